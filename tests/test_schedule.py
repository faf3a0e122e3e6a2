"""Scheduled completions: journaled at once, fired by the monitor at their time (also after a
kill -9 of the whole agent), cancelled by `cancel` or by a completion that comes first."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import protocol as p
from ctl.timespec import parse_at, parse_duration
from tests.harness import Agent, wait_for
from tests.unitrig import T0, UnitRig, unit_config


@pytest.fixture
def rig(tmpdir_short: Path) -> Iterator[UnitRig]:
    r = UnitRig(tmpdir_short)
    yield r
    r.close()


def schedule(rig: UnitRig, todo_id: int, due_at: float, at: float = T0) -> p.Reply:
    return rig.send(
        p.Schedule(request_id=rig.rid("sched"), todo_id=todo_id, due_at=due_at, output="later"),
        at,
    )


def test_a_scheduled_completion_fires_at_its_time_not_before(rig: UnitRig) -> None:
    rig.start(1)
    ack = schedule(rig, 1, T0 + 600)
    assert isinstance(ack, p.Ack) and ack.due_at == T0 + 600
    [pending] = rig.journal.pending_schedules()  # journaled at once
    assert rig.run(T0 + 599.9) <= T0 + 600  # the monitor wakes for it
    assert rig.entries(1, "normal") == []
    rig.run(T0 + 600)
    [entry] = rig.entries(1, "normal")
    assert entry.completion_id == f"sched-{pending.request_id}"
    assert entry.state == "accepted"
    request = p.decode_request(entry.request)
    assert isinstance(request, p.Complete) and request.output == "later"
    assert request.event == "scheduled"
    assert rig.journal.pending_schedules() == []
    # It is the todo's completion: its deadlines are disarmed.
    assert rig.journal.timers(1)[0].done == 1
    rig.run(T0 + 700)
    assert len(rig.entries(1, "normal")) == 1  # fired once
    assert rig.journal.counters()["scheduled_completions"] == 1


def test_a_schedule_survives_a_monitor_restart(rig: UnitRig) -> None:
    schedule(rig, 1, T0 + 60)
    rig.run(T0 + 1)
    rig.monitor.shutdown()
    rig.monitor = rig.new_monitor()
    rig.run(T0 + 61)
    assert len(rig.entries(1, "normal")) == 1


def test_a_real_completion_that_comes_first_cancels_the_schedule(rig: UnitRig) -> None:
    rig.start(1)
    schedule(rig, 1, T0 + 600)
    rig.complete(1, T0 + 300)
    rig.run(T0 + 601)
    assert len(rig.entries(1, "normal")) == 1  # only the real one
    [s] = rig.journal.schedules_for_todo(1)
    assert s.state == "cancelled" and s.reason == "a completion came first"


def test_cancel_cancels_and_a_second_cancel_is_refused(rig: UnitRig) -> None:
    schedule(rig, 1, T0 + 600)
    ack = rig.send(p.Cancel(request_id="c1", todo_id=1), T0 + 10)
    assert isinstance(ack, p.Ack)
    rig.run(T0 + 601)
    assert rig.entries(1, "normal") == []
    again = rig.send(p.Cancel(request_id="c2", todo_id=1), T0 + 20)
    assert isinstance(again, p.Error) and again.code == p.ErrorCode.NOT_FOUND
    assert "no scheduled completion" in again.message


def test_a_new_schedule_replaces_the_pending_one(rig: UnitRig) -> None:
    schedule(rig, 1, T0 + 600)
    schedule(rig, 1, T0 + 900)
    rig.run(T0 + 600)
    assert rig.entries(1, "normal") == []
    rig.run(T0 + 900)
    assert len(rig.entries(1, "normal")) == 1
    states = sorted(s.state for s in rig.journal.schedules_for_todo(1))
    assert states == ["cancelled", "fired"]


def test_status_shows_the_schedule(rig: UnitRig) -> None:
    schedule(rig, 4, T0 + 600)
    report = rig.intake.status(p.Status(todo_id=4), T0)
    assert report.todo is not None
    [s] = report.todo.scheduled
    assert (s.due_at, s.state) == (T0 + 600, "pending")
    agent = rig.intake.status(p.Status(), T0).agent
    assert agent is not None and [x.todo_id for x in agent.scheduled] == [4]


def test_a_schedule_counts_from_when_it_was_asked_for(rig: UnitRig) -> None:
    """A schedule that waited in the outbox guards against todos created since it was sent."""
    for todo_id, sent_at, expected in ((1, T0 - 50, T0 - 50), (2, T0 + 999, T0), (3, None, T0)):
        rig.send(
            p.Schedule(request_id=f"s{todo_id}", todo_id=todo_id, due_at=T0 + 60, sent_at=sent_at),
            T0,
        )
        [pending] = rig.journal.schedules_for_todo(todo_id)
        request = p.decode_request(pending.request)
        assert isinstance(request, p.Complete) and request.not_created_after == expected


def test_a_scheduled_completion_is_collected_with_the_schedulers_rights(rig: UnitRig) -> None:
    """The fired completion carries who asked for it (stamped by intake from the peer's
    credentials), so the collector reads nothing with more rights than that user has."""
    rig.intake.handle_frames(
        [p.encode(p.Schedule(request_id="s-uid", todo_id=5, due_at=T0 + 60))], T0, [4321]
    )
    [pending] = rig.journal.schedules_for_todo(5)
    request = p.decode_request(pending.request)
    assert isinstance(request, p.Complete) and request.requester_uid == 4321


def test_a_pending_schedule_holds_the_todos_deadlines_until_it_fires(rig: UnitRig) -> None:
    rig.start(1, timeout=60)  # completion deadline T0 + 60
    schedule(rig, 1, T0 + 600)
    assert rig.run(T0 + 100) <= T0 + 600  # past the deadline: held, the schedule is next
    assert rig.entries(1, "emergency") == []
    rig.run(T0 + 600)
    assert [e.kind for e in rig.entries(1) if e.kind != "start"] == ["normal"]
    rig.run(T0 + 5000)
    assert rig.entries(1, "emergency") == []  # the schedule's completion disarmed them
    # Cancelled, the hold ends: the todo's own deadline fires on the next pass.
    rig.start(2, at=T0, timeout=60)
    schedule(rig, 2, T0 + 600)
    rig.send(p.Cancel(request_id="c2", todo_id=2), T0 + 100)
    rig.run(T0 + 101)
    assert len(rig.entries(2, "emergency")) == 1


def test_a_schedule_past_the_emergency_deadline_holds_nothing(rig: UnitRig) -> None:
    """Only the completion deadline is held, and only by a schedule due before the emergency
    deadline: a far-off schedule (anyone on the socket may make one) must not switch off the
    deadlines of somebody else's session."""
    rig.start(1, timeout=60)  # completion T0 + 60, emergency T0 + 3600 (tests.unitrig)
    schedule(rig, 1, T0 + 10**7)
    rig.run(T0 + 61)
    assert len(rig.entries(1, "emergency")) == 1  # the completion deadline fired as ever
    rig.start(2, timeout=60)
    schedule(rig, 2, T0 + 3000)  # before the emergency deadline: held until then
    rig.run(T0 + 61)
    assert rig.entries(2, "emergency") == []


