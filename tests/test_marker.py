"""The legacy marker bridge: TASK_COMPLETED (+ CURRENT_TODO_ID) becomes a completion.

Unit tests drive ``MarkerBridge`` with a fake client and hand in the time; end-to-end tests run
the real agent with ``marker.enabled`` and the marker files in the test's private directory.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from loguru import logger

import protocol as p
from agent.marker import MarkerBridge
from ctl import AgentUnavailable, CommandRefused
from protocol.config import Config, Marker
from tests.harness import Agent, wait_for

# ---------------------------------------------------------------- unit: MarkerBridge


class FakeClient:
    def __init__(self, *answers) -> None:
        self.answers = list(answers)  # an Ack or an exception, one per call; the last repeats
        self.calls: list[tuple[int, dict]] = []
        self.before_answer = None

    def complete(self, todo_id, **kw):
        self.calls.append((todo_id, kw))
        if self.before_answer:
            self.before_answer()
        answer = self.answers[0] if len(self.answers) == 1 else self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def ack(todo_id: int, request_id: str = "r") -> p.Ack:
    return p.Ack(request_id=request_id, state="accepted", todo_id=todo_id, completion_id="c")


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "TASK_COMPLETED", tmp_path / "CURRENT_TODO_ID"


@pytest.fixture
def logged() -> list[str]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="DEBUG")
    yield lines
    logger.remove(sink)


def bridge(files, client) -> MarkerBridge:
    completed, current = files
    config = Config(marker=Marker(completed_file=str(completed), current_todo_file=str(current)))
    return MarkerBridge(config, client=client)


def test_marker_becomes_a_completion_and_is_removed_after_the_ack(files) -> None:
    completed, current = files
    current.write_text("42\n")
    completed.write_text("TASK_COMPLETED\n")
    client = FakeClient(ack(42))
    # While the agent has not answered yet, both files are still there.
    client.before_answer = lambda: (completed.exists() and current.exists()) or pytest.fail("gone")
    bridge(files, client).poll(100.0)
    assert [todo for todo, _ in client.calls] == [42]
    assert client.calls[0][1]["request_id"].startswith("marker-")
    assert client.calls[0][1]["event"] == "marker"
    assert client.calls[0][1]["queue_when_unreachable"] is False
    assert not completed.exists() and not current.exists()


def test_unanswered_marker_is_kept_retried_with_the_same_id_and_logged_once(files, logged):
    completed, current = files
    current.write_text("7")
    completed.write_text("")
    client = FakeClient(AgentUnavailable("no answer"), AgentUnavailable("no answer"), ack(7))
    b = bridge(files, client)
    b.poll(100.0)
    b.poll(100.2)  # inside the backoff: not even tried
    assert len(client.calls) == 1 and completed.exists() and current.exists()
    b.poll(102.0)
    assert len(client.calls) == 2 and completed.exists()
    b.poll(110.0)
    assert len(client.calls) == 3 and not completed.exists() and not current.exists()
    assert len({kw["request_id"] for _, kw in client.calls}) == 1  # applied once by the agent
    assert sum(line.startswith("marker for todo 7 kept") for line in logged) == 1


def test_refused_marker_is_left_in_place(files, logged) -> None:
    completed, current = files
    current.write_text("9")
    completed.write_text("")
    client = FakeClient(CommandRefused(p.ErrorCode.INVALID, "no such thing"))
    b = bridge(files, client)
    for now in (100.0, 200.0, 300.0):
        b.poll(now)
    assert completed.exists() and current.exists()
    assert sum(line.startswith("marker for todo 9 refused") for line in logged) == 1


@pytest.mark.parametrize("content", [None, "", "  \n", "abc", "0", "²", "9" * 30, "-3"])
def test_marker_without_a_todo_id_is_left_for_a_person(files, logged, content) -> None:
    completed, current = files
    if content is not None:
        current.write_text(content)
    completed.write_text("")
    client = FakeClient(ack(1))
    b = bridge(files, client)
    for now in (100.0, 100.5, 101.0):
        b.poll(now)
    assert client.calls == []
    assert completed.exists()
    assert current.exists() == (content is not None)
    assert sum("holds no todo id" in line for line in logged) == 1
    current.write_text("5")  # a person fills in the id: the same marker goes through now
    b.poll(101.5)
    assert [todo for todo, _ in client.calls] == [5] and not completed.exists()


def test_next_todo_written_while_sending_is_not_consumed(files) -> None:
    completed, current = files
    current.write_text("1")
    completed.write_text("")

    def session_moves_on():
        current.write_text("2")

    client = FakeClient(ack(1))
    client.before_answer = session_moves_on
    bridge(files, client).poll(100.0)
    assert not completed.exists()
    assert current.read_text() == "2"


def test_no_marker_no_request(files) -> None:
    client = FakeClient(ack(1))
    files[1].write_text("3")
    bridge(files, client).poll(100.0)
    assert client.calls == [] and files[1].exists()


# ---------------------------------------------------------------- end to end


def marker_entries(agent: Agent, todo: int) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(agent.state / "journal.db", timeout=10)) as db:
        return db.execute(
            "SELECT completion_id, state FROM entries WHERE todo_id = ? AND kind = 'normal'",
            (todo,),
        ).fetchall()


def monitor_log(agent: Agent) -> str:
    path = agent.state / "logs" / "monitor.log"
    return path.read_text() if path.exists() else ""


@pytest.fixture
def marker_agent(make_agent) -> Agent:
    return make_agent({"marker": {"enabled": True}}).start()


def test_marker_completes_the_named_todo_and_is_removed_only_once_journaled(
    marker_agent: Agent,
) -> None:
    agent = marker_agent
    other = agent.add("Not this one")
    todo = agent.add("This one")
    completed, current = agent.root / "TASK_COMPLETED", agent.root / "CURRENT_TODO_ID"
    current.write_text(f"{todo}\n")
    completed.write_text("TASK_COMPLETED\n")

    def gone_and_journaled():
        if completed.exists() or current.exists():
            return None
        # The files are gone: the completion must be in the journal already.
        entries = marker_entries(agent, todo)
        assert entries, "marker removed before the completion was journaled"
        return entries

    entries = wait_for(gone_and_journaled, 20, interval=0.01, what="marker consumed")
    assert entries[0][0].startswith("marker-")
    agent.wait_states(todo, "cleaned")
    assert agent.todo_row(todo)["status"] == "completed"
    assert agent.todo_row(other)["status"] == "offen"
    assert marker_entries(agent, other) == []


def test_marker_stays_while_the_agent_does_not_answer(marker_agent: Agent) -> None:
    agent = marker_agent
    todo = agent.add("Completed while the agent is frozen")
    completed, current = agent.root / "TASK_COMPLETED", agent.root / "CURRENT_TODO_ID"
    os.kill(agent.proc.pid, signal.SIGSTOP)  # the parent: intake does not answer
    try:
        current.write_text(str(todo))
        completed.write_text("")
        wait_for(lambda: "kept" in monitor_log(agent), 20, what="the bridge to try and give up")
        assert completed.exists() and current.exists()
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    wait_for(lambda: not completed.exists() and not current.exists(), 30, what="consumed")
    agent.wait_states(todo, "cleaned")
    assert agent.todo_row(todo)["status"] == "completed"
    assert len(marker_entries(agent, todo)) == 1


def test_marker_without_todo_id_is_left_and_logged(marker_agent: Agent) -> None:
    agent = marker_agent
    completed = agent.root / "TASK_COMPLETED"
    completed.write_text("TASK_COMPLETED\n")
    wait_for(lambda: "holds no todo id" in monitor_log(agent), 20, what="the warning")
    assert completed.exists()
    assert agent.status_json()["journal"].get("accepted", 0) == 0
    assert monitor_log(agent).count("holds no todo id") == 1
