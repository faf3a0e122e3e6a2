"""The completion report: one self-contained, script-free HTML page, plus its text and summary.

Agent output is untrusted. Every piece of it goes through the same pipeline, in this order:
cap (head and tail kept, "N bytes omitted" note) before any other work, so a 100 MB output costs
no more than a 1 MB one; decode invalid UTF-8 and lone surrogates to U+FFFD; strip terminal
escape sequences and C0/C1 control characters (tab and newline stay, CRLF becomes LF); make
bidi controls visible as "⟦U+202E⟧"; then escape. Markdown is rendered by markdown-it-pyrs (the
markdown-it rules, compiled) with raw HTML off and images shown as text, and its HTML is then
cleaned by nh3 to the tags those rules emit, with links limited to http, https, mailto and
in-page anchors; above ``MARKDOWN_MAX_BYTES`` or when the rendering does not fit the page, the
output is shown escaped in ``<pre>``.

The page does not rely on its Content-Security-Policy for safety: it may be shown embedded in a
page whose own policy applies, so the markup itself carries no scripts, handlers or outside
resources, and the policy is a second wall.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from html import escape

import nh3
from markdown_it_pyrs import MarkdownIt as FastMarkdown

from agent.reasons import localize
from agent.report_markdown import report_markdown
from agent.session_facts import SessionFacts
from agent.session_report import GitEvidence, session_view
from agent.sources import (
    NOTE_RESERVE,
    Collected,
    TodoFacts,
    cap_text,
    omission_note,
    split_for_cap,
    strip_escape_sequences,
)
from agent.store.profile import zone_label

# default-src does not cover base-uri and form-action, so they are closed by name.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)
MARKDOWN_MAX_BYTES = 128 * 1024  # a bound on hostile input (set for markdown-it-py's ~100 KB/s)
SUMMARY_MAX_CHARS = 150  # the plugin's limit for claude_summary
MIN_REPORT_BYTES = 64 * 1024  # room for the page's fixed parts and every capped field

_TITLE_MAX_BYTES = 1000
_REASON_MAX_BYTES = 4000
_WORKDIR_MAX_BYTES = 2000
_PROBLEM_MAX_BYTES = 2000
_SAFE_LINK_SCHEMES = ("http:", "https:", "mailto:")

_SURROGATE_RE = re.compile("[\ud800-\udfff]")
# C0 except tab and newline, DEL, C1: after escape sequences are gone, what is left is noise
# or a trick (NUL truncating a C reader, a lone CR overwriting a line in a terminal).
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Bidi embeddings, overrides, isolates and marks: they reorder what a reader sees (Trojan Source).
_BIDI_RE = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


class Report:
    """``html``: the standalone page, for the archive's report.html; ``text``: the sanitized,
    capped plain output, for claude_text_output; ``summary``: one plain line of at most
    SUMMARY_MAX_CHARS, for claude_summary; ``db``: what goes into claude_html_output, in
    ``report.db_format``.

    The page may be given as ``page``, a function that builds it: it is then built on first
    use of ``html`` (once), so a completion whose page nobody needs (the default Markdown in
    the database, no session files to archive) does not pay for rendering it."""

    __slots__ = ("_html", "_page", "db", "summary", "text")

    def __init__(
        self,
        html: str | None = None,
        text: str = "",
        summary: str = "",
        db: str = "",
        *,
        page: Callable[[], str] | None = None,
    ) -> None:
        if (html is None) == (page is None):
            raise ValueError("give the page (html) or how to build it (page), not both")
        self._html, self._page = html, page
        self.text, self.summary, self.db = text, summary, db

    @property
    def html(self) -> str:
        if self._html is None:
            assert self._page is not None
            self._html, self._page = self._page(), None
        return self._html

    @property
    def for_database(self) -> str:
        return self.db or self.html


# Every fixed string of the report and the summary, per `report.language`.
STRINGS: dict[str, dict[str, str]] = {
    "de": {
        "done": "erledigt",
        "forced": "zwangsweise abgeschlossen",
        "todo": "Todo",
        "completion": "Abschluss",
        "kind": "Art",
        "kind_normal": "normal",
        "kind_emergency": "Notabschluss (erzwungen)",
        "started": "Gestartet",
        "completed": "Abgeschlossen",
        "source": "Quelle der Ausgabe",
        "html_reduced": "HTML auf Text reduziert",
        "workdir": "Arbeitsverzeichnis",
        "summary": "Zusammenfassung",
        "description": "Beschreibung",
        "output": "Ausgabe",
        "no_output": "Es wurde keine Ausgabe gesammelt.",
        "problems": "Probleme beim Sammeln",
        "no_problems": "Keine.",
        "more_problems": "… und {n} weitere, nicht gezeigt.",
        "forced_title": "Erzwungener Abschluss",
        "forced_text": (
            "Dieses Todo wurde erzwungen abgeschlossen, nicht von seiner Sitzung. Grund:"
        ),
        "no_reason": "kein Grund angegeben",
        "system": "Systemzustand",
        "unknown": "unbekannt",
        "db_only": "Keine Sitzungsausgabe gefunden; das Todo so, wie die Datenbank es kennt.",
        "emergency_lead": "Notabschluss",
        "report": "Abschlussbericht",
        "too_large": "[… zu groß zum Anzeigen …]",
    },
    "en": {
        "done": "done",
        "forced": "completed by force",
        "todo": "Todo",
        "completion": "Completion",
        "kind": "Kind",
        "kind_normal": "normal",
        "kind_emergency": "emergency (forced)",
        "started": "Started",
        "completed": "Completed",
        "source": "Output source",
        "html_reduced": "HTML reduced to plain text",
        "workdir": "Working directory",
        "summary": "Summary",
        "description": "Description",
        "output": "Output",
        "no_output": "No output was collected.",
        "problems": "Collection problems",
        "no_problems": "There were none.",
        "more_problems": "… and {n} more, not shown.",
        "forced_title": "Forced completion",
        "forced_text": "This todo was completed by force, not by its session. Reason:",
        "no_reason": "no reason given",
        "system": "System status",
        "unknown": "unknown",
        "db_only": "No session output was found; the todo is shown as the database knows it.",
        "emergency_lead": "Forced completion",
        "report": "completion report",
        "too_large": "[… too large to show …]",
    },
}


def render_report(
    *,
    todo_id: int,
    todo: TodoFacts | None,
    collected: Collected,
    kind: str,
    started_at: datetime | None,
    completed_at: datetime,
    reason: str | None = None,
    system_status: str | None = None,
    max_output_bytes: int = 1_000_000,
    max_report_bytes: int = 2 * 1024 * 1024,
    zone: tzinfo | None = None,
    language: str = "de",
    db_format: str = "markdown",
    session: SessionFacts | None = None,
    evidence: GitEvidence | None = None,
) -> Report:
    """Build the report for one completion. ``kind`` is "normal" or "emergency".

    ``collected.text`` may also be bytes (decoded with replacement here). Naive datetimes are
    taken as UTC and shown in ``zone`` (None: UTC) with the zone's name. ``db_format`` picks
    what ``Report.db`` holds: "markdown" (what the todo plugin renders), "html_fragment" or
    "page"; ``Report.html`` is always the standalone page for the archive (with "markdown",
    built when first asked for: an error in it is raised then). Raises ValueError only for a
    ``max_report_bytes`` below ``MIN_REPORT_BYTES``.
    """
    words = STRINGS.get(language, STRINGS["de"])
    if reason:
        reason = localize(reason, language)  # the agent's own reasons: in the report's language
    zone = zone if zone is not None else UTC
    # Any other kind the journal may carry is reported as normal: a report must not fail on it.
    kind = "emergency" if kind == "emergency" else "normal"
    if max_report_bytes < MIN_REPORT_BYTES:
        raise ValueError(f"max_report_bytes must be at least {MIN_REPORT_BYTES}")
    field_budget = max_report_bytes // 16  # description, system status, problems: each

    text = sanitize_capped(collected.text, max_output_bytes)
    view = session_view(
        session,
        evidence,
        answer=text,
        source=collected.source,
        language=language,
        zone=zone,
        clean=_one_clean_line,
    )
    summary = _summary(text, kind=kind, reason=reason, source=collected.source, words=words)
    if kind != "emergency" and view.summary:
        # The plugin's pattern: what the session did, counted; ⚠️ when its claim looks wrong.
        summary = one_line(view.summary, warning=view.warning is not None)

    if todo is not None and todo.title.strip():
        title = " ".join(sanitize_capped(todo.title, _TITLE_MAX_BYTES).split())
    else:
        title = f"todo {todo_id}"
    description = sanitize_capped(todo.description, field_budget) if todo else ""
    workdir = sanitize_capped(todo.working_directory, _WORKDIR_MAX_BYTES) if todo else ""
    problems = [sanitize_capped(problem, _PROBLEM_MAX_BYTES) for problem in collected.problems]

    facts = _fact_rows(
        todo_id=todo_id,
        workdir=workdir,
        kind=kind,
        started_at=started_at,
        completed_at=completed_at,
        collected=collected,
        zone=zone,
        words=words,
    )

    def sections_and_page() -> tuple[list[str], str]:
        sections = [_header(todo_id, title, kind, words), _facts(facts, words)]
        if kind == "emergency":
            sections.append(_emergency(reason, system_status, field_budget, words))
        sections.append(
            f'<section><h2>{words["summary"]}</h2><p class="summary">{escape(summary)}</p>'
            "</section>"
        )
        if description.strip():
            sections.append(
                f"<section><h2>{words['description']}</h2>"
                + _fit_html(description, field_budget, _pre)
                + "</section>"
            )
        if view.warning:
            sections.insert(1, f'<p class="warning">⚠️ {escape(view.warning)}</p>')
        for heading, items in view.sections:
            lis = "".join(f"<li>{escape(item, quote=False)}</li>" for item in items)
            sections.append(f"<section><h2>{escape(heading)}</h2><ul>{lis}</ul></section>")
        sections.append(_problems(problems, field_budget, words))
        output_at = len(sections) - 1  # the output goes before the problems section

        # The output gets whatever room the rest of the page leaves (16: its joining newline).
        room = max_report_bytes - _utf8_len(_page(title, todo_id, sections, language, words)) - 16
        sections.insert(output_at, _output_section(text, collected, room, words))
        page = _page(title, todo_id, sections, language, words)
        # Every part above is fitted to its budget; this guards the arithmetic, not the input.
        if _utf8_len(page) > max_report_bytes:
            raise AssertionError("report exceeds max_report_bytes")
        return sections, page

    if db_format == "page":
        _, page = sections_and_page()
        return Report(html=page, text=text, summary=summary, db=page)
    if db_format == "html_fragment":
        sections, page = sections_and_page()
        return Report(html=page, text=text, summary=summary, db=_fragment(sections, language))
    db = report_markdown(
        todo_id=todo_id,
        title=title,
        kind=kind,
        facts=facts,
        summary=summary,
        description=description,
        text=text,
        reason=sanitize_capped(reason, _REASON_MAX_BYTES) if reason else None,
        system_status=sanitize_capped(system_status, field_budget) if system_status else None,
        problems=problems,
        max_bytes=max_report_bytes,
        words=words,
        session=view.sections,
        warning=view.warning,
    )
    # The page (the rendered output above all) only for whoever asks for it: the archive.
    return Report(text=text, summary=summary, db=db, page=lambda: sections_and_page()[1])


# --- the untrusted-text pipeline ---


def sanitize(data: str | bytes) -> str:
    """Untrusted output made safe to show: decoded, escape sequences and controls stripped,
    bidi controls made visible. Not capped and not HTML-escaped: see ``sanitize_capped``."""
    if isinstance(data, bytes):
        text = data.decode("utf-8", "replace")
    else:
        text = _SURROGATE_RE.sub("\ufffd", data)
    text = strip_escape_sequences(text.replace("\r\n", "\n"))
    text = _CONTROL_RE.sub("", text)
    return _BIDI_RE.sub(lambda m: f"⟦U+{ord(m.group()):04X}⟧", text)


def sanitize_capped(data: str | bytes, max_bytes: int) -> str:
    """``sanitize`` after capping to ``max_bytes``; the result is at most ``max_bytes`` of UTF-8.

    Head and tail are sanitized apart, so an escape sequence left open at the cut cannot swallow
    the omission note.
    """
    head, omitted, tail = split_for_cap(data, max_bytes)
    if omitted:
        head, omitted, tail = split_for_cap(data, max(0, max_bytes - NOTE_RESERVE))
        text = sanitize(head) + omission_note(omitted) + sanitize(tail)
    else:
        text = sanitize(head)
    # Visible bidi markers are longer than what they replace; cap again if they tipped it over.
    return cap_text(text, max_bytes) if _utf8_len(text) > max_bytes else text


def _summary(
    text: str, *, kind: str, reason: str | None, source: str, words: dict[str, str]
) -> str:
    """One plain line of at most SUMMARY_MAX_CHARS: "✅ " (or "⚠️ " when forced) and what
    was done, with markup, links and line breaks taken out."""
    if kind == "emergency":
        said = plain_line(sanitize_capped(reason or words["no_reason"], _REASON_MAX_BYTES))
        return one_line(f"{words['emergency_lead']}: {said}", warning=True)
    if source == "none" or not text.strip():
        body = words["no_output"]
    elif source == "database":
        body = words["db_only"]
    else:
        body = _first_lines(text)
    return one_line(body, warning=False)


_MD_LINK_RE = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_TAG_RE = re.compile(r"</?[A-Za-z!?/][^>]*>")
_MARKS_RE = re.compile(r"(\*\*|__|`+|~~)")


def _one_clean_line(text: str) -> str:
    """Untrusted text (a path, a command, an error) as one sanitized line of bounded size."""
    return " ".join(sanitize_capped(text, 2000).split())


def plain_line(text: str) -> str:
    """`text` as one line without markup: links as their text, tags and emphasis marks gone."""
    text = _MD_LINK_RE.sub(lambda m: m.group(1), text)
    text = _TAG_RE.sub(" ", text)
    text = _MARKS_RE.sub("", text)
    text = text.replace("<", "\u2039").replace(">", "\u203a")  # single angle quotes
    return " ".join(text.split())


def one_line(body: str, *, warning: bool) -> str:
    """The summary's form: the plugin's ✅/⚠️ prefix, one plain line, ≤ SUMMARY_MAX_CHARS."""
    prefix = "⚠️ " if warning else "✅ "
    line = prefix + plain_line(body)
    if len(line) > SUMMARY_MAX_CHARS:
        line = line[: SUMMARY_MAX_CHARS - 1].rstrip() + "…"
    return line


def _first_lines(text: str) -> str:
    """The first meaningful prose lines: markdown decoration, fences and blank lines skipped."""
    kept: list[str] = []
    length = 0
    in_fence = False
    for line in text[: SUMMARY_MAX_CHARS * 40].split("\n"):
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        if in_fence or not stripped or not stripped.strip("-*_=#|:> "):
            continue
        stripped = stripped.lstrip("#> ").strip()
        kept.append(stripped)
        length += len(stripped) + 1
        if length >= SUMMARY_MAX_CHARS:
            break
    if not kept:  # all code: the first lines are still better than nothing
        kept = [line.strip() for line in text[: SUMMARY_MAX_CHARS * 4].split("\n") if line.strip()]
    return " ".join(kept)


# --- markdown ---


def _is_safe_link(url: str) -> bool:
    lowered = url.strip().lower()
    return lowered.startswith(_SAFE_LINK_SCHEMES) or lowered.startswith("#")


# markdown-it-pyrs (markdown-it's rules, compiled): CommonMark without raw HTML (html_block and
# html_inline are left out, so "<script>" in the output is shown as text), plus tables and
# strikethrough. Its own link check already refuses javascript:, vbscript: and file:.
_MARKDOWN_RULES = (
    *("blockquote", "code", "fence", "heading", "hr", "lheading", "list", "paragraph"),
    *("reference", "autolink", "backticks", "emphasis", "entity", "escape", "image", "link"),
    *("newline", "table", "strikethrough"),
)
_MARKDOWN = FastMarkdown("zero").enable_many(list(_MARKDOWN_RULES))  # type: ignore[arg-type]
# An image would load from outside (a tracking pixel where no CSP applies): its alt text is shown
# instead. The renderer escapes attribute values, so a quote cannot end one early.
_IMAGE_RE = re.compile(r'<img src="[^"]*" alt="([^"]*)"[^>]*>')
# Then nh3 (ammonia) keeps only what the renderer may emit for those rules, and links only to
# http, https, mailto and in-page anchors: the line between output text and markup does not
# rest on the renderer alone.
_CLEAN_TAGS = {
    *("p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "pre", "code", "em", "strong"),
    *("a", "blockquote", "hr", "br", "table", "thead", "tbody", "tr", "th", "td", "s"),
}
_CLEAN_ATTRIBUTES = {
    "a": {"href", "title"},
    "code": {"class"},
    "ol": {"start"},
    "th": {"style"},
    "td": {"style"},
}
_LINK_REL = "nofollow noopener noreferrer"


def _keep_attribute(tag: str, name: str, value: str) -> str | None:
    if name == "href" and not _is_safe_link(value):
        return None  # relative links too: the page is shown from an archive or a database row
    return value


def _markdown(text: str) -> str:
    rendered = _IMAGE_RE.sub(
        lambda m: f"[image: {m.group(1)}]" if m.group(1) else "[image]",
        _MARKDOWN.render(text),
    )
    clean = nh3.clean(
        rendered,
        tags=_CLEAN_TAGS,
        attributes=_CLEAN_ATTRIBUTES,
        attribute_filter=_keep_attribute,
        url_schemes={"http", "https", "mailto"},
        link_rel=_LINK_REL,
        filter_style_properties={"text-align"},
        strip_comments=True,
    )
    return f'<div class="output markdown">{clean}</div>'


def _pre(text: str) -> str:
    return f"<pre>{escape(text, quote=False)}</pre>"


def _fit_html(text: str, budget: int, render: Callable[[str], str]) -> str:
    """``render(text)``, with ``text`` cut further until the markup fits ``budget`` bytes.

    Escaping can multiply the size (``&`` becomes ``&amp;``), so the cut is found by measuring.
    """
    for _ in range(8):
        markup = render(text)
        size = _utf8_len(markup)
        if size <= budget:
            return markup
        keep = int(_utf8_len(text) * budget / size * 0.9) - NOTE_RESERVE
        text = cap_text(text, max(0, keep))
    return render("[… too large to show …]")


# --- the page ---

_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;
color:#1d1d1f;background:#fff}
h1{font-size:1.5rem;margin:0 0 .25rem}h2{font-size:1.1rem;margin:1.5rem 0 .5rem;
border-bottom:1px solid #ddd}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem}dt{font-weight:600}
dd{margin:0}pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f8fa;padding:.75rem;
border-radius:4px}code{font-family:ui-monospace,monospace}
.kind{display:inline-block;padding:0 .5rem;border-radius:3px;background:#e8f0fe}
.emergency .kind,section.emergency{background:#fdecea}section.emergency{padding:.5rem 1rem}
.markdown pre{background:#f6f8fa}.markdown table{border-collapse:collapse}
.markdown td,.markdown th{border:1px solid #ddd;padding:.25rem .5rem}
.none{color:#555}
""".strip()


