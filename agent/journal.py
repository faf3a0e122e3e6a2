"""The journal: the agent's durable truth (SQLite, WAL, synchronous=FULL; only the collector's
commits skip their fsync, see ``Journal.__init__``).

Every accepted request becomes a row here before the client gets its ack.  Entries move
through ``accepted -> collected -> written -> verified -> cleaned`` (``failed`` and ``dead``
beside them); the todo table holds deadlines, heartbeats and the session mapping, so no timer
lives only in memory.  Each process opens its own Journal; SQLite serialises the writers.

This module is the only one that speaks SQL to the journal (tests/test_architecture.py fails
otherwise).  Every state change is one method below, with its compare-and-set built in: it
changes a row only from the state(s) it expects, so a process that lost a race changes nothing.

=========================  ==========================================  ===================
method                     change                                      called by
=========================  ==========================================  ===================
queue_start                new START entry, COLLECTED; arm timers      intake (parent)
accept_completion          new NORMAL (or REVISION, FAILURE) entry,    intake
                           ACCEPTED; disarm timers
queue_emergency            new EMERGENCY entry, ACCEPTED;              intake, monitor
                           completion deadline fired (the only place   (fire_deadline),
                           that sets ``completion_fired = 1``)         health
                                                                       (force_completion)
requeue_dead               DEAD -> COLLECTED                           intake (retry)
heard, mark_waiting        todo timers: heartbeat, waits for a person  intake
collected                  ACCEPTED -> COLLECTED (with the report)     collector
written                    COLLECTED|WRITTEN -> WRITTEN                writer
verified                   COLLECTED|WRITTEN -> VERIFIED (NORMAL,      writer
                           EMERGENCY) or CLEANED (START, RESET)
failed                     COLLECTED|WRITTEN -> FAILED                 writer
dead                       COLLECTED|WRITTEN -> DEAD                   writer
retry_later, verify_later  backoff on COLLECTED / WRITTEN              writer
release_backoff            backoff of COLLECTED, WRITTEN reset         writer (db is back)
disarm_refused_start       todo timers off after a refused start       writer
fire_deadline              completion deadline -> queue_emergency      monitor
supersede_emergencies      ACCEPTED|COLLECTED|WRITTEN|DEAD -> FAILED   monitor (reset)
queue_reset                new RESET entry, COLLECTED                  monitor, health
finish_timers              todo timers done (emergency deadline)       monitor
cleaned                    VERIFIED -> CLEANED; todo done              monitor
archived_final             archive path of a final answer's entries    monitor
set_last_word, mark_final, todo facts for revisions and finality:      intake
reopen                     last word (Stop / StopFailure), final_at
acknowledge                a health check cleared now (acks)           intake
force_completion           queue_emergency unless one is in hand       health
reset_if_idle              queue_reset unless an entry waits           health
save_checks, bump_counter  health table, counters                      health
prune                      forget CLEANED/FAILED after retention       monitor
schedule                   new PENDING schedule (replaces a pending    intake
                           one of the todo)
cancel_schedules           PENDING -> CANCELLED (also done by          intake (cancel),
                           accept_completion: a completion came first) accept_completion
fire_schedule              PENDING -> FIRED + accept_completion        monitor
rearm_refused_schedules    todo timers armed again after the database  writer
                           refused a scheduled completion
record_silence             a silence sample (heard, disarm)            intake
set_projects               todo -> project_id, for prediction          health
shorten_deadline           completion deadline earlier (predict.act    monitor
                           = "shorten"): only an armed, unfired one,
                           unheard since, and only earlier
prune_history              forget settled schedules, old samples       monitor
record_stages              a request's stage timings (metrics)         intake
record_git_head            the repository's head at a write            writer
add_event                  an event for the notify child               parent (daemon)
fan_out, claim_deliveries, deliveries: queued, sending, done,          notify
deliveries_done/_retry/    retried or dropped
_drop
=========================  ==========================================  ===================

The writer's transitions also accept an entry that a reset marked FAILED meanwhile: the
writer records what the database now holds, and that wins over the supersede.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class State(StrEnum):
    """Where a journal entry is on its way to the database (stored as these strings)."""

    ACCEPTED = "accepted"  # journaled by intake; the collector makes its report
    COLLECTED = "collected"  # ready for the writer
    WRITTEN = "written"  # committed, not read back yet
    VERIFIED = "verified"  # read back; the monitor cleans up the session dir
    CLEANED = "cleaned"  # finished
    FAILED = "failed"  # refused by the database, superseded, or never read back: finished
    DEAD = "dead"  # a permanent error; waits for `completionctl retry`


class Kind(StrEnum):
    """What a journal entry asks the database to do (stored as these strings)."""

    START = "start"
    NORMAL = "normal"
    EMERGENCY = "emergency"
    RESET = "reset"
    REVISION = "revision"  # a later answer of the session that completed the todo
    FAILURE = "failure"  # a failed session's todo back to offen (hook.on_failure = "reset")


# Entries on their way to the database (health, status and the writer count them).
UNFINISHED_STATES = (State.ACCEPTED, State.COLLECTED, State.WRITTEN)
# States an entry waits in for a process to act on it.
WAITING_STATES = (*UNFINISHED_STATES, State.VERIFIED)
# Not yet in the database and not finished: a dead entry waits for a person.
PENDING_STATES = (*UNFINISHED_STATES, State.DEAD)
TERMINAL_STATES = (State.CLEANED, State.FAILED, State.DEAD)
MAX_SILENCES = 100_000  # silence samples kept for predictive recovery, newest first
COMPLETION_KINDS = (Kind.NORMAL, Kind.EMERGENCY, Kind.REVISION)
# Kinds whose verified entry waits for the todo's result to be final before cleanup.
ANSWER_KINDS = (Kind.NORMAL, Kind.REVISION)
# What the writer may find an entry in when it records a result (see the docstring).
_WRITER_FROM = (State.COLLECTED, State.WRITTEN, State.FAILED)


def after_verify(kind: str) -> State:
    """Starts and resets leave no session files behind: they are finished once verified."""
    return State.VERIFIED if kind in (*COMPLETION_KINDS, Kind.FAILURE) else State.CLEANED


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    completion_id TEXT,
    todo_id INTEGER,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    completion_id TEXT NOT NULL UNIQUE,
    todo_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    request BLOB,
    reason TEXT,
    html TEXT,
    text TEXT,
    summary TEXT,
    source TEXT,
    problems TEXT,
    outcome TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    archive_path TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_state ON entries(state, seq);
CREATE INDEX IF NOT EXISTS entries_todo ON entries(todo_id, seq);
CREATE TABLE IF NOT EXISTS todos (
    todo_id INTEGER PRIMARY KEY,
    session_id TEXT,
    transcript_path TEXT,
    cwd TEXT,
    started_at REAL,
    last_heard_at REAL,
    completion_timeout REAL,
    completion_due REAL,
    emergency_due REAL,
    completion_fired INTEGER NOT NULL DEFAULT 0,
    emergency_fired INTEGER NOT NULL DEFAULT 0,
    waiting TEXT,
    note TEXT,
    done INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    todo_id INTEGER NOT NULL,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS health (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    message TEXT NOT NULL,
    todo_ids TEXT NOT NULL,
    checked_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules (
    request_id TEXT PRIMARY KEY,
    todo_id INTEGER NOT NULL,
    due_at REAL NOT NULL,
    request BLOB NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS schedules_pending ON schedules(state, due_at);
CREATE TABLE IF NOT EXISTS silences (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    todo_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    seconds REAL NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS projects (
    todo_id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stages (
    completion_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    at REAL NOT NULL,
    seconds REAL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS stages_completion ON stages(completion_id);
CREATE INDEX IF NOT EXISTS stages_at ON stages(at);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL,
    todo_id INTEGER,
    completion_id TEXT,
    at REAL NOT NULL,
    body TEXT NOT NULL,
    fanned INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_fanned ON events(fanned, seq);
CREATE TABLE IF NOT EXISTS deliveries (
    msg_id TEXT PRIMARY KEY,
    event_seq INTEGER NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    sent_as TEXT,
    last_error TEXT,
    delivered_at REAL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, next_at);
CREATE TABLE IF NOT EXISTS health_seen (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL
);
-- Every change of an entry's state is timed in the same transaction that makes it, and the
-- changes a person may want to hear about become events (notifications) in that transaction too.
CREATE TRIGGER IF NOT EXISTS stage_on_insert AFTER INSERT ON entries BEGIN
    INSERT INTO stages (completion_id, stage, at, detail)
    VALUES (new.completion_id, new.state, new.created_at, new.kind);
END;
CREATE TRIGGER IF NOT EXISTS stage_on_state AFTER UPDATE OF state ON entries
WHEN new.state != old.state BEGIN
    INSERT INTO stages (completion_id, stage, at, detail)
    VALUES (new.completion_id, new.state, new.updated_at, new.last_error);
END;
CREATE TRIGGER IF NOT EXISTS stage_on_attempt AFTER UPDATE OF attempts ON entries
WHEN new.attempts > old.attempts BEGIN
    INSERT INTO stages (completion_id, stage, at, detail)
    VALUES (new.completion_id, 'attempt', new.updated_at, new.last_error);
END;
CREATE TRIGGER IF NOT EXISTS event_on_state AFTER UPDATE OF state ON entries
WHEN new.state != old.state AND (
    (new.state = 'verified' AND new.kind IN ('normal', 'emergency')
        AND COALESCE(new.outcome, '') != 'duplicate')
    OR (new.state = 'cleaned' AND new.kind = 'reset' AND new.outcome = 'applied')
    OR (new.state = 'failed' AND new.kind != 'reset'
        AND COALESCE(new.outcome, '') != 'superseded')
    OR new.state = 'dead'
) BEGIN
    INSERT INTO events (event_id, event, todo_id, completion_id, at, body)
    VALUES (
        'evt_' || lower(hex(randomblob(12))),
        CASE
            WHEN new.state = 'verified' AND new.kind = 'normal' THEN 'completed'
            WHEN new.state = 'verified' THEN 'forced'
            WHEN new.state = 'cleaned' THEN 'reset'
            ELSE new.state
        END,
        new.todo_id, new.completion_id, new.updated_at,
        json_object(
            'kind', new.kind, 'source', new.source, 'outcome', new.outcome,
            'summary', substr(COALESCE(new.summary, ''), 1, 500),
            'reason', new.reason, 'error', new.last_error,
            'accepted_at', new.created_at, 'attempts', new.attempts
        )
    );
END;
CREATE TABLE IF NOT EXISTS git_heads (
    todo_id INTEGER PRIMARY KEY,
    cwd TEXT NOT NULL,
    head TEXT NOT NULL,
    recorded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS acks (
    name TEXT PRIMARY KEY,
    at REAL NOT NULL
);
"""
# Columns added to the todos table after its first release (added to an older journal at start).
_TODO_COLUMNS_ADDED = (
    ("last_word", "TEXT"),  # "Stop", or "StopFailure: <error>": what the session said last
    ("last_stop_at", "REAL"),  # when the latest Stop's answer was accepted
    ("final_at", "REAL"),  # when the result became final (its session ended)
)


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    completion_id: str
    todo_id: int
    kind: str
    state: str
    request: bytes | None
    reason: str | None
    html: str | None
    text: str | None
    summary: str | None
    source: str | None
    problems: str | None
    outcome: str | None
    attempts: int
    last_error: str | None
    next_attempt_at: float
    archive_path: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class FinishedHead:
    seq: int
    completion_id: str
    todo_id: int
    kind: str
    archive_path: str | None


