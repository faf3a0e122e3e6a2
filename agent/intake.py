"""Intake: what the parent does with each batch of requests, durable before the reply.

A batch is decoded, its reads answered (``agent.reads``), and its changes journaled in one
transaction (one fsync: group commit; ``agent.handlers`` has one method per request type), then
every reply is sent.  A child stuck inside a journal transaction must not stall intake: the
lock-wait policy below answers UNAVAILABLE instead, and the client queues the request.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import msgspec
from loguru import logger

import protocol as p
from protocol.config import Config

from .checks import MONITOR_CHECKS as MONITOR_CHECKS  # re-exported for the tests
from .checks import ChildInfo
from .handlers import HANDLERS, Handlers
from .journal import Journal
from .reads import READERS, Reads
from .replies import Outcome, Refusal, internal, unavailable

LOCK_WAIT = 0.5  # seconds a batch of requests waits for a child's journal transaction
LOCK_WAIT_STUCK = 0.05  # the same, while the lock has been found stuck


class Intake:
    def __init__(
        self,
        config: Config,
        journal: Journal,
        children: Callable[[], dict[str, ChildInfo]],
        started_at: float,
    ) -> None:
        self.config = config
        self.journal = journal
        self.stopping = False
        self._stuck_at_version: int | None = None  # see wait_for_lock
        self.handlers = Handlers(config, journal)
        self.reads = Reads(config, journal, children, started_at)

    # The reads, also asked directly (in-process tests and rigs).
    def status(self, request: p.Status, now: float) -> p.StatusReport:
        return self.reads.status(request, now)

    def list_todos(self, request: p.ListTodos, now: float) -> p.TodoList:
        return self.reads.list_todos(request, now)

    def health(self, now: float) -> p.HealthReport:
        return self.reads.health(p.Health(), now)

    # ------------------------------------------------------------ batches

    def handle_frames(
        self, frames: list[bytes], now: float, requesters: list[int] | None = None
    ) -> tuple[list[p.Reply], set[str]]:
        """Decode, journal and answer a batch; one transaction for all that change the journal.

        ``requesters``: each frame's sender (the peer's uid, or protocol.REMOTE); it is stamped
        on the request, so that the children read what it names with no more than its rights.
        """
        replies: list[p.Reply | None] = [None] * len(frames)
        decoded: list[tuple[int, p.Request]] = []
        for index, frame in enumerate(frames):
            request: p.Request
            try:
                request = p.decode_request(frame)
            except p.ProtocolError as exc:
                logger.warning("rejected a frame: {}", exc)
                replies[index] = p.Error(code=exc.code, message=str(exc))
                continue
            if isinstance(request, p.TodoRequest):
                uid = requesters[index] if requesters is not None else None
                request = msgspec.structs.replace(request, requester_uid=uid)
            decoded.append((index, request))
        ring: set[str] = set()
        writes = [(i, r) for i, r in decoded if type(r) in HANDLERS]
        for index, request in decoded:
            if type(request) in READERS:
                replies[index] = self._safely(request, now)
        if writes:
            if self.stopping:
                for index, _ in writes:
                    replies[index] = p.Error(
                        code=p.ErrorCode.STOPPING,
                        message="completiond is stopping; the request was not taken",
                    )
            else:
                try:
                    outcomes = self._journal_batch(writes, now)
                except sqlite3.Error as exc:
                    # Disk full, an I/O error, a lock held past the busy timeout: nothing of the
                    # batch was recorded, so nothing is acknowledged; the client queues it.
                    logger.error(
                        "the journal could not record {} request(s): {}; they were not taken",
                        len(writes),
                        exc,
                    )
                    outcomes = [
                        (index, Outcome(unavailable(exc, self.config.state_dir)))
                        for index, _ in writes
                    ]
                for index, outcome in outcomes:
                    replies[index] = outcome.reply
                    ring |= outcome.ring
        return [r if r is not None else internal("no reply") for r in replies], ring

    def apply(self, request: p.Request, now: float) -> Outcome:
        """One request that changes the journal (used for outbox files)."""
        [(_, outcome)] = self._journal_batch([(0, request)], now)
        return outcome

    def wait_for_lock(self) -> None:
        """From now on a child may hold the journal's write lock; one that is stopped or
        starved mid-transaction must not stall intake.  A batch waits ``LOCK_WAIT`` for it and
        is then answered UNAVAILABLE (the client queues it in the outbox, ingested on the next
        sweep).  While the lock stays stuck (nobody has committed since), each further batch
        waits only ``LOCK_WAIT_STUCK``, so requests queued behind one another do not add up
        their waits; a holder that is merely slow commits meanwhile and gets the full wait."""
        self._stuck_at_version = None
        self.journal.set_busy_timeout(LOCK_WAIT)

    def _journal_batch(
        self, writes: list[tuple[int, p.Request]], now: float
    ) -> list[tuple[int, Outcome]]:
        if self._stuck_at_version is not None:
            if self.journal.data_version() != self._stuck_at_version:
                self._stuck_at_version = None  # someone committed: the lock moves again
            wait = LOCK_WAIT if self._stuck_at_version is None else LOCK_WAIT_STUCK
            self.journal.set_busy_timeout(wait)
        try:
            results = self._journal_batch_once(writes, now)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) and self._stuck_at_version is None:
                self._stuck_at_version = self.journal.data_version()
            raise
        if self._stuck_at_version is not None:
            self._stuck_at_version = None
            self.journal.set_busy_timeout(LOCK_WAIT)
        return results

    def _journal_batch_once(
        self, writes: list[tuple[int, p.Request]], now: float
    ) -> list[tuple[int, Outcome]]:
        results: list[tuple[int, Outcome]] = []
        with self.journal.transaction() as db:
            for index, request in writes:
                try:
                    with self.journal.savepoint(db):
                        outcome = self._handle(db, request, now)
                except Refusal as exc:
                    outcome = Outcome(p.Error(code=exc.code, message=str(exc)))
                except (sqlite3.IntegrityError, ValueError) as exc:
                    logger.exception("request {} failed", request.request_id)
                    outcome = Outcome(internal(str(exc)))
                results.append((index, outcome))
        return results

    def _handle(self, db: sqlite3.Connection, request: p.Request, now: float) -> Outcome:
        request_id = request.request_id or p.new_request_id()
        if request.request_id:
            completion_id, todo_id = self.journal.seen_request(db, request_id)
            if todo_id is not None or completion_id is not None:
                return Outcome(
                    p.Ack(
                        request_id=request_id,
                        state="accepted",
                        todo_id=todo_id,
                        completion_id=completion_id,
                        message="this request was already received; it is applied once",
                    )
                )
        if not request.request_id:
            request = _with_id(request, request_id)
        return self.handlers.handle(db, request, now)

    def _safely(self, request: p.Request, now: float) -> p.Reply:
        try:
            return self.reads.read(request, now)
        except Refusal as exc:
            return p.Error(code=exc.code, message=str(exc))
        except sqlite3.Error as exc:
            logger.exception("journal read failed")
            return internal(f"journal read failed: {exc}")


def _with_id(request: p.Request, request_id: str) -> p.Request:
    return msgspec.structs.replace(request, request_id=request_id)
