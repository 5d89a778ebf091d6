"""Pictures of an article: which ones its body references, what their bytes are, and the body
with every picture pointing at the platform's own copy.

An article references a picture by an http(s) URL or by a name given with the article (its
bytes come with it and are stored in MySQL beside the task, so any worker host can publish
it). A picture is recognised by its bytes, never by its name. Remote pictures are fetched by
the worker, once per attempt, with a size limit and a timeout.
"""

import base64
import binascii
import dataclasses
import hashlib
import html
import re
import urllib.error
import urllib.parse
import urllib.request

import content



# (MIME type, file extension, test on the first bytes)
KINDS = (
    ('image/png', 'png', lambda head: head.startswith(b'\x89PNG\r\n\x1a\n')),
    ('image/jpeg', 'jpg', lambda head: head.startswith(b'\xff\xd8\xff')),
    ('image/gif', 'gif', lambda head: head[:6] in (b'GIF87a', b'GIF89a')),
    ('image/webp', 'webp', lambda head: head[:4] == b'RIFF' and head[8:12] == b'WEBP'),
)
EXTENSIONS = {mime: extension for mime, extension, _ in KINDS}
IMG_SRC = re.compile(r'(<img\b[^>]*?\bsrc=")([^"]*)(")', re.I)
NAME_MAX_CHARS = 200
FETCH_SECONDS = 15.0


class BadImage(ValueError):
    """A picture we will not take; `code` says which rule it broke, the message names it."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Picture:
    """One picture of an article: `source` is how the body references it (a name or a URL)."""
    source: str
    mime: str
    data: bytes

    @property
    def sha256(self):
        return hashlib.sha256(self.data).hexdigest()

    @property
    def file_name(self):
        return f'{self.sha256[:16]}.{EXTENSIONS[self.mime]}'


def image_kind(data):
    """The MIME type of a PNG, JPEG, GIF or WebP, by its bytes; None for anything else."""
    head = data[:16]
    return next((mime for mime, _, matches in KINDS if matches(head)), None)


def sources_in(body_html):
    """Every picture source the rendered body references, in order, each once (unescaped)."""
    return list(dict.fromkeys(html.unescape(match.group(2)) for match in IMG_SRC.finditer(body_html)))


def is_remote(source):
    return urllib.parse.urlsplit(source).scheme in ('http', 'https')


def replace_sources(body_html, new_sources):
    """The body with each picture source in `new_sources` ({old: new}) replaced."""
    def swap(match):
        old = html.unescape(match.group(2))
        new = new_sources.get(old)
        return match.group(0) if new is None else f'{match.group(1)}{html.escape(new, quote=True)}{match.group(3)}'
    return IMG_SRC.sub(swap, body_html)


def checked_images(markdown_text, given, max_bytes, max_count):
    """The pictures an article sends (`given`: {name: base64}) that its Markdown references, as
    Pictures, after every rule: at most `max_count` pictures in all, each at most `max_bytes`,
    each a PNG, JPEG, GIF or WebP by its bytes, and every name the body references sent."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise BadImage('invalid_images', '"images" must be an object of {"name.png": "<base64>"}')
    sources = sources_in(content.render_markdown(markdown_text))
    if len(sources) > max_count:
        raise BadImage('too_many_images', f'it references {len(sources)} pictures, at most {max_count} are allowed')
    pictures = []
    for source in sources:
        if is_remote(source):
            continue
        if source not in given:
            raise BadImage('image_missing', f'it references the picture "{source[:NAME_MAX_CHARS]}", which was not '
                                            'sent in "images"')
        pictures.append(decoded_picture(source, given[source], max_bytes))
    return pictures


def decoded_picture(name, encoded, max_bytes):
    if not isinstance(encoded, str) or len(name) > NAME_MAX_CHARS:
        raise BadImage('invalid_image', f'the picture "{name[:NAME_MAX_CHARS]}" must be sent as base64 text')
    if len(encoded) * 3 // 4 > max_bytes + 3:
        raise BadImage('image_too_large', f'the picture "{name}" is over {max_bytes} bytes')
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage('invalid_image', f'the picture "{name}" is not valid base64') from None
    return picture_from_bytes(name, data, max_bytes)


def picture_from_bytes(source, data, max_bytes):
    if len(data) > max_bytes:
        raise BadImage('image_too_large', f'the picture "{source}" is {len(data)} bytes, at most {max_bytes} are allowed')
    mime = image_kind(data)
    if mime is None:
        raise BadImage('invalid_image', f'"{source}" is not a PNG, JPEG, GIF or WebP picture (judged by its bytes)')
    return Picture(source, mime, data)


class PictureUnavailable(Exception):
    """A remote picture that cannot be had now (`retryable`) or cannot be used at all."""

    def __init__(self, message, retryable):
        super().__init__(message)
        self.retryable = retryable


def fetch_picture(url, max_bytes, timeout=FETCH_SECONDS):
    """A remote picture's bytes, read by the worker; PictureUnavailable naming its URL."""
    request = urllib.request.Request(url, headers={'User-Agent': 'TOP_N image fetch'})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise PictureUnavailable(f'图片 {url} 无法下载，稍后自动重试 (could not fetch the picture {url}: '
                                 f'{getattr(error, "reason", error)})', retryable=True) from None
    try:
        return picture_from_bytes(url, data, max_bytes)
    except BadImage as bad:
        raise PictureUnavailable(f'图片 {url} 不可用：{bad} (the picture at {url} cannot be used)',
                                 retryable=False) from None
