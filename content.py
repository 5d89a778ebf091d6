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


def articles_from_markdown(text, default_title):
    """The articles of a Markdown text, by one rule for the CLI and the page alike: every
    "# " heading outside code fences starts an article titled by it, and text before the
    first heading opens the first article's body; a text without such a heading is one
    article titled `default_title` (a file's name)."""
    preface, articles, in_code = [], [], False
    for line in text.replace('\r\n', '\n').split('\n'):
        if line.lstrip().startswith('```'):
            in_code = not in_code
        if not in_code and line.startswith('# ') and line[2:].strip():
            articles.append((line[2:].strip(), []))
        else:
            (articles[-1][1] if articles else preface).append(line)
    if not articles:
        return [{'title': default_title, 'content': '\n'.join(preface).strip()}]
    bodies = ['\n'.join(body).strip() for _, body in articles]
    bodies[0] = '\n\n'.join(part for part in ('\n'.join(preface).strip(), bodies[0]) if part)
    return [{'title': title, 'content': body} for (title, _), body in zip(articles, bodies)]
