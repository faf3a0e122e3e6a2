"""Deadlines with an injected clock: the pure functions, and the Monitor's run_once(now) against a
real journal (no child processes, no sleeping)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import protocol as p
from agent.intake import Intake
from agent.journal import Journal, NewEntry, TodoTimers
from agent.monitor import RESET_SETTLE_MAX, Due, Monitor, due_deadlines, next_deadline
from tests.harness import T0, unit_config


def timer(todo_id: int = 1, **kw: Any) -> TodoTimers:
    values: dict[str, Any] = dict.fromkeys(TodoTimers.__slots__)
    values.update(
        todo_id=todo_id,
        started_at=T0,
        last_heard_at=T0,
        completion_due=T0 + 10,
        emergency_due=T0 + 60,
        completion_fired=0,
        emergency_fired=0,
        done=0,
    )
    values.update(kw)
    return TodoTimers(**values)


# ------------------------------------------------------------------ pure functions


def test_nothing_is_due_before_the_completion_deadline() -> None:
    assert due_deadlines([timer()], T0 + 9.99) == []
    assert next_deadline([timer()]) == T0 + 10


def test_completion_deadline_makes_an_emergency_completion() -> None:
    assert due_deadlines([timer()], T0 + 10) == [Due(1, "emergency", T0 + 10)]


def test_fired_and_done_timers_are_never_due_again() -> None:
    fired = timer(completion_fired=1, emergency_fired=1)
    done = timer(2, done=1)
    assert due_deadlines([fired, done], T0 + 1000) == []
    assert next_deadline([fired, done]) is None


def test_emergency_deadline_after_a_fired_completion_deadline_is_a_reset() -> None:
    t = timer(completion_fired=1)
    assert due_deadlines([t], T0 + 59) == []
    assert next_deadline([t]) == T0 + 60
    assert due_deadlines([t], T0 + 60) == [Due(1, "reset", T0 + 60)]


def test_both_passed_at_once_means_the_emergency_completion_goes_first() -> None:
    # The agent was down through both deadlines: collect what there is before any reset.
    assert due_deadlines([timer()], T0 + 1000) == [Due(1, "emergency", T0 + 10)]


def test_a_todo_waiting_for_a_person_is_reported_not_completed() -> None:
    t = timer(waiting="permission_prompt: may I run rm?")
    assert due_deadlines([t], T0 + 10) == [Due(1, "report-waiting", T0 + 10)]
    # Its completion deadline is not a wake-up time (it moves with the next heartbeat) ...
    assert next_deadline([t]) == T0 + 60
    # ... but the absolute emergency deadline still holds.
    assert due_deadlines([t], T0 + 60) == [
        Due(1, "report-waiting", T0 + 10),
        Due(1, "reset", T0 + 60),
    ]


def test_disabled_deadlines_are_neither_due_nor_awaited() -> None:
    t = timer()
    assert due_deadlines([t], T0 + 1000, completion_enabled=False) == [Due(1, "reset", T0 + 60)]
    assert due_deadlines([t], T0 + 1000, completion_enabled=False, emergency_enabled=False) == []
    assert next_deadline([t], completion_enabled=False) == T0 + 60
    assert next_deadline([t], completion_enabled=False, emergency_enabled=False) is None


def test_next_deadline_is_the_earliest_of_all_todos() -> None:
    timers = [timer(1, completion_due=T0 + 30), timer(2, completion_due=T0 + 5), timer(3, done=1)]
    assert next_deadline(timers) == T0 + 5
    assert [d.todo_id for d in due_deadlines(timers, T0 + 30)] == [1, 2]


# ------------------------------------------------------------------ the Monitor, clock injected


class Rig:
    """A Monitor and the parent's Intake on one real journal; time is whatever the test says."""

    def __init__(self, root: Path, extra: dict[str, Any] | None = None) -> None:
        self.root = root
        self.config = unit_config(root, extra)
        self.journal = Journal.create(self.config.journal_path)
        self.intake = Intake(self.config, self.journal, lambda: {}, T0)
        self.monitor = self.new_monitor()

    def new_monitor(self) -> Monitor:
        monitor = Monitor(self.config, clock=lambda: T0)
        monitor.initialize()
        monitor.next_check = math.inf  # health rounds have their own tests
        return monitor

    def send(self, request: p.Request, at: float) -> p.Reply:
        return self.intake.apply(request, at).reply

    def start(self, todo_id: int, at: float = T0, timeout: float | None = None) -> None:
        self.send(p.Start(request_id=f"start-{todo_id}-{at}", todo_id=todo_id, timeout=timeout), at)

    def heartbeat(self, todo_id: int, at: float) -> None:
        self.send(p.Heartbeat(request_id=f"hb-{todo_id}-{at}", todo_id=todo_id), at)

    def entries(self, todo_id: int, kind: str | None = None) -> list:
        return [e for e in self.journal.entries_for_todo(todo_id) if kind is None or e.kind == kind]

    def run(self, at: float) -> float:
        return self.monitor.run_once(at)

    def close(self) -> None:
        self.monitor.shutdown()
        self.journal.close()


