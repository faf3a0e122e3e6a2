"""``completionctl hook`` fed Claude Code's hook payloads, against the real agent.

Every payload is a recorded-shape fixture; its ``transcript_path`` points at a copy of the fixture
transcript in the test's private directory.  The hook must always exit 0 with an empty stdout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Agent, wait_for

FIXTURES = Path(__file__).parent / "fixtures" / "claude-code"
FINAL_ANSWER = "Das Login-Formular validiert jetzt E-Mail und Passwort."
LAST_MESSAGE = "Das Login-Formular validiert jetzt E-Mail und Passwort; 12 Tests laufen grün."


def payload(agent: Agent, name: str, **overrides: Any) -> dict[str, Any]:
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    transcript = agent.root / "transcript.jsonl"
    if not transcript.exists():
        shutil.copy(FIXTURES / "transcript.jsonl", transcript)
    data["transcript_path"] = str(transcript)
    data["cwd"] = str(agent.root)
    data.update(overrides)
    return data


def hook(
    agent: Agent, data: dict[str, Any] | str | bytes, todo_id: int | None = None
) -> tuple[str, float]:
    """Run the real hook; it must exit 0, and print nothing on stdout or one JSON object
    holding only a systemMessage. Returns (stderr, seconds)."""
    env = {"TODO_ID": str(todo_id)} if todo_id is not None else None
    raw = data if isinstance(data, str | bytes) else json.dumps(data)
    started = time.monotonic()
    result = agent.ctl("hook", input=raw, env=env)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    if result.stdout:
        said = json.loads(result.stdout)
        assert list(said) == ["systemMessage"], said
    return result.stderr.decode(), took


def outbox(agent: Agent) -> list[Path]:
    return sorted((agent.state / "outbox").glob("*.req"))


def kinds(agent: Agent, todo_id: int) -> list[str]:
    status = agent.todo_status(todo_id)
    return [e["kind"] for e in status["entries"]] if status else []


def test_session_then_stop_completes_the_mapped_todo_with_the_last_message(agent: Agent) -> None:
    todo = agent.add("Login form")
    hook(agent, payload(agent, "session-start"), todo_id=todo)
    wait_for(lambda: agent.todo_row(todo)["status"] == "in_progress", what="in_progress")
    status = agent.todo_status(todo)
    assert status["session_id"] == "5b1e7c2a-3f40-4c1e-9d7a-2a61c0e4f9b3"
    assert [d["name"] for d in status["deadlines"]] == ["completion", "emergency"]

    # Everything below comes without $TODO_ID: the session id maps to the todo.
    heard = status["last_heard_at"]
    for name in ("user-prompt-submit", "post-tool-use", "subagent-stop", "task-completed"):
        hook(agent, payload(agent, name))
        now = agent.todo_status(todo)
        assert now["last_heard_at"] > heard, name
        heard = now["last_heard_at"]
    # SubagentStop and TaskCompleted are heartbeats, never completions.
    assert kinds(agent, todo) == ["start"]

    hook(agent, payload(agent, "stop"))
    # Completed at once, but not final: a later Stop of this session may still revise it.
    agent.wait_states(todo, "cleaned", "verified")
    row = agent.todo_row(todo)
    assert row["status"] == "completed"
    assert LAST_MESSAGE in row["claude_text_output"]
    assert agent.todo_status(todo)["entries"][1]["source"] == "message"

    # SessionEnd after Stop: complete_if_open finds the completion and adds nothing; the
    # result is final now, so the monitor archives and cleans up.
    hook(agent, payload(agent, "session-end"))
    agent.wait_states(todo, "cleaned", "cleaned")
    assert len(agent.todo_status(todo)["entries"]) == 2
    assert [r["kind"] for r in agent.log_rows(todo)] == ["normal"]
    assert outbox(agent) == []


def test_stop_without_last_message_is_collected_from_the_transcript(agent: Agent) -> None:
    todo = agent.add("From the transcript")
    hook(agent, payload(agent, "session-start", session_id="s-transcript"), todo_id=todo)
    hook(agent, payload(agent, "stop-without-last-message", session_id="s-transcript"))
    status = agent.wait_states(todo, "cleaned", "verified")
    assert status["entries"][1]["source"] == "transcript"
    text = agent.todo_row(todo)["claude_text_output"]
    assert FINAL_ANSWER in text
    assert "Alle 12 Tests laufen grün." in text
    assert "(subagent)" not in text


def test_session_end_without_stop_completes_an_open_todo(agent: Agent) -> None:
    todo = agent.add("Ended early")
    hook(agent, payload(agent, "session-start", session_id="s-end"), todo_id=todo)
    hook(agent, payload(agent, "session-end", session_id="s-end"))
    status = agent.wait_states(todo, "cleaned", "cleaned")
    assert status["entries"][1]["kind"] == "normal"
    assert agent.todo_row(todo)["status"] == "completed"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("notification-permission", "permission_prompt"), ("notification-idle", "idle_prompt")],
)
def test_notification_shows_the_todo_waiting_for_a_person(
    agent: Agent, name: str, expected: str
) -> None:
    todo = agent.add("Needs a person")
    hook(agent, payload(agent, "session-start"), todo_id=todo)
    hook(agent, payload(agent, name))
    result = agent.ctl("--json", "status", str(todo))
    assert result.returncode == 0
    waiting = json.loads(result.stdout)["waiting"]
    assert waiting and expected in waiting
    health = json.loads(agent.ctl("--json", "health").stdout)
    check = next(c for c in health["checks"] if c["name"] == "waiting_for_person")
    assert check["status"] == "WARNING" and check["todo_ids"] == [todo]
    # The next sign of life clears it; a waiting todo is never completed by the hook.
    hook(agent, payload(agent, "post-tool-use"))
    assert agent.todo_status(todo)["waiting"] is None
    assert kinds(agent, todo) == ["start"]


def test_stop_failure_is_noted_on_the_todo_and_is_a_heartbeat(agent: Agent) -> None:
    todo = agent.add("Rate limited")
    hook(agent, payload(agent, "session-start"), todo_id=todo)
    heard = agent.todo_status(todo)["last_heard_at"]
    hook(agent, payload(agent, "stop-failure"))
    status = agent.todo_status(todo)
    assert status["note"] == "StopFailure: rate_limit: 429 Too Many Requests"
    assert status["last_heard_at"] > heard
    assert kinds(agent, todo) == ["start"]
    assert "rate_limit" in (agent.state / "logs" / "agent.log").read_text()


def test_huge_last_message_is_capped_not_lost(agent: Agent) -> None:
    todo = agent.add("Verbose")
    huge = "head " + "x" * (6 << 20) + " tail"
    hook(agent, payload(agent, "stop", last_assistant_message=huge), todo_id=todo)
    agent.wait_states(todo, "verified", timeout=30)
    row = agent.todo_row(todo)
    assert row["status"] == "completed"
    assert row["claude_text_output"].startswith("head ")
    assert row["claude_text_output"].endswith(" tail")
    # A Stop's answer stays open for revisions (hook.final_after), even for a todo this agent
    # never heard start: the journal's prune must not make it final at once.
    assert agent.entry_states(todo) == ["verified"]


def test_stop_hook_active_alone_completes_with_its_answer(agent: Agent) -> None:
    todo = agent.add("Continued by a stop hook")
    hook(agent, payload(agent, "session-start"), todo_id=todo)
    hook(agent, payload(agent, "stop", stop_hook_active=True))
    agent.wait_states(todo, "cleaned", "verified")
    assert kinds(agent, todo) == ["start", "normal"]
    assert LAST_MESSAGE in agent.todo_row(todo)["claude_text_output"]


def test_compaction_session_start_is_a_heartbeat(agent: Agent) -> None:
    todo = agent.add("Compacted")
    hook(agent, payload(agent, "session-start"), todo_id=todo)
    hook(agent, payload(agent, "session-start", source="compact"), todo_id=todo)
    assert kinds(agent, todo) == ["start"]


def test_which_todo_env_beats_session_beats_current_todo_file(agent: Agent) -> None:
    mapped, explicit, hinted = agent.add("mapped"), agent.add("explicit"), agent.add("hinted")
    (agent.root / "CURRENT_TODO_ID").write_text(f"{hinted}\n")
    hook(agent, payload(agent, "session-start", session_id="s-one"), todo_id=explicit)
    hook(agent, payload(agent, "session-start", session_id="s-two"), todo_id=mapped)
    # $TODO_ID wins over the session mapping (s-two maps to `mapped`).
    hook(agent, payload(agent, "stop", session_id="s-two"), todo_id=explicit)
    agent.wait_states(explicit, "cleaned", "verified")
    assert kinds(agent, mapped) == ["start"]
    # The session mapping wins over the CURRENT_TODO_ID hint.
    hook(agent, payload(agent, "session-start", session_id="s-two"), todo_id=mapped)
    hook(agent, payload(agent, "stop", session_id="s-two"))
    agent.wait_states(mapped, "cleaned", "cleaned", "verified")
    assert agent.todo_status(hinted) is None
    # An unknown session falls back to the hint.
    hook(agent, payload(agent, "stop", session_id="s-unknown"))
    agent.wait_states(hinted, "verified")
    assert agent.todo_row(hinted)["status"] == "completed"


def test_stop_means_heartbeat_is_configurable(make_agent) -> None:
    agent = make_agent({"hook": {"stop_means": "heartbeat", "session_end_means": "nothing"}})
    agent.start()
    todo = agent.add("Many turns")
    hook(agent, payload(agent, "session-start"), todo_id=todo)
    hook(agent, payload(agent, "stop"))
    err, _ = hook(agent, payload(agent, "session-end"))
    assert "ignored" in err
    assert kinds(agent, todo) == ["start"]


def test_agent_down_queues_at_once_and_delivers_after_start(make_agent) -> None:
    agent = make_agent({"hook": {"timeout": 3}})
    todo = 1
    # The socket file is missing: the hook must not wait for an answer (hook.timeout is 3 s).
    err, took = hook(agent, payload(agent, "session-start", session_id="s-down"), todo_id=todo)
    assert "queued" in err
    assert took < 2.5, took  # Python's start-up, no wait
    # Queued without $TODO_ID: resolved through the queued SessionStart's mapping on ingest.
    time.sleep(0.02)  # outbox files are ingested in mtime order
    hook(agent, payload(agent, "stop", session_id="s-down"))
    assert len(outbox(agent)) == 2
    # The todo exists before the agent ingests the queue (add needs no agent), as in real use.
    todo = agent.add("Queued while down")
    assert todo == 1
    agent.start()
    agent.wait_states(todo, "cleaned", "verified", timeout=30)
    assert LAST_MESSAGE in agent.todo_row(todo)["claude_text_output"]
    assert outbox(agent) == []


def test_hung_agent_costs_at_most_the_hook_timeout_and_applies_once(agent: Agent) -> None:
    todo = agent.add("Hung agent")
    hook(agent, payload(agent, "session-start", session_id="s-hung"), todo_id=todo)
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        err, took = hook(agent, payload(agent, "stop", session_id="s-hung"))
        queued = outbox(agent)  # before SIGCONT: the agent's next sweep ingests it
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    assert "queued" in err
    assert 0.5 <= took < 5.0, took  # it waited hook.timeout (0.5 s), and no longer
    assert len(queued) == 1
    # The frame that reached the socket and the outbox copy share a request id: applied once.
    agent.wait_states(todo, "cleaned", "verified")
    wait_for(lambda: outbox(agent) == [], what="outbox drained")
    assert [r["kind"] for r in agent.log_rows(todo)] == ["normal"]


def test_a_killed_agents_stale_socket_queues_at_once(make_agent) -> None:
    agent = make_agent({"hook": {"timeout": 3}})
    agent.start()
    todo = agent.add("Killed agent")
    hook(agent, payload(agent, "session-start", session_id="s-killed"), todo_id=todo)
    agent.kill()  # SIGKILL: both socket files stay behind, nobody listens
    assert (agent.state / "completiond.sock.stream").is_socket()
    err, took = hook(agent, payload(agent, "stop", session_id="s-killed"))
    assert "queued" in err, err
    assert took < 2.5, took  # refused at connect: no wait for hook.timeout (3 s)
    agent.start()
    agent.wait_states(todo, "cleaned", "verified")
    assert LAST_MESSAGE in agent.todo_row(todo)["claude_text_output"]


def test_without_the_stream_socket_the_client_uses_zeromq(agent: Agent) -> None:
    """An agent that has no stream socket (one from before it, or a path over the kernel's
    limit) is still reached: the one-shot client falls back to the ZeroMQ socket."""
    todo = agent.add("Over ZeroMQ")
    (agent.state / "completiond.sock.stream").unlink()
    hook(agent, payload(agent, "session-start", session_id="s-zmq"), todo_id=todo)
    err, _ = hook(agent, payload(agent, "stop", session_id="s-zmq"))
    assert "queued" not in err, err
    agent.wait_states(todo, "cleaned", "verified")
    assert outbox(agent) == []


def test_the_hook_imports_neither_pyzmq_nor_the_agent(agent: Agent) -> None:
    """Its whole run, with the request delivered: the stream socket needs only ``_socket``."""
    todo = agent.add("Lean hook")
    result = agent.ctl(
        "hook",
        input=json.dumps(payload(agent, "post-tool-use", session_id="s-lean")),
        env={"TODO_ID": str(todo)},
        python_options=("-X", "importtime"),
    )
    assert result.returncode == 0, result.stderr
    modules = {
        line.split("|")[-1].strip()
        for line in result.stderr.decode().splitlines()
        if line.startswith("import time:")
    }
    assert "ctl.hook" in modules  # the listing is real
    assert not {m for m in modules if m.split(".")[0] in ("zmq", "agent", "loguru", "pymysql")}
    assert "queued" not in result.stderr.decode()


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_bad_payload_exits_0_with_a_reason_on_stderr(agent: Agent, raw: bytes) -> None:
    err, _ = hook(agent, raw)
    assert err.startswith("completionctl hook:"), err
    assert "not a hook payload" in err, err
    assert outbox(agent) == []


def test_unknown_session_without_any_todo_id_is_refused_but_exits_0(agent: Agent) -> None:
    err, _ = hook(agent, payload(agent, "stop", session_id="s-nobody"))
    assert "refused" in err and "which todo" in err


def test_config_errors_and_unknown_events_never_fail_the_session(make_agent) -> None:
    agent = make_agent()
    err, _ = hook(agent, {"hook_event_name": "SomethingNew", "session_id": "x"})
    assert "ignored (event 'SomethingNew' is not one the hook acts on)" in err
    err, _ = hook(agent, {})
    assert "ignored (the payload has no hook_event_name)" in err
    agent.config_path.write_text("[behavior]\nno_such_key = 1\n")
    err, _ = hook(agent, payload(agent, "stop"), todo_id=1)
    assert "configuration error" in err and "no_such_key" in err
