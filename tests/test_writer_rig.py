"""The writer's logic in milliseconds: a real journal, a fake Store that fails on demand, and a
clock the test sets.  Batching, splitting a batch around a locked row, backoff, a permanent
error, outage probing and draining.  (The same behaviour against MariaDB behind a proxy is in
test_writer.py.)"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.journal import Journal, Kind, NewEntry, State
from agent.store import PermanentError, TodoWrite, TransientError, WriteOutcome
from agent.writer import BATCH, PROBE_INTERVAL, Writer, _log_kind
from tests.harness import T0, unit_config

SQLITE_BUSY = 5  # the writer's test config uses SQLite: a busy row lock is contention


class FakeStore:
    """The Store protocol, in memory.  ``down``: every call fails as an unreachable server;
    ``locked``: a transaction touching one of these todos fails as a held row lock; ``bad``: a
    write for one of these todos is refused with a permanent error."""

    def __init__(self) -> None:
        self.down = False
        self.locked: set[int] = set()
        self.bad: set[int] = set()
        self.refuse: dict[int, str] = {}  # todo id -> why the database refuses its writes
        self.rows: dict[str, TodoWrite] = {}
        self.transactions: list[list[str]] = []
        self.pings = 0

    def _reachable(self) -> None:
        if self.down:
            raise TransientError("connection refused; will retry")

    def ensure_schema(self, *, create_todo_table: bool) -> None:
        self._reachable()

    def ping(self) -> None:
        self.pings += 1
        self._reachable()

    def apply(self, writes: Sequence[TodoWrite]) -> list[WriteOutcome]:
        self._reachable()
        todos = {w.todo_id for w in writes}
        if todos & self.locked:
            raise TransientError("lock wait timeout; will retry", errno=SQLITE_BUSY)
        if todos & self.bad:
            raise PermanentError("no such column: claude_html_output")
        self.transactions.append([w.completion_id for w in writes])
        outcomes = []
        for w in writes:
            if w.todo_id in self.refuse:
                outcomes.append(WriteOutcome(w.completion_id, "refused", self.refuse[w.todo_id]))
                continue
            self.rows[w.completion_id] = w
            outcomes.append(
                WriteOutcome(w.completion_id, "applied", log_kind=_log_kind(w.kind, "applied"))
            )
        return outcomes

    def verify_many(
        self, writes: Sequence[TodoWrite], outcomes: Sequence[WriteOutcome]
    ) -> list[bool]:
        self._reachable()
        return [w.completion_id in self.rows for w in writes]

    def verify(self, write: TodoWrite, outcome: WriteOutcome) -> bool:
        self._reachable()
        return write.completion_id in self.rows

    def close(self) -> None:
        pass


class FakeRoute:
    """What the writer opens its store through (agent/dbroute.py), handing out the fake."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.opened = 0

    def open(self, *, timeout: float | None = None) -> FakeStore:
        self.opened += 1
        return self.store

    def log_events(self, logger: Any) -> None:
        pass

    def note_node(self, store: Any, logger: Any) -> None:
        pass

    def close(self) -> None:
        pass


class Rig:
    def __init__(self, root: Path) -> None:
        self.config = unit_config(root, {"behavior": {"max_retries": 3, "retry_max_delay": 60}})
        self.journal = Journal.create(self.config.journal_path)
        self.store = FakeStore()
        self.now = T0
        self.writer = Writer(self.config, clock=lambda: self.now)
        self.writer.initialize()
        self.writer.route = FakeRoute(self.store)  # type: ignore[assignment]
        self.writer._rng = random.Random(11)  # the backoff's jitter, the same every run

    def collected(self, todo_id: int, cid: str, kind: str = Kind.NORMAL) -> None:
        self.collected_many([(todo_id, cid, kind)])

    def collected_many(self, entries: list[tuple[int, str, str]]) -> None:
        """Entries ready for the writer, journaled in one transaction (one fsync)."""
        with self.journal.transaction() as db:
            for todo_id, cid, kind in entries:
                new = NewEntry(cid, todo_id, kind, state=State.COLLECTED)
                self.journal.add_entry(db, new, T0)

    def run(self, at: float) -> float:
        self.now = at
        return self.writer.run_once(at)

    def state(self, cid: str) -> str:
        entry = self.journal.entry(cid)
        assert entry is not None
        return entry.state

    def entry(self, cid: str) -> Any:
        return self.journal.entry(cid)

    def close(self) -> None:
        self.writer.shutdown()
        self.journal.close()


