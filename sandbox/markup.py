"""Article HTML: the tag whitelist the sandbox stores, and the text fingerprint it reports.

static/editor.js applies the same whitelist to pasted HTML in the browser; the server applies it again
because API clients can publish without the editor.
"""

import hashlib
import html
import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

ALLOWED_TAGS = frozenset(
    {'p', 'br', 'h1', 'h2', 'h3', 'h4', 'strong', 'em', 'code', 'pre', 'ul', 'ol', 'li', 'blockquote', 'a', 'img'}
)
VOID_TAGS = frozenset({'br', 'img'})
RENAMED_TAGS = {'b': 'strong', 'i': 'em'}
DROPPED_WITH_CONTENT = frozenset(
    {'script', 'style', 'template', 'iframe', 'object', 'embed', 'noscript', 'head', 'title', 'svg', 'math'}
)
URL_ATTRIBUTE = {'a': 'href', 'img': 'src'}
SAFE_SCHEMES = {'a': frozenset({'', 'http', 'https', 'mailto'}), 'img': frozenset({'', 'http', 'https'})}
URL_NOISE = re.compile(r'[\x00-\x20]')


def sanitize_html(untrusted: str) -> str:
    """Keep only whitelisted tags and their URL attribute; drop scripts, styles and event handlers."""
    sanitizer = _Sanitizer()
    sanitizer.feed(untrusted)
    sanitizer.close()
    return sanitizer.result()


def text_content(stored_html: str) -> str:
    """Concatenate the text nodes, like the DOM's textContent."""
    collector = _TextCollector()
    collector.feed(stored_html)
    collector.close()
    return ''.join(collector.texts)


def body_fingerprint(stored_html: str) -> str:
    """sha256 hex of the stripped text content: what /api/articles reports as body_sha256."""
    return hashlib.sha256(text_content(stored_html).strip().encode('utf-8')).hexdigest()


def is_safe_url(tag: str, url: str) -> bool:
    """Browsers ignore control characters and spaces inside a scheme (`java\\tscript:`), so do we."""
    cleaned = URL_NOISE.sub('', url).lower()
    if tag == 'img' and cleaned.startswith('data:image/'):
        return True
    return urlsplit(cleaned).scheme in SAFE_SCHEMES[tag]


class _Sanitizer(HTMLParser):
    """Rebuilds the document from allowed pieces only, closing every tag it opens."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []
        self.open_tags = []
        self.dropped_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in DROPPED_WITH_CONTENT:
            self.dropped_depth += 1
            return
        tag = RENAMED_TAGS.get(tag, tag)
        if self.dropped_depth or tag not in ALLOWED_TAGS:
            return
        url = self._safe_url(tag, attrs)
        if tag == 'img' and url is None:
            return
        self.parts.append(_start_tag(tag, url))
        if tag not in VOID_TAGS:
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        if tag in DROPPED_WITH_CONTENT:
            self.dropped_depth = max(0, self.dropped_depth - 1)
            return
        tag = RENAMED_TAGS.get(tag, tag)
        if self.dropped_depth or tag not in self.open_tags:
            return
        while self.open_tags:
            closed = self.open_tags.pop()
            self.parts.append(f'</{closed}>')
            if closed == tag:
                return

    def handle_data(self, data):
        if not self.dropped_depth:
            self.parts.append(html.escape(data, quote=False))

    def result(self):
        closing = [f'</{tag}>' for tag in reversed(self.open_tags)]
        return ''.join(self.parts + closing)

    @staticmethod
    def _safe_url(tag, attrs):
        wanted = URL_ATTRIBUTE.get(tag)
        for name, value in attrs:
            if name == wanted and value and is_safe_url(tag, value):
                return value.strip()
        return None


def _start_tag(tag, url):
    if url is None:
        return f'<{tag}>'
    return f'<{tag} {URL_ATTRIBUTE[tag]}="{html.escape(url, quote=True)}">'


class _TextCollector(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.texts = []

    def handle_data(self, data):
        self.texts.append(data)
