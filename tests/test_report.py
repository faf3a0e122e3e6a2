"""The report is safe with hostile output, bounded for huge output, and says what happened.

``tests/hostile/`` holds a corpus of hostile outputs (script and attribute injection, dangerous
markdown links, SVG, terminal escapes with invalid UTF-8, bidi overrides); every file is rendered
both as markdown and as plain text.
"""

from __future__ import annotations

import time
import tracemalloc
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent import git_evidence, reasons
from agent.report import (
    CONTENT_SECURITY_POLICY,
    MARKDOWN_MAX_BYTES,
    page_of_stored,
    render_report,
    sanitize,
)
from agent.sources import Collected, TodoFacts
from tests.markup import ALLOWED_TAGS, BIDI, Markup

HOSTILE = sorted((Path(__file__).parent / "hostile").iterdir())
TODO = TodoFacts("Login-Formular validieren", "E-Mail & Passwort <prüfen>", "/srv/sites/plugin")
STARTED = datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)
COMPLETED = datetime(2026, 11, 28, 9, 1, 32, tzinfo=UTC)


def report(text, *, source="transcript", is_markdown=True, problems=(), **kwargs):
    collected = Collected(text, source, tuple(problems), is_markdown, kwargs.pop("is_html", False))
    args = dict(
        todo_id=42,
        todo=TODO,
        collected=collected,
        kind="normal",
        started_at=STARTED,
        completed_at=COMPLETED,
        language="en",
    )
    args.update(kwargs)
    return render_report(**args)


def assert_safe(page: str) -> Markup:
    page.encode("utf-8")  # strict: raises on lone surrogates
    markup = Markup(page)
    tags = {tag for tag, _ in markup.tags}
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS
    for tag, attrs in markup.tags:
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name, value)
            assert name in {"lang", "charset", "http-equiv", "content", "name", "class"} | {
                "href",
                "rel",
                "title",
                "style",
                "start",
            }, (tag, name)
            assert name != "start" or tag == "ol", (tag, name)
    for href in markup.attrs("a", "href"):
        assert href is not None
        assert href.startswith(("https://", "http://", "mailto:", "#")), href
    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    assert "<svg" not in page.lower()
    assert markup.attrs("meta", "content").count(CONTENT_SECURITY_POLICY) == 1
    assert markup.attrs("meta", "http-equiv") == ["Content-Security-Policy"]
    assert markup.attrs("meta", "charset") == ["utf-8"]
    assert "\x1b" not in page and "\x00" not in page
    assert not any(ch in page for ch in BIDI)
    return markup


@pytest.mark.parametrize("is_markdown", [True, False], ids=["markdown", "plain"])
@pytest.mark.parametrize("path", HOSTILE, ids=[path.name for path in HOSTILE])
def test_hostile_output_cannot_inject_markup(path, is_markdown):
    result = report(path.read_bytes(), is_markdown=is_markdown)
    assert_safe(result.html)
    for field in (result.text, result.summary):
        field.encode("utf-8")
        assert "\x1b" not in field and "\x00" not in field
        assert not any(ch in field for ch in BIDI)


@pytest.mark.parametrize("path", HOSTILE, ids=[path.name for path in HOSTILE])
def test_the_stored_markdown_shown_as_a_page_is_as_safe_as_the_report(path):
    stored = report(path.read_bytes(), db_format="markdown").db
    assert not stored.startswith("<")
    assert_safe(page_of_stored(stored, 42, "en"))


@pytest.mark.parametrize("db_format", ["markdown", "html_fragment", "page"])
def test_the_stored_report_becomes_one_page_in_every_db_format(db_format):
    stored = report("# Done\n\nAll **tests** pass.", db_format=db_format).db
    page = page_of_stored(stored, 42, "en")
    assert_safe(page)
    assert page.count("<!DOCTYPE html>") == 1
    assert "<h2>" in page and "\n## " not in page  # rendered, not shown raw
    assert "All **tests** pass." in page or "<strong>tests</strong>" in page
    if db_format == "page":
        assert page == stored


def test_dangerous_markdown_links_lose_their_href():
    page = report((Path(__file__).parent / "hostile" / "links.md").read_text()).html
    markup = assert_safe(page)
    hrefs = markup.attrs("a", "href")
    assert hrefs == [
        "https://example.com",
        "https://example.com/ok?a=1&b=2",
        "mailto:someone@example.com",
    ]
    assert set(markup.attrs("a", "rel")) == {"nofollow noopener noreferrer"}
    assert "[image: tracking pixel]" in page


def test_raw_html_in_markdown_is_shown_as_text():
    page = report('Done "><img src=x onerror=alert(1)> <script>alert(1)</script>').html
    assert_safe(page)
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_terminal_output_is_stripped_and_invalid_utf8_replaced():
    result = report((Path(__file__).parent / "hostile" / "terminal.bin").read_bytes())
    text = result.text
    assert "plain red bold orange" in text
    assert "osc8 link and bel link" in text
    assert "window title" not in text and "javascript" not in text
    assert "nul::" in text and "crlf line\nlone" in text
    assert "\ufffd" in text
    assert "\r" not in text
    assert all(ch in "\t\n" or ord(ch) >= 0x20 for ch in text)
    assert not any(0x7F <= ord(ch) <= 0x9F for ch in text)


