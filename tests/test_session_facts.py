"""The session report (issue #21): facts read from a Claude Code transcript of documented line
shapes (tool_use/tool_result pairs, is_error, sidechains, a summary line, unknown types), the
report and summary built from them with exact numbers, a 200 MB transcript in bounded memory and
time, git evidence from a real repository, and hostile file names and commands that stay inert
in every view of the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent import git_evidence
from agent.report import SUMMARY_MAX_CHARS, render_report
from agent.session_facts import read_facts
from agent.sources import Collected, TodoFacts
from tests.plugin_views import (
    CHROMIUM,
    PARSEDOWN,
    PHP,
    Browser,
    admin_page,
    render_views,
    view_problems,
)

SESSION = "5b1e7c2a-3f40-4c1e-9d7a-2a61c0e4f9b3"
BERLIN = ZoneInfo("Europe/Berlin")


class Transcript:
    """Builds a transcript line by line in the shapes Claude Code writes (see
    tests/fixtures/claude-code/README.md)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.n = 0
        self.second = 0

    def _envelope(self, kind: str, *, side: bool = False, **extra: object) -> dict:
        self.n += 1
        self.second += 1
        minute, second = divmod(self.second, 60)
        return {
            "type": kind,
            "uuid": f"x-{self.n}",
            "parentUuid": f"x-{self.n - 1}" if self.n > 1 else None,
            "isSidechain": side,
            "timestamp": f"2026-11-28T09:{minute:02d}:{second:02d}.000Z",
            "sessionId": SESSION,
            "cwd": "/srv/site",
            "version": "2.1.150",
            **extra,
        }

    def add(self, obj: dict) -> None:
        self.lines.append(json.dumps(obj, ensure_ascii=False))

    def raw(self, text: str) -> None:
        self.lines.append(text)

    def say(self, text: str, *, msg: str, side: bool = False) -> None:
        self.add(
            self._envelope(
                "assistant",
                side=side,
                message={
                    "id": msg,
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4",
                    "content": [{"type": "text", "text": text}],
                    "usage": {"input_tokens": 100, "output_tokens": 10},
                },
            )
        )

    def tool(
        self,
        name: str,
        params: dict,
        *,
        msg: str,
        result: str = "ok",
        error: bool = False,
        side: bool = False,
        tool_result: dict | None = None,
    ) -> None:
        tid = f"toolu_{self.n:04d}"
        self.add(
            self._envelope(
                "assistant",
                side=side,
                message={
                    "id": msg,
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4",
                    "content": [{"type": "tool_use", "id": tid, "name": name, "input": params}],
                    "usage": {"input_tokens": 100, "output_tokens": 20},
                },
            )
        )
        block: dict = {"type": "tool_result", "tool_use_id": tid, "content": result}
        if error:
            block["is_error"] = True
        extra = {"toolUseResult": tool_result} if tool_result is not None else {}
        self.add(
            self._envelope("user", side=side, message={"role": "user", "content": [block]}, **extra)
        )

    def write(self, path: Path) -> Path:
        path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        return path


