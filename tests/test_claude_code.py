"""Claude Code as it really behaves (issue 13): payloads from the hooks reference, through
``completionctl hook`` and the HTTP hook endpoint, against a running agent.

Stop fires after every turn (the latest answer wins), SessionEnd acts by its reason, a failed
session is not a completion, refusals fade, and problems reach the user once.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from tests import claude_events as ce
from tests.dbfixtures import fetch_row, proxied_url
from tests.harness import Agent, check_of, entries, health, wait_for
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.slow

ANSWERS = ["Turn one: looked at the form.", "Turn two: wrote the tests.", "Turn three: all green."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_hook(agent: Agent, data: dict, todo_id: int | None = None) -> tuple[str, str]:
    env = {"TODO_ID": str(todo_id)} if todo_id is not None else None
    result = agent.ctl("hook", input=json.dumps(data), env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode(), result.stderr.decode()


def ev(agent: Agent, name: str, session: str, **overrides: Any) -> dict:
    transcript = agent.root / f"{session}.jsonl"
    return ce.event(name, session, str(agent.root), str(transcript), **overrides)


def kinds(agent: Agent, todo_id: int) -> list[str]:
    status = agent.todo_status(todo_id)
    return [e["kind"] for e in status["entries"]] if status else []


def archives(agent: Agent, todo_id: int) -> list[Path]:
    return sorted((agent.state / "archive").glob(f"todo_{todo_id}_*"))


def health_check(agent: Agent, name: str) -> dict:
    health = json.loads(agent.ctl("--json", "health").stdout)
    return next(c for c in health["checks"] if c["name"] == name)


def journal_requests(agent: Agent, todo_id: int) -> int:
    from agent.journal import Journal

    journal = Journal(agent.state / "journal.db")
    try:
        return journal.count_requests(todo_id)
    finally:
        journal.close()


# ---------------------------------------------------------------- the event table


def _assert_row(agent: Agent, todo: int, name: str, before: dict) -> dict:
    """What the event must have left in the journal, per tests/claude_events.EXPECTED."""
    expected = ce.EXPECTED[name]
    status = agent.todo_status(todo)
    assert status is not None, name
    if expected == "heartbeat":
        assert status["last_heard_at"] > before["last_heard_at"], name
        assert status["waiting"] is None, name
    elif expected == "waiting":
        assert status["waiting"], name
    elif expected == "failure-noted":
        assert status["note"] and "rate_limit" in status["note"], name
    elif expected == "completion":
        assert [e["kind"] for e in status["entries"]][-1] in ("normal", "revision"), name
    return status


def _drive_table(agent: Agent, send) -> None:
    todo = agent.add("Every event")
    session = "table-session"
    send(ev(agent, "SessionStart", session), todo)
    status = wait_for(lambda: agent.todo_status(todo), what="start journaled")
    assert kinds(agent, todo) == ["start"]
    order = [n for n in ce.EVENT_FIELDS if n not in ("SessionStart", "Stop", "SessionEnd")]
    for name in order:
        send(ev(agent, name, session), None)
        status = _assert_row(agent, todo, name, status)
    assert kinds(agent, todo) == ["start"]  # none of them completes anything
    send(ev(agent, "Stop", session), None)
    status = _assert_row(agent, todo, "Stop", status)
    agent.wait_states(todo, "cleaned", "verified")
    row = agent.todo_row(todo)
    assert row["status"] == "completed"
    assert "validates email and password" in row["claude_text_output"]


def test_every_reference_event_through_the_command_hook(agent: Agent) -> None:
    def send(data: dict, todo_id: int | None) -> None:
        out, err = run_hook(agent, data, todo_id)
        assert out == "", (data["hook_event_name"], out, err)

    _drive_table(agent, send)


def test_every_reference_event_through_http_hooks(make_agent) -> None:
    port = free_port()
    agent = make_agent({"hook": {"http_listen": f"127.0.0.1:{port}"}}).start()
    token = agent.ctl("hook-token").stdout.decode().strip()
    token_file = agent.state / "hook-token"
    assert token and token_file.read_text().strip() == token
    assert token_file.stat().st_mode & 0o777 == 0o600
    url = f"http://127.0.0.1:{port}/"

    def send(data: dict, todo_id: int | None) -> None:
        headers_todo = {} if todo_id is None else {"X-Todo-Id": str(todo_id)}
        status, body = _post(url, data, token, headers_todo)
        assert (status, body) == (200, b""), data["hook_event_name"]

    _drive_table(agent, send)


def _post(url: str, data: dict, token: str | None, extra: dict | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **(extra or {})}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        url, data=json.dumps(data).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_http_hook_wrong_or_missing_token_is_401_and_nothing_journaled(make_agent) -> None:
    port = free_port()
    agent = make_agent({"hook": {"http_listen": f"127.0.0.1:{port}"}}).start()
    token = agent.ctl("hook-token").stdout.decode().strip()
    todo = agent.add("Guarded")
    url = f"http://127.0.0.1:{port}/"
    start = ev(agent, "SessionStart", "s-guard")
    for bad in (None, "wrong", token + "x"):
        status, body = _post(url, start, bad, {"X-Todo-Id": str(todo)})
        assert (status, body) == (401, b"")
    assert agent.todo_status(todo) is None  # nothing journaled
    assert _post(url, start, token, {"X-Todo-Id": str(todo)}) == (200, b"")
    wait_for(lambda: kinds(agent, todo) == ["start"], what="start journaled")


def _raw_http(port: int, data: bytes, *, answers: int = 1) -> list[bytes]:
    """Send ``data`` on one connection; the status lines of the answers read before the server
    closed it (or ``answers`` of them, whichever comes first)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        reader = conn.makefile("rb")
        lines: list[bytes] = []
        while len(lines) < answers:
            status = reader.readline()
            if not status:
                break
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            lines.append(status.split(b" ", 2)[1])
        if len(lines) == answers:
            conn.settimeout(0.5)
            try:  # anything more would be an answer too many (or the server closed: b"")
                extra = reader.readline()
            except TimeoutError:
                extra = b""
            assert extra == b"", extra
        return lines


