"""The loop every child shares: a journal that cannot be written backs off instead of crashing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.journal import Journal
from agent.loop import JOURNAL_RETRY_FIRST, JOURNAL_RETRY_MAX, ChildBase
from protocol.config import Config


class Flaky(ChildBase):
    name = "writer"

    def open(self) -> None:
        self.failures: list[Exception] = []
        self.calls = 0

    def work(self, now: float) -> float:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return now + 100.0


@pytest.fixture
def child(tmpdir_short: Path):
    state = tmpdir_short / "state"
    state.mkdir()
    config = Config(state_dir=str(state))
    Journal.create(config.journal_path).close()
    process = Flaky(config)
    process.initialize()
    yield process
    process.shutdown()


def test_a_journal_that_cannot_be_written_backs_off_and_recovers(child: Flaky) -> None:
    full = sqlite3.OperationalError("database or disk is full")
    child.failures = [full, full, full]
    now = 1000.0
    waits = []
    for _ in range(3):
        wake = child.run_once(now)
        waits.append(wake - now)
        now = wake
    assert waits == [JOURNAL_RETRY_FIRST, 2 * JOURNAL_RETRY_FIRST, 4 * JOURNAL_RETRY_FIRST]
    assert child.journal_failures == 3
    # Space is back: the work runs as usual and the streak ends.
    assert child.run_once(now) == now + child.sweep
    assert (child.calls, child.journal_failures) == (4, 0)


def test_the_back_off_is_capped(child: Flaky) -> None:
    child.failures = [sqlite3.OperationalError("disk I/O error")] * 12
    waits = [child.run_once(1000.0) - 1000.0 for _ in range(12)]
    assert max(waits) == JOURNAL_RETRY_MAX


def test_other_errors_are_not_swallowed(child: Flaky) -> None:
    child.failures = [sqlite3.DatabaseError("database disk image is malformed")]
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        child.run_once(1000.0)


def test_a_child_removes_only_the_doorbell_it_bound(tmpdir_short: Path) -> None:
    from agent import doorbell

    path = tmpdir_short / "bell-w.sock"
    path.write_text("mine")
    mine = doorbell.identify(path)
    # A successor binds anew at the same path while this one still holds its socket (as a
    # bound socket holds its file, the successor's is a different one).
    with path.open():
        successor = tmpdir_short / "successor"
        successor.write_text("a successor's")
        successor.replace(path)
        doorbell.remove_if_same(path, mine)
    assert path.read_text() == "a successor's"
    doorbell.remove_if_same(path, doorbell.identify(path))
    assert not path.exists()
    doorbell.remove_if_same(path, None)  # nothing there, nothing known: no error
