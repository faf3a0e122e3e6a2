"""The requests that change the journal: one method each, registered by message type with
``@handles``, run inside intake's batch transaction (``agent.intake``) through ``Journal``
methods only.  Nothing here waits on the database, tmux or session files."""

from __future__ import annotations

import math
import sqlite3

from loguru import logger

import protocol as p
from protocol.config import Config

from .journal import ANSWER_KINDS, Journal, Kind, scheduled_completion_id
from .replies import Outcome, Refusal, Registry, ack

ACKNOWLEDGEABLE = ("refused",)  # checks `completionctl ack` can clear
# SessionStart sources of a session that existed before (not a fresh start of the work).
RESUMED_SOURCES = ("resume", "clear", "compact")

handles = Registry()  # @handles(p.X) on the method that takes requests of type X
HANDLERS = handles.by_type


class Handlers:
    def __init__(self, config: Config, journal: Journal) -> None:
        self.config = config
        self.journal = journal

    def handle(self, db: sqlite3.Connection, request: p.Request, now: float) -> Outcome:
        return HANDLERS[type(request)](self, db, request, now)

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

    @handles(p.Start)
    def start(self, db: sqlite3.Connection, request: p.Start, now: float) -> Outcome:
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
                ack(
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
        return Outcome(ack(request, todo_id, completion_id), {"writer", "monitor"})

    @handles(p.Heartbeat)
    def heartbeat(self, db: sqlite3.Connection, request: p.Heartbeat, now: float) -> Outcome:
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
        return Outcome(ack(request, todo_id), {"monitor"})

    @handles(p.Waiting)
    def waiting(self, db: sqlite3.Connection, request: p.Waiting, now: float) -> Outcome:
        todo_id = self.resolve(db, request)
        self._record(db, request, todo_id, now)
        self.journal.mark_waiting(db, todo_id, request.reason, now)
        logger.bind(todo_id=todo_id).info("session waits for a person: {}", request.reason)
        return Outcome(ack(request, todo_id), {"monitor"})

    @handles(p.Complete)
    def complete(self, db: sqlite3.Connection, request: p.Complete, now: float) -> Outcome:
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
                ack(request, todo_id, message="already completed; nothing to do"),
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
        return Outcome(ack(request, todo_id, completion_id), {"collector", "monitor"})

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
                ack(
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
        return Outcome(ack(request, todo_id, completion_id), {"collector", "monitor"})

    @handles(p.Emergency)
    def emergency(self, db: sqlite3.Connection, request: p.Emergency, now: float) -> Outcome:
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
        return Outcome(ack(request, todo_id, completion_id), {"collector"})

    @handles(p.Retry)
    def retry(self, db: sqlite3.Connection, request: p.Retry, now: float) -> Outcome:
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

    @handles(p.BatchComplete)
    def batch_complete(
        self, db: sqlite3.Connection, request: p.BatchComplete, now: float
    ) -> Outcome:
        """Every todo of the batch gets its own completion, all in this one transaction; the
        ack lists each todo's outcome.  The database's verdict (no such todo, blocked) comes
        from the writer later, like any completion's: ``Outcomes`` asks for it."""
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

    @handles(p.Schedule)
    def schedule(self, db: sqlite3.Connection, request: p.Schedule, now: float) -> Outcome:
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
            requester_uid=request.requester_uid,  # collected with the scheduler's rights
            # When it was asked for: a schedule that waited in the outbox counts from then.
            # (A sender can only make its own schedule stricter by claiming an earlier time.)
            not_created_after=(
                request.sent_at
                if request.sent_at is not None and 0 <= now - request.sent_at < 30 * 86400
                else now
            ),
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

    @handles(p.Cancel)
    def cancel(self, db: sqlite3.Connection, request: p.Cancel, now: float) -> Outcome:
        todo_id = self.resolve(db, request)
        if not self.journal.cancel_schedules(db, todo_id, "cancelled by request", now):
            raise Refusal(
                p.ErrorCode.NOT_FOUND,
                f"todo {todo_id} has no scheduled completion waiting (it fired, was cancelled, "
                "or was never scheduled): `completionctl status ID` shows its schedules",
            )
        self._record(db, request, todo_id, now)
        logger.bind(todo_id=todo_id).info("scheduled completion cancelled")
        return Outcome(ack(request, todo_id, message="scheduled completion cancelled"), {"monitor"})

    @handles(p.Acknowledge)
    def acknowledge(self, db: sqlite3.Connection, request: p.Acknowledge, now: float) -> Outcome:
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


def batch_completion_id(request_id: str, todo_id: int) -> str:
    # Fits completion_log's 64-character column: a request id is at most 48 characters.
    return f"{request_id[:40]}-{todo_id}"
