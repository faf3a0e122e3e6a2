"""The writer: the only process that writes the todo database.

It takes collected journal entries in order (per todo), writes them in batched transactions,
reads each back (verification) and records the result in the journal.  Transient errors back off
and retry for as long as it takes; permanent errors make an entry ``dead`` (``completionctl retry``
queues it again).  While the database is down it probes it, and drains the backlog at once when
it answers again.  A lock held by someone else is not an outage: the batch is split so that only
the locked todo waits, with backoff.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from loguru import logger

import protocol as p

from . import git_evidence
from .dbroute import DbRoute
from .fleet import Beacon, worst
from .journal import (
    COMPLETION_KINDS,
    PENDING_STATES,
    SCHEDULED_PREFIX,
    UNFINISHED_STATES,
    Entry,
    Kind,
    State,
)
from .loop import ChildBase
from .store import (
    PermanentError,
    StoreError,
    TodoWrite,
    TransientError,
    WriteOutcome,
)

BATCH = 200
BATCH_BYTES = 8 * 1024 * 1024  # a burst of huge reports must not become one giant transaction
PROBE_INTERVAL = 1.0
VERIFY_TRIES = 3
WORK_BUDGET = 5.0  # seconds of draining before the loop looks at its signals again
# Transient errors of a server that answers: a lock, a deadlock, a concurrent insert of the same
# completion id.  They cost one todo a backoff; they do not mean the database is down.
MYSQL_CONTENTION = {1205, 1213, 1062}
SQLITE_CONTENTION = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED (primary result codes)


class _Unconfigured(Exception):
    """database.url or database.table cannot be used; nothing can be written until a restart."""


class SchemaState(StrEnum):
    READY = "ready"  # completion_log (and on SQLite the todo table) exist
    PENDING = "pending"  # not checked yet, or the database did not answer: nothing is written
    BROKEN = "broken"  # a permanent error: writes go ahead, and those it fails die with it


@dataclass
class DbState:
    """What the writer knows about the database between two passes."""

    schema: SchemaState = SchemaState.PENDING
    schema_error: str | None = None
    schema_retry_at: float = 0.0
    down_since: float | None = None  # when it stopped answering; None while it answers
    next_probe: float = 0.0  # while down: when to ping it next


class Written(StrEnum):
    """What became of a batch `_write` was given."""

    DONE = "done"  # committed (some entries may have been refused or found dead on the way)
    RETRY = "retry"  # a transient error: the entries back off, or the database is down
    DEAD = "dead"  # a permanent error: the (single) entry is dead


class Writer(ChildBase):
    name = "writer"
    rings = ("monitor",)

    def open(self) -> None:
        self.store = None
        self.route: DbRoute | None = None  # the writer's own way to the database (its tunnel)
        self.beacon = Beacon(self.config, self.sweep)  # this agent's row in the fleet registry
        self.sqlite = self.config.database_url.startswith("sqlite:")
        self.config_error: str | None = None
        self.db = DbState()  # what this writer knows about the database
        self.transactions = 0  # committed write transactions since this writer started
        self._rng = random.Random()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self.route is not None:
            self.route.close()

    def _store(self):
        if self.store is None:
            try:
                if self.route is None:
                    self.route = DbRoute(self.config, "writer")
                self.store = self.route.open()
            except ValueError as exc:
                self.config_error = str(exc)
                logger.error(
                    "the database settings cannot be used: {}; completions wait in the journal "
                    "until the configuration is fixed and completiond restarted",
                    exc,
                )
                raise _Unconfigured(str(exc)) from exc
        return self.store

    # ------------------------------------------------------------ the loop's work

    def work(self, now: float) -> float:
        if self.config_error is not None:
            return now + self.sweep
        try:
            return self._work(now)
        except _Unconfigured:
            return now + self.sweep
        finally:
            if self.route is not None:
                self.route.log_events(logger)
                self.route.note_node(self.store, logger)
            self._beat(now)

    def _work(self, now: float) -> float:
        if self.db.down_since is not None:
            if now < self.db.next_probe:
                return self._next_wake(now)
            if not self._probe(now):
                return self.db.next_probe
        if self.db.schema != SchemaState.READY and now >= self.db.schema_retry_at:
            self._prepare(now)
        if self.db.down_since is not None or self.db.schema == SchemaState.PENDING:
            return self._next_wake(now)
        started = self.clock()
        while True:
            batch, verify, more = self._pick(now)
            if not batch and not verify:
                break
            if verify:
                self._verify_written(verify, now)
            if batch and self.db.down_since is None:
                self._write(batch, now)
            now = self.clock()
            if self.db.down_since is not None or not more:
                break
            if now - started > WORK_BUDGET:
                return now  # more to drain: run again at once, after a look at the signals
        return self._next_wake(now)

    def _beat(self, now: float) -> None:
        """Upsert this agent's fleet row (MySQL only), at most once a sweep, while the
        database answers."""
        if not self.beacon.due(now) or self.store is None or self.db.down_since is not None:
            return
        if self.db.schema != SchemaState.READY:
            return
        counts = self.journal.count_by_state()
        backlog = sum(counts.get(s, 0) for s in PENDING_STATES)
        health = worst([check[1] for check in self.journal.checks()])
        error = self.beacon.beat(self.store, now, backlog=backlog, health=health)
        if error is not None:
            logger.warning("fleet registry not updated: {}", error)

    def _prepare(self, now: float) -> None:
        """Create the audit table (and on SQLite the todo table) where missing.

        Until that worked nothing is written (PENDING), except after a permanent error
        (BROKEN): then the writes go ahead and those that fail on it become dead with the
        error, since a wrong password or table needs a person, not a retry loop.
        """
        try:
            store = self._store()
            store.ensure_schema(create_todo_table=self.sqlite)
        except TransientError as exc:
            self.db.schema_retry_at = now + PROBE_INTERVAL
            if self._contention(exc):
                logger.info("database schema not checked yet: {}", exc)
            else:
                self._went_down(now, exc)
            return
        except PermanentError as exc:
            if self.db.schema_error != str(exc):
                logger.error("cannot prepare the database schema: {}", exc)
            self.db.schema, self.db.schema_error = SchemaState.BROKEN, str(exc)
            self.db.schema_retry_at = now + self.config.behavior.retry_max_delay
            return
        moved = getattr(store, "moved_log_rows", 0)
        if moved:
            logger.info(
                "moved {} row(s) of this table's todos from completion_log into {}",
                moved,
                getattr(store, "log_table", "the prefixed audit table"),
            )
        if self.db.schema_error is not None:
            logger.info("database schema ready")
        self.db.schema, self.db.schema_error = SchemaState.READY, None

    def _pick(self, now: float) -> tuple[list[Entry], list[Entry], bool]:
        """Entries ready to write and to verify, in order; a todo with an earlier unfinished
        entry waits.  `more`: the batch is full and others are ready behind it."""
        chosen: list[str] = []
        written: list[str] = []
        blocked: set[int] = set()
        more = False
        for cid, todo_id, state, next_at in self.journal.heads_in(UNFINISHED_STATES, limit=5000):
            if todo_id in blocked:
                continue
            if state == State.ACCEPTED or next_at > now:
                blocked.add(todo_id)
                continue
            if state == State.WRITTEN:
                written.append(cid)
                continue
            if len(chosen) >= BATCH:
                more = True
                break
            chosen.append(cid)
        batch = self.journal.entries_by_id(chosen)
        size = 0
        for index, entry in enumerate(batch):
            if index and size + _size(entry) > BATCH_BYTES:
                return batch[:index], self.journal.entries_by_id(written), True
            size += _size(entry)
        return batch, self.journal.entries_by_id(written), more

    def _next_wake(self, now: float) -> float:
        next_at = self.journal.next_attempt_at()
        wake = now + self.sweep
        if next_at is not None:
            wake = min(wake, max(next_at, now))
        if self.db.down_since is not None:
            wake = min(wake, self.db.next_probe)
        if self.db.schema != SchemaState.READY:
            wake = min(wake, max(self.db.schema_retry_at, now))
        return wake

    def _contention(self, exc: StoreError) -> bool:
        if exc.errno is None:
            return False
        if self.sqlite:
            return exc.errno & 0xFF in SQLITE_CONTENTION
        return exc.errno in MYSQL_CONTENTION

    # ------------------------------------------------------------ writing

    def _write(self, batch: list[Entry], now: float) -> Written:
        """Write `batch` in one transaction: DONE, RETRY (transient) or DEAD."""
        entries: list[Entry] = []
        writes: list[TodoWrite] = []
        for entry in batch:
            try:
                writes.append(_to_write(entry))
                entries.append(entry)
            except (ValueError, OverflowError, OSError) as exc:
                self._dead(entry, now, f"the journal entry cannot be written: {exc}")
        if not entries:
            return Written.DEAD
        for entry in entries:
            # Before the todo shows as started: the evidence's base is the tree the session
            # began with (a retried start keeps the first HEAD it recorded).
            if entry.kind == Kind.START and entry.attempts == 0:
                self._record_git_head(entry.todo_id, now, _requester(entry))
        try:
            outcomes = self._store().apply(writes)
        except TransientError as exc:
            if self._contention(exc) and len(entries) > 1:
                logger.info("{}; writing the batch of {} one at a time", exc, len(entries))
                self._write_each(entries, now)
                return Written.DONE
            self._retry_later(entries, now, exc)
            if not self._contention(exc):
                self._went_down(now, exc)
            return Written.RETRY
        except PermanentError as exc:
            if len(entries) > 1:
                # One bad entry must not hold up the rest: find it by writing one at a time.
                self._write_each(entries, now)
                return Written.DONE
            self._dead(entries[0], now, str(exc))
            return Written.DEAD
        self.transactions += 1
        counts = Counter(o.outcome for o in outcomes)
        logger.info(
            "wrote {} in one transaction (#{} of this writer: {})",
            len(entries),
            self.transactions,
            ", ".join(f"{n} {name}" for name, n in sorted(counts.items())),
        )
        self._came_back(now)
        self._record_outcomes(entries, writes, outcomes, now)
        return Written.DONE

    def _write_each(self, entries: list[Entry], now: float) -> None:
        """One transaction per entry; a todo whose entry must wait keeps its later ones back."""
        held: set[int] = set()
        for entry in entries:
            if self.db.down_since is not None:
                return
            if entry.todo_id in held:
                continue
            if self._write([entry], self.clock()) is Written.RETRY:
                held.add(entry.todo_id)

    def _record_outcomes(
        self,
        entries: list[Entry],
        writes: list[TodoWrite],
        outcomes: list[WriteOutcome],
        now: float,
    ) -> None:
        refused_starts: list[tuple[int, float, str]] = []
        refused_schedules: list[tuple[int, str]] = []
        verified_any = False
        unreadable: StoreError | None = None
        checked: list[bool] | StoreError
        try:  # one read-back for the whole batch
            checked = self._store().verify_many(writes, outcomes)
        except StoreError as exc:
            checked = exc
        with self.journal.transaction() as db:
            for index, (entry, outcome) in enumerate(zip(entries, outcomes, strict=True)):
                log = logger.bind(todo_id=entry.todo_id, completion_id=entry.completion_id)
                attempts = entry.attempts + 1
                if outcome.outcome == "refused":
                    log.warning("database refused the {}: {}", entry.kind, outcome.reason)
                    self.journal.failed(
                        db,
                        entry.completion_id,
                        now,
                        outcome.reason,
                        attempts=attempts,
                        outcome=outcome.outcome,
                    )
                    if entry.kind == Kind.START:
                        refused_starts.append((entry.todo_id, entry.created_at, outcome.reason))
                    elif entry.completion_id.startswith(SCHEDULED_PREFIX):
                        refused_schedules.append((entry.todo_id, outcome.reason))
                    continue
                if outcome.outcome == "duplicate":
                    log.info("recorded as a duplicate: {}", outcome.reason)
                elif outcome.outcome == "already":
                    log.info(
                        "{} was already in the database (a commit whose acknowledgement was "
                        "lost); not applied again",
                        entry.kind,
                    )
                else:
                    log.info("{} {}{}", entry.kind, outcome.outcome, _because(outcome.reason))
                ok, problem = False, None
                if isinstance(checked, TransientError):
                    unreadable = checked
                elif isinstance(checked, StoreError):
                    problem = f"verification failed: {checked}"
                else:
                    ok = checked[index]
                if unreadable is not None:
                    problem = f"committed, but not read back yet: {unreadable}"
                elif not ok and problem is None:
                    problem = "verification did not read the write back"
                if problem is not None:
                    log.warning("{}", problem)
                verified_any |= ok
                if ok:
                    self.journal.verified(
                        db,
                        entry.completion_id,
                        entry.kind,
                        now,
                        attempts=attempts,
                        outcome=outcome.outcome,
                    )
                else:
                    self.journal.written(
                        db,
                        entry.completion_id,
                        now,
                        next_attempt_at=now + PROBE_INTERVAL,
                        last_error=problem,
                        attempts=attempts,
                        outcome=outcome.outcome,
                    )
        started = [
            e.todo_id
            for e, o in zip(entries, outcomes, strict=True)
            if e.kind == Kind.START and o.outcome == "applied"
        ]
        if started and (error := self.beacon.claim(self._store(), started)) is not None:
            logger.warning("fleet claims for {} not recorded: {}", started, error)
        if refused_starts:
            self._disarm(refused_starts)
        if refused_schedules:
            # Firing disarmed the todo's deadlines; the database refused the completion (a todo
            # created after the schedule, say), so a session working on it gets them back.
            behavior = self.config.behavior
            self.journal.rearm_refused_schedules(
                refused_schedules,
                now,
                completion_timeout=behavior.completion_timeout,
                emergency_timeout=behavior.emergency_timeout,
            )
            self.ring("monitor")
        if verified_any:
            self.ring("monitor")
        if unreadable is not None:
            self._went_down(now, unreadable)

    def _record_git_head(self, todo_id: int, now: float, starter: int | None = None) -> None:
        """The HEAD of the session's repository at start: the report's git evidence compares
        the completion's working tree with it. Bounded by git_evidence's timeout.  git runs
        as the user who started the session (the cwd is theirs to name), never as the agent
        for someone else; a tcp:// peer's cwd is not looked at."""
        if starter == p.REMOTE and not self.config.collect.remote_paths:
            return
        timers = self.journal.timers(todo_id)
        cwd = timers[0].cwd if timers else None
        if not cwd or not os.path.isdir(cwd):
            return
        uid = None if starter is None or starter == os.geteuid() else starter
        commit = git_evidence.head(cwd, uid=uid)
        if commit is not None:
            self.journal.record_git_head(todo_id, cwd, commit, now)

    def _disarm(self, starts: list[tuple[int, float, str]]) -> None:
        """A start the database refused (no such todo, blocked, already completed) must not
        leave deadlines behind that later force a completion nobody can write."""
        self.journal.disarm_refused_start(starts)
        self.ring("monitor")

    def _verify_written(self, entries: list[Entry], now: float) -> None:
        results: list[tuple[Entry, bool]] = []
        unreadable: StoreError | None = None
        for entry in entries:
            try:
                write = _to_write(entry)
            except (ValueError, OverflowError, OSError) as exc:
                self._dead(entry, now, f"the journal entry cannot be verified: {exc}")
                continue
            kind = entry.outcome or "applied"
            outcome = WriteOutcome(entry.completion_id, kind, log_kind=_log_kind(entry.kind, kind))
            try:
                ok = self._store().verify(write, outcome)
            except TransientError as exc:
                unreadable = exc  # the database is down: not a failed verification
                break
            except PermanentError as exc:
                logger.bind(completion_id=entry.completion_id).warning(
                    "verification failed: {}", exc
                )
                ok = False
            results.append((entry, ok))
        if results:
            with self.journal.transaction() as db:
                for entry, ok in results:
                    if ok:
                        self.journal.verified(db, entry.completion_id, entry.kind, now)
                    elif entry.attempts >= VERIFY_TRIES + 1:
                        self.journal.failed(
                            db,
                            entry.completion_id,
                            now,
                            "written, but the row never read back as expected "
                            "(changed by someone else?)",
                        )
                    else:
                        self.journal.verify_later(
                            db,
                            entry.completion_id,
                            now,
                            attempts=entry.attempts + 1,
                            next_attempt_at=now + PROBE_INTERVAL,
                        )
            self.ring("monitor")
        if unreadable is not None:
            self._went_down(now, unreadable)

    def _retry_later(self, batch: list[Entry], now: float, exc: StoreError) -> None:
        behavior = self.config.behavior
        logger.warning("could not write {} completion(s), will retry: {}", len(batch), exc)
        with self.journal.transaction() as db:
            for entry in batch:
                attempts = entry.attempts + 1
                if attempts <= behavior.max_retries:
                    delay = min(2.0**attempts, behavior.retry_max_delay)
                else:
                    delay = behavior.retry_max_delay
                    if attempts == behavior.max_retries + 1:
                        logger.bind(
                            todo_id=entry.todo_id, completion_id=entry.completion_id
                        ).warning(
                            "{} attempts failed; it stays in the journal and is retried every "
                            "{:.0f} s",
                            attempts,
                            delay,
                        )
                delay *= self._rng.uniform(0.8, 1.2)
                self.journal.retry_later(
                    db,
                    entry.completion_id,
                    now,
                    attempts=attempts,
                    next_attempt_at=now + delay,
                    error=str(exc),
                )

    def _dead(self, entry: Entry, now: float, error: str) -> None:
        logger.bind(todo_id=entry.todo_id, completion_id=entry.completion_id).error(
            "permanent error, not retried: {}; fix it, then `completionctl retry {}`",
            error,
            entry.completion_id,
        )
        self.journal.dead(entry.completion_id, now, error, entry.attempts + 1)

    # ------------------------------------------------------------ outages

    def _went_down(self, now: float, exc: StoreError) -> None:
        if self.db.down_since is None:
            self.db.down_since = now
            logger.warning("database unreachable: {}; completions wait in the journal", exc)
        if self.store is not None:
            self.store.close()
            self.store = None
        self.db.next_probe = now + PROBE_INTERVAL

    def _probe(self, now: float) -> bool:
        try:
            self._store().ping()
        except TransientError as exc:
            if not self._contention(exc):
                self.db.next_probe = now + PROBE_INTERVAL
                return False
        except PermanentError:
            pass  # it answers, with an error the next write will report (and die of)
        self._came_back(now)
        return True

    def _came_back(self, now: float) -> None:
        if self.db.down_since is None:
            return
        logger.info("database reachable again after {:.0f} s; draining", now - self.db.down_since)
        self.db.down_since = None
        # Everything that waited for the database may go now, not at its backoff time.
        self.journal.release_backoff()