@pytest.fixture
def rig(tmpdir_short: Path) -> Iterator[Rig]:
    r = Rig(tmpdir_short)
    yield r
    r.close()


def test_completion_deadline_fires_once_even_across_a_monitor_restart(rig: Rig) -> None:
    rig.start(1)
    assert rig.run(T0 + 9.9) <= T0 + 10
    assert rig.entries(1, "emergency") == []
    rig.run(T0 + 10)
    [emg] = rig.entries(1, "emergency")
    assert emg.state == "accepted"
    assert "no completion and no heartbeat for 10 s" in emg.reason
    rig.run(T0 + 11)
    rig.monitor.shutdown()
    rig.monitor = rig.new_monitor()  # a restarted monitor reads the same journal
    rig.run(T0 + 12)
    assert len(rig.entries(1, "emergency")) == 1
    assert rig.journal.counters() == {"deadline_emergencies": 1}
    assert rig.journal.timers(1)[0].completion_fired == 1


def test_per_todo_timeout_overrides_the_config(rig: Rig) -> None:
    rig.start(1, timeout=3)
    rig.run(T0 + 3)
    [emg] = rig.entries(1, "emergency")
    assert "for 3 s" in emg.reason


def test_heartbeats_keep_a_todo_alive_and_their_absence_lets_it_fire(rig: Rig) -> None:
    rig.start(1)
    for at in (T0 + 8, T0 + 16, T0 + 24):
        rig.heartbeat(1, at)
        rig.run(at + 1)
    rig.run(T0 + 33.9)
    assert rig.entries(1, "emergency") == []
    assert rig.journal.timers(1)[0].completion_due == T0 + 34
    rig.run(T0 + 34)
    assert len(rig.entries(1, "emergency")) == 1


def test_a_normal_completion_cancels_both_deadlines(rig: Rig) -> None:
    rig.start(1)
    rig.send(p.Complete(request_id="done-1", todo_id=1, output="ok"), T0 + 5)
    assert next_deadline(rig.journal.armed_timers()) is None
    rig.run(T0 + 10)
    rig.run(T0 + 10_000)
    assert [e.kind for e in rig.entries(1)] == ["start", "normal"]


def test_a_persons_emergency_disarms_the_completion_deadline(rig: Rig) -> None:
    rig.start(1)
    rig.send(p.Emergency(request_id="e-1", todo_id=1, reason="stuck on a prompt"), T0 + 2)
    rig.run(T0 + 10)
    assert [(e.kind, e.completion_id) for e in rig.entries(1)][1:] == [("emergency", "e-1")]


def test_waiting_for_a_person_holds_the_deadline_until_activity_resumes(rig: Rig) -> None:
    rig.start(1)
    rig.send(p.Waiting(request_id="w-1", todo_id=1, reason="permission_prompt: rm?"), T0 + 2)
    wake = rig.run(T0 + 20)
    assert wake > T0 + 20  # no busy loop on a held deadline
    assert rig.entries(1, "emergency") == []
    t = rig.journal.timers(1)[0]
    assert t.waiting and not t.completion_fired
    rig.heartbeat(1, T0 + 30)  # the person answered; the session works again
    assert rig.journal.timers(1)[0].waiting is None
    rig.run(T0 + 39.9)
    assert rig.entries(1, "emergency") == []
    rig.run(T0 + 40)
    assert len(rig.entries(1, "emergency")) == 1


def _fail_write(rig: Rig, completion_id: str, attempts: int = 2, at: float = T0) -> None:
    """What the writer leaves behind when every attempt failed on a transient error."""
    rig.journal.update_entry(
        completion_id,
        at,
        state="collected",
        attempts=attempts,
        last_error="MySQL error 2003: cannot connect (will retry)",
    )


def test_emergency_deadline_resets_a_todo_whose_writes_keep_failing(rig: Rig) -> None:
    rig.start(1)
    rig.run(T0 + 10)
    [emg] = rig.entries(1, "emergency")
    _fail_write(rig, emg.completion_id)
    rig.run(T0 + 59)
    assert rig.entries(1, "reset") == []
    rig.run(T0 + 60)
    [emg] = rig.entries(1, "emergency")
    assert (emg.state, emg.outcome) == ("failed", "superseded")
    [reset] = rig.entries(1, "reset")
    assert reset.state == "collected"  # straight to the writer
    assert reset.completion_id == f"reset-1-{int(T0 + 60)}"
    t = rig.journal.timers(1)[0]
    assert t.emergency_fired and t.done
    rig.run(T0 + 61)
    assert len(rig.entries(1, "reset")) == 1
    assert rig.journal.counters() == {"deadline_emergencies": 1, "deadline_resets": 1}