def test_http_hook_speaks_only_what_a_hook_needs(make_agent) -> None:
    """POST with a Content-Length or chunked body, kept alive over several requests;
    100-continue; every other shape of request is answered with an error, and those whose rest
    cannot be read are closed. Only the good requests are journaled."""
    port = free_port()
    agent = make_agent({"hook": {"http_listen": f"127.0.0.1:{port}"}}).start()
    token = agent.ctl("hook-token").stdout.decode().strip()
    todo = agent.add("Raw HTTP")
    start = json.dumps(ev(agent, "SessionStart", "s-raw")).encode()
    beat = json.dumps(ev(agent, "PostToolUse", "s-raw")).encode()

    def post(body: bytes, *extra: str, version: str = "HTTP/1.1", length: bool = True) -> bytes:
        head = [f"POST /hook {version}", "Host: x", f"Authorization: Bearer {token}", *extra]
        if length:
            head.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body

    # Three requests on one connection, the middle one not JSON: 200, 400, 200, still open.
    three = post(start, f"X-Todo-Id: {todo}") + post(b"{not json") + post(beat)
    assert _raw_http(port, three, answers=3) == [b"200", b"400", b"200"]
    wait_for(lambda: journal_requests(agent, todo) == 2, what="the start and the heartbeat")
    # HTTP/1.0 closes after its answer; so does a request that says so.
    assert _raw_http(port, post(beat, version="HTTP/1.0") + post(beat), answers=2) == [b"200"]
    assert _raw_http(port, post(beat, "Connection: close") + post(beat), answers=2) == [b"200"]
    # 100-continue: the interim answer, then the final one.
    assert _raw_http(port, post(beat, "Expect: 100-continue"), answers=2) == [b"100", b"200"]
    wait_for(lambda: journal_requests(agent, todo) == 5, what="three more heartbeats")
    # A chunked body is read as well as a counted one.
    chunked = post(b"", "Transfer-Encoding: chunked", length=False)
    chunked += b"%x\r\n%s\r\n0\r\n\r\n" % (len(beat), beat)
    assert _raw_http(port, chunked + post(beat), answers=2) == [b"200", b"200"]
    wait_for(lambda: journal_requests(agent, todo) == 7, what="two more heartbeats")
    refused = {
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n": b"405",
        b"garbage\r\n\r\n": b"400",
        b"POST / HTTP/2.0\r\nHost: x\r\n\r\n": b"505",
        post(beat, "Transfer-Encoding: chunked", length=False): b"400",  # not chunks
        post(beat, "Content-Length: -1", length=False): b"400",
        post(beat, "Content-Length: 5", "Content-Length: 6", length=False): b"400",
        post(beat, "X-Big: " + "x" * 70_000): b"431",
        b"POST /" + b"x" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n": b"431",
        post(beat).replace(token.encode(), b"wrong"): b"401",
    }
    for request, status in refused.items():
        # Each closes the connection: a second request on it is never answered.
        assert _raw_http(port, request + post(beat), answers=2) == [status], request[:60]
    # A client gone mid-request costs nothing but its connection.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(post(beat)[:-10])
    assert _raw_http(port, post(beat)) == [b"200"]
    wait_for(lambda: journal_requests(agent, todo) == 8, what="the last heartbeat")
    assert journal_requests(agent, todo) == 8