@dataclass(frozen=True, slots=True)
class TodoTimers:
    todo_id: int
    session_id: str | None
    transcript_path: str | None
    cwd: str | None
    started_at: float | None
    last_heard_at: float | None
    completion_timeout: float | None
    completion_due: float | None
    emergency_due: float | None
    completion_fired: int
    emergency_fired: int
    waiting: str | None
    note: str | None
    done: int

    def held_by(self, schedule_due: float | None) -> bool:
        """Whether a pending scheduled completion due then holds this todo's completion
        deadline: only one due before the emergency deadline, which nothing holds (a far-off
        schedule must not switch off the safety net)."""
        if schedule_due is None:
            return False
        return self.emergency_due is None or schedule_due <= self.emergency_due


@dataclass(frozen=True, slots=True)
class ScheduledCompletion:
    request_id: str
    todo_id: int
    due_at: float
    request: bytes
    state: str  # ScheduleState
    reason: str | None
    created_at: float
    updated_at: float


SCHEDULED_PREFIX = "sched-"


def scheduled_completion_id(request_id: str) -> str:
    """The completion id a scheduled completion fires as."""
    return f"{SCHEDULED_PREFIX}{request_id}"


class ScheduleState(StrEnum):
    """Where a scheduled completion is (stored as these strings)."""

    PENDING = "pending"
    FIRED = "fired"
    CANCELLED = "cancelled"


class SilenceKind(StrEnum):
    """What a silence sample measures: the gap between two events of a session, or a session's
    whole duration from its start to its completion."""

    GAP = "gap"
    DURATION = "duration"


@dataclass(frozen=True, slots=True)
class Silence:
    seq: int
    todo_id: int
    kind: str  # SilenceKind
    seconds: float


@dataclass(frozen=True, slots=True)
class NewEntry:
    completion_id: str
    todo_id: int
    kind: str
    state: str = State.ACCEPTED
    request: bytes | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class EntryHead:
    completion_id: str
    todo_id: int
    kind: str
    state: str
    outcome: str | None
    source: str | None
    attempts: int
    last_error: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class StageRow:
    rowid: int
    completion_id: str
    stage: str
    at: float
    seconds: float | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class EventRow:
    seq: int
    event_id: str
    event: str
    todo_id: int | None
    completion_id: str | None
    at: float
    body: str


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    msg_id: str
    event_seq: int
    target: str
    state: str
    attempts: int
    next_at: float
    sent_as: str | None
    last_error: str | None
    created_at: float


_ENTRY_COLUMNS = ", ".join(Entry.__slots__)
_HEAD_COLUMNS = ", ".join(EntryHead.__slots__)
_EVENT_COLUMNS = ", ".join(EventRow.__slots__)
_DELIVERY_COLUMNS = ", ".join(DeliveryRow.__slots__)
_TIMER_COLUMNS = ", ".join(TodoTimers.__slots__)
_SCHEDULE_COLUMNS = ", ".join(ScheduledCompletion.__slots__)


