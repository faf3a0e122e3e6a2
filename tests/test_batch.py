"""Batch completions: one request, one journal transaction, one ack with each todo's outcome;
10,000 ids taken, 10,001 refused whole; exactly once when the writer is killed mid-batch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import protocol as p
from agent.journal import Journal
from ctl import Client, CommandRefused
from tests.harness import Agent, wait_for
from tests.unitrig import T0, UnitRig


@pytest.fixture
def rig(tmpdir_short: Path) -> Iterator[UnitRig]:
    r = UnitRig(tmpdir_short)
    yield r
    r.close()


def test_a_batch_gives_each_todo_its_own_completion_and_outcome(rig: UnitRig) -> None:
    rig.start(3)
    ack = rig.send(
        p.BatchComplete(request_id="batch-1", todo_ids=[3, 4, 5, 4], output="all done"), T0 + 5
    )
    assert isinstance(ack, p.Ack) and ack.state == "accepted"
    assert [(i.todo_id, i.outcome) for i in ack.items] == [
        (3, "accepted"),
        (4, "accepted"),
        (5, "accepted"),
        (4, "refused"),
    ]
    assert ack.items[3].reason == "listed twice; completed once"
    assert ack.message == "3 accepted, 1 refused"
    for todo_id in (3, 4, 5):
        [entry] = rig.entries(todo_id, "normal")
        assert entry.completion_id == f"batch-1-{todo_id}"
        request = p.decode_request(entry.request)
        assert isinstance(request, p.Complete) and request.output == "all done"
    # A batch completion is a completion: the started todo's deadlines are disarmed.
    assert rig.journal.timers(3)[0].done == 1
    # Delivered twice (the client queued it as well): applied once.
    again = rig.send(p.BatchComplete(request_id="batch-1", todo_ids=[3, 4, 5]), T0 + 6)
    assert isinstance(again, p.Ack)
    assert {(i.outcome, i.reason) for i in again.items} == {
        ("accepted", "already received; applied once")
    }
    assert len(rig.entries(4)) == 1


def test_ten_thousand_ids_are_taken_in_one_frame_and_one_transaction(rig: UnitRig) -> None:
    ids = list(range(1, p.MAX_BATCH + 1))
    request = p.BatchComplete(request_id="big", todo_ids=ids, output="x" * 100)
    frame = p.encode(request)
    assert len(frame) < p.MAX_FRAME_BYTES  # within the hook's limits
    replies, ring = rig.intake.handle_frames([frame], T0)
    [ack] = replies
    assert isinstance(ack, p.Ack)
    assert len(ack.items) == p.MAX_BATCH
    assert {i.outcome for i in ack.items} == {"accepted"}
    assert rig.journal.count_by_state() == {"accepted": p.MAX_BATCH}
    assert "collector" in ring


def test_a_batch_is_one_transaction_so_a_failure_takes_none_of_it(
    rig: UnitRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Journal.add_entry
    calls = 0

    def failing(self, db, entry, now):
        nonlocal calls
        calls += 1
        if calls == 500:
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, db, entry, now)

    monkeypatch.setattr(Journal, "add_entry", failing)
    [reply], _ = rig.intake.handle_frames(
        [p.encode(p.BatchComplete(request_id="b", todo_ids=list(range(1, 1001))))], T0
    )
    assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.UNAVAILABLE
    monkeypatch.setattr(Journal, "add_entry", real)
    assert rig.journal.count_by_state() == {}


def test_ten_thousand_and_one_ids_are_refused_whole_with_a_clear_error(rig: UnitRig) -> None:
    ids = list(range(1, p.MAX_BATCH + 2))
    reply = rig.send(p.BatchComplete(request_id="too-big", todo_ids=ids), T0)
    assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.TOO_LARGE
    assert "at most 10,000 todos" in reply.message and "10,001" in reply.message
    assert "nothing was taken" in reply.message
    assert rig.journal.count_by_state() == {}
    # The client refuses it before sending (and never queues it).
    client = Client(config=rig.config)
    with pytest.raises(CommandRefused, match="at most 10,000"):
        client.batch_complete(ids)
    assert not rig.config.outbox_dir.exists() or not any(rig.config.outbox_dir.iterdir())


def test_an_output_too_large_for_every_todo_is_refused_whole(rig: UnitRig) -> None:
    big = "y" * (p.MAX_BATCH_JOURNAL_BYTES // 100 + 1)
    reply = rig.send(
        p.BatchComplete(request_id="huge", todo_ids=list(range(1, 101)), output=big), T0
    )
    assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.TOO_LARGE
    assert "shorter output or fewer todos" in reply.message
    assert rig.journal.count_by_state() == {}


# ------------------------------------------------------------------ the real agent


def _sql(agent: Agent, statement: str, params=()) -> None:
    with contextlib.closing(sqlite3.connect(agent.sqlite_path)) as db:
        db.execute(statement, params)
        db.commit()


@pytest.mark.slow
def test_mixed_ids_get_their_own_outcomes_from_the_database(agent: Agent) -> None:
    existing = agent.add("Exists")
    blocked = agent.add("Blocked")
    _sql(agent, "UPDATE stage_project_todos SET status = 'blocked' WHERE id = ?", (blocked,))
    missing = 999_999
    result = agent.ctl(
        "--json",
        "complete",
        str(existing),
        "--ids-from",
        "-",
        "--output",
        "batch result",
        "--wait",
        "20",
        input=f"{blocked}, {missing}  # and a comment\n",
    )
    assert result.returncode == 1, result.stderr.decode()  # some were refused
    ack = json.loads(result.stdout)
    by_id = {item["todo_id"]: item for item in ack["items"]}
    assert by_id[existing]["outcome"] == "applied"
    assert by_id[existing]["state"] in ("verified", "cleaned")
    assert by_id[blocked]["outcome"] == "refused"
    assert "blocked" in by_id[blocked]["reason"]
    assert by_id[missing]["outcome"] == "refused"
    assert agent.todo_row(existing)["status"] == "completed"
    assert "batch result" in agent.todo_row(existing)["claude_text_output"]
    assert agent.todo_row(blocked)["status"] == "blocked"
    bad = agent.ctl("complete", "--ids-from", "-", input="1 two 3\n")
    assert bad.returncode == 2 and b"'two' is not a todo id" in bad.stderr


@pytest.mark.slow
def test_a_batch_is_written_exactly_once_when_the_writer_is_killed_mid_batch(
    agent: Agent,
) -> None:
    count = 3000
    first = agent.add("first")
    with contextlib.closing(sqlite3.connect(agent.sqlite_path)) as db:
        db.executemany(
            "INSERT INTO stage_project_todos (title) VALUES (?)",
            [(f"todo {n}",) for n in range(count - 1)],
        )
        db.commit()
    ids = list(range(first, first + count))
    writer = agent.children()["writer"]
    os.kill(writer, signal.SIGSTOP)
    try:
        client = Client(str(agent.config_path), timeout=30)
        ack = client.batch_complete(ids, output="done in bulk")
        client.close()
        assert ack.state == "accepted" and len(ack.items) == count
        wait_for(
            lambda: agent.status_json()["journal"].get("collected") == count,
            timeout=120,
            what="the collector to render every report",
        )
    finally:
        os.kill(writer, signal.SIGCONT)

    def logged() -> int:
        try:
            with contextlib.closing(sqlite3.connect(agent.sqlite_path, timeout=5)) as db:
                return db.execute("SELECT COUNT(*) FROM stage_completion_log").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    started = time.monotonic()
    while logged() == 0 and time.monotonic() - started < 60:
        pass  # the writer's first transaction of the batch: kill it right after
    os.kill(writer, signal.SIGKILL)
    at_kill = logged()
    assert 0 < at_kill < count, f"the kill landed after {at_kill} of {count} writes"
    wait_for(lambda: agent.children().get("writer") not in (None, writer), what="a new writer")
    wait_for(lambda: logged() >= count, timeout=120, what="every completion logged")
    with contextlib.closing(sqlite3.connect(agent.sqlite_path)) as db:
        per_todo = dict(
            db.execute(
                "SELECT todo_id, COUNT(*) FROM stage_completion_log GROUP BY todo_id"
            ).fetchall()
        )
        statuses = dict(
            db.execute(
                "SELECT status, COUNT(*) FROM stage_project_todos WHERE id >= ? GROUP BY status",
                (first,),
            ).fetchall()
        )
    assert sorted(per_todo) == ids
    assert set(per_todo.values()) == {1}  # exactly once each
    assert statuses == {"completed": count}


def test_outcomes_answer_for_the_longest_derived_ids(rig: UnitRig) -> None:
    request_id = "r" * 48
    big = 2**63 - 1
    ack = rig.send(p.BatchComplete(request_id=request_id, todo_ids=[big, 5]), T0)
    assert isinstance(ack, p.Ack)
    ids = [i.completion_id for i in ack.items]
    assert len(ids[0]) == 60
    frame = p.encode(p.Outcomes(request_id="o", completion_ids=[*ids, "never-seen"]))
    [report], _ = rig.intake.handle_frames([frame], T0 + 1)
    assert isinstance(report, p.OutcomeReport)
    assert [(i.todo_id, i.state, i.outcome) for i in report.items] == [
        (big, "accepted", "pending"),
        (5, "accepted", "pending"),
        (0, None, "unknown"),
    ]
