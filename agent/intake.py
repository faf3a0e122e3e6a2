"""Intake: what the parent does with each request, durable before the reply.

Handlers are looked up by message type.  A batch of requests is journaled in one transaction
(one fsync: group commit), then every reply is sent.  Nothing here waits on the database, tmux
or session files; the children do that work from the journal.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from loguru import logger

import protocol as p
from protocol.config import Config
from protocol.dburl import mask_url

from .checks import MONITOR_CHECKS as MONITOR_CHECKS  # re-exported for the tests
from .checks import (
    ChildInfo,
    children_check,
    journal_check,
    predicted_hang,
    refused_check,
    render_health,
    scheduled,
    todo_status,
    waiting_check,
)
from .journal import ANSWER_KINDS, Journal, Kind, State, scheduled_completion_id

ACKNOWLEDGEABLE = ("refused",)  # checks `completionctl ack` can clear
# SessionStart sources of a session that existed before (not a fresh start of the work).
RESUMED_SOURCES = ("resume", "clear", "compact")


class Refusal(Exception):
    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Outcome:
    reply: p.Reply
    ring: set[str] = field(default_factory=set)


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
        self.children = children
        self.started_at = started_at
        self.stopping = False
        self._stuck_at_version: int | None = None  # see wait_for_lock
        self._handlers: dict[type, Callable[[sqlite3.Connection, p.Request, float], Outcome]] = {
            p.Start: self._start,
            p.Heartbeat: self._heartbeat,
            p.Waiting: self._waiting,
            p.Complete: self._complete,
            p.Emergency: self._emergency,
            p.Retry: self._retry,
            p.BatchComplete: self._batch_complete,
            p.Schedule: self._schedule,
            p.Cancel: self._cancel,
            p.Acknowledge: self._acknowledge,
        }
        self._readers: dict[type, Callable[[p.Request, float], p.Reply]] = {
            p.Ping: lambda request, now: p.Pong(version=p.VERSION, pid=_pid()),
            p.Health: lambda request, now: self.health(now),
            p.Status: lambda request, now: self.status(request, now),  # type: ignore[arg-type]
            p.Outcomes: lambda request, now: self.outcomes(request),  # type: ignore[arg-type]
            p.Metrics: lambda request, now: self.metrics(request, now),  # type: ignore[arg-type]
            p.ListTodos: lambda request, now: self.list_todos(request, now),  # type: ignore[arg-type]
        }

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
        writes = [(i, r) for i, r in decoded if type(r) in self._handlers]
        for index, request in decoded:
            reader = self._readers.get(type(request))
            if reader is not None:
                replies[index] = self._safely(reader, request, now)
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
                        (index, Outcome(_unavailable(exc, self.config.state_dir)))
                        for index, _ in writes
                    ]
                for index, outcome in outcomes:
                    replies[index] = outcome.reply
                    ring |= outcome.ring
        return [r if r is not None else _internal("no reply") for r in replies], ring

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
                    outcome = Outcome(_internal(str(exc)))
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
        return self._handlers[type(request)](db, request, now)

    def _safely(
        self, read: Callable[[p.Request, float], p.Reply], request: p.Request, now: float
    ) -> p.Reply:
        try:
            return read(request, now)
        except Refusal as exc:
            return p.Error(code=exc.code, message=str(exc))
        except sqlite3.Error as exc:
            logger.exception("journal read failed")
            return _internal(f"journal read failed: {exc}")

    # ------------------------------------------------------------ handlers

    def resolve(self, db: sqlite3.Connection, request: p.TodoRequest) -> int:
        """Which todo: the explicit id, then the session mapping, then the CURRENT_TODO_ID hint."""
        if request.todo_id is not None:
            return request.todo_id
        if request.session_id:
            todo_id = self.journal.todo_for_session(db, request.session_id)
            if todo_id is not None:
                return todo_id
        hinted = p.parse_todo_id(request.todo_hint)
        if hinted is not None:
            return hinted
        raise Refusal(
            p.ErrorCode.UNKNOWN_TODO,
            "cannot tell which todo this is about: give the todo id, set $TODO_ID, "
            "or start the todo with --session so the session id maps to it",
        )

    def _record(
        self,
        db: sqlite3.Connection,
        request: p.TodoRequest,
        todo_id: int,
        now: float,
        completion_id: str | None = None,
    ) -> None:
        self.journal.record_request(db, request.request_id, completion_id, todo_id, now)
        if request.session_id:
            self.journal.map_session(db, request.session_id, todo_id, now)

    def _sent(
        self, db: sqlite3.Connection, completion_id: str, request: p.TodoRequest, now: float
    ) -> None:
        """When the client sent it (the hook's clock): where end-to-end latency starts."""
        if request.sent_at is not None and 0 <= now - request.sent_at < 30 * 86400:
            self.journal.record_stages(
                db, [(completion_id, "sent", request.sent_at, now - request.sent_at, None)]
            )

    def _ack(
        self, request: p.Request, todo_id: int, completion_id: str | None = None, **kw: Any
    ) -> p.Ack:
        return p.Ack(
            request_id=request.request_id,
            state="accepted",
            todo_id=todo_id,
            completion_id=completion_id,
            **kw,
        )

    def _start(self, db: sqlite3.Connection, request: p.Request, now: float) -> Outcome:
        assert isinstance(request, p.Start)
        todo_id = self.resolve(db, request)
        if request.source in RESUMED_SOURCES and self.journal.has_completion(db, todo_id):
            # `claude --resume`, /clear or a compaction of a session whose todo is completed:
            # the session is alive, nothing starts anew (and nothing is refused).
            self._record(db, request, todo_id, now)
            self.journal.heard(
                db,
                todo_id,
                now,
                default_timeout=self.config.behavior.completion_timeout,
                session_id=request.session_id,
            )
            logger.bind(todo_id=todo_id).info(
                "session {} {}: the todo is completed already; a heartbeat",
                request.session_id,
                request.source,
            )
            return Outcome(
                self._ack(
                    request,
                    todo_id,
                    message=f"todo {todo_id} is completed already; this {request.source} is "
                    "a heartbeat of its session",
                ),
                {"monitor"},
            )
        behavior = self.config.behavior
        completion_id = f"start-{request.request_id}"
        self._record(db, request, todo_id, now, completion_id)
        self.journal.queue_start(
            db,
            completion_id,
            todo_id,
            p.encode(request),
            now,
            completion_timeout=request.timeout or behavior.completion_timeout,
            emergency_timeout=max(
                behavior.emergency_timeout, request.timeout or behavior.completion_timeout
            ),
            session_id=request.session_id,
            transcript_path=request.transcript_path,
            cwd=request.cwd,
        )
        self.journal.reopen(db, todo_id)
        logger.bind(todo_id=todo_id).info("start accepted (session {})", request.session_id)
        return Outcome(self._ack(request, todo_id, completion_id), {"writer", "monitor"})

    def _heartbeat(self, db: sqlite3.Connection, request: p.Request, now: float) -> Outcome:
        assert isinstance(request, p.Heartbeat)
        todo_id = self.resolve(db, request)
        self._record(db, request, todo_id, now)
        note = f"{request.event}: {request.note}" if request.note else None
        self.journal.heard(
            db,
            todo_id,
            now,
            default_timeout=self.config.behavior.completion_timeout,
            note=note,
            session_id=request.session_id,
        )
        if request.event == "StopFailure":
            # The turn ended with an API error: a SessionEnd after it is not a completion.
            self.journal.set_last_word(db, todo_id, note, now, stop=False)
        if note:
            logger.bind(todo_id=todo_id).warning("session reported {}", note)
        return Outcome(self._ack(request, todo_id), {"monitor"})

    def _waiting(self, db: sqlite3.Connection, request: p.Request, now: float) -> Outcome:
        assert isinstance(request, p.Waiting)
        todo_id = self.resolve(db, request)
        self._record(db, request, todo_id, now)
        self.journal.mark_waiting(db, todo_id, request.reason, now)
        logger.bind(todo_id=todo_id).info("session waits for a person: {}", request.reason)
        return Outcome(self._ack(request, todo_id), {"monitor"})

    def _complete(self, db: sqlite3.Connection, request: p.Request, now: float) -> Outcome:
        assert isinstance(request, p.Complete)
        todo_id = self.resolve(db, request)
        if request.event == "Stop":
            self.journal.set_last_word(db, todo_id, "Stop", now, stop=True)
        else:
            if request.event == "SessionEnd":
                word = self.journal.last_word(db, todo_id)
                if word and word.startswith("StopFailure"):
                    return self._failed_session(db, request, todo_id, word, now)
            # The session ended (or a person or script said it is done): the result is final.
            self.journal.mark_final(db, todo_id, now)
        if request.only_if_open and self.journal.has_completion(db, todo_id):
            self._record(db, request, todo_id, now)
            return Outcome(
                self._ack(request, todo_id, message="already completed; nothing to do"),
                {"monitor"},
            )
        kind = Kind.NORMAL
        if request.event == "Stop" and self._same_session_answered(db, request, todo_id):
            kind = Kind.REVISION  # the latest answer wins
        completion_id = request.request_id
        self._record(db, request, todo_id, now, completion_id)
        self.journal.accept_completion(
            db, completion_id, todo_id, p.encode(request), now, kind=kind
        )
        self._sent(db, completion_id, request, now)
        logger.bind(todo_id=todo_id, completion_id=completion_id).info(
            "{} accepted ({})",
            "revision" if kind == "revision" else "completion",
            request.event or "cli",
        )
        return Outcome(self._ack(request, todo_id, completion_id), {"collector", "monitor"})

    def _same_session_answered(
        self, db: sqlite3.Connection, request: p.Complete, todo_id: int
    ) -> bool:
        """Whether this session's earlier Stop already completed the todo (then this one is a
        revision; another session's Stop on a completed todo stays a duplicate)."""
        latest = self.journal.latest_answer(db, todo_id)
        if latest is None or latest[0] not in ANSWER_KINDS or not request.session_id:
            return False
        try:
            earlier = p.decode_request(latest[1]) if latest[1] else None
        except p.ProtocolError:
            return False
        return (
            isinstance(earlier, p.Complete)
            and earlier.event == "Stop"
            and earlier.session_id == request.session_id
        )

    def _failed_session(
        self, db: sqlite3.Connection, request: p.Complete, todo_id: int, word: str, now: float
    ) -> Outcome:
        """SessionEnd after StopFailure: ``hook.on_failure`` decides (reset, complete, wait)."""
        policy = self.config.hook.on_failure
        log = logger.bind(todo_id=todo_id)
        self.journal.mark_final(db, todo_id, now)
        if policy == "wait" or (policy == "complete" and self.journal.has_completion(db, todo_id)):
            self._record(db, request, todo_id, now)
            log.warning("session ended after {}; hook.on_failure = {}: nothing done", word, policy)
            return Outcome(
                self._ack(
                    request,
                    todo_id,
                    message=f"the session failed ({word}); hook.on_failure = {policy}",
                ),
                {"monitor"},
            )
        kind = Kind.FAILURE if policy == "reset" else Kind.NORMAL
        completion_id = request.request_id
        self._record(db, request, todo_id, now, completion_id)
        self.journal.accept_completion(
            db, completion_id, todo_id, p.encode(request), now, kind=kind, reason=word
        )
        self._sent(db, completion_id, request, now)
        log.warning(
            "session ended after {}; hook.on_failure = {}: {}",
            word,
            policy,
            "the todo goes back to offen" if kind == Kind.FAILURE else "completed with the error",
        )
        return Outcome(self._ack(request, todo_id, completion_id), {"collector", "monitor"})

    def _emergency(self, db: sqlite3.Connection, request: p.Request, now: float) -> Outcome:
        assert isinstance(request, p.Emergency)
        todo_id = self.resolve(db, request)
        completion_id = request.request_id
        self._record(db, request, todo_id, now, completion_id)
        self.journal.queue_emergency(
            db, completion_id, todo_id, request.reason, now, request=p.encode(request)
        )
        self._sent(db, completion_id, request, now)
        logger.bind(todo_id=todo_id, completion_id=completion_id, emergency=True).warning(
            "emergency completion requested: {}", request.reason
        )
        return Outcome(self._ack(request, todo_id, completion_id), {"collector"})

    def _retry(self, db: sqlite3.Connection, request: p.Request, now: float) -> Outcome:
        assert isinstance(request, p.Retry)
        if request.completion_id:
            queued = self.journal.requeue_dead(db, now, request.completion_id)
            if queued == 0:
                raise Refusal(
                    p.ErrorCode.NOT_FOUND,
                    f"no dead completion {request.completion_id}; "
                    "`completionctl status TODO_ID` lists a todo's completions",
                )
        elif request.all_dead:
            queued = self.journal.requeue_dead(db, now)
        else:
            raise Refusal(p.ErrorCode.INVALID, "give a completion id or --dead")
        self.journal.record_request(db, request.request_id, None, None, now)
        return Outcome(
            p.Ack(
                request_id=request.request_id,
                state="accepted",
                message=f"{queued} completion(s) queued again",
            ),
            {"writer"},
        )

    def _batch_complete(self, db: sqlite3.Connection, request: p.Request, now: float) -> Outcome:
        """Every todo of the batch gets its own completion, all in this one transaction; the
        ack lists each todo's outcome.  The database's verdict (no such todo, blocked) comes
        from the writer later, like any completion's: ``Outcomes`` asks for it."""
        assert isinstance(request, p.BatchComplete)
        ids = request.todo_ids
        if not ids:
            raise Refusal(p.ErrorCode.INVALID, "a batch completion needs at least one todo id")
        if len(ids) > p.MAX_BATCH:
            raise Refusal(
                p.ErrorCode.TOO_LARGE,
                f"a batch completes at most {p.MAX_BATCH:,} todos and this one names "
                f"{len(ids):,}; nothing was taken: split it into smaller batches",
            )
        size = len(request.output.encode("utf-8", "surrogatepass")) if request.output else 0
        if size * len(ids) > p.MAX_BATCH_JOURNAL_BYTES:
            raise Refusal(
                p.ErrorCode.TOO_LARGE,
                f"the output ({size:,} bytes) kept for each of the {len(ids):,} todos would take "
                f"{size * len(ids):,} bytes of journal, over the "
                f"{p.MAX_BATCH_JOURNAL_BYTES:,}-byte limit; nothing was taken: send a shorter "
                "output or fewer todos per batch",
            )
        self.journal.record_request(db, request.request_id, None, None, now)
        items: list[p.ItemOutcome] = []
        seen: set[int] = set()
        for todo_id in ids:
            if todo_id in seen:
                items.append(
                    p.ItemOutcome(
                        todo_id=todo_id, outcome="refused", reason="listed twice; completed once"
                    )
                )
                continue
            seen.add(todo_id)
            completion_id = batch_completion_id(request.request_id, todo_id)
            single = p.Complete(
                request_id=request.request_id,
                todo_id=todo_id,
                output=request.output,
                event=request.event or "batch",
                sent_at=request.sent_at,
            )
            added = self.journal.accept_completion(
                db, completion_id, todo_id, p.encode(single), now
            )
            if not added:
                # This batch was delivered before (and queued too): the same completion.
                items.append(
                    p.ItemOutcome(
                        todo_id=todo_id,
                        outcome="accepted",
                        completion_id=completion_id,
                        reason="already received; applied once",
                    )
                )
                continue
            items.append(
                p.ItemOutcome(todo_id=todo_id, outcome="accepted", completion_id=completion_id)
            )
        accepted = sum(1 for item in items if item.outcome == "accepted")
        fresh = sum(1 for item in items if item.outcome == "accepted" and not item.reason)
        logger.info(
            "batch completion {} accepted for {} of {} todo(s)",
            request.request_id,
            accepted,
            len(ids),
        )
        return Outcome(
            p.Ack(
                request_id=request.request_id,
                state="accepted",
                message=f"{accepted} accepted, {len(items) - accepted} refused",
                items=items,
            ),
            {"collector", "monitor"} if fresh else set(),
        )

    def _schedule(self, db: sqlite3.Connection, request: p.Request, now: float) -> Outcome:
        assert isinstance(request, p.Schedule)
        if not math.isfinite(request.due_at) or request.due_at <= 0:
            raise Refusal(p.ErrorCode.INVALID, f"{request.due_at!r} is not a time to complete at")
        todo_id = self.resolve(db, request)
        self._record(db, request, todo_id, now)
        single = p.Complete(
            request_id=request.request_id,
            todo_id=todo_id,
            session_id=request.session_id,
            output=request.output,
            event="scheduled",
            sent_at=request.sent_at,
            not_created_after=now,
        )
        self.journal.schedule(
            db, request.request_id, todo_id, request.due_at, p.encode(single), now
        )
        when = "now (its time has passed)" if request.due_at <= now else "at its time"
        logger.bind(todo_id=todo_id).info(
            "completion scheduled for {:.0f} (in {:.0f} s)", request.due_at, request.due_at - now
        )
        return Outcome(
            p.Ack(
                request_id=request.request_id,
                state="accepted",
                todo_id=todo_id,
                completion_id=scheduled_completion_id(request.request_id),
                message=f"the monitor completes it {when}",
                due_at=request.due_at,
            ),
            {"monitor"},
        )

    def _cancel(self, db: sqlite3.Connection, request: p.Request, now: float) -> Outcome:
        assert isinstance(request, p.Cancel)
        todo_id = self.resolve(db, request)
        if not self.journal.cancel_schedules(db, todo_id, "cancelled by request", now):
            raise Refusal(
                p.ErrorCode.NOT_FOUND,
                f"todo {todo_id} has no scheduled completion waiting (it fired, was cancelled, "
                "or was never scheduled): `completionctl status ID` shows its schedules",
            )
        self._record(db, request, todo_id, now)
        logger.bind(todo_id=todo_id).info("scheduled completion cancelled")
        return Outcome(
            self._ack(request, todo_id, message="scheduled completion cancelled"), {"monitor"}
        )

    def _acknowledge(self, db: sqlite3.Connection, request: p.Request, now: float) -> Outcome:
        assert isinstance(request, p.Acknowledge)
        if request.check not in ACKNOWLEDGEABLE:
            raise Refusal(
                p.ErrorCode.INVALID,
                f"only {', '.join(ACKNOWLEDGEABLE)} can be acknowledged, not {request.check!r}",
            )
        self.journal.acknowledge(db, request.check, now)
        self.journal.record_request(db, request.request_id, None, None, now)
        logger.info("health check {} acknowledged", request.check)
        return Outcome(
            p.Ack(
                request_id=request.request_id,
                state="accepted",
                message=f"the {request.check} check is clear until the next refusal",
            )
        )

    # ------------------------------------------------------------ reads

    def outcomes(self, request: p.Outcomes) -> p.OutcomeReport:
        found = self.journal.outcomes(list(request.completion_ids))
        items = []
        for completion_id in request.completion_ids:
            row = found.get(completion_id)
            if row is None:
                items.append(
                    p.ItemOutcome(
                        todo_id=0,
                        outcome="unknown",
                        completion_id=completion_id,
                        reason="not in the journal (never taken, or pruned)",
                    )
                )
                continue
            todo_id, state, outcome, last_error = row
            items.append(
                p.ItemOutcome(
                    todo_id=todo_id,
                    outcome=outcome or "pending",
                    completion_id=completion_id,
                    reason=last_error or "",
                    state=state,
                )
            )
        return p.OutcomeReport(items=items)

    def health(self, now: float) -> p.HealthReport:
        journal = self.journal
        counts = journal.count_by_state()
        parent = {
            "children": children_check(self.children()),
            "journal": journal_check(
                counts,
                journal.oldest_unfinished_at(),
                journal.todos_in((State.DEAD,)) if counts.get(State.DEAD) else [],
                now,
            ),
            "refused": refused_check(
                journal.refused(
                    limit=50,
                    since=max(
                        now - self.config.health.refused_window,
                        journal.acknowledged_at("refused") or 0.0,
                    ),
                ),
                self.config.health.refused_window,
            ),
            "waiting_for_person": waiting_check(journal.waiting_for_person()),
        }
        return render_health(parent, journal.checks(), now)

    def metrics(self, request: p.Metrics, now: float) -> p.MetricsReport:
        from .metrics import report

        return report(self.journal, now, request.since)

    def list_todos(self, request: p.ListTodos, now: float) -> p.TodoList:
        since = now - request.since if request.since else None
        hanging_after = self.config.behavior.hanging_after
        pending = {s.todo_id: s.due_at for s in self.journal.pending_schedules()}
        checks = self.journal.checks()
        todos = []
        for row in self.journal.todo_summaries(since, request.limit):
            (todo_id, session, started, heard, due, emergency, waiting, note, done) = row[:9]
            kind, state, completed, revisions, archive = row[9:]
            todos.append(
                p.TodoSummary(
                    todo_id=todo_id,
                    session_id=session,
                    started_at=started,
                    last_heard_at=heard,
                    completion_due=due,
                    emergency_due=emergency,
                    waiting=waiting,
                    note=note,
                    done=bool(done),
                    hanging=not done and heard is not None and now - heard > hanging_after,
                    latest_kind=kind,
                    latest_state=state,
                    completed_at=completed,
                    revisions=revisions,
                    archive_path=archive,
                    scheduled_at=pending.get(todo_id),
                    predicted_hang=predicted_hang(checks, todo_id),
                )
            )
        # A todo known only by its scheduled completion (never started here) is listed too.
        listed = {t.todo_id for t in todos}
        for todo_id, due_at in pending.items():
            if todo_id not in listed and len(todos) < request.limit:
                todos.append(
                    p.TodoSummary(
                        todo_id=todo_id,
                        session_id=None,
                        started_at=None,
                        last_heard_at=None,
                        completion_due=None,
                        emergency_due=None,
                        waiting=None,
                        note=None,
                        done=False,
                        hanging=False,
                        latest_kind=None,
                        latest_state=None,
                        completed_at=None,
                        scheduled_at=due_at,
                    )
                )
        return p.TodoList(todos=todos)

    def status(self, request: p.Status, now: float) -> p.StatusReport:
        if request.todo_id is None:
            children = self.children()
            return p.StatusReport(
                agent=p.AgentStatus(
                    pid=_pid(),
                    version=p.VERSION,
                    endpoint=self.config.endpoint,
                    state_dir=self.config.state_dir,
                    database=mask_url(self.config.database_url),
                    started_at=self.started_at,
                    children={name: info.pid for name, info in children.items()},
                    restarts={name: info.restarts for name, info in children.items()},
                    journal=self.journal.count_by_state(),
                    recoveries=self.journal.counters(),
                    scheduled=[scheduled(s) for s in self.journal.pending_schedules()],
                )
            )
        entries = self.journal.entries_for_todo(request.todo_id)
        timers = self.journal.timers(request.todo_id)
        schedules = self.journal.schedules_for_todo(request.todo_id)
        if not entries and not timers and not schedules:
            raise Refusal(
                p.ErrorCode.NOT_FOUND,
                f"the agent knows nothing about todo {request.todo_id} "
                "(never started or completed here, or pruned)",
            )
        from .metrics import timings_by_completion

        timings = timings_by_completion(self.journal, [e.completion_id for e in entries])
        return p.StatusReport(
            todo=todo_status(
                request.todo_id,
                entries,
                timers[0] if timers else None,
                schedules,
                predicted_hang(self.journal.checks(), request.todo_id),
                timings,
            )
        )


def batch_completion_id(request_id: str, todo_id: int) -> str:
    # Fits completion_log's 64-character column: a request id is at most 48 characters.
    return f"{request_id[:40]}-{todo_id}"


def _with_id(request: p.Request, request_id: str) -> p.Request:
    return msgspec.structs.replace(request, request_id=request_id)


def _unavailable(exc: Exception, state_dir: str) -> p.Error:
    if "locked" in str(exc):  # SQLITE_BUSY: a child stopped or starved inside a transaction
        remedy = "try again shortly; if it persists, see agent.log for a stuck child process"
    else:
        remedy = f"free space in {state_dir}"
    return p.Error(
        code=p.ErrorCode.UNAVAILABLE,
        message=f"completiond could not record the request in its journal ({exc}); it was NOT "
        f"taken: {remedy} (the client queues it in the outbox if it can)",
    )


def _internal(message: str) -> p.Error:
    return p.Error(code=p.ErrorCode.INTERNAL, message=f"internal error: {message}; see agent.log")


def _pid() -> int:
    return os.getpid()
