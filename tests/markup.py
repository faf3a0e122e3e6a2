"""What a completion report may contain, and a parser to list what it does contain: shared by
the report's unit tests, the collector's end-to-end tests and the hostile-report suite."""

from __future__ import annotations

from html.parser import HTMLParser

# The page's own markup plus what the markdown renderer emits for commonmark, tables and
# strikethrough (after nh3 cleaned it).
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "section", "h1", "h2", "h3",
    "h4", "h5", "h6", "p", "span", "div", "dl", "dt", "dd", "ul", "ol", "li", "pre", "code",
    "em", "strong", "a", "blockquote", "hr", "br", "table", "thead", "tbody", "tr", "th", "td",
    "s",
}  # fmt: skip
ALLOWED_ATTRS = {"lang", "charset", "http-equiv", "content", "name", "class", "href", "rel"}
ALLOWED_ATTRS |= {"title", "style"}  # style: only on td/th, from markdown tables
ALLOWED_ATTRS |= {"start"}  # an ordered list that starts at another number
# Bidi embeddings, overrides, isolates and marks: a report shows them as "⟦U+202E⟧" instead.
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"


class Markup(HTMLParser):
    """Every start tag of a page with its attributes, in order."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))

    handle_startendtag = handle_starttag

    def attrs(self, tag: str, name: str) -> list[str | None]:
        return [v for t, attrs in self.tags if t == tag for k, v in attrs if k == name]