def session_transcript(*, last_test_fails: bool = False) -> Transcript:
    """3 files created, 2 modified, 5 commands (1 failed, exit code 1), 1 error on the main
    chain; a subagent that edits 1 file and runs 2 commands; noise around it."""
    t = Transcript()
    t.add({"type": "summary", "summary": "Login-Formular validieren", "leafUuid": "x-9"})
    t.add(t._envelope("user", message={"role": "user", "content": "Bearbeite Todo #42"}))
    t.say("Ich sehe mir das an.", msg="m1")
    t.tool("Write", {"file_path": "/srv/site/a.php", "content": "x"}, msg="m2",
           tool_result={"type": "create", "filePath": "/srv/site/a.php"})  # fmt: skip
    t.tool("Write", {"file_path": "/srv/site/b.php", "content": "x"}, msg="m3")
    t.tool("NotebookEdit", {"notebook_path": "/srv/site/c.ipynb", "new_source": "x"}, msg="m4")
    t.tool("Edit", {"file_path": "/srv/site/a.php", "old_string": "x", "new_string": "y"},
           msg="m5")  # created above: stays created, counted once  # fmt: skip
    t.tool("Write", {"file_path": "/srv/site/d.php", "content": "x"}, msg="m6",
           tool_result={"type": "create"})  # fmt: skip
    t.tool("MultiEdit", {"file_path": "/srv/site/e.php", "edits": []}, msg="m7")
    t.tool("Bash", {"command": "git status"}, msg="m8")
    t.tool("Bash", {"command": "npm install"}, msg="m9")
    t.tool("Bash", {"command": "php -l a.php"}, msg="m10")
    t.tool("Read", {"file_path": "/srv/site/a.php"}, msg="m11")  # a tool it need not know
    t.tool("Bash", {"command": "npm test"}, msg="m12", error=True,
           result="Exit code 1\nTests: 11 passed, 1 failed")  # fmt: skip
    t.raw('{"type": "file-history-snapshot", "messageId": "m13", "snapshot": {}}')
    t.raw('{"type": "progress", "data": {"whatever": 1}}')  # a type this reader does not know
    t.raw("{not json at all")
    t.tool("Edit", {"file_path": "/srv/site/side.php"}, msg="s1", side=True)
    t.tool("Bash", {"command": "grep -r validate ."}, msg="s2", side=True)
    t.tool("Bash", {"command": "ls"}, msg="s3", side=True, error=True, result="boom")
    if last_test_fails:
        t.tool("Bash", {"command": "pytest -q"}, msg="m14", error=True, result="exit code 2")
    else:
        t.tool("Bash", {"command": "npm test"}, msg="m14", result="Tests: 12 passed")
    t.say("Alle Tests laufen, das Formular prüft jetzt E-Mail und Passwort.", msg="m15")
    return t


def facts_of(t: Transcript, tmp_path: Path):
    return read_facts(t.write(tmp_path / "transcript.jsonl"))


# --------------------------------------------------------------------------- the facts


def test_facts_are_exact(tmp_path: Path) -> None:
    f = facts_of(session_transcript(), tmp_path)
    assert f.main.created == ["/srv/site/a.php", "/srv/site/b.php", "/srv/site/d.php"]
    assert f.main.modified == ["/srv/site/c.ipynb", "/srv/site/e.php"]
    assert [(c.command, c.ok, c.exit_code) for c in f.main.commands] == [
        ("git status", True, None),
        ("npm install", True, None),
        ("php -l a.php", True, None),
        ("npm test", False, 1),
        ("npm test", True, None),
    ]
    assert f.main.commands_total == 5 and f.main.failed_commands == 1
    assert len(f.main.errors) == 1 and f.main.errors[0].startswith("npm test: Exit code 1")
    # the subagent's work is counted apart
    assert (f.side.modified, f.side.commands_total, len(f.side.errors)) == (
        ["/srv/site/side.php"],
        2,
        1,
    )
    assert f.first_at == datetime(2026, 11, 28, 9, 0, 1, tzinfo=UTC)
    assert f.duration_s == (len(session_transcript().lines) - 5)  # one second per envelope line
    assert f.model == "claude-sonnet-4"
    assert (f.unknown_lines, f.skipped_lines) == (1, 1)


def test_write_over_an_existing_file_is_a_modification(tmp_path: Path) -> None:
    t = Transcript()
    t.tool("Write", {"file_path": "/x/old.txt"}, msg="m1", tool_result={"type": "update"})
    t.tool("Write", {"file_path": "/x/new.txt"}, msg="m2", tool_result={"type": "create"})
    f = facts_of(t, tmp_path)
    assert (f.main.created, f.main.modified) == (["/x/new.txt"], ["/x/old.txt"])


def test_usage_of_one_api_message_split_over_lines_is_counted_once(tmp_path: Path) -> None:
    t = Transcript()
    t.say("a", msg="same")
    t.tool("Bash", {"command": "true"}, msg="same")  # same API message: usage 100/20
    t.say("b", msg="other")
    f = facts_of(t, tmp_path)
    assert (f.tokens_in, f.tokens_out) == (200, 30)


# --------------------------------------------------------------------------- the report