def test_bidi_controls_are_made_visible():
    result = report("user\u202e \u2066// admin\u2069 \u200f", is_markdown=False)
    assert "⟦U+202E⟧" in result.text and "⟦U+2066⟧" in result.text
    assert "⟦U+2069⟧" in result.text and "⟦U+200F⟧" in result.text
    assert "⟦U+202E⟧" in result.html


def test_lone_surrogates_become_replacement_characters():
    result = report("broken \ud800 pair \udfff end")
    assert result.text == "broken \ufffd pair \ufffd end"
    result.html.encode("utf-8")


def test_sanitize_keeps_tabs_and_newlines_and_normalizes_crlf():
    assert sanitize("a\tb\r\nc\x00\x07\x08d\x7f\x85e") == "a\tb\ncde"
    assert sanitize(b"ok \xff\xfe") == "ok \ufffd\ufffd"


def test_page_says_what_happened():
    result = report(
        "## Fertig\n\nAlle Tests laufen.",
        problems=["message: the message carried only empty output"],
    )
    page = result.html
    assert_safe(page)
    assert "Login-Formular validieren" in page
    assert "E-Mail &amp; Passwort &lt;prüfen&gt;" in page
    assert "2026-11-28 09:00:00 UTC" in page and "2026-11-28 09:01:32 UTC" in page
    assert "transcript" in page
    assert "<h2>Fertig</h2>" in page
    assert "Collection problems" in page
    assert "<li>message: the message carried only empty output</li>" in page
    assert result.summary == "✅ Fertig Alle Tests laufen."


def test_no_problems_is_said():
    page = report("fine").html
    assert "Collection problems" in page and "There were none." in page


def test_every_problem_is_listed():
    problems = [f"source{i}: failed because <{i}>" for i in range(5)]
    page = report("", source="none", problems=problems).html
    for i in range(5):
        assert f"<li>source{i}: failed because &lt;{i}&gt;</li>" in page
    assert "No output was collected." in page


def test_unknown_todo_is_named_by_its_id():
    result = report("out", todo=None, started_at=None)
    assert "<h1>todo 42</h1>" in result.html
    assert "unknown" in result.html


def test_times_are_shown_in_utc_without_a_zone():
    berlin = timezone(timedelta(hours=1))
    page = report(
        "out",
        started_at=datetime(2026, 11, 28, 10, 0, 0, tzinfo=berlin),
        completed_at=datetime(2026, 11, 28, 9, 5, 0),  # naive: taken as UTC
    ).html
    assert "2026-11-28 09:00:00 UTC" in page and "2026-11-28 09:05:00 UTC" in page


def test_emergency_report_says_it_was_forced_and_why():
    result = report(
        "Title: Login-Formular validieren",
        source="database",
        is_markdown=False,
        kind="emergency",
        reason="completion timeout after 300 s",
        system_status="load: 0.5\nclaude process: gone <pid 123>",
        problems=["transcript: file /x not found", "tmux: timed out after 3 s"],
    )
    page = result.html
    assert_safe(page)
    assert "Forced completion" in page
    assert "completion timeout after 300 s" in page
    assert "<pre>load: 0.5\nclaude process: gone &lt;pid 123&gt;</pre>" in page
    assert "database" in page
    assert result.summary == "⚠️ Forced completion: completion timeout after 300 s"


def test_html_source_is_marked_as_reduced_to_text():
    page = report("Done", source="session_dir:output.html", is_markdown=False, is_html=True).html
    assert "session_dir:output.html (HTML reduced to plain text)" in page


def test_summary_is_short_and_skips_markup():
    text = "# Heading\n\n---\n\n```\ncode\n```\n\n" + "word " * 500
    summary = report(text).summary
    assert summary.startswith("✅ Heading word word")
    assert "```" not in summary and "---" not in summary
    assert len(summary) <= 150 and "\n" not in summary


def test_markdown_too_big_to_render_in_time_is_shown_preformatted():
    text = "[" * (MARKDOWN_MAX_BYTES + 1)
    started = time.perf_counter()
    page = report(text).html
    assert time.perf_counter() - started < 2
    assert f"<pre>{'[' * 100}" in page


def test_escaping_that_multiplies_the_size_still_fits_the_page():
    result = report("&" * 1_000_000, is_markdown=False)
    assert len(result.html.encode()) <= 2 * 1024 * 1024
    assert len(result.text.encode()) <= 1_000_000
    assert "bytes omitted" in result.html


def test_every_field_is_bounded_in_a_small_page():
    huge = "<&>" * 400_000
    result = render_report(
        todo_id=1,
        todo=TodoFacts(huge, huge, huge),
        collected=Collected(huge, "message", tuple([huge] * 50), True, False),
        kind="emergency",
        started_at=None,
        completed_at=COMPLETED,
        reason=huge,
        system_status=huge,
        max_output_bytes=100_000,
        max_report_bytes=64 * 1024,
    )
    assert len(result.html.encode()) <= 64 * 1024
    assert len(result.text.encode()) <= 100_000
    assert_safe(result.html)