def test_list_shows_a_todo_known_only_by_its_schedule(rig: UnitRig) -> None:
    rig.start(1)
    schedule(rig, 7, T0 + 600)  # never started here
    todos = {t.todo_id: t for t in rig.intake.list_todos(p.ListTodos(), T0).todos}
    assert set(todos) == {1, 7}
    assert todos[7].scheduled_at == T0 + 600 and not todos[7].done
    assert todos[1].scheduled_at is None


# ------------------------------------------------------------------ the command line's times


def test_durations_parse_and_nonsense_is_refused() -> None:
    assert parse_duration("10m") == 600
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90
    assert parse_duration("2d") == 2 * 86400
    for bad in ("", "soon", "10x", "-5m"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_at_reads_the_site_zone_unless_an_offset_is_given(tmpdir_short: Path) -> None:
    config = unit_config(tmpdir_short)
    # With an offset, the offset wins.
    at = parse_at("2026-12-24T18:00+01:00", config)
    assert at == datetime(2026, 12, 24, 17, 0, tzinfo=UTC)
    # Without one: the site's zone (the machine's local zone when none is configured).
    local = parse_at("2026-12-24T18:00", config)
    assert local == datetime(2026, 12, 24, 18, 0).astimezone()
    with pytest.raises(ValueError, match="not a time"):
        parse_at("Christmas", config)
    # database.time_zone names the site's zone: 18:00 in Berlin in winter is 17:00 UTC.
    (tmpdir_short / "berlin").mkdir()
    berlin = unit_config(tmpdir_short / "berlin", {"database": {"time_zone": "Europe/Berlin"}})
    assert parse_at("2026-12-24T18:00", berlin) == datetime(2026, 12, 24, 17, 0, tzinfo=UTC)
    assert parse_at("2026-07-01T18:00", berlin) == datetime(2026, 7, 1, 16, 0, tzinfo=UTC)


# ------------------------------------------------------------------ the real agent


@pytest.mark.slow
def test_scheduled_completion_survives_kill_9_of_the_whole_agent(
    make_agent: Callable[..., Agent],
) -> None:
    agent = make_agent().start()
    todo = agent.add("Ship the release")
    assert agent.ctl("start", str(todo)).returncode == 0
    wait_for(lambda: (agent.todo_row(todo) or {}).get("status") == "in_progress", what="start")
    result = agent.ctl("complete", str(todo), "--in", "4s", "--output", "released on time")
    assert result.returncode == 0, result.stderr.decode()
    assert "scheduled for" in result.stdout.decode()
    status = agent.todo_status(todo)
    assert [s["state"] for s in status["scheduled"]] == ["pending"]
    text = agent.ctl("status").stdout.decode()
    assert f"scheduled todo {todo}" in text
    # kill -9 of the parent and every child before the time comes.
    family = agent.family()
    for proc in family:
        os.kill(proc.pid, signal.SIGKILL)
    agent.proc.wait(10)
    assert agent.todo_row(todo)["status"] == "in_progress"
    agent.start()
    wait_for(
        lambda: (agent.todo_row(todo) or {}).get("status") == "completed",
        timeout=30,
        what="the scheduled completion to land after the restart",
    )
    assert "released on time" in (agent.todo_row(todo)["claude_text_output"] or "")
    [s] = agent.todo_status(todo)["scheduled"]
    assert s["state"] == "fired"


@pytest.mark.slow
def test_a_schedule_never_completes_a_todo_created_after_it(agent: Agent) -> None:
    """Issue 18: a schedule accepted for an id that did not exist yet must not fire on the
    unrelated todo that later gets that id; status says why it was refused."""
    first = agent.add("An existing todo")
    ghost = first + 1  # no row has this id yet
    result = agent.ctl("complete", str(ghost), "--in", "3s", "--output", "not yours")
    assert result.returncode == 0, result.stderr.decode()
    # The rows keep whole seconds: the todo is created in a later second than the schedule.
    scheduled_in = int(time.time())
    wait_for(lambda: int(time.time()) > scheduled_in, timeout=5, what="the next second")
    unrelated = agent.add("Created after the schedule")
    assert unrelated == ghost
    status = agent.wait_states(unrelated, "failed", timeout=30)
    [entry] = status["entries"]
    assert "after this completion was scheduled" in (entry["last_error"] or entry["outcome"])
    row = agent.todo_row(unrelated)
    assert row is not None and row["status"] == "offen"
    assert "not yours" not in (row["claude_text_output"] or "")
    assert agent.log_rows(unrelated) == []
    text = agent.ctl("status", str(unrelated)).stdout.decode()
    assert "after this completion was scheduled" in text


@pytest.mark.slow
def test_cancel_and_refusals_on_the_command_line(agent: Agent) -> None:
    todo = agent.add("Maybe later")
    future = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    assert agent.ctl("complete", str(todo), "--at", future).returncode == 0
    result = agent.ctl("cancel", str(todo))
    assert result.returncode == 0, result.stderr.decode()
    again = agent.ctl("cancel", str(todo))
    assert again.returncode == 1 and b"no scheduled completion" in again.stderr
    past = agent.ctl("complete", str(todo), "--at", "2001-01-01T00:00")
    assert past.returncode == 2 and b"has passed" in past.stderr
    two = agent.ctl("complete", "1", "2", "--in", "5m")
    assert two.returncode == 2 and b"one TODO_ID" in two.stderr
    [s] = agent.todo_status(todo)["scheduled"]
    assert s["state"] == "cancelled"


def test_pruning_forgets_settled_schedules_and_old_samples_but_keeps_pending_ones(
    rig: UnitRig,
) -> None:
    schedule(rig, 1, T0 + 10)
    schedule(rig, 2, T0 + 10**6)
    rig.run(T0 + 10)  # todo 1's fires; todo 2's stays pending
    with rig.journal.transaction() as db:
        rig.journal.record_silence(db, 1, "gap", 30.0, T0 - 100 * 86400)
        rig.journal.record_silence(db, 1, "gap", 40.0, T0)
    rig.journal.prune_history(schedules_before=T0 + 11, silences_before=T0 - 90 * 86400)
    assert [s.todo_id for s in rig.journal.schedules_for_todo(1)] == []
    assert [s.state for s in rig.journal.schedules_for_todo(2)] == ["pending"]
    assert [s.seconds for s in rig.journal.silences_after(0)] == [40.0]