@pytest.fixture
def rig(tmpdir_short: Path) -> Iterator[Rig]:
    r = Rig(tmpdir_short)
    yield r
    r.close()


def test_a_burst_is_written_in_full_batches_in_journal_order(rig: Rig) -> None:
    cids = [f"c-{i}" for i in range(BATCH + 50)]
    rig.collected_many([(i + 1, cid, Kind.NORMAL) for i, cid in enumerate(cids)])
    rig.run(T0)
    assert [len(t) for t in rig.store.transactions] == [BATCH, 50]
    assert [c for t in rig.store.transactions for c in t] == cids
    assert {rig.state(c) for c in cids} == {State.VERIFIED}
    assert rig.writer.transactions == 2


def test_a_todo_waits_for_its_earlier_entry(rig: Rig) -> None:
    rig.collected(1, "start-1", Kind.START)
    rig.collected(1, "n-1")
    rig.store.locked = {1}
    rig.run(T0)
    assert (rig.state("start-1"), rig.entry("start-1").attempts) == (State.COLLECTED, 1)
    assert rig.entry("n-1").attempts == 0  # never tried before the start landed
    rig.store.locked = set()
    rig.run(rig.entry("start-1").next_attempt_at)
    assert rig.store.transactions == [["start-1", "n-1"]]
    assert (rig.state("start-1"), rig.state("n-1")) == (State.CLEANED, State.VERIFIED)


def test_a_locked_row_splits_the_batch_and_only_its_todo_waits(rig: Rig) -> None:
    for todo in (1, 2, 3):
        rig.collected(todo, f"c-{todo}")
    rig.store.locked = {2}
    rig.run(T0)
    assert rig.store.transactions == [["c-1"], ["c-3"]]  # one at a time after the lock
    assert [rig.state(f"c-{t}") for t in (1, 2, 3)] == ["verified", "collected", "verified"]
    waiting = rig.entry("c-2")
    assert waiting.attempts == 1 and "lock wait timeout" in waiting.last_error
    assert rig.writer.db.down_since is None  # a lock is not an outage
    rig.store.locked = set()
    rig.run(waiting.next_attempt_at)
    assert rig.state("c-2") == State.VERIFIED


def test_transient_errors_back_off_exponentially_up_to_the_cap(rig: Rig) -> None:
    rig.collected(1, "c-1")
    rig.store.locked = {1}
    delays = []
    now = T0
    for _ in range(6):
        rig.run(now)
        entry = rig.entry("c-1")
        delays.append(entry.next_attempt_at - now)
        now = entry.next_attempt_at
    # 2, 4, 8 (max_retries 3), then retry_max_delay; each with 20 % jitter either way.
    for delay, nominal in zip(delays, [2, 4, 8, 60, 60, 60], strict=True):
        assert nominal * 0.8 <= delay <= nominal * 1.2
    assert rig.entry("c-1").attempts == 6
    assert rig.state("c-1") == State.COLLECTED  # never given up on


def test_a_permanent_error_kills_only_its_entry(rig: Rig) -> None:
    for todo in (1, 2, 3):
        rig.collected(todo, f"c-{todo}")
    rig.store.bad = {2}
    rig.run(T0)
    assert [rig.state(f"c-{t}") for t in (1, 2, 3)] == ["verified", "dead", "verified"]
    assert "no such column" in rig.entry("c-2").last_error


