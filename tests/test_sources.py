"""The fallback chain: each source wins in turn, and each failure is recorded before the next."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from agent.sources import (
    CollectRequest,
    TodoFacts,
    cap_text,
    collect,
    html_to_text,
    strip_escape_sequences,
)

FIXTURE = Path(__file__).parent / "fixtures" / "claude-code" / "transcript.jsonl"
FINAL_ANSWER = (
    "Das Login-Formular validiert jetzt E-Mail und Passwort.\n\nAlle 12 Tests laufen grün."
)
TODO = TodoFacts("Login-Formular validieren", "E-Mail und Passwort prüfen", "/srv/sites/plugin")
TMUX = shutil.which("tmux")


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run(req: CollectRequest, load_todo=lambda todo_id: TODO, **kwargs):
    fake = FakeTime()
    kwargs.setdefault("tmux_socket", "completiond-test-no-server")
    return collect(req, load_todo=load_todo, clock=fake.clock, sleep=fake.sleep, **kwargs)


def no_todo(todo_id):
    return None


def broken_database(todo_id):
    raise TimeoutError("database did not answer within 2 s")


# --- each source in turn wins ---


def test_message_output_wins_and_is_markdown():
    got = run(CollectRequest(1, output="**done**", transcript_path=str(FIXTURE)))
    assert (got.text, got.source, got.problems) == ("**done**", "message", ())
    assert got.is_markdown and not got.is_html


def test_transcript_wins_without_message_output():
    got = run(CollectRequest(1, transcript_path=str(FIXTURE)))
    assert (got.text, got.source, got.problems) == (FINAL_ANSWER, "transcript", ())
    assert got.is_markdown


@pytest.mark.parametrize(
    ("name", "content", "is_markdown"),
    [
        ("output.md", "# Result\n", True),
        ("output.txt", "result\n", False),
        ("summary.txt", "short\n", False),
    ],
)
def test_session_dir_file_wins(tmp_path, name, content, is_markdown):
    (tmp_path / name).write_text(content, encoding="utf-8")
    got = run(CollectRequest(1, session_dir=str(tmp_path)))
    assert (got.text, got.source, got.problems) == (content, f"session_dir:{name}", ())
    assert got.is_markdown is is_markdown and not got.is_html


def test_output_html_is_reduced_to_text(tmp_path):
    (tmp_path / "output.html").write_text(
        "<html><head><title>t</title><script>alert(1)</script></head>"
        "<body><h1>Done</h1><p>All &amp; <b>well</b></p><img src=x onerror=alert(1)></body></html>",
        encoding="utf-8",
    )
    got = run(CollectRequest(1, session_dir=str(tmp_path)))
    assert got.source == "session_dir:output.html"
    assert got.is_html and not got.is_markdown
    assert got.text == "Done\n\nAll & well"


def test_session_dir_prefers_markdown_then_html_then_text(tmp_path):
    for name in ("output.html", "output.txt", "summary.txt"):
        (tmp_path / name).write_text(f"from {name}", encoding="utf-8")
    assert run(CollectRequest(1, session_dir=str(tmp_path))).source == "session_dir:output.html"
    (tmp_path / "output.md").write_text("from output.md", encoding="utf-8")
    assert run(CollectRequest(1, session_dir=str(tmp_path))).source == "session_dir:output.md"


def test_empty_output_md_falls_through_to_output_txt(tmp_path):
    (tmp_path / "output.md").write_text("  \n", encoding="utf-8")
    (tmp_path / "output.txt").write_text("text", encoding="utf-8")
    got = run(CollectRequest(1, session_dir=str(tmp_path)))
    assert got.source == "session_dir:output.txt"


def test_database_wins_when_nothing_else_is_given():
    got = run(CollectRequest(7, emergency_reason="completion timeout"))
    assert got.source == "database"
    assert got.problems == ()
    assert "Login-Formular validieren" in got.text
    assert "E-Mail und Passwort prüfen" in got.text
    assert "/srv/sites/plugin" in got.text


# --- each source failing in turn, the next one used, the failure listed ---


def test_empty_message_output_is_a_problem_and_transcript_is_used():
    got = run(CollectRequest(1, output="   \n", transcript_path=str(FIXTURE)))
    assert got.source == "transcript"
    assert got.problems == ("message: the message carried only empty output",)


def test_missing_transcript_is_a_problem_and_session_dir_is_used(tmp_path):
    (tmp_path / "output.md").write_text("from the session", encoding="utf-8")
    missing = tmp_path / "gone.jsonl"
    got = run(CollectRequest(1, transcript_path=str(missing), session_dir=str(tmp_path)))
    assert got.source == "session_dir:output.md"
    assert got.problems == (f"transcript: file {missing} not found",)


def test_transcript_without_text_is_a_problem_after_polling(tmp_path):
    transcript = tmp_path / "t.jsonl"
    transcript.write_text(
        '{"type": "assistant", "message": {"id": "m1", "content": [{"type": "tool_use"}]}}\n',
        encoding="utf-8",
    )
    (tmp_path / "summary.txt").write_text("summary", encoding="utf-8")
    got = run(CollectRequest(1, transcript_path=str(transcript), session_dir=str(tmp_path)))
    assert got.source == "session_dir:summary.txt"
    assert got.problems == (f"transcript: the last assistant message in {transcript} has no text",)


def test_transcript_that_is_a_fifo_is_a_problem_not_a_hang(tmp_path):
    fifo = tmp_path / "t.jsonl"
    os.mkfifo(fifo)
    got = run(CollectRequest(1, transcript_path=str(fifo)))
    assert got.source == "database"
    assert got.problems[0].startswith(f"transcript: cannot read {fifo}")


def test_missing_session_dir_is_a_problem_and_database_is_used(tmp_path):
    got = run(CollectRequest(1, session_dir=str(tmp_path / "nope")))
    assert got.source == "database"
    assert got.problems == (f"session_dir: directory {tmp_path / 'nope'} not found",)


def test_session_dir_without_outputs_is_a_problem(tmp_path):
    got = run(CollectRequest(1, session_dir=str(tmp_path)))
    assert got.problems == (
        f"session_dir: none of output.md, output.html, output.txt, summary.txt in {tmp_path}",
    )


def test_session_dir_symlinks_and_fifos_are_not_read(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("private key", encoding="utf-8")
    session = tmp_path / "session"
    session.mkdir()
    (session / "output.md").symlink_to(secret)
    os.mkfifo(session / "output.txt")
    got = run(CollectRequest(1, session_dir=str(session)), load_todo=no_todo)
    assert "private key" not in got.text
    assert got.source == "none"
    assert "output.md: is a symlink, not followed" in got.problems[0]
    assert "output.txt: not a regular file" in got.problems[0]


def test_database_failure_is_a_problem_and_nothing_is_none():
    got = run(CollectRequest(3), load_todo=broken_database)
    assert (got.text, got.source) == ("", "none")
    assert got.problems == ("database: loading todo 3 failed: database did not answer within 2 s",)
    assert not got.is_markdown and not got.is_html


def test_unknown_todo_is_a_problem():
    got = run(CollectRequest(3), load_todo=no_todo)
    assert got.problems == ("database: todo 3 not found",)
    assert got.source == "none"


def test_every_failure_is_listed_in_order(tmp_path):
    req = CollectRequest(
        5,
        output="",
        transcript_path=str(tmp_path / "t.jsonl"),
        session_dir=str(tmp_path / "s"),
        tmux_target="completiond-test-missing",
        emergency_reason="hanging",
    )
    got = run(req, load_todo=broken_database, tmux_command="/nonexistent/tmux")
    assert got.source == "none"
    assert [problem.split(":", 1)[0] for problem in got.problems] == [
        "message",
        "transcript",
        "session_dir",
        "tmux",
        "database",
    ]
    assert got.problems[3] == "tmux: /nonexistent/tmux not found"


def test_emergency_completion_still_prefers_the_session_output():
    got = run(CollectRequest(1, transcript_path=str(FIXTURE), emergency_reason="timeout"))
    assert got.source == "transcript"


# --- capping ---


def test_big_session_file_is_capped_keeping_head_and_tail(tmp_path):
    (tmp_path / "output.txt").write_text("HEAD" + "x" * 100_000 + "TAIL", encoding="utf-8")
    got = run(CollectRequest(1, session_dir=str(tmp_path)), max_source_bytes=10_000)
    assert len(got.text.encode()) <= 10_000
    assert got.text.startswith("HEAD") and got.text.endswith("TAIL")
    assert "bytes omitted" in got.text


def test_cap_text_counts_utf8_bytes_and_never_splits_characters():
    capped = cap_text("ä" * 50_000 + "€" * 50_000, 4_000)
    assert len(capped.encode("utf-8")) <= 4_000
    assert capped.startswith("ä") and capped.endswith("€")
    assert "\ufffd" not in capped
    assert cap_text("short", 4_000) == "short"


def test_escape_sequences_are_stripped():
    raw = "\x1b[1;31mred\x1b[0m \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\ \x1b]0;title\x07done\x1b(B"
    assert strip_escape_sequences(raw) == "red link done"


@pytest.mark.parametrize(
    "hostile",
    ["\x90" * 1_000_000, "\x1b]" * 500_000, "\x1bP" * 500_000, "\x9b" + "0" * 1_000_000],
    ids=["dcs-8bit", "osc", "dcs", "csi-params"],
)
def test_unterminated_escape_sequences_cost_linear_time(hostile):
    started = time.perf_counter()
    strip_escape_sequences(hostile)
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize(
    "hostile",
    ["<" * 1_000_000, "<a " * 300_000, "<!--" * 250_000, "<script>" * 120_000, "<b>" * 300_000],
    ids=["lt", "unclosed-tags", "comments", "scripts", "tags"],
)
def test_html_to_text_costs_linear_time(hostile):
    started = time.perf_counter()
    html_to_text(hostile)
    assert time.perf_counter() - started < 2


def test_html_to_text_drops_scripts_comments_and_declarations():
    markup = (
        "<!DOCTYPE html><html><head><title>t</title><style>p{}</style></head><body>"
        "<p>a &lt; b</p><!-- hidden --><script>alert(1)</script>c < d<br>e</body></html>"
    )
    assert html_to_text(markup) == "a < b\nc < d\ne"


# --- tmux: a real server on a private socket ---


@pytest.fixture
def tmux_socket():
    if TMUX is None:
        pytest.skip("tmux is not installed")
    private = tempfile.mkdtemp(prefix="ctmux", dir="/tmp")  # short: socket paths are limited
    socket = os.path.join(private, "sock")
    yield socket
    subprocess.run([TMUX, "-S", socket, "kill-server"], capture_output=True, timeout=5)
    shutil.rmtree(private, ignore_errors=True)


def wait_for_pane(socket: str, target: str, needle: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        shown = subprocess.run(
            [TMUX, "-S", socket, "capture-pane", "-p", "-t", target],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        if needle in shown:
            return
        time.sleep(0.05)
    raise AssertionError(f"tmux pane never showed {needle!r}")


def test_tmux_pane_is_captured_and_stripped(tmux_socket):
    script = r"printf '\033[31mRED-ALERT\033[0m and \033[1;32mgreen\033[0m\nsecond line\n\n\n'"
    new_session = ["new-session", "-d", "-s", "work", "-x", "120", "-y", "20"]
    subprocess.run(
        [TMUX, "-S", tmux_socket, *new_session, f"{script}; exec sleep 60"],
        check=True,
        timeout=5,
    )
    wait_for_pane(tmux_socket, "work", "second line")

    got = run(
        CollectRequest(1, session_dir="/nonexistent-session-dir", tmux_target="work"),
        tmux_socket=tmux_socket,
    )

    assert got.source == "tmux"
    assert got.text == "RED-ALERT and green\nsecond line"
    assert got.problems == ("session_dir: directory /nonexistent-session-dir not found",)


def test_tmux_target_that_does_not_exist_is_a_problem(tmux_socket):
    subprocess.run(
        [TMUX, "-S", tmux_socket, "new-session", "-d", "-s", "other", "sleep 60"],
        check=True,
        timeout=5,
    )
    got = run(CollectRequest(1, tmux_target="no-such-session"), tmux_socket=tmux_socket)
    assert got.source == "database"
    assert len(got.problems) == 1
    assert got.problems[0].startswith("tmux: capture of no-such-session failed: can't find")


def test_tmux_without_a_server_is_a_problem():
    got = run(CollectRequest(1, tmux_target="work"), tmux_socket="/tmp/completiond-no-such.sock")
    assert got.source == "database"
    assert got.problems[0].startswith("tmux: capture of work failed:")


def test_hanging_tmux_times_out_and_its_children_are_killed(tmp_path):
    fake = tmp_path / "tmux"
    fake.write_text("#!/bin/sh\nsleep 60 &\nsleep 60\n", encoding="utf-8")
    fake.chmod(0o755)
    started = time.monotonic()
    got = run(CollectRequest(1, tmux_target="work"), tmux_command=str(fake), tmux_timeout=0.3)
    assert time.monotonic() - started < 5
    assert got.source == "database"
    assert got.problems == ("tmux: timed out after 0.3 s capturing work",)
