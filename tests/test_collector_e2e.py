"""The collector through the real processes: the fallback chain, the safe report, the archive.

Real completiond and completionctl, a real tmux server on the test's private socket, the embedded
SQLite database.  Each source wins in turn, each fails in turn and hands over to the next (the
failure listed in the report), hostile output yields a safe bounded page, the archive is taken
before the session dir is deleted, and a slow source holds up only its own completion.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Agent, wait_for
from tests.markup import ALLOWED_ATTRS, ALLOWED_TAGS, BIDI, Markup

FIXTURE_TRANSCRIPT = Path(__file__).parent / "fixtures" / "claude-code" / "transcript.jsonl"
FINAL_ANSWER = (
    "Das Login-Formular validiert jetzt E-Mail und Passwort.\n\nAlle 12 Tests laufen grün."
)
HOSTILE = Path(__file__).parent / "hostile"
MiB = 1024 * 1024


# ---------------------------------------------------------------- helpers


class Tmux:
    """A real tmux server on the agent's private socket (collect.tmux_socket)."""

    def __init__(self, agent: Agent) -> None:
        self.socket = agent.config["collect"]["tmux_socket"]
        self.env = {k: v for k, v in agent.env.items() if k not in ("TMUX", "TMUX_PANE")}
        self.stopped: int | None = None

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["tmux", "-S", self.socket, *args],
            env=self.env,
            capture_output=True,
            timeout=10,
            check=False,
        )

    def session(self, name: str, text: str) -> None:
        command = f"printf '%b' {shlex_quote(text)}; exec sleep 600"
        result = self("new-session", "-d", "-s", name, "-x", "120", "-y", "30", command)
        assert result.returncode == 0, result.stderr
        wait_for(
            lambda: text.split("\\n")[0] in self("capture-pane", "-p", "-t", name).stdout.decode(),
            10,
            what=f"tmux pane {name} to show its text",
        )

    def server_pid(self) -> int:
        return int(self("display-message", "-p", "#{pid}").stdout)

    def stop(self) -> None:
        self.stopped = self.server_pid()
        os.kill(self.stopped, signal.SIGSTOP)

    def kill_server(self) -> None:
        if self.stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.stopped, signal.SIGCONT)
            self.stopped = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self("kill-server")


def shlex_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@pytest.fixture
def tmux_for(make_agent) -> Iterator:
    """tmux_for(agent) -> Tmux; every server is killed at the end (before the agents)."""
    servers: list[Tmux] = []

    def make(agent: Agent) -> Tmux:
        server = Tmux(agent)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill_server()


def complete(agent: Agent, todo: int, *args: str) -> str:
    """``completionctl complete``; returns the completion id."""
    result = agent.ctl("--json", "complete", str(todo), *args)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)["completion_id"]


def session_dir(agent: Agent, todo: int, files: dict[str, str | bytes] | None = None) -> Path:
    directory = agent.sessions / f"claude_session_{todo}"
    directory.mkdir(parents=True)
    for name, content in (files or {}).items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return directory