def _log_kind(kind: str, outcome: str) -> str | None:
    """The completion_log kind `apply` recorded for this outcome (see store.base.decide)."""
    if outcome == "applied":
        return None if kind == Kind.START else kind
    if outcome == "duplicate":
        return "duplicate" if kind in COMPLETION_KINDS else None
    return None


def _because(reason: str) -> str:
    return f": {reason}" if reason else ""


def _size(entry: Entry) -> int:
    return sum(len(v) for v in (entry.html, entry.text, entry.summary) if v)


def _to_write(entry: Entry) -> TodoWrite:
    return TodoWrite(
        completion_id=entry.completion_id,
        todo_id=entry.todo_id,
        kind=entry.kind,
        at=datetime.fromtimestamp(entry.created_at, UTC),
        html=entry.html,
        text=entry.text,
        summary=entry.summary,
        source=entry.source or "",
        attempts=entry.attempts + 1,
        not_created_after=_not_created_after(entry),
        note=entry.reason,
    )


def _not_created_after(entry: Entry) -> datetime | None:
    """A scheduled completion may only complete a todo that existed when it was scheduled."""
    if not entry.completion_id.startswith(SCHEDULED_PREFIX) or not entry.request:
        return None
    try:
        request = p.decode_request(entry.request)
    except p.ProtocolError:
        return None
    at = getattr(request, "not_created_after", None)
    return None if at is None else datetime.fromtimestamp(at, UTC)


def _requester(entry: Entry) -> int | None:
    """Who sent the request behind a journal entry (protocol.TodoRequest.requester_uid)."""
    if not entry.request:
        return None
    try:
        return getattr(p.decode_request(entry.request), "requester_uid", None)
    except p.ProtocolError:
        return None