def report_of(facts, text: str, kind: str = "normal", **kw):
    return render_report(
        todo_id=42,
        todo=TodoFacts("Login-Formular validieren", "", "/srv/site"),
        collected=Collected(text, "transcript", (), True, False),
        kind=kind,
        started_at=datetime(2026, 11, 28, 9, 0, tzinfo=UTC),
        completed_at=datetime(2026, 11, 28, 9, 1, tzinfo=UTC),
        zone=BERLIN,
        session=facts,
        **kw,
    )


def test_summary_and_report_follow_the_plugins_pattern(tmp_path: Path) -> None:
    f = facts_of(session_transcript(), tmp_path)
    answer = "Alle Tests laufen, das Formular prüft jetzt E-Mail und Passwort."
    r = report_of(f, answer)
    assert r.summary == "✅ 3 Dateien erstellt, 2 geändert, 5 Befehle, 1 Fehler"
    md = r.db
    # the final answer leads, then files, commands, errors, the session
    order = [md.index(h) for h in ("## Ausgabe", "## Dateien (5)", "## Befehle (5)",
                                   "## Fehler (1)", "## Sitzung")]  # fmt: skip
    assert order == sorted(order)
    assert md.index("    " + answer) < md.index("## Dateien")
    for line in (
        "- Erstellt (3):",
        "- /srv/site/a.php",
        "- Geändert (2):",
        "- ❌ npm test (Exit-Code 1)",
        "- ✅ php -l a.php",
        "- npm test: Exit code 1 Tests: 11 passed, 1 failed",
        "- Dauer: ",
        "- Modell: claude-sonnet-4",
        "- Subagenten: 0 erstellt, 1 geändert, 2 Befehle, 1 Fehler",
    ):
        assert line in md, line
    english = report_of(f, answer, language="en")
    assert english.summary == "✅ 3 files created, 2 modified, 5 commands, 1 error"


def test_last_n_commands_with_a_count_of_the_rest(tmp_path: Path) -> None:
    t = Transcript()
    for i in range(14):
        t.tool("Bash", {"command": f"step {i}"}, msg=f"m{i}")
    md = report_of(facts_of(t, tmp_path), "fertig").db
    assert "- … und 4 frühere\n- ✅ step 4\n" in md and "step 3\n" not in md
    assert "- ✅ step 13\n" in md


def test_claimed_success_with_a_failed_last_test_warns(tmp_path: Path) -> None:
    f = facts_of(session_transcript(last_test_fails=True), tmp_path)
    r = report_of(f, "Alle Tests laufen. Erfolgreich abgeschlossen ✅")
    assert r.summary.startswith("⚠️ 3 Dateien erstellt, 2 geändert, 5 Befehle, 2 Fehler")
    first, second = r.db.split("\n\n")[:2]
    assert first.startswith("⚠️ Todo #42 erledigt")
    assert second.startswith("⚠️ Achtung: Die Antwort meldet Erfolg") and "pytest -q" in second
    assert "⚠️" in r.html and "pytest -q" in r.html
    # no claim of success: no warning
    calm = report_of(f, "Ein Test schlägt noch fehl; siehe unten.")
    assert calm.summary.startswith("✅ ") and "Achtung" not in calm.db


def test_without_tool_calls_the_summary_is_the_answers_first_line(tmp_path: Path) -> None:
    t = Transcript()
    t.say("Nur eine Erklärung.", msg="m1")
    r = report_of(facts_of(t, tmp_path), "Nur eine Erklärung.\n\nMehr Text.")
    assert r.summary == "✅ Nur eine Erklärung. Mehr Text."