def test_an_outage_is_probed_once_a_second_and_drained_at_once(rig: Rig) -> None:
    rig.run(T0 - 10)  # the schema is ready: the outage starts with a write
    rig.collected(1, "c-1")
    rig.store.down = True
    wake = rig.run(T0)
    assert rig.writer.db.down_since == T0
    assert rig.entry("c-1").attempts == 1
    assert wake <= T0 + PROBE_INTERVAL
    pings = rig.store.pings
    rig.run(T0 + PROBE_INTERVAL / 2)
    assert rig.store.pings == pings  # not before the probe is due
    rig.run(T0 + PROBE_INTERVAL)
    assert rig.store.pings == pings + 1
    for i in range(2, 6):  # more arrive during the outage
        rig.collected(i, f"c-{i}")
    rig.run(T0 + 2 * PROBE_INTERVAL)
    assert rig.entry("c-1").next_attempt_at > T0 + 1  # backing off meanwhile (2 s ± 20 %)
    rig.store.down = False
    rig.run(T0 + 3 * PROBE_INTERVAL)
    # Back: the backoff is forgotten and the whole backlog goes in one transaction at once.
    assert rig.writer.db.down_since is None
    assert rig.store.transactions == [["c-1", "c-2", "c-3", "c-4", "c-5"]]
    assert {rig.state(f"c-{i}") for i in range(1, 6)} == {State.VERIFIED}


def test_a_write_that_does_not_read_back_is_verified_later_then_failed(rig: Rig) -> None:
    rig.collected(1, "c-1")
    original = rig.store.verify_many
    rig.store.verify_many = lambda writes, outcomes: [False] * len(writes)  # type: ignore[method-assign]
    rig.store.verify = lambda write, outcome: False  # type: ignore[method-assign]
    rig.run(T0)
    assert rig.state("c-1") == State.WRITTEN
    now = T0
    while rig.state("c-1") == State.WRITTEN and now < T0 + 100:
        now = rig.entry("c-1").next_attempt_at
        rig.run(now)
    assert rig.state("c-1") == State.FAILED
    assert "never read back" in rig.entry("c-1").last_error
    assert len(rig.store.transactions) == 1  # written once, only read again
    rig.store.verify_many = original  # type: ignore[method-assign]


def test_nothing_waiting_sleeps_until_the_sweep(rig: Rig) -> None:
    assert rig.run(T0) == T0 + rig.config.behavior.sweep_interval
    assert rig.store.transactions == [] and not math.isnan(rig.run(T0 + 1))


def test_a_refused_scheduled_completion_gives_the_todo_its_deadlines_back(rig: Rig) -> None:
    """The schedule fired (disarming the todo's deadlines) but the database refused it, e.g. a
    todo created after the schedule: the session on that todo gets fresh deadlines."""
    journal = rig.journal
    with journal.transaction() as db:
        journal.queue_start(
            db, "start-7", 7, b"", T0, completion_timeout=60, emergency_timeout=600,
            session_id=None, transcript_path=None, cwd=None,
        )  # fmt: skip
        journal.schedule(db, "r1", 7, T0 + 100, b"", T0)
    rig.run(T0)  # the start lands
    [pending] = journal.pending_schedules()
    assert journal.fire_schedule(pending, "sched-r1", T0 + 100)
    assert journal.timers(7)[0].done == 1  # firing disarmed them
    journal.collected([("sched-r1", {"text": "later"})], T0 + 100)
    rig.store.refuse = {7: "todo 7 was created at ..., after this completion was scheduled"}
    rig.run(T0 + 101)
    assert rig.state("sched-r1") == State.FAILED
    [timer] = journal.timers(7)
    assert timer.done == 0
    # The configured timeouts (tests.harness.unit_config: 10 s and 60 s), from now.
    assert (timer.completion_due, timer.emergency_due) == (T0 + 101 + 10, T0 + 101 + 60)
    assert timer.note is not None and "scheduled completion refused" in timer.note