class Journal:
    """One connection to journal.db; every method is one short transaction."""

    def __init__(self, path: Path, *, busy_timeout: float = 10.0, durable: bool = True) -> None:
        """``durable=False`` (synchronous=NORMAL) is for a process whose every change can be
        made again from the journal's durable state, when an operating-system crash or power
        loss drops it (a killed process loses nothing either way, WAL keeps it): its commits
        skip their fsync, and become durable with the next FULL commit of any connection,
        whose fsync covers the whole log before it."""
        self.path = path
        self._db = sqlite3.connect(
            str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")

    @classmethod
    def open_readonly(cls, path: Path) -> Journal:
        """A connection that can only read (the web process): it never takes the write lock."""
        journal = cls.__new__(cls)
        journal.path = path
        journal._db = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
        journal._db.execute("PRAGMA busy_timeout=2000")
        return journal

    @classmethod
    def create(cls, path: Path) -> Journal:
        journal = cls(path)
        journal._db.executescript(_SCHEMA)
        have = {row[1] for row in journal._db.execute("PRAGMA table_info(todos)")}
        for name, decl in _TODO_COLUMNS_ADDED:
            if name not in have:
                journal._db.execute(f"ALTER TABLE todos ADD COLUMN {name} {decl}")
        path.chmod(0o600)
        return journal

    def data_version(self) -> int:
        """Changes whenever another connection commits to the journal (PRAGMA data_version)."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def set_busy_timeout(self, seconds: float) -> None:
        """How long a write waits for another process's transaction before it fails."""
        self._db.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (disk full, I/O error) must not leave the transaction open, or
            # every later BEGIN fails; SQLite may have rolled back already, and a failing
            # ROLLBACK must not hide the error that matters.
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

    @staticmethod
    @contextmanager
    def savepoint(db: sqlite3.Connection) -> Iterator[None]:
        """Part of a transaction that an error undoes alone (one request of intake's batch)."""
        db.execute("SAVEPOINT one")
        try:
            yield
        except Exception:
            # A failing rollback (the connection is broken) must not hide the error that matters;
            # the enclosing transaction rolls back then.
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK TO one")
                db.execute("RELEASE one")
            raise
        db.execute("RELEASE one")

    # ------------------------------------------------------------ intake (parent)

    def seen_request(
        self, db: sqlite3.Connection, request_id: str
    ) -> tuple[str | None, int | None]:
        row = db.execute(
            "SELECT completion_id, todo_id FROM requests WHERE request_id = ?", (request_id,)
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def record_request(
        self,
        db: sqlite3.Connection,
        request_id: str,
        completion_id: str | None,
        todo_id: int | None,
        now: float,
    ) -> bool:
        cursor = db.execute(
            "INSERT OR IGNORE INTO requests (request_id, completion_id, todo_id, received_at)"
            " VALUES (?, ?, ?, ?)",
            (request_id, completion_id, todo_id, now),
        )
        return cursor.rowcount == 1

    def add_entry(self, db: sqlite3.Connection, entry: NewEntry, now: float) -> bool:
        cursor = db.execute(
            "INSERT OR IGNORE INTO entries (completion_id, todo_id, kind, state, request, reason,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.completion_id,
                entry.todo_id,
                entry.kind,
                entry.state,
                entry.request,
                entry.reason,
                now,
                now,
            ),
        )
        return cursor.rowcount == 1

    def todo_summaries(self, since: float | None, limit: int) -> list[tuple]:
        """The newest todos the journal knows (by last sign of life), each with its timers,
        its latest completion entry and how many revisions it has:
        (todo_id, session_id, started_at, last_heard_at, completion_due, emergency_due,
        waiting, note, done, latest_kind, latest_state, first_completed_at, revisions,
        archive_path)."""
        return self._db.execute(
            "SELECT t.todo_id, t.session_id, t.started_at, t.last_heard_at, t.completion_due,"
            " t.emergency_due, t.waiting, t.note, t.done,"
            " (SELECT kind FROM entries e WHERE e.todo_id = t.todo_id AND e.kind != 'start'"
            "  ORDER BY seq DESC LIMIT 1),"
            " (SELECT state FROM entries e WHERE e.todo_id = t.todo_id AND e.kind != 'start'"
            "  ORDER BY seq DESC LIMIT 1),"
            " (SELECT MIN(created_at) FROM entries e WHERE e.todo_id = t.todo_id"
            "  AND e.kind IN ('normal', 'emergency', 'revision')),"
            " (SELECT COUNT(*) FROM entries e WHERE e.todo_id = t.todo_id"
            "  AND e.kind = 'revision'),"
            " (SELECT archive_path FROM entries e WHERE e.todo_id = t.todo_id"
            "  AND archive_path IS NOT NULL ORDER BY seq DESC LIMIT 1)"
            " FROM todos t WHERE COALESCE(t.last_heard_at, t.started_at, 0) >= ?"
            " ORDER BY COALESCE(t.last_heard_at, t.started_at, 0) DESC LIMIT ?",
            (since or 0.0, limit),
        ).fetchall()

    def count_requests(self, todo_id: int) -> int:
        """How many requests about ``todo_id`` the journal took (tests, diagnostics)."""
        return int(
            self._db.execute(
                "SELECT COUNT(*) FROM requests WHERE todo_id = ?", (todo_id,)
            ).fetchone()[0]
        )

    def todo_for_session(self, db: sqlite3.Connection, session_id: str) -> int | None:
        row = db.execute(
            "SELECT todo_id FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        return row[0] if row else None

    def map_session(
        self, db: sqlite3.Connection, session_id: str, todo_id: int, now: float
    ) -> None:
        db.execute(
            "INSERT INTO sessions (session_id, todo_id, seen_at) VALUES (?, ?, ?)"
            " ON CONFLICT(session_id) DO UPDATE SET todo_id = excluded.todo_id,"
            " seen_at = excluded.seen_at",
            (session_id, todo_id, now),
        )

    def arm(
        self,
        db: sqlite3.Connection,
        todo_id: int,
        *,
        now: float,
        completion_timeout: float,
        emergency_timeout: float,
        session_id: str | None,
        transcript_path: str | None,
        cwd: str | None,
    ) -> None:
        """Start (or restart) a todo's timers: both deadlines measured from now."""
        db.execute(
            "INSERT INTO todos (todo_id, session_id, transcript_path, cwd, started_at,"
            " last_heard_at, completion_timeout, completion_due, emergency_due,"
            " completion_fired, emergency_fired, waiting, note, done)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, NULL, NULL, 0)"
            " ON CONFLICT(todo_id) DO UPDATE SET"
            " session_id = COALESCE(excluded.session_id, session_id),"
            " transcript_path = COALESCE(excluded.transcript_path, transcript_path),"
            " cwd = COALESCE(excluded.cwd, cwd), started_at = excluded.started_at,"
            " last_heard_at = excluded.last_heard_at,"
            " completion_timeout = excluded.completion_timeout,"
            " completion_due = excluded.completion_due, emergency_due = excluded.emergency_due,"
            " completion_fired = 0, emergency_fired = 0, waiting = NULL, done = 0",
            (
                todo_id,
                session_id,
                transcript_path,
                cwd,
                now,
                now,
                completion_timeout,
                now + completion_timeout,
                now + emergency_timeout,
            ),
        )

    def heard(
        self,
        db: sqlite3.Connection,
        todo_id: int,
        now: float,
        *,
        default_timeout: float,
        note: str | None = None,
        session_id: str | None = None,
    ) -> None:
        """A heartbeat: the completion deadline measures silence, so it moves to now + timeout.

        The silence it ends is a sample for predictive recovery (a live todo's only)."""
        previous = db.execute(
            "SELECT last_heard_at FROM todos WHERE todo_id = ? AND done = 0", (todo_id,)
        ).fetchone()
        if previous is not None and previous[0] is not None and now > previous[0]:
            self.record_silence(db, todo_id, SilenceKind.GAP, now - previous[0], now)
        db.execute(
            "INSERT INTO todos (todo_id, session_id, last_heard_at, completion_timeout, note)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT(todo_id) DO UPDATE SET"
            " last_heard_at = excluded.last_heard_at,"
            " session_id = COALESCE(excluded.session_id, session_id),"
            " completion_due = CASE WHEN done = 0 AND completion_due IS NOT NULL"
            "   AND completion_fired = 0"
            "   THEN excluded.last_heard_at + COALESCE(completion_timeout, ?)"
            "   ELSE completion_due END,"
            " waiting = NULL, note = COALESCE(excluded.note, note)",
            (todo_id, session_id, now, default_timeout, note, default_timeout),
        )

    def mark_waiting(self, db: sqlite3.Connection, todo_id: int, reason: str, now: float) -> None:
        db.execute(
            "INSERT INTO todos (todo_id, last_heard_at, waiting) VALUES (?, ?, ?)"
            " ON CONFLICT(todo_id) DO UPDATE SET waiting = excluded.waiting,"
            " last_heard_at = excluded.last_heard_at",
            (todo_id, now, reason or "waiting for a person"),
        )

    def disarm(self, db: sqlite3.Connection, todo_id: int, now: float | None = None) -> None:
        """A normal completion cancels both deadlines; given ``now``, the session's duration
        and its last silence become samples for predictive recovery."""
        if now is not None:
            row = db.execute(
                "SELECT started_at, last_heard_at FROM todos WHERE todo_id = ? AND done = 0",
                (todo_id,),
            ).fetchone()
            if row is not None and row[0] is not None and now > row[0]:
                self.record_silence(db, todo_id, SilenceKind.DURATION, now - row[0], now)
                if row[1] is not None and now > row[1]:
                    self.record_silence(db, todo_id, SilenceKind.GAP, now - row[1], now)
        db.execute(
            "UPDATE todos SET done = 1, completion_due = NULL, emergency_due = NULL,"
            " waiting = NULL WHERE todo_id = ?",
            (todo_id,),
        )

    def has_completion(self, db: sqlite3.Connection, todo_id: int) -> bool:
        """A completion that still counts: not failed, and not followed by a failure reset."""
        row = db.execute(
            f"SELECT 1 FROM entries WHERE todo_id = ? AND kind IN ({_marks(COMPLETION_KINDS)})"
            " AND state != ? AND seq > COALESCE((SELECT MAX(seq) FROM entries WHERE todo_id = ?"
            " AND kind = ? AND state != ?), 0) LIMIT 1",
            (todo_id, *COMPLETION_KINDS, State.FAILED, todo_id, Kind.FAILURE, State.FAILED),
        ).fetchone()
        return row is not None

    def latest_answer(
        self, db: sqlite3.Connection, todo_id: int
    ) -> tuple[str, bytes | None] | None:
        """(kind, request) of the todo's newest completion that still counts (not failed, not
        followed by a failure reset), or None."""
        kinds = (*COMPLETION_KINDS, Kind.FAILURE)
        row = db.execute(
            f"SELECT kind, request FROM entries WHERE todo_id = ? AND kind IN ({_marks(kinds)})"
            " AND state != ? ORDER BY seq DESC LIMIT 1",
            (todo_id, *kinds, State.FAILED),
        ).fetchone()
        if row is None or row[0] == Kind.FAILURE:
            return None
        return str(row[0]), row[1]

    def set_last_word(
        self, db: sqlite3.Connection, todo_id: int, word: str | None, now: float, *, stop: bool
    ) -> None:
        """What the session said last ("Stop", "StopFailure: ..."); a Stop also dates the
        answer, from which ``hook.final_after`` counts."""
        db.execute(
            "INSERT INTO todos (todo_id, last_word, last_stop_at) VALUES (?, ?, ?)"
            " ON CONFLICT(todo_id) DO UPDATE SET last_word = excluded.last_word,"
            " last_stop_at = COALESCE(excluded.last_stop_at, last_stop_at)",
            (todo_id, word, now if stop else None),
        )

    def last_word(self, db: sqlite3.Connection, todo_id: int) -> str | None:
        row = db.execute("SELECT last_word FROM todos WHERE todo_id = ?", (todo_id,)).fetchone()
        return row[0] if row else None

    def mark_final(self, db: sqlite3.Connection, todo_id: int, now: float) -> None:
        """The todo's session ended: its result is final now (archive and cleanup may go)."""
        db.execute(
            "UPDATE todos SET final_at = COALESCE(final_at, ?) WHERE todo_id = ?", (now, todo_id)
        )

    def reopen(self, db: sqlite3.Connection, todo_id: int) -> None:
        """A new session started the todo: its result is not final any more."""
        db.execute(
            "UPDATE todos SET final_at = NULL, last_word = NULL WHERE todo_id = ?", (todo_id,)
        )

    def final_todos(self, todo_ids: Iterable[int], now: float, final_after: float) -> set[int]:
        """Those of ``todo_ids`` whose result is final: the session ended, ``final_after``
        passed since its last Stop, or no Stop answered it (a CLI or SessionEnd completion)."""
        ids = sorted(set(todo_ids))
        if not ids:
            return set()
        rows = self._db.execute(
            f"SELECT todo_id, final_at, last_stop_at FROM todos WHERE todo_id IN ({_marks(ids)})",
            ids,
        ).fetchall()
        known = {row[0]: (row[1], row[2]) for row in rows}
        final = set()
        for todo_id in ids:
            final_at, last_stop_at = known.get(todo_id, (None, None))
            if final_at is not None or last_stop_at is None or now - last_stop_at >= final_after:
                final.add(todo_id)
        return final

    def acknowledge(self, db: sqlite3.Connection, name: str, now: float) -> None:
        db.execute(
            "INSERT INTO acks (name, at) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET"
            " at = excluded.at",
            (name, now),
        )

    def acknowledged_at(self, name: str) -> float | None:
        row = self._db.execute("SELECT at FROM acks WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def queue_start(
        self,
        db: sqlite3.Connection,
        completion_id: str,
        todo_id: int,
        request: bytes,
        now: float,
        *,
        completion_timeout: float,
        emergency_timeout: float,
        session_id: str | None,
        transcript_path: str | None,
        cwd: str | None,
    ) -> bool:
        """A start: an entry for the writer (nothing to collect) and the todo's timers armed."""
        added = self.add_entry(
            db,
            NewEntry(completion_id, todo_id, Kind.START, state=State.COLLECTED, request=request),
            now,
        )
        self.arm(
            db,
            todo_id,
            now=now,
            completion_timeout=completion_timeout,
            emergency_timeout=emergency_timeout,
            session_id=session_id,
            transcript_path=transcript_path,
            cwd=cwd,
        )
        return added

    def accept_completion(
        self,
        db: sqlite3.Connection,
        completion_id: str,
        todo_id: int,
        request: bytes,
        now: float,
        *,
        kind: Kind = Kind.NORMAL,
        reason: str | None = None,
    ) -> bool:
        """A completion for the collector: NORMAL, a REVISION (a later answer of the session
        that completed the todo) or a FAILURE (a failed session's todo back to offen, with the
        error as ``reason``).  When it is new it cancels both deadlines, except a revision's
        (its todo was disarmed by the first answer).  False: this completion id was journaled
        before, and nothing changed."""
        added = self.add_entry(
            db, NewEntry(completion_id, todo_id, kind, request=request, reason=reason), now
        )
        if added and kind != Kind.REVISION:
            self.disarm(db, todo_id, now)
            self.cancel_schedules(db, todo_id, "a completion came first", now)
        return added

    def queue_emergency(
        self,
        db: sqlite3.Connection,
        completion_id: str,
        todo_id: int,
        reason: str,
        now: float,
        *,
        request: bytes | None = None,
        deadline: float | None = None,
        counter: str | None = None,
    ) -> bool:
        """The one way an emergency completion is made: an entry for the collector, and the
        todo's completion deadline marked fired so it does not force another.

        With ``deadline`` (the monitor's completion deadline) the timer is compare-and-set
        first: a heartbeat, a completion or another emergency that came first wins, and nothing
        is queued.  ``counter`` is bumped when the entry is new.
        """
        if deadline is not None and not self._fire_completion(db, todo_id, deadline):
            return False
        added = self.add_entry(
            db,
            NewEntry(completion_id, todo_id, Kind.EMERGENCY, request=request, reason=reason),
            now,
        )
        if added:
            if deadline is None:
                self._fire_completion(db, todo_id, None)
            if counter:
                self.bump(db, counter)
        return added

    @staticmethod
    def _fire_completion(db: sqlite3.Connection, todo_id: int, due_at: float | None) -> bool:
        """The only statement that sets ``completion_fired``; with ``due_at``, only while that
        deadline is still armed and unchanged (compare-and-set)."""
        sql = "UPDATE todos SET completion_fired = 1 WHERE todo_id = ?"
        args: tuple[object, ...] = (todo_id,)
        if due_at is not None:
            sql += (
                " AND done = 0 AND completion_fired = 0 AND completion_due = ? AND waiting IS NULL"
            )
            args += (due_at,)
        return db.execute(sql, args).rowcount > 0

    def requeue_dead(
        self, db: sqlite3.Connection, now: float, completion_id: str | None = None
    ) -> int:
        """DEAD -> COLLECTED with a fresh count of attempts: one entry, or all of them."""
        sql = (
            "UPDATE entries SET state = ?, attempts = 0, next_attempt_at = 0, updated_at = ?"
            " WHERE state = ?"
        )
        args: tuple[object, ...] = (State.COLLECTED, now, State.DEAD)
        if completion_id is not None:
            sql += " AND completion_id = ?"
            args += (completion_id,)
        return db.execute(sql, args).rowcount

    # ------------------------------------------------------------ workers

    def entries_in(self, states: Iterable[str], limit: int = 1000) -> list[Entry]:
        states = tuple(states)
        marks = _marks(states)
        rows = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE state IN ({marks}) ORDER BY seq LIMIT ?",
            (*states, limit),
        ).fetchall()
        return [Entry(*row) for row in rows]

    def heads_in(
        self, states: Iterable[str], limit: int = 1000
    ) -> list[tuple[str, int, str, float]]:
        """(completion_id, todo_id, state, next_attempt_at) of entries in ``states``, in order,
        without their payload (request, report): enough to choose which to load."""
        states = tuple(states)
        marks = _marks(states)
        return self._db.execute(
            "SELECT completion_id, todo_id, state, next_attempt_at FROM entries"
            f" WHERE state IN ({marks}) ORDER BY seq LIMIT ?",
            (*states, limit),
        ).fetchall()

    def finished_heads(self, limit: int = 500) -> list[FinishedHead]:
        """Verified entries without their payload: what cleanup needs to know, and no more."""
        rows = self._db.execute(
            "SELECT seq, completion_id, todo_id, kind, archive_path FROM entries"
            " WHERE state = ? ORDER BY seq LIMIT ?",
            (State.VERIFIED, limit),
        ).fetchall()
        return [FinishedHead(*row) for row in rows]

    def entries_by_id(self, completion_ids: list[str]) -> list[Entry]:
        if not completion_ids:
            return []
        marks = _marks(completion_ids)
        rows = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE completion_id IN ({marks}) ORDER BY seq",
            completion_ids,
        ).fetchall()
        return [Entry(*row) for row in rows]

    def outcomes(self, completion_ids: list[str]) -> dict[str, tuple]:
        """completion id -> (todo_id, state, outcome, last_error), without the payloads."""
        found: dict[str, tuple] = {}
        for start in range(0, len(completion_ids), 500):
            chunk = completion_ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for cid, *rest in self._db.execute(
                "SELECT completion_id, todo_id, state, outcome, last_error FROM entries"
                f" WHERE completion_id IN ({marks})",
                chunk,
            ):
                found[cid] = tuple(rest)
        return found

    def entry(self, completion_id: str) -> Entry | None:
        row = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE completion_id = ?", (completion_id,)
        ).fetchone()
        return Entry(*row) if row else None

    def entries_for_todo(self, todo_id: int) -> list[Entry]:
        rows = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE todo_id = ? ORDER BY seq", (todo_id,)
        ).fetchall()
        return [Entry(*row) for row in rows]

    def start_requests(self, todo_id: int) -> list[bytes | None]:
        """The requests of the todo's start entries, newest first (without reading its
        completions, whose reports a long session has many of)."""
        rows = self._db.execute(
            "SELECT request FROM entries WHERE todo_id = ? AND kind = ? ORDER BY seq DESC",
            (todo_id, Kind.START),
        ).fetchall()
        return [row[0] for row in rows]

    def update_entry(self, completion_id: str, now: float, **values: object) -> None:
        """Set any columns of one entry, whatever its state: for tests and manual repair only.
        The agent moves entries through the named transitions (a test guards this)."""
        with self.transaction() as db:
            self._update(db, completion_id, values, now)

    @staticmethod
    def _update(
        db: sqlite3.Connection,
        completion_id: str,
        values: Mapping[str, object],
        now: float,
        expect: Sequence[str] = (),
    ) -> int:
        """One entry's columns; with ``expect``, only while it is in one of those states."""
        unknown = set(values) - set(Entry.__slots__)
        if unknown:
            raise ValueError(f"not journal columns: {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in values)
        sql = f"UPDATE entries SET {assignments}, updated_at = ? WHERE completion_id = ?"
        if expect:
            sql += f" AND state IN ({_marks(expect)})"
        return db.execute(sql, (*values.values(), now, completion_id, *expect)).rowcount

    # ------------------------------------------------------------ collector

    # ``request``: the collector stores it again without the output the report now holds, so a
    # journal row does not keep a 4 MiB output twice (issue 14, M7).
    REPORT_COLUMNS = frozenset(
        {"html", "text", "summary", "source", "problems", "archive_path", "request"}
    )

    def collected(
        self,
        reports: Iterable[tuple[str, dict[str, object]]],
        now: float,
        *,
        tried: Mapping[str, Iterable[tuple[str, float, bool]]] | None = None,
    ) -> int:
        """ACCEPTED -> COLLECTED with each entry's report, in one transaction; how many moved.

        An entry that moved on meanwhile (a reset at the emergency deadline superseded it)
        stays what it is.  ``tried``: per completion id, (source, seconds, found) of each source
        the collector tried, kept as stage timings with the entry that moved.
        """
        landed = 0
        with self.transaction() as db:
            for completion_id, report in reports:
                unknown = set(report) - self.REPORT_COLUMNS
                if unknown:
                    raise ValueError(f"not report columns: {sorted(unknown)}")
                values = {**report, "state": State.COLLECTED}
                moved = self._update(db, completion_id, values, now, (State.ACCEPTED,))
                landed += moved
                if moved and tried:
                    self.record_stages(
                        db,
                        (
                            (completion_id, f"source:{name}", now, seconds, "found" if ok else None)
                            for name, seconds, ok in tried.get(completion_id, ())
                        ),
                    )
        return landed

    # ------------------------------------------------------------ writer
    # Each takes the writer's transaction (``with journal.transaction() as db``), so one batch's
    # results are recorded with one commit.

    def written(
        self,
        db: sqlite3.Connection,
        completion_id: str,
        now: float,
        *,
        next_attempt_at: float,
        last_error: str | None,
        attempts: int | None = None,
        outcome: str | None = None,
    ) -> int:
        """Committed but not read back (yet): the writer verifies it at ``next_attempt_at``."""
        values: dict[str, object] = {
            "state": State.WRITTEN,
            "last_error": last_error,
            "next_attempt_at": next_attempt_at,
        }
        if attempts is not None:
            values["attempts"] = attempts
        if outcome is not None:
            values["outcome"] = outcome
        return self._update(db, completion_id, values, now, _WRITER_FROM)

    def verified(
        self,
        db: sqlite3.Connection,
        completion_id: str,
        kind: str,
        now: float,
        *,
        attempts: int | None = None,
        outcome: str | None = None,
    ) -> int:
        """Read back as written: VERIFIED (a completion: cleanup follows) or CLEANED."""
        values: dict[str, object] = {"state": after_verify(kind), "last_error": None}
        if outcome is not None:
            values.update(outcome=outcome, attempts=attempts, next_attempt_at=0)
        return self._update(db, completion_id, values, now, _WRITER_FROM)

    def failed(
        self,
        db: sqlite3.Connection,
        completion_id: str,
        now: float,
        error: str | None,
        *,
        attempts: int | None = None,
        outcome: str | None = None,
    ) -> int:
        """Finished without effect: refused by the database, or never read back as written."""
        values: dict[str, object] = {"state": State.FAILED, "last_error": error}
        if outcome is not None:
            values.update(outcome=outcome, attempts=attempts)
        return self._update(db, completion_id, values, now, _WRITER_FROM)

    def dead(self, completion_id: str, now: float, error: str, attempts: int) -> int:
        """A permanent error: the entry waits for a person (`completionctl retry`)."""
        with self.transaction() as db:
            values = {"state": State.DEAD, "last_error": error, "attempts": attempts}
            return self._update(db, completion_id, values, now, _WRITER_FROM)

    def retry_later(
        self,
        db: sqlite3.Connection,
        completion_id: str,
        now: float,
        *,
        attempts: int,
        next_attempt_at: float,
        error: str,
    ) -> int:
        """A transient error: the entry stays COLLECTED, tried again at ``next_attempt_at``."""
        values = {"attempts": attempts, "next_attempt_at": next_attempt_at, "last_error": error}
        return self._update(db, completion_id, values, now, _WRITER_FROM)

    def verify_later(
        self,
        db: sqlite3.Connection,
        completion_id: str,
        now: float,
        *,
        attempts: int,
        next_attempt_at: float,
    ) -> int:
        """A WRITTEN entry that did not read back yet is read again at ``next_attempt_at``."""
        values = {"attempts": attempts, "next_attempt_at": next_attempt_at}
        return self._update(db, completion_id, values, now, _WRITER_FROM)

    def release_backoff(self) -> None:
        """The database answers again: everything waiting for it may go now."""
        with self.transaction() as db:
            db.execute(
                "UPDATE entries SET next_attempt_at = 0 WHERE state IN (?, ?)",
                (State.COLLECTED, State.WRITTEN),
            )

    def disarm_refused_start(self, starts: Iterable[tuple[int, float, str]]) -> None:
        """(todo id, start's created_at, reason): a start the database refused leaves no
        deadlines behind; only the timers that start armed (a later start re-armed them)."""
        with self.transaction() as db:
            for todo_id, started_at, reason in starts:
                db.execute(
                    "UPDATE todos SET done = 1, completion_due = NULL, emergency_due = NULL,"
                    " note = ? WHERE todo_id = ? AND started_at = ?",
                    (f"start refused: {reason}", todo_id, started_at),
                )

    def rearm_refused_schedules(
        self,
        refused: Iterable[tuple[int, str]],
        now: float,
        *,
        completion_timeout: float,
        emergency_timeout: float,
    ) -> None:
        """(todo id, reason): a scheduled completion the database refused.  Its firing
        disarmed the todo's deadlines; a todo started here that has no other completion gets
        fresh ones (the configured timeouts, from now)."""
        with self.transaction() as db:
            for todo_id, reason in refused:
                if self.has_completion(db, todo_id):
                    continue
                db.execute(
                    "UPDATE todos SET done = 0, completion_due = ?, emergency_due = ?,"
                    " completion_fired = 0, emergency_fired = 0, note = ?"
                    " WHERE todo_id = ? AND done = 1 AND started_at IS NOT NULL",
                    (
                        now + completion_timeout,
                        now + max(emergency_timeout, completion_timeout),
                        f"scheduled completion refused: {reason}",
                        todo_id,
                    ),
                )

    def count_by_state(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM entries GROUP BY state").fetchall()
        return {state: count for state, count in rows}

    def todos_in(self, states: tuple[str, ...]) -> list[int]:
        """The todos with an entry in one of ``states``, in id order."""
        marks = _marks(states)
        rows = self._db.execute(
            f"SELECT DISTINCT todo_id FROM entries WHERE state IN ({marks}) ORDER BY todo_id",
            states,
        ).fetchall()
        return [row[0] for row in rows]

    def oldest_unfinished_at(self) -> float | None:
        """When the oldest entry still on its way to the database was made."""
        row = self._db.execute(
            f"SELECT MIN(created_at) FROM entries WHERE state IN ({_marks(UNFINISHED_STATES)})",
            UNFINISHED_STATES,
        ).fetchone()
        return row[0]  # type: ignore[no-any-return]

    def next_attempt_at(self) -> float | None:
        """The earliest time an entry waiting for the writer may be tried (or verified) again."""
        row = self._db.execute(
            "SELECT MIN(next_attempt_at) FROM entries WHERE state IN (?, ?)",
            (State.COLLECTED, State.WRITTEN),
        ).fetchone()
        return row[0]  # type: ignore[no-any-return]

    def refused(self, limit: int = 50, since: float = 0.0) -> list[tuple[int, str | None]]:
        """(todo id, reason) of the latest requests the database refused after ``since``,
        newest first."""
        return [(todo_id, reason) for todo_id, reason, _ in self.refusals(limit, since)]

    def refusals(self, limit: int = 50, since: float = 0.0) -> list[tuple[int, str | None, float]]:
        """``refused`` with the time of each refusal (to tell those acknowledged since)."""
        return self._db.execute(
            "SELECT todo_id, last_error, updated_at FROM entries WHERE state = ?"
            " AND outcome = 'refused' AND updated_at > ? ORDER BY seq DESC LIMIT ?",
            (State.FAILED, since, limit),
        ).fetchall()

    def waiting_for_person(self) -> list[tuple[int, str]]:
        """(todo id, what it waits for) of the live todos whose session waits for a person."""
        return self._db.execute(
            "SELECT todo_id, waiting FROM todos WHERE waiting IS NOT NULL AND done = 0"
        ).fetchall()

    # ------------------------------------------------------------ timers (monitor)

    def timers(self, todo_id: int | None = None) -> list[TodoTimers]:
        if todo_id is None:
            rows = self._db.execute(f"SELECT {_TIMER_COLUMNS} FROM todos").fetchall()
        else:
            rows = self._db.execute(
                f"SELECT {_TIMER_COLUMNS} FROM todos WHERE todo_id = ?", (todo_id,)
            ).fetchall()
        return [TodoTimers(*row) for row in rows]

    def armed_timers(self) -> list[TodoTimers]:
        rows = self._db.execute(
            f"SELECT {_TIMER_COLUMNS} FROM todos WHERE done = 0 AND"
            " ((completion_due IS NOT NULL AND completion_fired = 0)"
            "  OR (emergency_due IS NOT NULL AND emergency_fired = 0))"
        ).fetchall()
        return [TodoTimers(*row) for row in rows]

    def timer_in(self, db: sqlite3.Connection, todo_id: int) -> TodoTimers | None:
        """One todo's timers, read inside the caller's transaction."""
        row = db.execute(
            f"SELECT {_TIMER_COLUMNS} FROM todos WHERE todo_id = ?", (todo_id,)
        ).fetchone()
        return TodoTimers(*row) if row else None

    def completions_since_start(self, db: sqlite3.Connection, todo_id: int) -> list[Entry]:
        """The todo's completions (normal, emergency) not failed, since its latest start here."""
        rows = db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE todo_id = ?"
            f" AND kind IN ({_marks(COMPLETION_KINDS)}) AND state != ? AND seq > COALESCE("
            "(SELECT MAX(seq) FROM entries WHERE todo_id = ? AND kind = ?), 0) ORDER BY seq",
            (todo_id, *COMPLETION_KINDS, State.FAILED, todo_id, Kind.START),
        ).fetchall()
        return [Entry(*row) for row in rows]

    def has_pending(self, db: sqlite3.Connection, todo_id: int) -> bool:
        """Whether an entry of the todo waits to reach the database (or for a person)."""
        row = db.execute(
            f"SELECT 1 FROM entries WHERE todo_id = ? AND state IN ({_marks(PENDING_STATES)})"
            " LIMIT 1",
            (todo_id, *PENDING_STATES),
        ).fetchone()
        return row is not None

    def fire_deadline(
        self, todo_id: int, due_at: float, completion_id: str, reason: str, now: float
    ) -> bool:
        """The completion deadline passed: queue an emergency completion, compare-and-set on
        the timer (whatever came first wins, and this stands down)."""
        with self.transaction() as db:
            return self.queue_emergency(
                db,
                completion_id,
                todo_id,
                reason,
                now,
                deadline=due_at,
                counter="deadline_emergencies",
            )

    def finish_timers(self, db: sqlite3.Connection, todo_id: int) -> None:
        """The emergency deadline was acted on: the todo's timers are done."""
        db.execute("UPDATE todos SET emergency_fired = 1, done = 1 WHERE todo_id = ?", (todo_id,))

    def supersede_emergencies(
        self, db: sqlite3.Connection, completion_ids: Iterable[str], now: float
    ) -> int:
        """Emergency completions that never landed, replaced by a reset: -> FAILED."""
        moved = 0
        values: dict[str, object] = {
            "state": State.FAILED,
            "outcome": "superseded",
            "last_error": "superseded by the reset at the emergency deadline",
        }
        for completion_id in completion_ids:
            moved += self._update(db, completion_id, values, now, PENDING_STATES)
        return moved

    def queue_reset(
        self,
        db: sqlite3.Connection,
        completion_id: str,
        todo_id: int,
        reason: str,
        now: float,
        *,
        counter: str,
    ) -> bool:
        """A reset to 'offen' for the writer (nothing to collect); ``counter`` bumped if new."""
        added = self.add_entry(
            db,
            NewEntry(completion_id, todo_id, Kind.RESET, state=State.COLLECTED, reason=reason),
            now,
        )
        if added:
            self.bump(db, counter)
        return added

    def archived_final(self, heads: Sequence[FinishedHead], path: str, now: float) -> None:
        """The archive taken once a todo's answer became final, on each of its verified
        entries (their archive the collector deferred)."""
        with self.transaction() as db:
            for head in heads:
                self._update(db, head.completion_id, {"archive_path": path}, now, (State.VERIFIED,))

    def cleaned(self, heads: Sequence[FinishedHead], now: float, sessions_deleted: int) -> None:
        """VERIFIED -> CLEANED after the cleanup; the todo's remaining deadline (the reset) has
        nothing left to guard, for a completion of the todo's current run."""
        with self.transaction() as db:
            for head in heads:
                self._update(
                    db, head.completion_id, {"state": State.CLEANED}, now, (State.VERIFIED,)
                )
            for head in heads:
                db.execute(
                    "UPDATE todos SET done = 1, emergency_due = NULL, waiting = NULL"
                    " WHERE todo_id = ? AND done = 0 AND ? > COALESCE((SELECT MAX(seq)"
                    " FROM entries WHERE todo_id = ? AND kind = ?), 0)",
                    (head.todo_id, head.seq, head.todo_id, Kind.START),
                )
            if sessions_deleted:
                self.bump(db, "sessions_cleaned", sessions_deleted)

    # ------------------------------------------------------------ health's recovery actions

    def force_completion(self, todo_id: int, completion_id: str, reason: str, now: float) -> bool:
        """An emergency completion for a hanging todo, unless one is in hand since its start."""
        with self.transaction() as db:
            if self.completions_since_start(db, todo_id):
                return False
            return self.queue_emergency(
                db, completion_id, todo_id, reason, now, counter="forced_completions"
            )

    def reset_if_idle(self, todo_id: int, completion_id: str, reason: str, now: float) -> bool:
        """A reset to 'offen', unless an entry of the todo still waits to be written."""
        with self.transaction() as db:
            if self.has_pending(db, todo_id):
                return False
            return self.queue_reset(
                db, completion_id, todo_id, reason, now, counter="status_resets"
            )

    # ------------------------------------------------------------ health and counters

    def save_checks(self, checks: Iterable[tuple[str, str, str, list[int]]], now: float) -> None:
        with self.transaction() as db:
            for name, status, message, todo_ids in checks:
                db.execute(
                    "INSERT INTO health (name, status, message, todo_ids, checked_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
                    " status = excluded.status, message = excluded.message,"
                    " todo_ids = excluded.todo_ids, checked_at = excluded.checked_at",
                    (name, status, message, json.dumps(todo_ids), now),
                )

    def checks(self) -> list[tuple[str, str, str, list[int], float]]:
        rows = self._db.execute(
            "SELECT name, status, message, todo_ids, checked_at FROM health"
        ).fetchall()
        return [(n, s, m, json.loads(ids), at) for n, s, m, ids, at in rows]

    def bump(self, db: sqlite3.Connection, name: str, by: int = 1) -> None:
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def bump_counter(self, name: str, by: int = 1) -> None:
        with self.transaction() as db:
            self.bump(db, name, by)

    def counters(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT name, value FROM counters").fetchall())

    def prune(self, older_than: float) -> int:
        """Forget finished entries and old request ids after the retention time."""
        with self.transaction() as db:
            gone = db.execute(
                "DELETE FROM entries WHERE state IN (?, ?) AND updated_at < ?",
                (State.CLEANED, State.FAILED, older_than),
            ).rowcount
            db.execute(
                "DELETE FROM stages WHERE at < ? AND completion_id NOT IN"
                " (SELECT completion_id FROM entries)",
                (older_than,),
            )
            db.execute(
                "DELETE FROM deliveries WHERE created_at < ? AND state IN ('delivered', 'dropped')",
                (older_than,),
            )
            db.execute(
                "DELETE FROM events WHERE at < ? AND seq NOT IN (SELECT event_seq FROM deliveries"
                " WHERE state IN ('pending', 'sending'))",
                (older_than,),
            )
            db.execute("DELETE FROM requests WHERE received_at < ?", (older_than,))
            # By the row's latest sign of life: a todo answered by a Stop but never heard
            # otherwise (no SessionStart here) keeps its last Stop, from which
            # hook.final_after counts, until the retention time has passed since it.
            db.execute(
                "DELETE FROM todos WHERE done = 1 AND MAX(COALESCE(last_heard_at, 0),"
                " COALESCE(started_at, 0), COALESCE(last_stop_at, 0), COALESCE(final_at, 0)) < ?",
                (older_than,),
            )
            db.execute("DELETE FROM sessions WHERE seen_at < ?", (older_than,))
        return gone

    # ------------------------------------------------------------ scheduled completions

    def schedule(
        self,
        db: sqlite3.Connection,
        request_id: str,
        todo_id: int,
        due_at: float,
        request: bytes,
        now: float,
    ) -> None:
        """Schedule a completion; an earlier pending one of the same todo is replaced."""
        self.cancel_schedules(db, todo_id, f"replaced by scheduled completion {request_id}", now)
        db.execute(
            f"INSERT INTO schedules ({_SCHEDULE_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL, ?, ?)",
            (request_id, todo_id, due_at, request, ScheduleState.PENDING, now, now),
        )

    def cancel_schedules(
        self, db: sqlite3.Connection, todo_id: int, reason: str, now: float
    ) -> int:
        """Cancel the todo's pending scheduled completion(s); how many there were."""
        return db.execute(
            "UPDATE schedules SET state = ?, reason = ?, updated_at = ?"
            " WHERE todo_id = ? AND state = ?",
            (ScheduleState.CANCELLED, reason, now, todo_id, ScheduleState.PENDING),
        ).rowcount

    def pending_schedules(self) -> list[ScheduledCompletion]:
        """Pending scheduled completions, soonest first."""
        rows = self._db.execute(
            f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE state = ? ORDER BY due_at",
            (ScheduleState.PENDING,),
        ).fetchall()
        return [ScheduledCompletion(*row) for row in rows]

    def schedules_for_todo(self, todo_id: int) -> list[ScheduledCompletion]:
        rows = self._db.execute(
            f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE todo_id = ? ORDER BY created_at",
            (todo_id,),
        ).fetchall()
        return [ScheduledCompletion(*row) for row in rows]

    def fire_schedule(self, scheduled: ScheduledCompletion, completion_id: str, now: float) -> bool:
        """The monitor's one move for a due schedule: PENDING -> FIRED and its completion
        accepted like a user's, in one transaction; False when it was cancelled or fired
        meanwhile."""
        with self.transaction() as db:
            fired = db.execute(
                "UPDATE schedules SET state = ?, reason = ?, updated_at = ?"
                " WHERE request_id = ? AND state = ?",
                (
                    ScheduleState.FIRED,
                    f"completion {completion_id}",
                    now,
                    scheduled.request_id,
                    ScheduleState.PENDING,
                ),
            ).rowcount
            if not fired:
                return False
            self.accept_completion(db, completion_id, scheduled.todo_id, scheduled.request, now)
            self.bump(db, "scheduled_completions")
        return True

    # ------------------------------------------------------------ predictive recovery

    def record_silence(
        self, db: sqlite3.Connection, todo_id: int, kind: str, seconds: float, now: float
    ) -> None:
        db.execute(
            "INSERT INTO silences (todo_id, kind, seconds, at) VALUES (?, ?, ?, ?)",
            (todo_id, kind, seconds, now),
        )

    def silences_after(self, seq: int, limit: int = 100_000) -> list[Silence]:
        """Samples newer than ``seq``, in order (the sketches are fed incrementally)."""
        rows = self._db.execute(
            "SELECT seq, todo_id, kind, seconds FROM silences WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return [Silence(*row) for row in rows]

    def set_projects(self, projects: dict[int, int]) -> int:
        """Remember which project each todo belongs to; how many mappings changed."""
        changed = 0
        with self.transaction() as db:
            for todo_id, project_id in projects.items():
                changed += db.execute(
                    "INSERT INTO projects (todo_id, project_id) VALUES (?, ?)"
                    " ON CONFLICT(todo_id) DO UPDATE SET project_id = excluded.project_id"
                    " WHERE project_id != excluded.project_id",
                    (todo_id, project_id),
                ).rowcount
        return changed

    def projects(self) -> dict[int, int]:
        return dict(self._db.execute("SELECT todo_id, project_id FROM projects").fetchall())

    def record_git_head(self, todo_id: int, cwd: str, head: str, now: float) -> None:
        """The session's repository HEAD when its todo started (the base of the evidence)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO git_heads (todo_id, cwd, head, recorded_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(todo_id) DO UPDATE SET cwd = excluded.cwd, head = excluded.head,"
                " recorded_at = excluded.recorded_at",
                (todo_id, cwd, head, now),
            )

    def git_head(self, todo_id: int) -> tuple[str, str] | None:
        """(cwd, HEAD) recorded when the todo started, if any."""
        row = self._db.execute(
            "SELECT cwd, head FROM git_heads WHERE todo_id = ?", (todo_id,)
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def shorten_deadline(
        self, todo_id: int, *, expected_due: float, heard_at: float, new_due: float
    ) -> bool:
        """Bring a todo's completion deadline forward to ``new_due`` (predict.act = "shorten").

        Compare-and-set: only an armed, unfired deadline that still stands where the caller saw
        it, with no heartbeat since, and only earlier; a heartbeat afterwards moves it back to
        its full timeout.  Firing stays the monitor's deadline rule, so it fires once.
        """
        with self.transaction() as db:
            return (
                db.execute(
                    "UPDATE todos SET completion_due = ? WHERE todo_id = ? AND done = 0"
                    " AND completion_fired = 0 AND waiting IS NULL AND completion_due = ?"
                    " AND last_heard_at = ? AND ? < completion_due",
                    (new_due, todo_id, expected_due, heard_at, new_due),
                ).rowcount
                == 1
            )

    def prune_history(self, *, schedules_before: float, silences_before: float) -> None:
        """Forget settled schedules and old silence samples."""
        with self.transaction() as db:
            db.execute(
                "DELETE FROM schedules WHERE state != ? AND updated_at < ?",
                (ScheduleState.PENDING, schedules_before),
            )
            db.execute("DELETE FROM silences WHERE at < ?", (silences_before,))
            # A very busy agent keeps the newest samples only: the sketches are rebuilt from
            # them at every start, and the tail of a distribution needs no more.
            db.execute(
                "DELETE FROM silences WHERE seq <= (SELECT MAX(seq) FROM silences) - ?",
                (MAX_SILENCES,),
            )
            db.execute(
                "DELETE FROM projects WHERE todo_id NOT IN (SELECT todo_id FROM silences)"
                " AND todo_id NOT IN (SELECT todo_id FROM todos)"
            )

    # ------------------------------------------------------------ stage timings (metrics)

    def record_stages(
        self,
        db: sqlite3.Connection,
        rows: Iterable[tuple[str, str, float, float | None, str | None]],
    ) -> None:
        """(completion id, stage, at, seconds, detail) rows beside the state changes the
        triggers record: the hook's send time, each source the collector tried."""
        db.executemany(
            "INSERT INTO stages (completion_id, stage, at, seconds, detail) VALUES (?, ?, ?, ?, ?)",
            list(rows),
        )

    def entry_heads_since(self, since: float) -> list[EntryHead]:
        """Entries made since ``since``, without their payload, oldest first."""
        rows = self._db.execute(
            f"SELECT {_HEAD_COLUMNS} FROM entries WHERE created_at >= ? ORDER BY seq", (since,)
        ).fetchall()
        return [EntryHead(*row) for row in rows]

    def stages_of(self, completion_ids: list[str]) -> list[StageRow]:
        rows: list[StageRow] = []
        for start in range(0, len(completion_ids), 500):
            chunk = completion_ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            rows.extend(
                StageRow(*row)
                for row in self._db.execute(
                    "SELECT rowid, completion_id, stage, at, seconds, detail FROM stages"
                    f" WHERE completion_id IN ({marks}) ORDER BY rowid",
                    chunk,
                ).fetchall()
            )
        return rows

    def stages_after(self, rowid: int, limit: int = 5000) -> list[StageRow]:
        rows = self._db.execute(
            "SELECT rowid, completion_id, stage, at, seconds, detail FROM stages"
            " WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (rowid, limit),
        ).fetchall()
        return [StageRow(*row) for row in rows]

    def kinds_and_outcomes(self, completion_ids: list[str]) -> dict[str, tuple[str, str | None]]:
        found: dict[str, tuple[str, str | None]] = {}
        for start in range(0, len(completion_ids), 500):
            chunk = completion_ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for cid, kind, outcome in self._db.execute(
                "SELECT completion_id, kind, outcome FROM entries"
                f" WHERE completion_id IN ({marks})",
                chunk,
            ).fetchall():
                found[cid] = (kind, outcome)
        return found

    def latest_stage_rowid(self) -> int:
        """Grows with every state change of an entry (the dashboard's "something changed")."""
        return int(self._db.execute("SELECT COALESCE(MAX(rowid), 0) FROM stages").fetchone()[0])

    def summaries(self, completion_ids: list[str]) -> dict[str, str | None]:
        return self._column_of(completion_ids, "summary")

    def reasons(self, completion_ids: list[str]) -> dict[str, str | None]:
        return self._column_of(completion_ids, "reason")

    def _column_of(self, completion_ids: list[str], column: str) -> dict[str, str | None]:
        assert column in ("summary", "reason")
        found: dict[str, str | None] = {}
        for start in range(0, len(completion_ids), 500):
            chunk = completion_ids[start : start + 500]
            found.update(
                self._db.execute(
                    f"SELECT completion_id, {column} FROM entries"
                    f" WHERE completion_id IN ({_marks(chunk)})",
                    chunk,
                ).fetchall()
            )
        return found

    def armed_count(self) -> int:
        return int(
            self._db.execute(
                "SELECT COUNT(*) FROM todos WHERE done = 0 AND"
                " ((completion_due IS NOT NULL AND completion_fired = 0)"
                "  OR (emergency_due IS NOT NULL AND emergency_fired = 0))"
            ).fetchone()[0]
        )

    # ------------------------------------------------------------ events and their deliveries

    def add_event(
        self,
        db: sqlite3.Connection,
        event: str,
        at: float,
        body: dict[str, object],
        *,
        todo_id: int | None = None,
        completion_id: str | None = None,
    ) -> str:
        """An event a person may want to hear about, queued with the change it reports."""
        event_id = "evt_" + os.urandom(12).hex()
        db.execute(
            "INSERT INTO events (event_id, event, todo_id, completion_id, at, body)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (event_id, event, todo_id, completion_id, at, json.dumps(body)),
        )
        return event_id

    def health_changes(
        self, checks: Iterable[tuple[str, str, str]], now: float
    ) -> list[tuple[str, str, str, str]]:
        """Record each check's status; a change to WARNING or CRITICAL, or back to OK, becomes
        a ``health`` event in the same transaction.  Returns (name, before, after, message)."""
        changes: list[tuple[str, str, str, str]] = []
        with self.transaction() as db:
            for name, status, message in checks:
                if status not in ("OK", "WARNING", "CRITICAL"):
                    continue
                row = db.execute(
                    "SELECT status FROM health_seen WHERE name = ?", (name,)
                ).fetchone()
                before = row[0] if row else "OK"
                db.execute(
                    "INSERT INTO health_seen (name, status) VALUES (?, ?)"
                    " ON CONFLICT(name) DO UPDATE SET status = excluded.status",
                    (name, status),
                )
                if before == status:
                    continue
                self.add_event(
                    db,
                    "health",
                    now,
                    {"check": name, "before": before, "status": status, "message": message},
                )
                changes.append((name, before, status, message))
        return changes

    def events_to_fan_out(self, limit: int = 200) -> list[EventRow]:
        rows = self._db.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE fanned = 0 ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [EventRow(*row) for row in rows]

    def events_by_seq(self, seqs: list[int]) -> dict[int, EventRow]:
        if not seqs:
            return {}
        marks = ", ".join("?" * len(seqs))
        rows = self._db.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq IN ({marks})", seqs
        ).fetchall()
        return {row[0]: EventRow(*row) for row in rows}

    def fan_out(self, plan: list[tuple[EventRow, list[str]]], now: float) -> int:
        """Queue one delivery per (event, target); the delivery's id is stable for retries."""
        queued = 0
        with self.transaction() as db:
            for event, targets in plan:
                for target in targets:
                    queued += db.execute(
                        "INSERT OR IGNORE INTO deliveries (msg_id, event_seq, target, created_at)"
                        " VALUES (?, ?, ?, ?)",
                        (delivery_id(event.event_id, target), event.seq, target, now),
                    ).rowcount
                db.execute("UPDATE events SET fanned = 1 WHERE seq = ?", (event.seq,))
        return queued

    def deliveries_due(self, now: float, limit: int = 500) -> list[DeliveryRow]:
        rows = self._db.execute(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE state IN ('pending', 'sending')"
            " AND next_at <= ? ORDER BY event_seq LIMIT ?",
            (now, limit),
        ).fetchall()
        return [DeliveryRow(*row) for row in rows]

    def next_delivery_at(self) -> float | None:
        return self._db.execute(
            "SELECT MIN(next_at) FROM deliveries WHERE state IN ('pending', 'sending')"
        ).fetchone()[0]

    def claim_deliveries(self, msg_ids: list[str], sent_as: str, now: float) -> None:
        """Before a send: these deliveries go out as one message with id ``sent_as``; a
        delivering process killed mid-send sends the same message, same id, after its restart."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE deliveries SET state = 'sending', sent_as = ?, attempts = attempts + 1"
                " WHERE msg_id = ?",
                [(sent_as, m) for m in msg_ids],
            )

    def deliveries_done(self, msg_ids: list[str], now: float) -> None:
        with self.transaction() as db:
            db.executemany(
                "UPDATE deliveries SET state = 'delivered', delivered_at = ?, last_error = NULL"
                " WHERE msg_id = ?",
                [(now, m) for m in msg_ids],
            )

    def deliveries_retry(self, msg_ids: list[str], error: str, next_at: float) -> None:
        with self.transaction() as db:
            db.executemany(
                "UPDATE deliveries SET next_at = ?, last_error = ? WHERE msg_id = ?",
                [(next_at, error, m) for m in msg_ids],
            )

    def deliveries_drop(self, msg_ids: list[str]) -> None:
        with self.transaction() as db:
            db.executemany(
                "UPDATE deliveries SET state = 'dropped' WHERE msg_id = ?", [(m,) for m in msg_ids]
            )

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        rows = self._db.execute(
            "SELECT target, state, COUNT(*) FROM deliveries GROUP BY target, state"
        ).fetchall()
        return {(t, s): n for t, s, n in rows}


def delivery_id(event_id: str, target: str) -> str:
    """The id a delivery keeps across retries and restarts (webhook-id)."""
    digest = hashlib.sha256(f"{event_id}\0{target}".encode()).hexdigest()[:24]
    return f"msg_{digest}"