def entry(agent: Agent, completion_id: str) -> dict:
    with contextlib.closing(sqlite3.connect(agent.state / "journal.db", timeout=10)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute(
            "SELECT completion_id, todo_id, state, source, problems, archive_path,"
            " created_at, updated_at FROM entries WHERE completion_id = ?",
            (completion_id,),
        ).fetchone()
        assert row is not None, completion_id
        return dict(row)


def state_of(agent: Agent, completion_id: str) -> str:
    return entry(agent, completion_id)["state"]


def wait_cleaned(agent: Agent, *completion_ids: str, timeout: float = 30.0) -> None:
    wait_for(
        lambda: all(state_of(agent, cid) == "cleaned" for cid in completion_ids),
        timeout,
        what=f"{completion_ids} cleaned",
    )


# These tests read the whole report page from the database: they ask for it ("page", English).
# The default (Markdown, German) is tested in tests/test_todo_plugin.py.
PAGE = {"report": {"db_format": "page", "language": "en"}}


def html_bytes(agent: Agent, todo: int) -> bytes:
    with contextlib.closing(sqlite3.connect(agent.sqlite_path)) as db:
        (raw,) = db.execute(
            "SELECT CAST(claude_html_output AS BLOB) FROM stage_project_todos WHERE id = ?",
            (todo,),
        ).fetchone()
    return raw


def report_problems(page: str) -> list[str]:
    section = re.search(r"<h2>Collection problems</h2>(.*?)</section>", page, re.S)
    assert section is not None, "no problems section"
    return [html.unescape(item) for item in re.findall(r"<li>(.*?)</li>", section.group(1), re.S)]


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def output_source(page: str) -> str:
    found = re.search(r"<dt>Output source</dt><dd>(.*?)</dd>", page)
    assert found is not None
    return html.unescape(found.group(1))


def assert_safe_page(raw: bytes) -> str:
    page = raw.decode("utf-8")  # strict: invalid UTF-8 raises
    assert len(raw) <= 2 * MiB
    tags = Markup(page).tags
    assert {tag for tag, _ in tags} <= ALLOWED_TAGS, {tag for tag, _ in tags} - ALLOWED_TAGS
    metas = []
    for tag, attrs in tags:
        for name, value in attrs:
            assert name in ALLOWED_ATTRS and not name.startswith("on"), (tag, name, value)
            if name == "href":
                assert value and value.startswith(("https://", "http://", "mailto:", "#")), value
            if tag == "meta" and name == "http-equiv":
                metas.append(value)
    assert metas == ["Content-Security-Policy"]
    assert "<script" not in page.lower()
    for char in ("\x1b", "\x00", "\x07", "\x9b", *BIDI):
        assert char not in page, repr(char)
    return page


# ---------------------------------------------------------------- each source wins in turn


def test_each_source_wins_in_turn(make_agent, tmux_for) -> None:
    agent = make_agent(PAGE).start()
    tmux = tmux_for(agent)
    tmux.session("work", "hello from the pane\\n\\033[31mcoloured line\\033[0m\\n")
    transcript = agent.root / "transcript.jsonl"
    shutil.copy(FIXTURE_TRANSCRIPT, transcript)

    cases: dict[str, tuple[int, str]] = {}
    todo = agent.add("Message")
    cases["message"] = (todo, complete(agent, todo, "--output", "said by the message"))
    todo = agent.add("Transcript")
    cases["transcript"] = (todo, complete(agent, todo, "--transcript", str(transcript)))
    # A subagent's line written after the final answer, and a tool call of its own.
    late_sidechain = agent.root / "late-sidechain.jsonl"
    sidechain = {
        "type": "assistant",
        "isSidechain": True,
        "message": {
            "id": "msg_side_late",
            "role": "assistant",
            "stop_reason": "end_turn",
            "content": [
                {"type": "text", "text": "(subagent) late words"},
                {"type": "tool_use", "id": "toolu_late", "name": "Bash", "input": {}},
            ],
        },
    }
    late_sidechain.write_text(FIXTURE_TRANSCRIPT.read_text() + json.dumps(sidechain) + "\n")
    todo = agent.add("Transcript, sidechain last")
    late_case = (todo, complete(agent, todo, "--transcript", str(late_sidechain)))
    for name, text in [
        ("output.md", "# Done\n\nThe **markdown** output."),
        ("output.txt", "the plain output"),
        ("summary.txt", "the seed's summary"),
    ]:
        todo = agent.add(f"Session {name}")
        session_dir(agent, todo, {name: text})
        cases[f"session_dir:{name}"] = (todo, complete(agent, todo))
    todo = agent.add("Tmux")
    cases["tmux"] = (todo, complete(agent, todo, "--tmux-target", "work"))
    todo = agent.add("Only the database", description="check the <form>", dir="/srv/site")
    cases["database"] = (todo, complete(agent, todo))

    wait_cleaned(agent, *(cid for _, cid in cases.values()), late_case[1])
    assert agent.todo_row(late_case[0])["claude_text_output"] == FINAL_ANSWER
    assert entry(agent, late_case[1])["source"] == "transcript"
    for source, (todo, cid) in cases.items():
        row = agent.todo_row(todo)
        assert row["status"] == "completed", source
        assert entry(agent, cid)["source"] == source
        assert [r["sources"] for r in agent.log_rows(todo)] == [source]
        page = assert_safe_page(html_bytes(agent, todo))
        assert output_source(page) == source
        # The session dir is always looked for; a source that was not asked for is not tried.
        missing_dir = f"session_dir: directory {agent.sessions}/claude_session_{todo} not found"
        expected = [missing_dir] if source in ("tmux", "database") else []
        assert report_problems(page) == expected, source

    text = {
        source: agent.todo_row(todo)["claude_text_output"] for source, (todo, _) in cases.items()
    }
    assert text["message"] == "said by the message"
    # The last main-chain message, both of its lines; never the subagent's or a tool call.
    assert text["transcript"] == FINAL_ANSWER
    transcript_page = html_bytes(agent, cases["transcript"][0]).decode()
    output = re.search(r"<h2>Output</h2>(.*?)</section>", transcript_page, re.S)
    assert output is not None
    for not_final in ("(subagent)", "npm test", "toolu_", "Ich sehe mir zuerst", "11 passed"):
        assert not_final not in output.group(1) and not_final not in text["transcript"]
    # The tool calls are facts of the session, listed in their own sections (issue #21).
    assert "<h2>Commands (1)</h2><ul><li>✅ npm test</li></ul>" in transcript_page
    assert text["session_dir:output.md"] == "# Done\n\nThe **markdown** output."
    assert (
        "<strong>markdown</strong>" in html_bytes(agent, cases["session_dir:output.md"][0]).decode()
    )
    assert text["session_dir:output.txt"] == "the plain output"
    assert text["session_dir:summary.txt"] == "the seed's summary"
    assert "hello from the pane\ncoloured line" in text["tmux"]
    assert "\x1b" not in text["tmux"]
    database = text["database"]
    assert "Only the database" in database and "/srv/site" in database
    assert "check the <form>" in database
    assert "check the &lt;form&gt;" in html_bytes(agent, cases["database"][0]).decode()


# ---------------------------------------------------------------- each source fails in turn


def test_each_failing_source_hands_over_to_the_next_and_is_listed(make_agent, tmux_for) -> None:
    agent = make_agent(PAGE).start()
    tmux = tmux_for(agent)
    tmux.session("work", "the pane after all\\n")
    missing = str(agent.root / "no-such-transcript.jsonl")

    a = agent.add("Transcript missing")
    session_dir(agent, a, {"output.txt": "from the session dir"})
    ca = complete(agent, a, "--transcript", missing)

    b = agent.add("Transcript missing, session dir empty")
    session_dir(agent, b)
    cb = complete(agent, b, "--transcript", missing, "--tmux-target", "work")

    c = agent.add("Everything fails", description="the todo itself", dir="/srv/c")
    session_dir(agent, c, {"output.md": "   \n", "summary.txt": ""})
    cc = complete(agent, c, "--transcript", missing, "--tmux-target", "no-such-pane")

    wait_cleaned(agent, ca, cb, cc)
    expected = {
        a: ("session_dir:output.txt", ["transcript"]),
        b: ("tmux", ["transcript", "session_dir"]),
        c: ("database", ["transcript", "session_dir", "tmux"]),
    }
    for todo, (source, failed) in expected.items():
        page = assert_safe_page(html_bytes(agent, todo))
        assert output_source(page) == source
        problems = report_problems(page)
        assert [p.split(":")[0] for p in problems] == failed, problems
        assert agent.todo_row(todo)["status"] == "completed"
    a_problems = report_problems(html_bytes(agent, a).decode())
    assert a_problems == [f"transcript: file {missing} not found"]
    b_problems = report_problems(html_bytes(agent, b).decode())
    assert "none of output.md" in b_problems[1]
    c_problems = report_problems(html_bytes(agent, c).decode())
    assert "output.md is empty" in c_problems[1] and "summary.txt is empty" in c_problems[1]
    assert "no-such-pane" in c_problems[2]
    assert "the pane after all" in agent.todo_row(b)["claude_text_output"]
    assert "the todo itself" in agent.todo_row(c)["claude_text_output"]
    # The journal keeps the problems too (for status and the log).
    assert entry(agent, cc)["problems"].count("\n") == 2


# ---------------------------------------------------------------- slow sources


def test_late_transcript_line_is_polled_for_and_delays_only_its_own_completion(
    make_agent,
) -> None:
    agent = make_agent({**PAGE, "collect": {"transcript_wait": 20}}).start()
    lines = FIXTURE_TRANSCRIPT.read_text().splitlines(keepends=True)
    transcript = agent.root / "transcript.jsonl"
    transcript.write_text("".join(lines[:-2]))  # the Stop hook fired before the last lines

    slow = agent.add("Transcript still being written")
    slow_id = complete(agent, slow, "--transcript", str(transcript))
    sent = time.monotonic()
    fast = agent.add("Sent right after")
    fast_id = complete(agent, fast, "--output", "quick")
    wait_cleaned(agent, fast_id)
    assert state_of(agent, slow_id) == "accepted"  # still polling the transcript

    with transcript.open("a") as f:
        f.writelines(lines[-2:])
    wait_cleaned(agent, slow_id)
    assert time.monotonic() - sent < 20  # the final line ended the poll, not the time limit
    assert agent.todo_row(slow)["claude_text_output"] == FINAL_ANSWER
    assert entry(agent, slow_id)["source"] == "transcript"
    assert entry(agent, fast_id)["updated_at"] < entry(agent, slow_id)["updated_at"]


def test_stuck_tmux_is_cut_off_and_delays_only_its_own_completion(make_agent, tmux_for) -> None:
    agent = make_agent({**PAGE, "collect": {"tmux_timeout": 4}}).start()
    tmux = tmux_for(agent)
    tmux.session("work", "never captured\\n")
    tmux.stop()  # a tmux server that accepts the connection and never answers

    stuck = agent.add("Pane of a stuck tmux", description="fallback text")
    started = time.monotonic()
    stuck_id = complete(agent, stuck, "--tmux-target", "work")
    fast = agent.add("Sent right after")
    fast_id = complete(agent, fast, "--output", "quick")
    wait_cleaned(agent, fast_id)
    assert state_of(agent, stuck_id) == "accepted"

    wait_cleaned(agent, stuck_id)
    assert time.monotonic() - started < 4 + 15
    page = assert_safe_page(html_bytes(agent, stuck))
    assert output_source(page) == "database"
    assert report_problems(page)[1:] == ["tmux: timed out after 4 s capturing work"]
    assert "fallback text" in agent.todo_row(stuck)["claude_text_output"]
    # intake stayed responsive all along, and the agent is healthy afterwards
    assert agent.status_json() is not None


# ---------------------------------------------------------------- hostile output


def _hostile_block() -> bytes:
    corpus = b"".join(path.read_bytes() for path in sorted(HOSTILE.iterdir()))
    return (
        corpus
        + b'"><img src=x onerror=alert(1)> <a href="javascript:alert(1)">x</a>\n'
        + b"\x1b]8;;javascript:alert(1)\x1b\\osc link\x1b]8;;\x1b\\ \x1b[31mred\x1b[0m\n"
        + b"nul:\x00: invalid:\xff\xfe\xc3\x28: bidi:\xe2\x80\xae}gnp.exe\n"
    )


@pytest.mark.slow
def test_hostile_output_yields_a_strict_utf8_report_without_active_content(make_agent) -> None:
    agent = make_agent(PAGE).start()
    block = _hostile_block()
    huge = agent.root / "huge-hostile.bin"
    huge.write_bytes(block * (12 * MiB // len(block)))
    sent = {}

    by_file = agent.add("<script>alert('title')</script>", description="\x1b[2J<b onclick=x>")
    started = time.monotonic()
    sent[by_file] = complete(agent, by_file, "--output-file", str(huge))

    by_session = agent.add("Raw bytes in the session dir")
    session_dir(agent, by_session, {"output.txt": block * (20 * MiB // len(block))})
    sent[by_session] = complete(agent, by_session)

    as_markdown = agent.add("Hostile markdown")
    session_dir(agent, as_markdown, {"output.md": block})
    sent[as_markdown] = complete(agent, as_markdown)

    in_transcript = agent.add("Hostile transcript")
    transcript = agent.root / "hostile.jsonl"
    hostile_text = block.decode("utf-8", "replace") + "lone surrogate: \ud800 <b onmouseover=x>"
    final = {
        "type": "assistant",
        "isSidechain": False,
        "message": {
            "id": "msg_x",
            "role": "assistant",
            "stop_reason": "end_turn",
            "content": [{"type": "text", "text": hostile_text}],
        },
    }
    transcript.write_text(json.dumps(final) + "\n")  # \u escapes: NUL, ESC, a lone surrogate
    sent[in_transcript] = complete(agent, in_transcript, "--transcript", str(transcript))

    wait_cleaned(agent, *sent.values(), timeout=60)
    assert time.monotonic() - started < 60
    peak = peak_rss(agent.children()["collector"])
    assert peak < 256 * MiB, f"collector peak RSS {peak // MiB} MiB"  # bounded memory, too
    for todo, cid in sent.items():
        raw = html_bytes(agent, todo)
        page = assert_safe_page(raw)
        assert "⟦U+202E⟧" in page
        assert "&lt;script&gt;" in page or "&lt;SCRIPT" in page
        row = agent.todo_row(todo)
        for field in ("claude_text_output", "claude_summary"):
            assert not any(ch in row[field] for ch in ("\x00", "\x1b", *BIDI)), field
        archive = entry(agent, cid)["archive_path"]
        if todo == by_file:
            assert archive is None  # nothing on disk to keep: the report is in the database
        else:
            assert (Path(archive) / "report.html").read_bytes() == raw
    sources = {todo: entry(agent, cid)["source"] for todo, cid in sent.items()}
    assert sources == {
        by_file: "message",
        by_session: "session_dir:output.txt",
        as_markdown: "session_dir:output.md",
        in_transcript: "transcript",
    }
    big = html_bytes(agent, by_file).decode()
    assert "bytes omitted" in big
    assert "\ufffd" in big  # invalid UTF-8 shown as replacement characters
    assert "&lt;script&gt;alert(&#x27;title&#x27;)&lt;/script&gt;" in big
    assert "bytes omitted" in html_bytes(agent, by_session).decode()
    assert "\ufffd" in html_bytes(agent, by_session).decode()


# ---------------------------------------------------------------- archive before delete


def test_session_files_are_archived_and_deleted_only_after_verification(
    agent: Agent,
) -> None:
    todo = agent.add("Archive me")
    transcript = agent.root / "transcript.jsonl"
    shutil.copy(FIXTURE_TRANSCRIPT, transcript)
    session = session_dir(
        agent, todo, {"output.md": "# the session's own notes", "logs/run.txt": "step 1\nstep 2\n"}
    )
    writer = agent.children()["writer"]
    os.kill(writer, signal.SIGSTOP)  # the database write is held back
    try:
        cid = complete(agent, todo, "--transcript", str(transcript))
        wait_for(lambda: state_of(agent, cid) == "collected", 20, what="collected")
        archive = Path(entry(agent, cid)["archive_path"])
        assert archive.parent == agent.state / "archive"
        assert re.fullmatch(rf"todo_{todo}_\d+", archive.name)
        assert (archive / "session" / "output.md").read_text() == "# the session's own notes"
        assert (archive / "session" / "logs" / "run.txt").read_text() == "step 1\nstep 2\n"
        assert (archive / "transcript.jsonl").read_bytes() == FIXTURE_TRANSCRIPT.read_bytes()
        assert (archive / "report.html").exists()
        assert not list((agent.state / "archive").glob(".*.tmp"))  # renamed whole into place
        # Not verified yet: nothing deleted.
        assert session.is_dir() and (session / "output.md").exists()
        assert agent.todo_row(todo)["status"] != "completed"
    finally:
        os.kill(writer, signal.SIGCONT)
    wait_cleaned(agent, cid)
    assert not session.exists()
    assert transcript.exists()  # Claude Code's transcript is copied, never deleted
    assert (archive / "session" / "output.md").exists()
    # The archive keeps the standalone page; the database holds the Markdown the plugin shows.
    page = (archive / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in page
    assert "Archive me" in page
    assert html_bytes(agent, todo).decode().startswith(f"✅ Todo #{todo} erledigt: Archive me\n")
    assert agent.todo_row(todo)["status"] == "completed"


def test_stop_does_not_wait_for_a_slow_source_and_the_restart_redoes_it(make_agent) -> None:
    agent = make_agent({**PAGE, "collect": {"transcript_wait": 60}}).start()
    lines = FIXTURE_TRANSCRIPT.read_text().splitlines(keepends=True)
    transcript = agent.root / "transcript.jsonl"
    transcript.write_text("".join(lines[:-2]))
    todo = agent.add("Stopped mid-collection")
    cid = complete(agent, todo, "--transcript", str(transcript))
    completion_log = agent.state / "logs" / "completion.log"
    wait_for(
        lambda: completion_log.exists() and "collecting the normal" in completion_log.read_text(),
        what="the collector to be polling the transcript",
    )
    started = time.monotonic()
    assert agent.stop() == 0
    assert time.monotonic() - started < 5
    assert "collector did not stop" not in agent.output()
    assert state_of(agent, cid) == "accepted"  # nothing lost: the next collector does it

    with transcript.open("a") as f:
        f.writelines(lines[-2:])
    agent.start()
    wait_cleaned(agent, cid)
    assert agent.todo_row(todo)["claude_text_output"] == FINAL_ANSWER
    assert not completion_log.exists() or "crashed" not in completion_log.read_text()


# ---------------------------------------------------------------- the Collector in-process


@pytest.fixture
def collector(tmpdir_short: Path) -> Iterator:
    from agent.collector import Collector
    from agent.journal import Journal
    from protocol.config import Collect, Config

    state = tmpdir_short / "state"
    state.mkdir()
    config = Config(
        state_dir=str(state),
        collect=Collect(session_dir=str(tmpdir_short / "s_{todo_id}"), transcript_wait=0),
    )
    Journal.create(config.journal_path).close()
    process = Collector(config)
    process.initialize()
    yield process
    process.shutdown()


def _add_and_collect(collector, completion_id: str, kind: str = "normal"):
    from agent.journal import NewEntry

    with collector.journal.transaction() as db:
        collector.journal.add_entry(db, NewEntry(completion_id, 1, kind, reason="why"), 1.0)
    collector.work(time.time())
    future = collector.inflight[completion_id]
    future.result(timeout=30)
    return future


def test_a_result_never_revives_an_entry_that_moved_on(collector) -> None:
    _add_and_collect(collector, "e-1", "emergency")
    # Meanwhile the monitor's reset superseded the waiting emergency completion.
    collector.journal.update_entry("e-1", time.time(), state="failed", outcome="superseded")
    collector.work(time.time())
    assert collector.inflight == {}
    entry = collector.journal.entry("e-1")
    assert (entry.state, entry.outcome, entry.html) == ("failed", "superseded", None)


def test_a_result_whose_journal_write_failed_is_written_later_not_collected_again(
    collector, monkeypatch
) -> None:
    collected: list[str] = []
    real = collector._collect
    monkeypatch.setattr(
        collector,
        "_collect",
        lambda entry, *a: collected.append(entry.completion_id) or real(entry, *a),
    )
    _add_and_collect(collector, "n-2")
    journal_transaction = collector.journal.transaction

    def disk_full():
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(collector.journal, "transaction", disk_full)
    with pytest.raises(sqlite3.OperationalError):
        collector.work(time.time())  # the child's loop backs off on this (tests/test_loop.py)
    assert list(collector.unrecorded) == ["n-2"]
    monkeypatch.setattr(collector.journal, "transaction", journal_transaction)
    collector.work(time.time())
    assert collector.journal.entry("n-2").state == "collected"
    assert collected == ["n-2"] and collector.unrecorded == {} and collector.inflight == {}


def test_a_renderer_failure_still_yields_a_safe_report(collector, monkeypatch) -> None:
    import agent.collector as module

    def broken(**_):
        raise RuntimeError("renderer bug")

    monkeypatch.setattr(module, "render_report", broken)
    _add_and_collect(collector, "n-1")
    collector.work(time.time())
    entry = collector.journal.entry("n-1")
    assert entry.state == "collected"
    # The last-resort report is Markdown whatever the format: inert in every plugin view.
    assert entry.html.startswith("Todo #1\n\n## Output\n\n")
    assert all(line.startswith("    ") or not line.strip() for line in entry.html.split("\n")[4:])
    assert entry.summary and entry.summary.startswith("✅ ") and "\n" not in entry.summary


# ---------------------------------------------------------------- the todo facts, read in batches


def test_todo_facts_of_a_round_are_read_with_one_query(tmpdir_short: Path) -> None:
    from agent.collector import TodoFactsReader
    from agent.store import open_store

    url = f"sqlite:///{tmpdir_short / 'todos.db'}"
    store = open_store(url)
    store.ensure_schema(create_todo_table=True)
    ids = [store.add_todo(f"todo {n}", f"description {n}", f"/srv/{n}") for n in range(5)]
    store.close()
    missing = max(ids) + 100
    reader = TodoFactsReader(url, "stage_project_todos", timeout=3)
    try:
        reader.want([*ids, missing])
        facts = {todo: reader(todo) for todo in [*reversed(ids), missing]}
        assert reader.queries == 1
        assert facts[missing] is None
        for n, todo in enumerate(ids):
            assert facts[todo] is not None
            assert (facts[todo].title, facts[todo].working_directory) == (f"todo {n}", f"/srv/{n}")
        # An answer is used once: asked again, the todo is read fresh.
        assert reader(ids[0]).title == "todo 0"  # type: ignore[union-attr]
        assert reader.queries == 2
    finally:
        reader.close()


def test_todo_facts_stop_asking_for_a_while_after_a_failure(tmpdir_short: Path) -> None:
    from agent.collector import DB_QUIET_AFTER_FAILURE, TodoFactsReader
    from agent.store import StoreError

    now = [100.0]
    url = f"sqlite:///{tmpdir_short / 'no-such-dir' / 'todos.db'}"
    reader = TodoFactsReader(url, "stage_project_todos", timeout=3, clock=lambda: now[0])
    with pytest.raises(StoreError):
        reader(1)
    asked = reader.queries
    now[0] += DB_QUIET_AFTER_FAILURE - 1
    with pytest.raises(StoreError, match="not asked again yet"):
        reader(2)
    assert reader.queries == asked
    now[0] += 2
    with pytest.raises(StoreError) as again:
        reader(3)  # asked again (and failing again) once the quiet time is over
    assert "not asked again yet" not in str(again.value)
    reader.close()


def test_another_users_burst_takes_half_the_workers_and_payloads_load_when_taken_up(
    collector, monkeypatch
) -> None:
    """A burst of another user's completions gets at most half the workers while the agent
    user's own wait behind it; each waiting entry's payload (its request, with the output) is
    read when it is taken up, not again on every pass while others are in flight."""
    from concurrent.futures import Future

    import msgspec

    import protocol as p
    from agent.collector import WORKERS
    from agent.journal import NewEntry

    other = os.geteuid() + 4242

    def request(todo_id: int, uid: int) -> bytes:
        complete = p.Complete(request_id=f"r-{todo_id}", todo_id=todo_id, output="x" * 1000)
        return p.encode(msgspec.structs.replace(complete, requester_uid=uid))

    with collector.journal.transaction() as db:
        for n in range(6):  # the burst first, then the agent user's own
            entry = NewEntry(f"o-{n}", 10 + n, "normal", request=request(10 + n, other))
            collector.journal.add_entry(db, entry, 1.0)
        for n in range(2):
            entry = NewEntry(f"s-{n}", 20 + n, "normal", request=request(20 + n, os.geteuid()))
            collector.journal.add_entry(db, entry, 1.0)
    submitted: list[str] = []
    monkeypatch.setattr(
        collector.pool,
        "submit",
        lambda fn, entry, *a: submitted.append(entry.completion_id) or Future(),
    )
    loaded: list[list[str]] = []
    real = collector.journal.entries_by_id
    monkeypatch.setattr(
        collector.journal, "entries_by_id", lambda ids: loaded.append(list(ids)) or real(ids)
    )
    collector.work(time.time())
    assert submitted == [*(f"o-{n}" for n in range(WORKERS // 2)), "s-0", "s-1"]
    with collector.journal.transaction() as db:
        entry = NewEntry("s-2", 22, "normal", request=request(22, os.geteuid()))
        collector.journal.add_entry(db, entry, 1.0)
    loaded.clear()
    collector.work(time.time())
    assert submitted[-1] == "s-2"
    # Read again: the waiting burst (its user still busy) and the new one; none in flight.
    assert sorted(cid for ids in loaded for cid in ids) == [
        *(f"o-{n}" for n in range(WORKERS // 2, 6)),
        "s-2",
    ]