def _page(
    title: str, todo_id: int, sections: list[str], language: str, words: dict[str, str]
) -> str:
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="{language}">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{words['todo']} {todo_id}{': ' + escape(title) if title else ''}"
        f" — {words['report']}</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(section for section in sections if section)
        + "\n</body>\n</html>\n"
    )


_FRAGMENT_START = '<div class="completion-report"'  # how every fragment begins


def page_of_stored(stored: str, todo_id: int, language: str) -> str:
    """A standalone page of a report as the database row (and the journal) holds it, in any
    ``report.db_format``: a page as it is; a fragment, or Markdown rendered through the same
    pipeline as the output's (no raw HTML, sanitized), inside the report's head, style and CSP.
    For the dashboard's report frame."""
    if stored.startswith("<!DOCTYPE html>"):
        return stored
    body = stored if stored.startswith(_FRAGMENT_START) else _markdown(stored)
    return _page("", todo_id, [body], language, STRINGS.get(language, STRINGS["en"]))


def _fragment(sections: list[str], language: str) -> str:
    """The page's sections without document, head or style: for a page that embeds it."""
    body = "\n".join(section for section in sections if section)
    return f'{_FRAGMENT_START} lang="{language}">\n{body}\n</div>\n'


def _header(todo_id: int, title: str, kind: str, words: dict[str, str]) -> str:
    label = words["kind_emergency"] if kind == "emergency" else words["done"]
    return (
        f'<header class="{kind}"><h1>{escape(title)}</h1>'
        f'<p>{words["todo"]} {todo_id} · <span class="kind">{label}</span></p></header>'
    )


