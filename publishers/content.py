"""Article bodies: Markdown to the HTML editors accept, and a fingerprint to recognise a body again."""

import hashlib
import html.parser

import markdown

MARKDOWN_EXTENSIONS = ('fenced_code', 'tables', 'sane_lists')


def render_markdown(text):
    """Markdown to HTML. Fenced code keeps its language as a class, so editors that know
    code blocks (Zhihu's `<pre lang>`) can pick it up; blank lines do not become empty paragraphs."""
    return markdown.markdown(text, extensions=list(MARKDOWN_EXTENSIONS), output_format='html')


def text_content(fragment):
    """The text of an HTML fragment, as the DOM's textContent would give it."""
    parser = _TextCollector()
    parser.feed(fragment)
    parser.close()
    return ''.join(parser.parts)


def fingerprint(text):
    """sha256 of the text with all white space removed: platforms re-flow white space
    between blocks when they store a body, but keep its words."""
    return hashlib.sha256(''.join(text.split()).encode('utf-8')).hexdigest()


def html_fingerprint(fragment):
    return fingerprint(text_content(fragment))


class _TextCollector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []

    def handle_data(self, data):
        self.parts.append(data)