def test_reset_waits_for_an_emergency_completion_still_being_collected(rig: Rig) -> None:
    rig.start(1)
    rig.run(T0 + 10)  # accepted: the collector is on it
    rig.run(T0 + 60)
    assert rig.entries(1, "reset") == []
    [emg] = rig.entries(1, "emergency")
    # Collected just now, the writer has not tried yet: it gets the time of one attempt.
    _fail_write(rig, emg.completion_id, attempts=0, at=T0 + 61)
    rig.run(T0 + 62)
    assert rig.entries(1, "reset") == []
    _fail_write(rig, emg.completion_id, attempts=1, at=T0 + 62)
    rig.run(T0 + 62.5)
    assert len(rig.entries(1, "reset")) == 1


def test_reset_does_not_wait_for_a_writer_that_knows_the_database_is_down(rig: Rig) -> None:
    rig.start(1)
    rig.run(T0 + 10)
    # Collected at T0 + 11, never tried: the writer only probes the database while it is down.
    _fail_write(rig, rig.entries(1, "emergency")[0].completion_id, attempts=0, at=T0 + 11)
    grace = rig.config.behavior.database_timeout + 2 * rig.config.behavior.sweep_interval
    assert 11 + grace < 60
    rig.run(T0 + 60)
    assert len(rig.entries(1, "reset")) == 1


def test_reset_stops_waiting_for_a_completion_that_never_settles(rig: Rig) -> None:
    rig.start(1)
    rig.run(T0 + 10)
    rig.run(T0 + 60 + RESET_SETTLE_MAX - 1)
    assert rig.entries(1, "reset") == []
    rig.run(T0 + 60 + RESET_SETTLE_MAX)
    assert len(rig.entries(1, "reset")) == 1


def test_agent_down_through_both_deadlines_collects_first_then_resets(rig: Rig) -> None:
    rig.start(1)
    rig.run(T0 + 500)
    assert [e.kind for e in rig.entries(1)] == ["start", "emergency"]
    rig.run(T0 + 501)
    assert rig.entries(1, "reset") == []  # being collected
    _fail_write(rig, rig.entries(1, "emergency")[0].completion_id, attempts=0, at=T0 + 502)
    rig.run(T0 + 502.5)
    assert rig.entries(1, "reset") == []  # the writer gets its chance
    _fail_write(rig, rig.entries(1, "emergency")[0].completion_id, attempts=1, at=T0 + 503)
    rig.run(T0 + 503)
    assert len(rig.entries(1, "reset")) == 1


def test_no_reset_when_the_emergency_completion_landed(rig: Rig) -> None:
    rig.start(1)
    rig.run(T0 + 10)
    [emg] = rig.entries(1, "emergency")
    rig.journal.update_entry(emg.completion_id, T0 + 11, state="cleaned", outcome="applied")
    rig.run(T0 + 60)
    assert rig.entries(1, "reset") == []
    assert rig.journal.timers(1)[0].done == 1


def test_a_waiting_normal_completion_is_never_thrown_away_by_a_reset(rig: Rig) -> None:
    rig.start(1)
    rig.run(T0 + 10)
    _fail_write(rig, rig.entries(1, "emergency")[0].completion_id)
    # A real result that is still on its way (here even one that died of a permanent error
    # and waits for `completionctl retry`), with the timer left armed.
    with rig.journal.transaction() as db:
        rig.journal.add_entry(db, NewEntry("real-1", 1, "normal", state="dead"), T0 + 30)
    rig.run(T0 + 60)
    assert rig.entries(1, "reset") == []
    assert rig.journal.entry("real-1").state == "dead"
    assert rig.journal.timers(1)[0].done == 1


def test_a_completion_after_the_reset_is_queued_is_written_after_it(rig: Rig) -> None:
    rig.start(1)
    rig.run(T0 + 10)
    _fail_write(rig, rig.entries(1, "emergency")[0].completion_id)
    rig.run(T0 + 60)
    rig.send(p.Complete(request_id="late-real", todo_id=1, output="done at last"), T0 + 61)
    # The writer takes a todo's entries in journal order: the reset, then the real result,
    # which the database accepts (offen -> completed).
    kinds = [(e.kind, e.state) for e in rig.entries(1) if e.state != "failed"]
    assert kinds == [("start", "collected"), ("reset", "collected"), ("normal", "accepted")]