def test_http_hook_queues_in_the_outbox_while_the_journal_stays_locked(make_agent) -> None:
    """The endpoint journals on a connection of its own with intake's lock wait: a journal
    locked past it (a stopped process inside a transaction) costs the hook an outbox file and
    half a second, not the event; the agent ingests the file once the lock is gone."""
    import sqlite3
    import time

    port = free_port()
    agent = make_agent({"hook": {"http_listen": f"127.0.0.1:{port}"}}).start()
    token = agent.ctl("hook-token").stdout.decode().strip()
    todo = agent.add("Locked out")
    url = f"http://127.0.0.1:{port}/"
    assert _post(url, ev(agent, "SessionStart", "s-lock"), token, {"X-Todo-Id": str(todo)}) == (
        200,
        b"",
    )
    wait_for(lambda: journal_requests(agent, todo) == 1, what="the start journaled")
    outbox = agent.state / "outbox"
    holder = sqlite3.connect(agent.state / "journal.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        assert _post(url, ev(agent, "PostToolUse", "s-lock"), token) == (200, b"")
        assert time.monotonic() - started < 5  # intake's lock wait, not the lock's holder
        assert len(list(outbox.glob("*.req"))) == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_for(lambda: journal_requests(agent, todo) == 2, what="the queued heartbeat ingested")
    wait_for(lambda: not list(outbox.glob("*.req")), what="the outbox emptied")


@pytest.mark.mysql
def test_http_thousand_heartbeats_from_8_senders_with_the_database_cut(
    make_agent, mysql_url: str, wordpress_table: str, tcp_proxy: TcpProxy
) -> None:
    """1,000 PostToolUse events from 8 concurrent senders, the MariaDB cut under the connected
    agent a third of the way through: every event is journaled (intake never waits on the
    database), none lost; the answer sent during the outage lands once it is over."""
    port = free_port()
    agent = make_agent(
        {
            "hook": {"http_listen": f"127.0.0.1:{port}"},
            "database": {"url": proxied_url(mysql_url, tcp_proxy)},
            "behavior": {"database_timeout": 2, "max_retries": 1, "retry_max_delay": 1},
        }
    ).start()
    token = agent.ctl("hook-token").stdout.decode().strip()
    url = f"http://127.0.0.1:{port}/"
    todo = agent.add("Under load")
    start = ev(agent, "SessionStart", "s-load")
    assert _post(url, start, token, {"X-Todo-Id": str(todo)}) == (200, b"")
    # The agent is connected and has written through the proxy before the cut.
    agent.wait_states(todo, "cleaned")
    assert fetch_row(mysql_url, todo)["status"] == "in_progress"  # type: ignore[index]
    assert tcp_proxy.open_connections > 0
    errors: list[object] = []
    cut = threading.Event()

    def sender(n: int) -> None:
        for i in range(125):
            if i == 40 and not cut.wait(60):  # the rest goes after the cut
                errors.append("the database was never cut")
            data = ev(agent, "PostToolUse", "s-load", tool_use_id=f"t-{n}-{i}")
            try:
                result = _post(url, data, token)
                if result != (200, b""):
                    errors.append(result)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: journal_requests(agent, todo) == 321, timeout=60, what="a third journaled")
    tcp_proxy.mode = "blackhole"  # connections accepted, nothing answers: the worst outage
    tcp_proxy.cut()
    cut.set()
    answer = "Finished while the database was away."
    stop = ev(agent, "Stop", "s-load", last_assistant_message=answer)
    assert _post(url, stop, token) == (200, b"")
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    wait_for(lambda: journal_requests(agent, todo) == 1002, timeout=30, what="1,002 requests")
    assert list((agent.state / "outbox").glob("*.req")) == []

    # The writer met the outage: it tried the answer and failed, or it had seen the outage
    # already and holds it while it probes (a loaded machine gives either order).
    def held_back() -> bool:
        [normal] = entries(agent, todo, "normal") or [None]
        if normal is None or normal["state"] != "collected":
            return False
        if normal["attempts"] >= 1:
            return True
        return check_of(health(agent)[1], "database")["status"] == "CRITICAL"

    wait_for(held_back, timeout=30, what="the answer held back by the outage")
    assert fetch_row(mysql_url, todo)["status"] == "in_progress"  # type: ignore[index]

    tcp_proxy.mode = "pass"
    wait_for(
        lambda: fetch_row(mysql_url, todo)["status"] == "completed",  # type: ignore[index]
        timeout=30,
        what="the answer to drain into the database",
    )
    assert answer in fetch_row(mysql_url, todo)["claude_text_output"]  # type: ignore[index]
    wait_for(lambda: kinds(agent, todo) == ["start", "normal"], what="the journal to settle")
    assert journal_requests(agent, todo) == 1002