def _fact_rows(
    *,
    todo_id: int,
    workdir: str,
    kind: str,
    started_at: datetime | None,
    completed_at: datetime,
    collected: Collected,
    zone: tzinfo,
    words: dict[str, str],
) -> list[tuple[str, str]]:
    source = collected.source
    if collected.is_html:
        source += f" ({words['html_reduced']})"
    rows = [
        (words["todo"], str(todo_id)),
        (words["kind"], words["kind_emergency"] if kind == "emergency" else words["kind_normal"]),
        (words["started"], when(started_at, zone, words)),
        (words["completed"], when(completed_at, zone, words)),
        (words["source"], source),
    ]
    if workdir.strip():
        rows.append((words["workdir"], workdir))
    return rows


def _facts(rows: list[tuple[str, str]], words: dict[str, str]) -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    return f"<section><h2>{words['completion']}</h2><dl>{items}</dl></section>"


def _emergency(
    reason: str | None, system_status: str | None, budget: int, words: dict[str, str]
) -> str:
    said = sanitize_capped(reason, _REASON_MAX_BYTES) if reason else words["no_reason"]
    parts = [
        f'<section class="emergency"><h2>{words["forced_title"]}</h2>',
        f"<p>{words['forced_text']} {escape(said)}</p>",
    ]
    if system_status:
        status = sanitize_capped(system_status, budget)
        parts.append(f"<h3>{words['system']}</h3>" + _fit_html(status, budget, _pre))
    parts.append("</section>")
    return "".join(parts)