def test_output_is_capped_with_head_tail_and_note():
    result = report("HEAD" + "x" * 3_000_000 + "TAIL", max_output_bytes=10_000)
    assert result.text.startswith("HEAD") and result.text.endswith("TAIL")
    assert "bytes omitted" in result.text
    assert len(result.text.encode()) <= 10_000


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda: "a<b>&\x1b[31m\u202e" * 10_000_000,  # 100 MB str, ASCII-heavy
        lambda: "é€\u202e\ud800" * 10_000_000,  # ~100 MB of UTF-8, lone surrogates included
        lambda: b"\xff<script>\x1b]8;;x\x07" * 6_000_000,  # ~100 MB of bytes, invalid UTF-8
    ],
    ids=["str", "non-ascii-str", "bytes"],
)
def test_100_mb_output_is_bounded_in_size_time_and_memory(make):
    output = make()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = report(output)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(result.html.encode("utf-8")) <= 2 * 1024 * 1024
    assert len(result.text.encode("utf-8")) <= 1_000_000
    assert "bytes omitted" in result.text
    assert elapsed < 20
    assert peak < 60 * 1024 * 1024  # a few copies of the capped megabyte, never the 100 MB
    assert_safe(result.html)


def test_unexpected_kind_is_reported_as_normal():
    page = report("out", kind='"><script>alert(1)</script>').html
    assert_safe(page)
    assert '<header class="normal">' in page


def test_markdown_keeps_list_numbers_table_alignment_and_anchors_but_no_relative_links():
    page = report(
        "3. third\n4. fourth\n\n| a | b |\n|:--|--:|\n| 1 | 2 |\n\n"
        "[up](#top) [rel](../../etc/passwd) [data](data:image/png;base64,AAAA) ~~gone~~"
    ).html
    markup = assert_safe(page)
    assert markup.attrs("ol", "start") == ["3"]
    assert set(markup.attrs("td", "style")) == {"text-align:left", "text-align:right"}
    assert markup.attrs("a", "href") == ["#top"]
    assert "rel" in page and "<s>gone</s>" in page


# ----------------------------------------------------------------- one language


# Fixed fragments of each language that must not leak into a report in the other one.
ENGLISH = ["no completion", "heartbeat", "deadline passed", "not a git repository", "No git"]
GERMAN = ["Abschluss und", "Lebenszeichen", "Frist", "kein git-Repository", "Kein git", "Notab"]


def _all_text(rendered) -> str:
    return "\n".join([rendered.summary, rendered.db, rendered.html])


@pytest.mark.parametrize("language", ["de", "en"])
def test_agent_reasons_and_git_evidence_follow_the_report_language(language, tmp_path):
    evidence = git_evidence.evidence(str(tmp_path), None)  # a plain dir: not a repository
    assert evidence.missing == "not_a_repository"
    made = {
        "deadline": reasons.english("deadline", timeout="5"),
        "predicted_hang": reasons.english("predicted_hang", silent="40", timeout="600"),
        "hanging": reasons.english("hanging", silent="7300", limit="7200"),
    }
    for key, reason in made.items():
        rendered = report(
            "half of the work",
            kind="emergency",
            reason=reason,
            language=language,
            evidence=evidence,
        )
        text = _all_text(rendered)
        foreign = ENGLISH if language == "de" else GERMAN
        assert not [f for f in foreign if f in text], (key, rendered.summary)
        if language == "de":
            assert rendered.summary.startswith("⚠️ Notabschluss: ")
            assert "Kein git-Nachweis: das Arbeitsverzeichnis ist kein git-Repository" in text
        else:
            assert rendered.summary.startswith("⚠️ Forced completion: ")
            assert "No git evidence: the working directory is not a git repository" in text
    # The deadline's numbers survive the translation; a person's own reason is shown as given.
    de = report("x", kind="emergency", reason=made["deadline"], language="de")
    assert de.summary == (
        "⚠️ Notabschluss: kein Abschluss und kein Lebenszeichen seit 5 s (Abschlussfrist abgelaufen)"
    )
    own = report("x", kind="emergency", reason="stuck, said Anna", language=language)
    assert own.summary.endswith(": stuck, said Anna")
    # The journal and the logs keep the English form.
    assert made["deadline"] == "no completion and no heartbeat for 5 s (completion deadline passed)"


def test_the_page_is_built_only_when_an_archive_asks_for_it():
    """The database gets Markdown; rendering the output to HTML is for the archive's page, so
    a completion that is not archived now (a Stop's answer, no session files) never pays it."""
    result = report("# Done\n\n" + "- a step\n" * 200)
    assert "a step" in result.for_database  # the Markdown, without the page
    assert result._html is None  # not built yet
    page = result.html
    assert page.startswith("<!DOCTYPE html>") and "<li>a step</li>" in page
    assert result.html is page  # built once
    assert_safe(page)