# ---------------------------------------------------------------- revisions


def test_three_stops_the_latest_answer_wins_and_one_archive_at_the_end(agent: Agent) -> None:
    todo = agent.add("Three turns")
    session_dir = agent.sessions / f"claude_session_{todo}"
    session_dir.mkdir()
    (session_dir / "notes.txt").write_text("work in progress\n")
    run_hook(agent, ev(agent, "SessionStart", "s-turns"), todo)
    for answer in ANSWERS:
        run_hook(agent, ev(agent, "Stop", "s-turns", last_assistant_message=answer))
        wait_for(
            lambda a=answer: a in (agent.todo_row(todo)["claude_text_output"] or ""),
            what=f"answer {answer!r} in the database",
        )
        assert agent.todo_row(todo)["status"] == "completed"  # the first Stop completes
    assert kinds(agent, todo) == ["start", "normal", "revision", "revision"]
    assert [r["kind"] for r in agent.log_rows(todo)] == ["normal", "revision", "revision"]
    assert archives(agent, todo) == []  # not final yet: no archive, the session dir stays
    assert session_dir.is_dir()
    # The session ends: the result is final; one archive, the session dir cleaned up.
    run_hook(agent, ev(agent, "SessionEnd", "s-turns"))
    agent.wait_states(todo, "cleaned", "cleaned", "cleaned", "cleaned")
    [archive] = archives(agent, todo)
    page = (archive / "report.html").read_text()
    assert ANSWERS[-1] in page
    # A page, rendered from the Markdown the database got (not that Markdown as it is).
    assert page.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in page
    assert "<h2>" in page and "\n## " not in page
    assert not session_dir.exists()
    assert [r["kind"] for r in agent.log_rows(todo)] == ["normal", "revision", "revision"]


def test_result_is_final_after_final_after_seconds_without_a_session_end(make_agent) -> None:
    agent = make_agent({"hook": {"http_listen": "", "final_after": 1}}).start()
    todo = agent.add("Left open")
    run_hook(agent, ev(agent, "SessionStart", "s-open"), todo)
    run_hook(agent, ev(agent, "Stop", "s-open"))
    agent.wait_states(todo, "cleaned", "cleaned", timeout=30)