def _output_section(text: str, collected: Collected, room: int, words: dict[str, str]) -> str:
    head = f"<section><h2>{words['output']}</h2>"
    tail = "</section>"
    room -= len(head.encode()) + len(tail)
    if not text.strip():
        return head + f'<p class="none">{words["no_output"]}</p>' + tail
    if collected.is_markdown and _utf8_len(text) <= MARKDOWN_MAX_BYTES:
        rendered = _markdown(text)
        if _utf8_len(rendered) <= room:
            return head + rendered + tail
    return head + _fit_html(text, room, _pre) + tail


def _problems(problems: list[str], budget: int, words: dict[str, str]) -> str:
    head = f"<section><h2>{words['problems']}</h2>"
    if not problems:
        return head + f'<p class="none">{words["no_problems"]}</p></section>'
    items: list[str] = []
    used = 0
    for index, problem in enumerate(problems):
        item = f"<li>{escape(problem, quote=False)}</li>"
        if used + len(item.encode("utf-8")) > budget - 200:
            more = words["more_problems"].format(n=len(problems) - index)
            items.append(f"<li>{more}</li>")
            break
        items.append(item)
        used += len(item.encode("utf-8"))
    return head + "<ul>" + "".join(items) + "</ul></section>"


def when(moment: datetime | None, zone: tzinfo, words: dict[str, str]) -> str:
    """A moment on the site's clock with the zone's name: '2026-12-02 03:20:00 Europe/Berlin'."""
    if moment is None:
        return words["unknown"]
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return f"{moment.astimezone(zone):%Y-%m-%d %H:%M:%S} {zone_label(zone, moment)}"


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