def test_a_restart_of_the_todo_rearms_both_deadlines(rig: Rig) -> None:
    rig.start(1)
    rig.run(T0 + 10)
    rig.start(1, at=T0 + 20)
    t = rig.journal.timers(1)[0]
    assert (t.completion_due, t.emergency_due, t.completion_fired) == (T0 + 30, T0 + 80, 0)
    rig.run(T0 + 30)
    assert len(rig.entries(1, "emergency")) == 2


def test_disabled_handlers_fire_nothing(tmpdir_short: Path) -> None:
    rig = Rig(
        tmpdir_short,
        {"behavior": {"enable_robust_completion": False, "enable_emergency_handlers": False}},
    )
    try:
        rig.start(1)
        assert rig.run(T0 + 1) == T0 + 1 + rig.config.behavior.sweep_interval
        rig.run(T0 + 10_000)
        assert [e.kind for e in rig.entries(1)] == ["start"]
    finally:
        rig.close()


def test_verified_normal_completion_deletes_the_archived_session_dir(rig: Rig) -> None:
    session = Path(rig.config.session_dir_for(1))
    session.mkdir()
    (session / "output.md").write_text("done")
    archive = rig.root / "state" / "archive" / "todo_1_x"
    (archive / "session").mkdir(parents=True)  # the archive holds the session's copy
    with rig.journal.transaction() as db:
        rig.journal.add_entry(db, NewEntry("n-1", 1, "normal", state="verified"), T0)
    rig.journal.update_entry("n-1", T0, archive_path=str(archive))
    rig.run(T0 + 1)
    assert not session.exists()
    assert rig.journal.entry("n-1").state == "cleaned"
    assert rig.journal.counters() == {"sessions_cleaned": 1}


def test_session_dir_is_kept_when_not_archived_or_after_a_forced_completion(rig: Rig) -> None:
    session = Path(rig.config.session_dir_for(1))
    session.mkdir()
    archive = rig.root / "state" / "archive" / "todo_1_x"
    archive.mkdir(parents=True)
    with rig.journal.transaction() as db:
        rig.journal.add_entry(db, NewEntry("n-1", 1, "normal", state="verified"), T0)
        rig.journal.add_entry(db, NewEntry("e-1", 1, "emergency", state="verified"), T0)
    rig.journal.update_entry("e-1", T0, archive_path=str(archive))
    rig.run(T0 + 1)
    assert session.is_dir()
    assert [rig.journal.entry(c).state for c in ("n-1", "e-1")] == ["cleaned", "cleaned"]


def test_session_dir_is_kept_when_its_archive_lacks_the_session_copy(rig: Rig) -> None:
    session = Path(rig.config.session_dir_for(1))
    session.mkdir()
    archive = rig.root / "state" / "archive" / "todo_1_x"
    archive.mkdir(parents=True)  # e.g. the dir appeared after collection: nothing of it archived
    with rig.journal.transaction() as db:
        rig.journal.add_entry(db, NewEntry("n-1", 1, "normal", state="verified"), T0)
    rig.journal.update_entry("n-1", T0, archive_path=str(archive))
    rig.run(T0 + 1)
    assert session.is_dir()
    assert rig.journal.entry("n-1").state == "cleaned"


def test_the_agents_monitor_takes_up_rings_right_after_a_pass_with_the_next_one(
    tmp_path: Path,
) -> None:
    """A burst of rings costs a pass per COALESCE, not one each; a due deadline, a clock gone
    back and a monitor driven by a test's clock (no parent) never wait for it."""
    import os

    from agent.monitor import COALESCE

    config = unit_config(tmp_path)
    monitor = Monitor(config, parent_pid=os.getppid())
    monitor.open()
    assert monitor.coalesce == COALESCE
    passes: list[float] = []
    monitor._pass = lambda now: passes.append(now) or now + 5.0  # type: ignore[method-assign]
    assert monitor.work(100.0) == 105.0
    assert monitor.work(100.0 + COALESCE / 2) == 100.0 + COALESCE  # a ring: the next pass takes it
    assert monitor.work(100.0 + COALESCE) == 105.0 + COALESCE
    assert passes == [100.0, 100.0 + COALESCE]
    monitor._planned = 100.0 + COALESCE * 1.5  # a deadline due before the coalesced pass
    assert monitor.work(100.0 + COALESCE * 1.5) == 105.0 + COALESCE * 1.5
    assert monitor.work(50.0) == 55.0  # the clock went back: no waiting on the old pass
    assert len(passes) == 4
    monitor.close()
    unrung = Monitor(config)
    unrung.open()
    assert unrung.coalesce == 0.0
    unrung.close()