def test_stop_hook_active_alone_completes_and_another_sessions_stop_is_a_duplicate(
    agent: Agent,
) -> None:
    todo = agent.add("Kept going by a stop hook")
    run_hook(agent, ev(agent, "SessionStart", "s-first"), todo)
    run_hook(
        agent,
        ev(agent, "Stop", "s-first", stop_hook_active=True, last_assistant_message="final"),
    )
    agent.wait_states(todo, "cleaned", "verified")
    assert agent.todo_row(todo)["claude_text_output"].strip().endswith("final")
    # Another session's Stop on the completed todo changes nothing.
    run_hook(agent, ev(agent, "Stop", "s-other", last_assistant_message="intruder"), todo)
    wait_for(lambda: len(agent.log_rows(todo)) == 2, what="second log row")
    assert [r["kind"] for r in agent.log_rows(todo)] == ["normal", "duplicate"]
    assert "intruder" not in agent.todo_row(todo)["claude_text_output"]


def test_clear_mid_task_then_a_new_session_completes_once_with_its_answer(agent: Agent) -> None:
    todo = agent.add("Cleared")
    run_hook(agent, ev(agent, "SessionStart", "s-before"), todo)
    run_hook(agent, ev(agent, "PostToolUse", "s-before"))
    out, err = run_hook(agent, ev(agent, "SessionEnd", "s-before", reason="clear"))
    assert "ignored" in err and out == ""
    assert kinds(agent, todo) == ["start"]
    # The start reaches the database on its own time; the clear must not have completed it.
    wait_for(lambda: agent.todo_row(todo)["status"] == "in_progress", what="the start written")
    # /clear starts a new session (source "clear") on the same todo.
    out, _ = run_hook(agent, ev(agent, "SessionStart", "s-after", source="clear"), todo)
    assert out == ""
    run_hook(agent, ev(agent, "Stop", "s-after", last_assistant_message="the new answer"))
    run_hook(agent, ev(agent, "SessionEnd", "s-after", reason="logout"))
    agent.wait_states(todo, "cleaned", "cleaned", "cleaned")
    assert [r["kind"] for r in agent.log_rows(todo)] == ["normal"]
    assert "the new answer" in agent.todo_row(todo)["claude_text_output"]


def test_stop_failure_then_session_end_resets_with_the_error_in_the_report(agent: Agent) -> None:
    todo = agent.add("Rate limited")
    transcript = agent.root / "s-fail.jsonl"
    transcript.write_text(
        json.dumps(
            {
                "type": "assistant",
                "message": {"role": "assistant", "content": [{"type": "text", "text": "Halfway"}]},
            }
        )
        + "\n"
    )
    run_hook(agent, ev(agent, "SessionStart", "s-fail"), todo)
    run_hook(agent, ev(agent, "StopFailure", "s-fail"))
    run_hook(agent, ev(agent, "SessionEnd", "s-fail", reason="other"))
    status = agent.wait_states(todo, "cleaned", "cleaned")
    assert [e["kind"] for e in status["entries"]] == ["start", "failure"]
    row = agent.todo_row(todo)
    assert row["status"] == "offen"  # the queue retries it
    assert "rate_limit" in row["claude_text_output"] and "429" in row["claude_text_output"]
    (audit,) = agent.log_rows(todo)
    assert audit["kind"] == "failure"
    assert audit["note"] == "StopFailure: rate_limit: 429 Too Many Requests"
    shown = agent.ctl("show", str(todo))
    assert "failure" in shown.stdout.decode() and "429 Too Many Requests" in shown.stdout.decode()


def test_on_failure_wait_leaves_the_todo_to_its_deadlines(make_agent) -> None:
    agent = make_agent({"hook": {"http_listen": "", "on_failure": "wait"}}).start()
    todo = agent.add("Waits")
    run_hook(agent, ev(agent, "SessionStart", "s-wait"), todo)
    run_hook(agent, ev(agent, "StopFailure", "s-wait"))
    run_hook(agent, ev(agent, "SessionEnd", "s-wait"))
    assert kinds(agent, todo) == ["start"]
    wait_for(lambda: agent.todo_row(todo)["status"] == "in_progress", what="the start written")
    assert [d["name"] for d in agent.todo_status(todo)["deadlines"]] == ["completion", "emergency"]