def test_a_fallback_report_says_which_facts_it_lacks() -> None:
    r = render_report(
        todo_id=1,
        todo=None,
        collected=Collected("pane text", "tmux", (), False, False),
        kind="normal",
        started_at=None,
        completed_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert "Aus dieser Quelle (tmux) fehlen: Dateien, Befehle, Fehler, Dauer." in r.db
    assert "fehlen: Dateien, Befehle, Fehler, Dauer." in r.html


# --------------------------------------------------------------------------- big transcripts


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_200_mb_transcript_is_read_in_bounded_memory_and_time(tmp_path: Path) -> None:
    block = "\n".join(session_transcript().lines).encode() + b"\n"
    path = tmp_path / "big.jsonl"
    repeats = 200 * 1024 * 1024 // len(block) + 1
    with open(path, "wb") as out:
        for _ in range(repeats):
            out.write(block)
        out.write(
            b'{"type": "user", "message": {"content": "' + b"x" * (9 * 1024 * 1024) + b'"}}\n'
        )
    assert path.stat().st_size > 200 * 1024 * 1024
    code = (
        # VmHWM, not ru_maxrss: the latter carries the parent's peak over a vfork+exec, and an
        # xdist worker that ran other tests first is far bigger than this reader.
        "import json, re, sys, time; from pathlib import Path;"
        "from agent.session_facts import read_facts;"
        "t = time.monotonic(); f = read_facts(Path(sys.argv[1]));"
        "print(json.dumps({'s': time.monotonic() - t, 'commands': f.main.commands_total,"
        " 'created': len(f.main.created), 'skipped': f.skipped_lines,"
        " 'rss': int(re.search(r'VmHWM:\\s*(\\d+)', Path('/proc/self/status').read_text())[1])}))"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["commands"] == 5 * repeats  # every line was read
    assert out["created"] == 3  # each file once
    assert out["skipped"] == repeats + 1  # the bad line of each block, and the 9 MB one
    assert out["rss"] < 120 * 1024, f"peak RSS {out['rss']} KiB"  # KiB: bounded, not 200 MB
    assert time.monotonic() - started < 480


# --------------------------------------------------------------------------- git evidence


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}  # fmt: skip
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout


def test_git_evidence_sees_the_sessions_changes_and_flags_a_claim(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    for name in ("a.php", "b.php", "c.php"):
        (repo / name).write_text("old\n")
    # a hook that would tell if it ran
    (repo / ".git" / "hooks" / "post-checkout").write_text("#!/bin/sh\ntouch HOOK_RAN\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "start")
    base = git_evidence.head(str(repo))
    assert base is not None and len(base) == 40
    # the "session": one commit, one uncommitted change, one new file
    (repo / "a.php").write_text("new\n")
    git(repo, "commit", "-qam", "during")
    (repo / "b.php").write_text("changed\n")
    (repo / "n.php").write_text("brand new\n")
    ev = git_evidence.evidence(str(repo), base)
    assert ev.missing is None and ev.head == base
    assert ev.changed == ["a.php", "b.php", "n.php"]
    assert any("a.php" in line and "|" in line for line in ev.stat_lines)
    assert not (repo / "HOOK_RAN").exists()

    t = Transcript()
    for name in ("a.php", "b.php", "c.php"):  # c.php is claimed but unchanged
        t.tool("Edit", {"file_path": str(repo / name)}, msg=f"m-{name}")
    f = facts_of(t, tmp_path)
    md = report_of(f, "Fertig.", evidence=ev).db
    assert "- Write/Edit an 3 Dateien; git sieht 3 geändert" in md
    assert "- Gemeldet, aber für git unverändert: c.php" in md
    assert "- Von git gesehen, aber nicht gemeldet: n.php" in md
    assert f"- Stand beim Start: {base[:12]}" in md


def test_git_evidence_outside_a_repository_says_why(tmp_path: Path) -> None:
    ev = git_evidence.evidence(str(tmp_path), None)
    assert ev.missing == "not_a_repository"
    assert git_evidence.head(str(tmp_path)) is None


# --------------------------------------------------------------------------- hostile names


HOSTILE_NAMES = [
    "/srv/<script>alert(1)</script>.php",
    "/srv/a\nb](javascript:alert(2)).php",
    "/srv/\x1b[31mred\x1b[0m<img src=x onerror=alert(3)>.php",
    "/srv/evil\u202eexe.php",
    "/srv/![x](http://BEACON/img.png)",
]
HOSTILE_COMMANDS = [
    "echo '<iframe src=javascript:alert(4)>'",
    "cat <<EOF\n<svg onload=alert(5)>\nEOF",
    "printf '\x1b]8;;http://BEACON/\x07link\x1b]8;;\x07'",
    "ls \u2066<b>bidi</b>\u2069 [x](javascript:alert(6))",
]


@pytest.fixture
def browser():
    for tool in (PHP, CHROMIUM, str(PARSEDOWN)):
        if not Path(tool).exists():
            pytest.skip(f"{tool} is missing (scripts/test installs it as root)")
    server = Browser()
    yield server
    server.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hostile_file_names_and_commands_are_inert_everywhere(
    tmp_path: Path, browser: Browser
) -> None:
    beacon = browser.beacon("names").removeprefix("http://")
    t = Transcript()
    for i, name in enumerate(HOSTILE_NAMES):
        t.tool("Write", {"file_path": name.replace("BEACON", beacon)}, msg=f"w{i}")
    for i, command in enumerate(HOSTILE_COMMANDS):
        t.tool("Bash", {"command": command.replace("BEACON", beacon)}, msg=f"b{i}", error=True,
               result="<script>alert(7)</script>")  # fmt: skip
    f = facts_of(t, tmp_path)
    assert len(f.main.created) == len(HOSTILE_NAMES)
    r = report_of(f, "Fertig.")
    assert len(r.summary) <= SUMMARY_MAX_CHARS and "\n" not in r.summary
    assert "\x1b" not in r.db and "\u202e" not in r.db and "⟦U+202E⟧" in r.db
    views = render_views([r.db])[0]
    names = []
    for view, html in views.items():
        assert not view_problems(html), (view, view_problems(html))
        browser.add(f"names.{view}", admin_page(f"names.{view}", html))
        names.append(f"names.{view}")
    assert "<script" not in r.html.lower() and "<img" not in r.html.lower()
    browser.add("names.page", r.html)
    browser.verdict([*names, "names.page"])


# --------------------------------------------------------------------------- through the agent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_agent_records_head_at_start_and_reports_what_git_saw(make_agent) -> None:
    from ctl import Client
    from tests.harness import wait_for

    agent = make_agent({"collect": {"transcript_wait": 0}}).start()
    repo = agent.root / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    for name in ("a.php", "b.php"):
        (repo / name).write_text("old\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "before the session")
    base = git_evidence.head(str(repo))
    assert base is not None
    todo = agent.add("Evidenz")
    client = Client(str(agent.config_path), timeout=5)
    client.start(todo, cwd=str(repo), session_id="s-git")
    wait_for(lambda: agent.todo_row(todo)["status"] == "in_progress", what="in_progress")
    # the session commits one change (HEAD moves) and leaves another uncommitted
    (repo / "a.php").write_text("new\n")
    git(repo, "commit", "-qam", "during the session")
    (repo / "b.php").write_text("changed\n")
    t = Transcript()
    for name in ("a.php", "b.php", "c.php"):
        t.tool("Edit", {"file_path": str(repo / name)}, msg=f"m-{name}")
    t.say("Fertig: alle drei Dateien angepasst.", msg="end")
    transcript = t.write(agent.root / "transcript.jsonl")
    client.complete(todo, transcript_path=str(transcript), session_id="s-git")
    wait_for(
        lambda: (agent.todo_row(todo) or {}).get("status") == "completed",
        60,
        what="the completion in the database",
    )
    row = agent.todo_row(todo)
    md = row["claude_html_output"]
    assert row["claude_summary"] == "✅ 0 Dateien erstellt, 3 geändert, 0 Befehle, 0 Fehler"
    assert f"- Stand beim Start: {base[:12]}" in md, md  # recorded at start, before HEAD moved
    assert "- Write/Edit an 3 Dateien; git sieht 2 geändert" in md
    assert "- Gemeldet, aber für git unverändert: c.php" in md


def test_api_errors_count_as_errors_and_sidechain_models_do_not_win(tmp_path: Path) -> None:
    t = Transcript()
    t.say("Hallo", msg="m1")
    error = t._envelope(
        "assistant",
        isApiErrorMessage=True,
        message={
            "id": "m2",
            "role": "assistant",
            "model": "<synthetic>",
            "content": [{"type": "text", "text": "API Error: 529 Overloaded"}],
        },
    )
    t.add(error)
    side = t._envelope(
        "assistant",
        side=True,
        message={"id": "s1", "role": "assistant", "model": "claude-haiku", "content": []},
    )
    t.add(side)
    f = facts_of(t, tmp_path)
    assert f.api_errors == 1 and f.main.errors == ["API Error: 529 Overloaded"]
    assert f.model == "claude-sonnet-4"
