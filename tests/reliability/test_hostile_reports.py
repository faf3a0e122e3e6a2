"""Hostile output in reports: every payload of tests/hostile_payloads/ rendered into reports (by
agent/report.py directly, and through the real agent into the database) is inert markup: no
element or attribute that can run or load anything, and opened in headless Chromium no script
runs and nothing is fetched, with the page's Content-Security-Policy and without it. Invalid
UTF-8, control characters and bidi overrides come out as strict, visible text."""

from __future__ import annotations

import contextlib
import html
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest

from agent.report import render_report
from agent.sources import Collected, TodoFacts
from agent.store import open_store
from ctl import Client
from tests.harness import Agent, wait_for
from tests.markup import ALLOWED_ATTRS as MARKUP_ATTRS
from tests.markup import ALLOWED_TAGS
from tests.markup import BIDI as BIDI_CHARS
from tests.plugin_views import Browser, admin_page, render_views, view_problems
from tests.reliability.ledger import budget

pytestmark = [pytest.mark.reliability]

CORPUS = sorted((Path(__file__).resolve().parents[1] / "hostile_payloads").glob("[0-9]*"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--dump-dom",
    "--virtual-time-budget=2000",
]
ALLOWED_ATTRS = MARKUP_ATTRS | {"align"}
SAFE_HREF = re.compile(r"^(https?:|mailto:|#)", re.IGNORECASE)
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
BIDI = re.compile(f"[{BIDI_CHARS}]")
DETECTOR = (
    "<script>(function(){{var n={name!r};function hit(w){{try{{parent.document.body"
    ".setAttribute('data-xss-'+n,w)}}catch(e){{}};(new Image()).src='/hit/'+n+'/'+w}}"
    "window.alert=function(){{hit('alert')}};window.confirm=window.prompt=window.print="
    "window.alert}})()</script>"
)


def payloads() -> list[tuple[str, bytes]]:
    assert len(CORPUS) >= 50, f"the corpus has {len(CORPUS)} payloads, at least 50 are needed"
    return [(path.stem, path.read_bytes()) for path in CORPUS]


def as_text(data: bytes, beacon: str) -> str:
    # Raw bytes stay raw: invalid UTF-8 becomes lone surrogates, as a careless reader makes them.
    return data.replace(b"BEACON", beacon.encode()).decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- static checks


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.in_style = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ALLOWED_TAGS:
            self.problems.append(f"element <{tag}>")
        if tag == "style":
            self.in_style += 1
        for name, value in attrs:
            value = value or ""
            if name not in ALLOWED_ATTRS or name.startswith("on"):
                self.problems.append(f"attribute {name}= on <{tag}>")
            if name == "href" and not SAFE_HREF.match(value.strip()):
                self.problems.append(f"href {value[:60]!r}")
            if name == "style" and (tag not in ("td", "th") or not value.startswith("text-align")):
                self.problems.append(f"style {value[:60]!r} on <{tag}>")
            if name == "http-equiv" and value.lower() not in ("content-security-policy",):
                self.problems.append(f"meta http-equiv={value!r}")

    handle_startendtag = handle_starttag

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self.in_style -= 1

    def handle_data(self, data: str) -> None:
        if self.in_style and ("url(" in data or "@import" in data or "expression(" in data):
            self.problems.append(f"css {data[:60]!r}")

    def handle_pi(self, data: str) -> None:
        self.problems.append(f"processing instruction {data[:60]!r}")


def static_problems(page: str) -> list[str]:
    parser = _Markup()
    parser.feed(page)
    parser.close()
    problems = parser.problems
    if page.count("<style>") != 1 or page.count("<script") or page.count("<SCRIPT"):
        problems.append("a <script> or a second <style> in the markup")
    if CONTROL.search(page):
        problems.append(f"control character {CONTROL.search(page).group()!r}")  # type: ignore[union-attr]
    if BIDI.search(page):
        problems.append("a raw bidi control character")
    if re.search("[\ud800-\udfff]", page):
        problems.append("a lone surrogate")
    return problems


def report_pages(name: str, text: str) -> dict[str, str]:
    """The payload everywhere a report shows outside data: title, description, working
    directory, output (as markdown, and as plain text), emergency reason, system status and a
    collection problem."""
    facts = TodoFacts(title=text, description=text, working_directory=text)
    when = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
    normal = render_report(
        todo_id=7,
        todo=facts,
        collected=Collected(text, "message", (text,), True, False),
        kind="normal",
        started_at=when,
        completed_at=when,
    )
    emergency = render_report(
        todo_id=7,
        todo=facts,
        collected=Collected(text, "tmux", (text, text), False, False),
        kind="emergency",
        started_at=None,
        completed_at=when,
        reason=text,
        system_status=text,
    )
    return {f"{name}.md": normal.html, f"{name}.emergency": emergency.html}


# --------------------------------------------------------------------------- the browser


class Pages(Browser):
    """tests/plugin_views.Browser's server (/r/NAME serves a page; any other request is a hit,
    as is a call of the detector, /hit/NAME/...), with pages whose CSP can be stripped and one
    Chromium run that returns the DOM and the log."""

    def add(self, name: str, page: str, *, strip_csp: bool = False) -> None:
        if strip_csp:
            page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>\n?', "", page)
            assert "Content-Security-Policy" not in page
            page = page.replace("<head>", "<head>" + DETECTOR.format(name=name), 1)
        self.pages[name] = page

    def open_all(self, names: list[str]) -> tuple[str, str]:
        """Load every page at once (an index of iframes) in headless Chromium; return the
        index's DOM after the scripts had their chance, and Chromium's log."""
        frames = "".join(
            f'<iframe src="/r/{html.escape(n)}" width="900" height="300"></iframe>' for n in names
        )
        self.pages["index"] = (
            "<!DOCTYPE html><html><head><title>index-untouched</title></head>"
            f"<body>{frames}</body></html>"
        )
        profile = tempfile.mkdtemp(prefix="chromium-")
        try:
            result = subprocess.run(
                [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"{self.base}/r/index"],
                capture_output=True,
                timeout=90,
            )
        finally:
            shutil.rmtree(profile, ignore_errors=True)
        return result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")


@pytest.fixture
def pages() -> Iterator[Pages]:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (scripts/test installs it as root)")
    server = Pages()
    yield server
    server.close()


def _browser_verdict(pages: Pages, names: list[str], control: str) -> None:
    dom, log = pages.open_all([*names, control])
    fired = set(re.findall(r'data-xss-([^=\s]+)="', dom))
    assert "index-untouched" in dom, dom[:500]
    # The control page runs a payload unescaped: it proves the detector sees a script that runs.
    assert control in fired or any(h.startswith(f"/hit/{control}") for h in pages.hits), (
        f"the detector did not see the control page's script; hits {pages.hits}"
    )
    ran = sorted(fired - {control})
    loaded = [h for h in pages.hits if not h.startswith(f"/hit/{control}")]
    violations = [line for line in log.splitlines() if "Content Security Policy" in line]
    assert not ran, f"scripts ran in {ran}"
    assert not loaded, f"pages loaded {loaded[:10]}"
    assert not violations, "the markup tried something the CSP had to stop:\n" + "\n".join(
        violations[:5]
    )


def _add_control(pages: Pages) -> str:
    pages.add(
        "control",
        "<!DOCTYPE html><html><head></head><body><img src=/hit/control/img onerror=alert(1)>"
        "</body></html>",
        strip_csp=True,
    )
    return "control"


# --------------------------------------------------------------------------- the tests


@pytest.mark.slow
@pytest.mark.timeout(budget(180))
def test_rendered_reports_are_inert_in_chromium(pages: Pages) -> None:
    names: list[str] = []
    for name, data in payloads():
        text = as_text(data, pages.beacon(name))
        for page_name, page in report_pages(name, text).items():
            problems = static_problems(page)
            assert not problems, f"{page_name}: {problems}"
            pages.add(page_name, page)  # as stored, with its Content-Security-Policy
            pages.add(page_name + ".nocsp", page, strip_csp=True)  # the markup alone
            names += [page_name, page_name + ".nocsp"]
    _browser_verdict(pages, names, _add_control(pages))


def test_bytes_controls_and_bidi_become_strict_visible_text() -> None:
    raw = b"ok \xff\xfe end \xc0\xbc tag \xed\xa0\x80 cut:\xe2\x82"
    text = (
        raw.decode("utf-8", "surrogateescape")
        + " nul:\x00 bell:\x07 esc:\x1b[2J c1:\x9b31m del:\x7f cr:\r"
        + " rlo:\u202e lri:\u2066 pdi:\u2069 lrm:\u200e"
    )
    for page in report_pages("mixed", text).values():
        assert not static_problems(page)
        assert "\ufffd" in page  # every invalid byte shows as a replacement character
        for marker in ("⟦U+202E⟧", "⟦U+2066⟧", "⟦U+2069⟧", "⟦U+200E⟧"):
            assert marker in page  # bidi controls are shown, not obeyed
        assert "nul: bell: esc: c1: del: cr:" in page.replace("  ", " ")


@pytest.mark.slow
@pytest.mark.timeout(budget(240))
def test_reports_made_by_the_agent_are_inert_in_chromium(make_agent, tmpdir_short: Path) -> None:
    # The database holds Markdown: three views of each, opened in runs a loaded machine can
    # finish (tests/plugin_views.Browser); the beacons point at that browser's server.
    pages = Browser()
    agent: Agent = make_agent({"collect": {"transcript_wait": 0}}).start()
    store = open_store(f"sqlite:///{agent.sqlite_path}", timeout=10)
    store.ensure_schema(create_todo_table=True)
    client = Client(str(agent.config_path), timeout=5)
    todos: dict[int, str] = {}
    for n, (name, data) in enumerate(payloads()):
        text = as_text(data, pages.beacon(name))
        clean_title = text.encode("utf-8", "replace").decode("utf-8")[:200]
        todo = store.add_todo(clean_title, clean_title, clean_title)
        todos[todo] = name
        if n % 3 == 2:
            client.emergency(todo, reason=clean_title[:4000])
        elif data.isascii() and n % 3 == 0:
            client.complete(todo, output=text)
        else:
            # Raw bytes reach the agent as a session's output file.
            session = Path(agent.config["collect"]["session_dir"].format(todo_id=todo))
            session.mkdir(parents=True, exist_ok=True)
            (session / "output.txt").write_bytes(
                data.replace(b"BEACON", pages.beacon(name).encode())
            )
            client.complete(todo, output=None)
    store.close()

    def landed() -> bool:
        return all(
            (row := agent.todo_row(todo)) is not None and row["claude_html_output"]
            for todo in todos
        )

    wait_for(landed, 120, what="every hostile completion in the database")
    names: list[str] = []
    rows = {todo: agent.todo_row(todo) for todo in todos}
    # The database holds Markdown (report.db_format's default): open it as the todo plugin
    # shows it, through Parsedown with and without safe mode and escaped in <pre>.
    views = render_views([row["claude_html_output"] for row in rows.values() if row])
    for (todo, row), rendered in zip(rows.items(), views, strict=True):
        name = todos[todo]
        assert row is not None
        markdown = row["claude_html_output"]
        assert not CONTROL.search(markdown.replace("\n", "")) and not BIDI.search(markdown), name
        for column in ("claude_text_output", "claude_summary"):
            value = row[column] or ""
            assert not CONTROL.search(value) and not BIDI.search(value), (name, column)
        for view, html_view in rendered.items():
            problems = view_problems(html_view)
            assert not problems, f"{name} via {view}: {problems}"
            page_name = f"agent-{name}.{view}"
            pages.add(page_name, admin_page(page_name, html_view))
            names.append(page_name)
    try:
        pages.verdict(names)
    finally:
        pages.close()
    with contextlib.suppress(Exception):
        agent.stop()


def test_corpus_is_large_and_varied() -> None:
    items = payloads()
    assert len(items) >= 50
    joined = b"\n".join(data for _, data in items).lower()
    for needle in (b"<script", b"onerror", b"javascript:", b"<svg", b"data:", b"](", b"\xff"):
        assert needle in joined, needle