def test_resume_of_a_finished_todo_is_a_heartbeat_and_raises_no_warning(agent: Agent) -> None:
    todo = agent.add("Done, then resumed")
    run_hook(agent, ev(agent, "SessionStart", "s-done"), todo)
    run_hook(agent, ev(agent, "Stop", "s-done"))
    run_hook(agent, ev(agent, "SessionEnd", "s-done"))
    agent.wait_states(todo, "cleaned", "cleaned")
    heard = agent.todo_status(todo)["last_heard_at"]
    out, _ = run_hook(agent, ev(agent, "SessionStart", "s-done", source="resume"), todo)
    assert out == ""
    assert agent.todo_status(todo)["last_heard_at"] > heard
    assert kinds(agent, todo) == ["start", "normal"]
    wait_for(lambda: health_check(agent, "refused")["status"] == "OK", what="refused OK")
    assert agent.todo_row(todo)["status"] == "completed"


def test_refusals_fade_after_the_window_or_when_acknowledged(make_agent) -> None:
    agent = make_agent({"hook": {"http_listen": ""}, "health": {"refused_window": 3}}).start()
    assert agent.ctl("start", "4242").returncode == 0  # acknowledged, then refused
    wait_for(lambda: health_check(agent, "refused")["status"] == "WARNING", what="WARNING")
    wait_for(lambda: health_check(agent, "refused")["status"] == "OK", timeout=15, what="faded")
    assert agent.ctl("start", "4243").returncode == 0
    wait_for(lambda: health_check(agent, "refused")["status"] == "WARNING", what="WARNING")
    result = agent.ctl("ack", "refused")
    assert result.returncode == 0, result.stderr
    assert health_check(agent, "refused")["status"] == "OK"


# ---------------------------------------------------------------- telling the user


