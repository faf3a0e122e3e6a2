"""The lifecycle every agent process shares: initialise, run_once(now) until stopped, shut down.

Signal handlers only record the signal; the loop wakes through a set_wakeup_fd pipe registered in
its zmq.Poller, so a signal is handled between two iterations, never in the middle of one.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import zmq

from .memory import Trimmer

if TYPE_CHECKING:
    from protocol.config import Config

    from .doorbell import Bells
    from .journal import Journal

JOURNAL_RETRY_FIRST = 0.5  # seconds before work is tried again after the journal failed
JOURNAL_RETRY_MAX = 10.0


class Process(Protocol):
    name: str
    poller: zmq.Poller

    def initialize(self) -> None: ...

    def run_once(self, now: float) -> float:
        """Do what is due at ``now``; return the wall-clock time it next needs to run."""
        ...

    def shutdown(self) -> None: ...


class Signals:
    """Records SIGTERM/SIGINT/SIGHUP for the loop; a second SIGTERM/SIGINT means stop now."""

    def __init__(self) -> None:
        self.stop_requested = False
        self.reopen_requested = False
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def install(self, *, hup: bool = True) -> None:
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        if hup:
            signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum: int, frame: object) -> None:
        if self.stop_requested:
            # rq's two-stage stop: the second signal does not wait for the current job.
            os._exit(1)
        self.stop_requested = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reopen_requested = True

    @property
    def fd(self) -> int:
        return self._reader.fileno()

    def drain(self) -> None:
        try:
            while self._reader.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass


def serve(
    process: Process,
    signals: Signals,
    *,
    on_reopen: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.time,
    max_sleep: float = 30.0,
) -> None:
    """Run ``process`` until a stop signal; its poller holds its sockets and descriptors."""
    process.initialize()
    try:
        process.poller.register(signals.fd, zmq.POLLIN)
        while not signals.stop_requested:
            wake_at = process.run_once(clock())
            if signals.stop_requested:
                break
            timeout = min(max(wake_at - clock(), 0.0), max_sleep)
            events = dict(process.poller.poll(int(timeout * 1000) + (1 if timeout > 0 else 0)))
            if signals.fd in events:
                signals.drain()
            if signals.reopen_requested:
                signals.reopen_requested = False
                if on_reopen is not None:
                    on_reopen()
    finally:
        process.shutdown()


class ChildBase:
    """What every child shares: its own context, its doorbell, the journal, a parent check.

    Subclasses implement ``open()``, ``work(now) -> wake_at`` and ``close()``.
    """

    name = "child"
    rings: tuple[str, ...] = ()
    # Whether this process's journal commits are fsynced (agent.journal.Journal's durable).
    durable_journal = True

    journal: Journal  # set by initialize(), before open()

    def __init__(
        self,
        config: Config,
        *,
        parent_pid: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.parent_pid = parent_pid
        self.clock = clock
        self.poller = zmq.Poller()
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.bell: zmq.Socket[bytes] | None = None
        self.bells: Bells | None = None
        self.sweep = config.behavior.sweep_interval
        self.trimmer = Trimmer()
        self.journal_failures = 0  # in a row; see _journal_failed

    def initialize(self) -> None:
        from pathlib import Path

        from . import doorbell
        from .journal import Journal

        state = self.state_path = Path(self.config.state_dir)
        self.ctx = zmq.Context()
        self.bell = doorbell.listen(self.ctx, state, self.name)
        self._bell_file = doorbell.identify(doorbell.bell_path(state, self.name))
        self.poller.register(self.bell, zmq.POLLIN)
        self.bells = doorbell.Bells(self.ctx, state, self.rings)
        self.journal = Journal(self.config.journal_path, durable=self.durable_journal)
        self.open()

    def run_once(self, now: float) -> float:
        from . import doorbell

        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            raise SystemExit(0)  # orphaned: the parent died without stopping us
        assert self.bell is not None
        if doorbell.drain(self.bell):
            self.trimmer.worked(now)  # a ring means news: work, then a trim once it is quiet
        try:
            wake = min(self.work(now), now + self.sweep)
        except sqlite3.OperationalError as exc:
            return self._journal_failed(exc, now)
        if self.journal_failures:
            from loguru import logger

            logger.info("the journal is writable again; carrying on")
            self.journal_failures = 0
        self.trimmer.run(now)
        due = self.trimmer.due()
        return wake if due is None else min(wake, due)

    def _journal_failed(self, exc: sqlite3.OperationalError, now: float) -> float:
        """The journal cannot be written now (a full disk, an I/O error, a lock held too long).

        Nothing is lost by stopping here: the journal still holds what waits, and every step
        is idempotent, so work that was under way is simply done again once it can be recorded.
        Backing off beats crashing into the supervisor's restart loop.
        """
        from loguru import logger

        self.journal_failures += 1
        delay = min(JOURNAL_RETRY_MAX, JOURNAL_RETRY_FIRST * 2 ** (self.journal_failures - 1))
        if self.journal_failures == 1 or delay == JOURNAL_RETRY_MAX:
            if "locked" in str(exc):
                hint = "another agent process holds the journal's lock; is one stopped?"
            else:
                hint = f"check free space and permissions in {self.config.state_dir}"
            logger.error(
                "the journal could not be written ({}); nothing is lost, the work is taken up "
                "again in {:.1f} s ({})",
                exc,
                delay,
                hint,
            )
        return now + delay

    def ring(self, name: str) -> None:
        if self.bells is not None:
            self.bells.ring(name)

    def shutdown(self) -> None:
        from . import doorbell

        try:
            self.close()
        finally:
            if self.bells is not None:
                self.bells.close()
            if self.bell is not None:
                self.bell.close(0)
                # Only the file this process bound: a successor (a restart while an orphaned
                # predecessor was still stopping) may have bound its own at the same path.
                doorbell.remove_if_same(
                    doorbell.bell_path(self.state_path, self.name), self._bell_file
                )
            if self.ctx is not None:
                self.ctx.term()
            if getattr(self, "journal", None) is not None:
                self.journal.close()

    def open(self) -> None:
        pass

    def work(self, now: float) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass
