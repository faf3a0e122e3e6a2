"""The journal's transitions against a real SQLite journal: each moves an entry only from the
state(s) it expects (compare-and-set), and the stored values stay the plain strings."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.journal import (
    COMPLETION_KINDS,
    PENDING_STATES,
    UNFINISHED_STATES,
    FinishedHead,
    Journal,
    Kind,
    NewEntry,
    State,
)

T0 = 1_700_000_000.0


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal.create(tmp_path / "journal.db")
    yield j
    j.close()


def _add(journal: Journal, cid: str, kind: str = Kind.NORMAL, state: str = State.ACCEPTED) -> None:
    with journal.transaction() as db:
        assert journal.add_entry(db, NewEntry(cid, 1, kind, state=state), T0)


def _state(journal: Journal, cid: str) -> str:
    entry = journal.entry(cid)
    assert entry is not None
    return entry.state


def _arm(journal: Journal, todo_id: int = 1) -> None:
    with journal.transaction() as db:
        journal.queue_start(
            db,
            f"start-{todo_id}",
            todo_id,
            b"",
            T0,
            completion_timeout=10,
            emergency_timeout=60,
            session_id=None,
            transcript_path=None,
            cwd=None,
        )


def test_stored_values_are_the_plain_strings(journal: Journal, tmp_path: Path) -> None:
    _add(journal, "c-1", Kind.EMERGENCY)
    raw = sqlite3.connect(tmp_path / "journal.db").execute("SELECT kind, state FROM entries")
    assert raw.fetchall() == [("emergency", "accepted")]
    # The values stored before the enums existed stay what they were (members may be added).
    stored = {"accepted", "collected", "written", "verified", "cleaned", "failed", "dead"}
    assert stored <= {s.value for s in State}
    assert {"start", "normal", "emergency", "reset"} <= {k.value for k in Kind}
    assert set(UNFINISHED_STATES) < set(PENDING_STATES) and set(COMPLETION_KINDS) < set(Kind)


def test_collected_moves_only_accepted_entries(journal: Journal) -> None:
    _add(journal, "a")
    _add(journal, "b", Kind.EMERGENCY)
    with journal.transaction() as db:
        assert journal.supersede_emergencies(db, ["b"], T0 + 1) == 1
    landed = journal.collected([("a", {"html": "<p>", "text": "t"}), ("b", {"text": "t"})], T0 + 2)
    assert landed == 1
    assert (_state(journal, "a"), _state(journal, "b")) == (State.COLLECTED, State.FAILED)
    entry = journal.entry("a")
    assert entry is not None and entry.text == "t"
    with pytest.raises(ValueError, match="not report columns"):
        journal.collected([("a", {"state": State.CLEANED})], T0 + 3)


def test_writer_transitions_take_collected_written_and_a_racing_supersede(
    journal: Journal,
) -> None:
    for cid in ("w", "v", "s", "x"):
        _add(journal, cid, Kind.EMERGENCY, State.COLLECTED)
    _add(journal, "done", Kind.NORMAL, State.CLEANED)
    with journal.transaction() as db:
        journal.supersede_emergencies(db, ["s"], T0)
        assert journal.written(db, "w", T0, next_attempt_at=T0 + 1, last_error="later") == 1
        assert journal.verified(db, "v", Kind.EMERGENCY, T0, attempts=1, outcome="applied") == 1
        # The write landed while a reset superseded the entry: the database's truth wins.
        assert journal.verified(db, "s", Kind.EMERGENCY, T0) == 1
        # A finished entry is never moved back.
        assert journal.written(db, "done", T0, next_attempt_at=0, last_error=None) == 0
    assert journal.dead("x", T0, "bad", 1) == 1
    states = [_state(journal, c) for c in ("w", "v", "s", "x", "done")]
    assert states == ["written", "verified", "verified", "dead", "cleaned"]


def test_starts_and_resets_are_finished_once_verified(journal: Journal) -> None:
    _add(journal, "st", Kind.START, State.COLLECTED)
    _add(journal, "re", Kind.RESET, State.COLLECTED)
    with journal.transaction() as db:
        journal.verified(db, "st", Kind.START, T0)
        journal.verified(db, "re", Kind.RESET, T0)
    assert [_state(journal, c) for c in ("st", "re")] == ["cleaned", "cleaned"]


def test_requeue_dead_moves_only_dead_entries(journal: Journal) -> None:
    _add(journal, "d1", state=State.DEAD)
    _add(journal, "d2", state=State.DEAD)
    _add(journal, "ok", state=State.VERIFIED)
    with journal.transaction() as db:
        assert journal.requeue_dead(db, T0, "ok") == 0
        assert journal.requeue_dead(db, T0, "d1") == 1
        assert journal.requeue_dead(db, T0) == 1
    assert [_state(journal, c) for c in ("d1", "d2", "ok")] == [
        "collected",
        "collected",
        "verified",
    ]


def test_an_emergency_fires_the_completion_deadline_once(journal: Journal) -> None:
    _arm(journal)
    [timer] = journal.timers(1)
    assert timer.completion_due == T0 + 10
    assert journal.fire_deadline(1, T0 + 10, "emg-1", "late", T0 + 10)
    assert journal.timers(1)[0].completion_fired == 1
    assert not journal.fire_deadline(1, T0 + 10, "emg-2", "late", T0 + 11)
    assert journal.counters() == {"deadline_emergencies": 1}


def test_a_heartbeat_first_makes_the_deadline_stand_down(journal: Journal) -> None:
    _arm(journal)
    with journal.transaction() as db:
        journal.heard(db, 1, T0 + 5, default_timeout=10)
    assert not journal.fire_deadline(1, T0 + 10, "emg-1", "late", T0 + 10)
    assert journal.entries_for_todo(1)[-1].kind == Kind.START


def test_a_person_s_emergency_marks_the_deadline_fired(journal: Journal) -> None:
    _arm(journal)
    with journal.transaction() as db:
        assert journal.queue_emergency(db, "e-1", 1, "stuck", T0 + 1, request=b"x")
    assert journal.timers(1)[0].completion_fired == 1
    assert _state(journal, "e-1") == State.ACCEPTED
    assert journal.counters() == {}


def test_force_completion_only_without_a_completion_in_hand(journal: Journal) -> None:
    _arm(journal)
    assert journal.force_completion(1, "hang-1", "hanging", T0 + 100)
    assert not journal.force_completion(1, "hang-2", "hanging", T0 + 200)
    assert journal.counters() == {"forced_completions": 1}
    assert journal.timers(1)[0].completion_fired == 1


def test_reset_if_idle_waits_for_pending_entries(journal: Journal) -> None:
    _add(journal, "n", state=State.DEAD)
    assert not journal.reset_if_idle(1, "fix-1", "why", T0)
    journal.update_entry("n", T0, state=State.CLEANED)
    assert journal.reset_if_idle(1, "fix-1", "why", T0)
    assert _state(journal, "fix-1") == State.COLLECTED
    assert journal.counters() == {"status_resets": 1}


def test_cleaned_moves_only_verified_entries_and_finishes_the_todo(journal: Journal) -> None:
    _arm(journal)
    _add(journal, "n", state=State.VERIFIED)
    [head] = journal.finished_heads()
    journal.update_entry("n", T0, state=State.FAILED)  # moved on since it was read
    journal.cleaned([head], T0 + 1, 0)
    assert _state(journal, "n") == State.FAILED
    journal.update_entry("n", T0, state=State.VERIFIED)
    journal.cleaned([FinishedHead(head.seq, "n", 1, Kind.NORMAL, None)], T0 + 2, 1)
    assert _state(journal, "n") == State.CLEANED
    timer = journal.timers(1)[0]
    assert (timer.done, timer.emergency_due) == (1, None)
    assert journal.counters() == {"sessions_cleaned": 1}


def test_a_savepoint_undoes_only_its_own_part(journal: Journal) -> None:
    with journal.transaction() as db:
        journal.add_entry(db, NewEntry("kept", 1, Kind.NORMAL), T0)
        with pytest.raises(ValueError), journal.savepoint(db):
            journal.add_entry(db, NewEntry("undone", 1, Kind.NORMAL), T0)
            raise ValueError("refused")
    assert journal.entry("kept") is not None and journal.entry("undone") is None


def test_prune_keeps_a_stop_answered_todo_until_its_retention_passed(journal: Journal) -> None:
    # A todo completed by a Stop that this agent never heard start: the row holds the last
    # Stop, from which hook.final_after counts. Pruning it would make the answer final at once
    # (archived, its session dir removed) while the session may still revise it.
    with journal.transaction() as db:
        journal.set_last_word(db, 7, "Stop", T0, stop=True)
        journal.accept_completion(db, "c-7", 7, b"", T0)
    retention = 30 * 86400
    journal.prune(T0 + 60 - retention)
    assert journal.final_todos([7], T0 + 60, final_after=600) == set()
    journal.prune(T0 + retention + 1 - retention)  # the retention passed since the Stop
    assert journal.final_todos([7], T0 + retention + 1, final_after=600) == {7}


def test_only_the_collector_skips_the_fsync_of_its_commits(tmp_path: Path) -> None:
    """Intake's ack, the writer's VERIFIED (after which the monitor deletes session files) and
    the monitor's own changes wait for the disk; the collector's COLLECTED, made again from
    ACCEPTED after a power loss, does not (see agent.collector.Collector)."""
    from agent.collector import Collector
    from agent.monitor import Monitor
    from agent.writer import Writer

    assert (Collector.durable_journal, Writer.durable_journal, Monitor.durable_journal) == (
        False,
        True,
        True,
    )
    for durable, level in ((True, 2), (False, 1)):  # FULL, NORMAL
        journal = Journal(tmp_path / "journal.db", durable=durable)
        try:
            assert journal._db.execute("PRAGMA synchronous").fetchone()[0] == level
        finally:
            journal.close()