def _said(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_broken_config_says_so_once_per_session_as_a_system_message(agent: Agent) -> None:
    agent.config_path.write_text(agent.config_path.read_text() + "\n[oops]\nnot_a_section = 1\n")
    outs = [run_hook(agent, ev(agent, "PostToolUse", "s-broken"))[0] for _ in range(3)]
    said = _said(outs[0])
    assert len(said) == 1 and list(said[0]) == ["systemMessage"]
    assert "configuration" in said[0]["systemMessage"]
    assert outs[1:] == ["", ""]
    # Another session is told too, once.
    assert len(_said(run_hook(agent, ev(agent, "Stop", "s-other"))[0])) == 1


def test_unmapped_session_says_so_once_per_session(agent: Agent) -> None:
    out, _ = run_hook(agent, ev(agent, "SessionStart", "s-lost"))
    [said] = _said(out)
    assert list(said) == ["systemMessage"] and "no todo" in said["systemMessage"]
    for name in ("UserPromptSubmit", "PostToolUse", "Stop"):
        out, err = run_hook(agent, ev(agent, name, "s-lost"))
        assert out == "", (name, err)


# ---------------------------------------------------------------- the hook itself


def test_hook_help_and_version_without_stdin(agent: Agent) -> None:
    result = agent.ctl("hook", "--help", input=None)
    assert result.returncode == 0 and b"SessionEnd" in result.stdout
    for program in ("ctl", "agent"):
        import subprocess
        import sys

        done = subprocess.run(
            [sys.executable, "-m", program, "--version"],
            capture_output=True,
            env=agent.env,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode().split()[-1][0].isdigit()


def test_payload_over_the_limit_is_capped_and_still_completes(agent: Agent) -> None:
    todo = agent.add("Huge")
    data = ev(agent, "Stop", "s-huge", last_assistant_message="HEAD " + "y" * (65 << 20))
    raw = json.dumps(data)
    result = agent.ctl("hook", input=raw, env={"TODO_ID": str(todo)}, timeout=120)
    assert result.returncode == 0
    assert b"capped" in result.stderr
    agent.wait_states(todo, "verified", timeout=60)
    text = agent.todo_row(todo)["claude_text_output"]
    assert text.startswith("HEAD ") and "omitted" in text


def test_status_of_a_never_started_todo_says_what_the_database_holds(agent: Agent) -> None:
    todo = agent.add("Never started")
    result = agent.ctl("status", str(todo))
    assert result.returncode == 1
    assert f"todo {todo} ('Never started') is offen in the database" in result.stdout.decode()


def test_start_with_a_negative_timeout_is_a_usage_error(agent: Agent) -> None:
    result = agent.ctl("start", "1", "--timeout", "-1")
    assert result.returncode == 2
    assert b"not a timeout" in result.stderr and b"Traceback" not in result.stderr


def test_list_with_a_limit_below_one_is_a_usage_error(agent: Agent) -> None:
    for bad in ("0", "-3", "many"):
        result = agent.ctl("list", "--limit", bad)
        assert result.returncode == 2, bad
        assert b"not a limit" in result.stderr and b"Traceback" not in result.stderr


def test_shipped_settings_are_valid_against_the_reference() -> None:
    root = Path(__file__).resolve().parent.parent / "contrib"
    handler_fields = {
        "command": {"type", "command", "timeout", "async", "statusMessage"},
        "http": {"type", "url", "headers", "allowedEnvVars", "timeout", "statusMessage"},
    }
    for name in ("claude-settings.json", "claude-settings.command-only.json"):
        settings = json.loads((root / name).read_text())
        events = settings["hooks"]
        assert set(events) <= set(ce.EVENT_FIELDS), name
        for event, groups in events.items():
            for group in groups:
                assert set(group) <= {"matcher", "hooks"}, (name, event)
                for handler in group["hooks"]:
                    assert set(handler) <= handler_fields[handler["type"]], (name, event)
                    if handler["type"] == "http":
                        assert handler["url"].startswith("http://127.0.0.1:")
                        for header in handler["headers"].values():
                            for var in ("COMPLETION_HOOK_TOKEN", "TODO_ID"):
                                if f"${var}" in header or f"${{{var}}}" in header:
                                    assert var in handler["allowedEnvVars"]
                    else:
                        assert handler["command"].startswith("completionctl hook")
    # The must-not-lose events stay command hooks (outbox) in both variants.
    main = json.loads((root / "claude-settings.json").read_text())["hooks"]
    for event in ("SessionStart", "Stop", "StopFailure", "SessionEnd"):
        assert all(h["type"] == "command" for g in main[event] for h in g["hooks"]), event
    assert all(h["type"] == "http" for g in main["PostToolUse"] for h in g["hooks"])
    only = json.loads((root / "claude-settings.command-only.json").read_text())["hooks"]
    assert all(h.get("async") is True for g in only["PostToolUse"] for h in g["hooks"])
    assert not any(h.get("async") for g in only["Stop"] for h in g["hooks"])


# ---------------------------------------------------------------- seeing what happened


def test_list_and_show_tell_a_user_what_happened(agent: Agent) -> None:
    todo = agent.add("Listed")
    other = agent.add("Never touched")
    (agent.sessions / f"claude_session_{todo}").mkdir()
    (agent.sessions / f"claude_session_{todo}" / "notes.txt").write_text("kept\n")
    run_hook(agent, ev(agent, "SessionStart", "s-list"), todo)
    run_hook(agent, ev(agent, "Stop", "s-list", last_assistant_message="first"))
    run_hook(agent, ev(agent, "Stop", "s-list", last_assistant_message="second and last"))
    agent.wait_states(todo, "cleaned", "verified", "verified")
    listed = agent.ctl_json("list")
    [row] = [r for r in listed if r["todo_id"] == todo]
    assert row["status"] == "completed" and row["revisions"] == 1
    assert row["latest"] == "revision verified" and row["last_heard_at"] != "-"
    [queued] = [r for r in listed if r["todo_id"] == other]  # queued: live, though never started
    assert (queued["status"], queued["known_to_agent"], queued["latest"]) == ("offen", False, "-")
    offen = agent.ctl_json("list", "--status", "offen")
    assert [r["todo_id"] for r in offen] == [other]
    human = agent.ctl("list").stdout.decode()
    assert "revision verified, 1 revision(s)" in human

    shown = agent.ctl_json("show", str(todo))
    assert shown["status"] == "completed"
    assert [entry["kind"] for entry in shown["log"]] == ["normal", "revision"]
    assert shown["archive_path"] is None  # not final yet
    run_hook(agent, ev(agent, "SessionEnd", "s-list"))
    agent.wait_states(todo, "cleaned", "cleaned", "cleaned")
    shown = agent.ctl_json("show", str(todo))
    assert shown["report_path"] and Path(shown["report_path"]).is_file()
    report = agent.ctl("show", str(todo), "--report").stdout.decode()
    assert "second and last" in report


def test_plain_list_shows_the_databases_live_todos_too(agent: Agent) -> None:
    import sqlite3

    heard = agent.add("Heard here")
    run_hook(agent, ev(agent, "SessionStart", "s-heard"), heard)
    elsewhere = agent.add("Started by the plugin's CLI")
    parked = int(agent.ctl_json("add", "Not in the queue", "--no-queue")["id"])
    finished = agent.add("Finished elsewhere")
    queued = agent.add("Waits in the queue")
    # The plugin (not this agent) starts one todo and finishes another.
    with sqlite3.connect(agent.sqlite_path) as db:
        db.execute(
            "UPDATE stage_project_todos SET status = 'in_progress',"
            " started_at = datetime('now', 'localtime', '+1 minute'),"
            " updated_at = datetime('now', 'localtime', '+1 minute') WHERE id = ?",
            (elsewhere,),
        )
        db.execute(
            "UPDATE stage_project_todos SET status = 'completed',"
            " completed_at = datetime('now', 'localtime', '+2 minutes') WHERE id = ?",
            (finished,),
        )
        # ...and touches the queued one later still (the whole seconds of the database's
        # clock must not tie with the start this agent heard).
        db.execute(
            "UPDATE stage_project_todos SET updated_at = datetime('now', 'localtime',"
            " '+30 seconds') WHERE id = ?",
            (queued,),
        )
    db.close()

    listed = agent.ctl_json("list")
    ids = [r["todo_id"] for r in listed]
    # The journal's todo and the live rows, the most recently active first; neither the
    # completed todo this agent never heard of nor the one outside the queue.
    assert ids == [elsewhere, queued, heard]
    assert all(set(r) == set(listed[0]) for r in listed)  # one shape for every row
    rows = {r["todo_id"]: r for r in listed}
    assert rows[heard]["known_to_agent"] and rows[heard]["last_heard_at"] != "-"
    assert rows[elsewhere]["marks"] == ["not started through this agent"]
    assert rows[elsewhere]["started_at"] != "-" and rows[elsewhere]["last_heard_at"] == "-"
    assert rows[queued]["marks"] == [] and rows[queued]["status"] == "offen"
    assert [r["todo_id"] for r in agent.ctl_json("list", "--limit", "2")] == [elsewhere, queued]
    assert [r["todo_id"] for r in agent.ctl_json("list", "--since", "3600")] == [heard]
    assert [r["todo_id"] for r in agent.ctl_json("list", "--status", "offen")] == [queued, parked]
    assert [r["todo_id"] for r in agent.ctl_json("list", "--status", "completed")] == [finished]
    human = agent.ctl("list").stdout.decode().splitlines()
    assert [int(line.split()[0]) for line in human[1:]] == [elsewhere, queued, heard]
    assert "not started through this agent" in human[1]


def test_a_closed_pipe_is_no_traceback(agent: Agent) -> None:
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader (`head -1`) is gone before the first line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ctl", "--config", str(agent.config_path), "check"],
            stdout=write,
            stderr=subprocess.PIPE,
            env=agent.env,
            timeout=60,
        )
    finally:
        os.close(write)
    assert b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr, done.stderr


def test_logrotate_command_and_docs_name_the_config_lookup(agent: Agent) -> None:
    text = agent.ctl("logrotate").stdout.decode()
    assert f"{agent.state}/logs/agent.log" in text and "@" not in text
    readme = (Path(__file__).resolve().parent.parent / "contrib" / "README.md").read_text()
    assert "$XDG_CONFIG_HOME/completion/config.toml" in readme
    # The supervisord program passes --config: the install steps create that file first.
    steps = readme[readme.index("## supervisord") :]
    assert steps.index("cp contrib/config.example.toml ~/.config/completion/config.toml") < (
        steps.index("completiond.supervisord.conf")
    )
