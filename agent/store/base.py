"""The store's contract and the SQL both backends share.

This module owns:
- the value types (`Todo`, `TodoWrite`, `WriteOutcome`) and the error classes,
- the `Store` protocol the writer, collector and monitor program against,
- `decide()`: the compare-and-set rules of a write, as one pure function, so that SQLite and
  MySQL cannot drift apart,
- `SqlStore`: the transaction body of `apply`/`verify` and the plain reads, written once with `?`
  placeholders; a backend supplies connections, quoting, error classification and DDL.

Times: every datetime that goes in or comes out of the store's methods is *naive UTC*. An aware
datetime passed in is converted to UTC first. What the columns hold follows the site profile
(`profile.py`): DATETIME columns the site's wall-clock time of the event, MySQL TIMESTAMP columns
the instant (written in UTC through a `+00:00` session); whole seconds.

Which column gets what is the site profile, resolved once against the table's real columns: a
column the table lacks is skipped, and `describe_profile()` says so.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any, Protocol, runtime_checkable

from .profile import (
    OUTPUT_ROLES,
    ROLES,
    TIME_ROLES,
    Column,
    Resolved,
    SiteProfile,
    from_wall_time,
    local_zone,
    resolve,
    wall_time,
    zone_of,
)

STATUSES = ("offen", "in_progress", "completed", "blocked", "cancelled", "cron")
KINDS = ("start", "normal", "emergency", "reset", "revision", "failure")
LOG_KINDS = ("normal", "emergency", "reset", "duplicate", "revision", "failure")
OUTCOMES = ("applied", "duplicate", "refused", "already")
LOG_TABLE = "completion_log"  # the audit table's name without a prefix (and before prefixes)
# The audit row's reason (a failed session's error), a column added after the first release.
LOG_NOTE = "note"
MAX_NOTE = 1024  # characters of a note kept in the audit row
MAX_COMPLETION_ID = 64
MAX_SOURCES = 255

_TABLE_RE = re.compile(r"[A-Za-z0-9_]{1,64}")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Todo:
    """One row of the todo table, as far as the agent cares. Datetimes are naive UTC."""

    id: int
    title: str
    description: str
    working_directory: str
    status: str
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime | None = None  # the row's last change (the profile's `updated` column)


@dataclass(frozen=True, slots=True)
class TodoWrite:
    """One unit of work for the writer.

    `html`/`text`/`summary` of None leave that output column as it is (a NOT NULL column on a
    site's table must not turn a completion into a permanent error).
    """

    completion_id: str
    todo_id: int
    kind: str
    at: datetime
    html: str | None = None
    text: str | None = None
    summary: str | None = None
    source: str = ""
    attempts: int = 1
    # Refuse if the todo's row was created after this moment (a scheduled completion's
    # schedule time: it must not complete a todo created later under the id it named).
    not_created_after: datetime | None = None
    # Why, for the audit row: a failed session's error, an emergency's or a reset's reason.
    note: str | None = None

    def __post_init__(self) -> None:
        # A malformed write is a bug in the caller; refuse it before it reaches a transaction.
        if not self.completion_id or len(self.completion_id) > MAX_COMPLETION_ID:
            raise ValueError(
                f"completion_id must be 1..{MAX_COMPLETION_ID} characters, "
                f"got {len(self.completion_id)}"
            )
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What `apply` did with one write.

    outcome: "applied" | "duplicate" | "refused" | "already" (the completion id was already in
    completion_log, e.g. a replay after a lost commit acknowledgement). `log_kind` is the kind in
    completion_log for this completion id, if there is a row.
    """

    completion_id: str
    outcome: str
    reason: str = ""
    log_kind: str | None = None


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """A database operation failed. The message says what happened and what to do."""

    transient: bool = False

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, errno={self.errno!r})"


class TransientError(StoreError):
    """Worth retrying later: unreachable, connection lost, lock wait, deadlock, read-only..."""

    transient = True


class PermanentError(StoreError):
    """Retrying will not help until someone changes the setup (table, grants, password...)."""

    transient = False


# --------------------------------------------------------------------------- protocol


@runtime_checkable
class Store(Protocol):
    """What the agent's processes need from a todo database."""

    log_table: str  # the audit table beside the todo table
    moved_log_rows: int  # rows ensure_schema took over from an unprefixed completion_log

    def ensure_schema(self, *, create_todo_table: bool) -> None: ...
    def check_schema(self) -> list[str]: ...
    def describe_profile(self) -> list[str]: ...
    def site_zone(self) -> tzinfo: ...
    def add_todo(
        self,
        title: str,
        description: str = "",
        working_directory: str = "",
        *,
        priority: str | None = None,
        project_id: int | None = None,
        queued: bool = True,
    ) -> int: ...
    def get_todo(self, todo_id: int) -> Todo | None: ...
    def get_todos(self, todo_ids: Sequence[int]) -> dict[int, Todo]: ...
    def todos_with_status(self, status: str, limit: int = 10000) -> list[Todo]: ...
    def recent_todos(self, limit: int, status: str | None = None) -> list[Todo]: ...
    def project_ids(self, todo_ids: Sequence[int]) -> dict[int, int]: ...
    def row(self, todo_id: int) -> dict[str, Any] | None: ...
    def apply(self, writes: Sequence[TodoWrite]) -> list[WriteOutcome]: ...
    def verify(self, write: TodoWrite, outcome: WriteOutcome) -> bool: ...
    def verify_many(
        self, writes: Sequence[TodoWrite], outcomes: Sequence[WriteOutcome]
    ) -> list[bool]: ...
    def logged_kinds(self, todo_id: int) -> list[tuple[str, str]]: ...
    def audit_rows(self, todo_id: int) -> list[tuple[str, str, str | None]]: ...
    def get_outputs(self, todo_id: int) -> tuple[str | None, str | None, str | None] | None: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------- helpers


def check_table_name(table: str) -> str:
    """Return `table` if it is safe to interpolate (quoted) into SQL, else raise ValueError."""
    if not isinstance(table, str) or not _TABLE_RE.fullmatch(table):
        raise ValueError(
            f"table name {table!r} is not allowed: use 1-64 letters, digits or underscores"
        )
    if table == LOG_TABLE or table == log_table_for(table):
        raise ValueError(f"table name {table!r} is the agent's own audit table, not a todo table")
    return table


def log_table_for(table: str) -> str:
    """The audit table beside `table`, named with its prefix.

    `stage_project_todos` -> `stage_completion_log`; `wp_todos` -> `wp_completion_log`;
    `project_todos` and `todos` (no prefix) -> `completion_log`. The prefix is what comes before
    `project_todos`, else up to the first underscore.
    """
    if table.endswith("project_todos"):
        prefix = table[: -len("project_todos")]
    elif "_" in table:
        prefix = table[: table.index("_") + 1]
    else:
        prefix = ""
    return f"{prefix}{LOG_TABLE}"


def to_utc_naive(at: datetime) -> datetime:
    """Naive UTC, whole seconds (what a DATETIME column keeps)."""
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at.replace(microsecond=0)


def db_time(at: datetime) -> str:
    return to_utc_naive(at).strftime("%Y-%m-%d %H:%M:%S")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def parse_db_time(value: Any) -> datetime | None:
    """A DATETIME as either driver returns it; WordPress' '0000-00-00 00:00:00' reads as None."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return to_utc_naive(value)
    try:
        return to_utc_naive(datetime.fromisoformat(str(value)))
    except ValueError:
        return None


# --------------------------------------------------------------------------- fitting text

TRUNCATION_NOTE = "\n[truncated: {} bytes omitted to fit the column]"
_NON_BMP = re.compile("[\U00010000-\U0010ffff]")


def fit_text(value: str, max_bytes: int | None, max_chars: int | None, charset: str) -> str:
    """`value` made storable in a column of `charset` holding `max_bytes`/`max_chars` at most.

    Characters the column's charset cannot hold are replaced (utf8mb3 has no emoji, latin1 no
    CJK; strict mode would refuse the whole row). An oversize value keeps its head, cut on a
    character boundary, plus a visible TRUNCATION_NOTE, so "data too long" can never make a
    completion fail for ever.
    """
    cs = (charset or "utf8mb4").lower()
    codec = {"latin1": "cp1252", "ascii": "ascii"}.get(cs, "utf-8")
    if cs in ("utf8", "utf8mb3"):
        value = _NON_BMP.sub("\ufffd", value)
    elif codec == "utf-8" and cs not in ("utf8mb4", "binary") and max_bytes is not None:
        # An unknown charset: count the worst case of 4 bytes a character.
        max_chars = min(max_chars or max_bytes, max_bytes // 4)
        max_bytes = None
    data = value.encode(codec, "replace")
    clean = data.decode(codec, "replace")
    if (max_bytes is None or len(data) <= max_bytes) and (
        max_chars is None or len(clean) <= max_chars
    ):
        return clean
    longest_note = TRUNCATION_NOTE.format(len(data))
    room_bytes = len(data) if max_bytes is None else max_bytes - len(longest_note.encode(codec))
    room_chars = len(clean) if max_chars is None else max_chars - len(longest_note)
    if room_bytes <= 0 or room_chars <= 0:  # the column cannot even hold the note
        cut = len(data) if max_bytes is None else max_bytes
        return data[:cut].decode(codec, "ignore")[: max_chars if max_chars is not None else None]
    # Cutting bytes may split a multi-byte character at the end; "ignore" drops that tail only.
    head = data[:room_bytes].decode(codec, "ignore")[:room_chars]
    return head + TRUNCATION_NOTE.format(len(data) - len(head.encode(codec)))


# --------------------------------------------------------------------------- the CAS rules


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one write once the todo's status is known.

    `status` is the status to write (None: leave the todo row alone). `started`/`completed`
    set those columns to the write's time; `outputs` writes the three output columns; a reset
    (status "offen") clears the start columns, as the plugin's own reset does.
    """

    outcome: str
    reason: str = ""
    log_kind: str | None = None
    status: str | None = None
    started: bool = False
    completed: bool = False
    outputs: bool = False
    uncompleted: bool = False  # clear completed_at (a failed session's todo goes back to offen)


def decide(
    write: TodoWrite,
    status: str | None,
    logged_kind: str | None,
    prior_kinds: Callable[[], Collection[str]],
) -> Decision:
    """The compare-and-set rules; `prior_kinds` (the todo's completion_log kinds) is asked lazily.

    reset: only `in_progress` goes back to `offen`. `offen` is already where a reset leads, so it
    is a "duplicate" without a log row; `completed` and every other status refuse, because a
    reset must never undo or override what a person or another agent decided.
    """
    tid, kind = write.todo_id, write.kind
    if logged_kind is not None:
        return Decision(
            "already", f"completion {write.completion_id} was already recorded", logged_kind
        )
    if status is None:
        return Decision("refused", f"todo {tid} does not exist")
    if kind == "start":
        if status == "offen":
            return Decision("applied", status="in_progress", started=True)
        if status == "in_progress":
            # Started by someone else (the plugin's CLI sets no start time): fill the start
            # columns that are still NULL, so the plugin's stuck-task cleanup leaves it alone.
            return Decision(
                "applied", f"todo {tid} was already in_progress", status=status, started=True
            )
        return Decision("refused", f"todo {tid} is {status}, only an offen todo can be started")
    if kind == "reset":
        if status == "in_progress":
            return Decision("applied", log_kind="reset", status="offen")
        if status == "offen":
            return Decision("duplicate", f"todo {tid} is already offen")
        if status == "completed":
            return Decision("refused", f"todo {tid} is already completed, nothing to reset")
        return Decision("refused", f"todo {tid} is {status}, only an in_progress todo is reset")
    if kind == "revision":
        # A later answer of the session that completed the todo: the latest answer wins.
        if status == "completed":
            return Decision(
                "applied",
                f"todo {tid}: the result was replaced by a later answer of its session",
                log_kind="revision",
                status="completed",
                outputs=True,
            )
        if status in ("offen", "in_progress"):
            return Decision(
                "applied", log_kind="revision", status="completed", completed=True, outputs=True
            )
        return Decision("refused", f"todo {tid} is {status}, a revision is not recorded")
    if kind == "failure":
        # The session's last word was an API error (hook.on_failure = "reset"): back to offen
        # so the queue retries it; the report (the error, the last answer) stays on the row.
        if status in ("in_progress", "completed"):
            return Decision(
                "applied",
                f"todo {tid}: its session failed; back to offen",
                log_kind="failure",
                status="offen",
                outputs=True,
                uncompleted=status == "completed",
            )
        if status == "offen":
            return Decision("duplicate", f"todo {tid} is already offen")
        return Decision("refused", f"todo {tid} is {status}, a failed session changes nothing")
    # normal / emergency
    if status in ("offen", "in_progress"):
        return Decision("applied", log_kind=kind, status="completed", completed=True, outputs=True)
    if status == "completed":
        if kind == "normal":
            kinds = set(prior_kinds())
            if "emergency" in kinds and "normal" not in kinds:
                # The real result is worth more than the emergency report: replace the outputs,
                # keep completed_at (the todo was completed when the emergency closed it).
                return Decision(
                    "applied",
                    f"todo {tid}: the emergency output was replaced by the real result",
                    log_kind="normal",
                    status="completed",
                    outputs=True,
                )
        return Decision("duplicate", f"todo {tid} is already completed", log_kind="duplicate")
    return Decision("refused", f"todo {tid} is {status}, a completion is not recorded")


# --------------------------------------------------------------------------- shared SQL engine

# Columns the agent cannot work without, and the category of type each needs.
REQUIRED_COLUMNS: dict[str, str] = {"id": "int", "title": "text", "status": "status"}
# Read for the reports when the table has them.
DETAIL_COLUMNS = ("description", "working_directory")
# The category of type each role's columns need.
ROLE_CATEGORIES = {
    "started": "datetime",
    "completed": "datetime",
    "updated": "datetime",
    "report": "text",
    "text": "text",
    "summary": "text",
    "queue_flag": "int",
    "project": "int",
    "priority": "priority",
}
LOG_COLUMNS = (
    "id",
    "completion_id",
    "todo_id",
    "kind",
    "sources",
    "attempts",
    "created_at",
    "logged_at",
)
# The audit row's columns since `note` (ensure_schema adds it to an older table).
LOG_ROW_COLUMNS = (*LOG_COLUMNS, LOG_NOTE)


class SqlStore:
    """`Store` on a DB-API connection; subclasses provide the backend-specific parts.

    Every public method is one transaction on one connection, under a lock so that a store can be
    shared by threads. Subclasses implement `_transaction` (begin, commit, and on failure roll
    back and raise a classified `StoreError`), `_q` (quote an identifier), `_columns`,
    `_type_problem`, `_fit_outputs`, `ensure_schema` and `ping`.
    """

    placeholder = "?"
    lock_clause = ""  # MySQL: " FOR UPDATE"
    note_decl = "TEXT"  # the audit table's `note` column, as ensure_schema adds it
    # MySQL: TIMESTAMP columns go through the session's +00:00, and "SYSTEM" is the server's zone.
    server_zone = False

    def __init__(self, table: str, timeout: float, profile: SiteProfile | None = None) -> None:
        self.table = check_table_name(table)
        self.timeout = float(timeout)
        self.profile = profile if profile is not None else SiteProfile()
        self.log_table = log_table_for(self.table)
        self.moved_log_rows = 0  # rows taken over from an unprefixed completion_log at start
        self._lock = threading.RLock()
        self._t = self._q(self.table)
        self._log = self._q(self.log_table)
        self._resolved: Resolved | None = None
        self._log_note: bool | None = None  # whether the audit table has `note` (read once)

    # ---- backend hooks
    def _q(self, name: str) -> str:
        raise NotImplementedError

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Any]:
        raise NotImplementedError
        yield

    def _columns(self, cur: Any, table: str) -> dict[str, str]:
        """Column name -> declared type (lower case) of `table`; {} when it does not exist."""
        raise NotImplementedError

    def _type_problem(self, category: str, decl: str) -> str | None:
        """None if a column declared `decl` serves `category`, else what it must be."""
        raise NotImplementedError

    def _fit_outputs(self, cur: Any, write: TodoWrite) -> tuple[str | None, ...]:
        raise NotImplementedError

    def _suggested_type(self, category: str) -> str:
        raise NotImplementedError

    # ---- helpers
    def _sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def _run(self, cur: Any, text: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self._sql(text), tuple(params))
        return cur

    def _profile(self, cur: Any) -> Resolved:
        """The profile against the table's real columns, read once (the table never changes)."""
        if self._resolved is None:
            columns = self._columns(cur, self.table)
            if not columns:  # no table yet: resolved again once it exists
                return resolve(self.profile, columns)
            self._resolved = resolve(self.profile, columns)
        return self._resolved

    def _has_note(self, cur: Any) -> bool:
        """Whether the audit table has its `note` column, read once it exists (a table made
        before `note` lacks it until ensure_schema adds it)."""
        if self._log_note is None:
            columns = self._columns(cur, self.log_table)
            if not columns:
                return False
            self._log_note = LOG_NOTE in columns
        return self._log_note

    def _add_log_note(self) -> None:
        """Add `note` to an audit table made before it existed. The audit table is the agent's
        own (the todo table is never altered); no plugin reads it."""
        with self._lock, self._transaction(write=True) as cur:
            columns = self._columns(cur, self.log_table)
            if columns and LOG_NOTE not in columns:
                self._run(
                    cur, f"ALTER TABLE {self._log} ADD COLUMN {self._q(LOG_NOTE)} {self.note_decl}"
                )
        self._log_note = None

    def _output_names(self, cur: Any) -> tuple[str | None, ...]:
        """The column each output is fitted to (the first of its role), None when it has none."""
        r = self._profile(cur)
        return tuple(c.name if (c := r.first(role)) else None for role in OUTPUT_ROLES)

    def _zone(self) -> tzinfo | None:
        """The site's zone; None only for "SYSTEM" on MySQL (the server converts)."""
        zone = zone_of(self.profile.time_zone)
        if zone is None and not self.server_zone:
            return local_zone()
        return zone

    def site_zone(self) -> tzinfo:
        """The zone the site's times are shown in (for "SYSTEM" on MySQL: asked of the server,
        as a fixed offset named after the server's zone)."""
        zone = self._zone()
        if zone is not None:
            return zone
        with self._lock, self._transaction(write=False) as cur:
            cur.execute(
                "SELECT @@global.time_zone, @@system_time_zone, TIMESTAMPDIFF(SECOND, "
                "UTC_TIMESTAMP(), CONVERT_TZ(UTC_TIMESTAMP(), '+00:00', @@global.time_zone))"
            )
            configured, system, offset = cur.fetchone()
        name = str(system if str(configured).upper() == "SYSTEM" else configured)
        offset_td = timedelta(seconds=int(offset or 0))
        return timezone(offset_td, name) if name else timezone(offset_td)

    def _write_time(self, col: Column, at: datetime) -> tuple[str, str]:
        """SQL expression and parameter that put the moment `at` into `col`."""
        if self.server_zone and col.is_timestamp:
            return "?", db_time(at)
        zone = self._zone()
        if zone is None:
            return "CONVERT_TZ(?, '+00:00', @@global.time_zone)", db_time(at)
        return "?", wall_time(to_utc_naive(at), zone)

    def _read_time_expr(self, col: Column | None) -> str:
        if col is None:
            return "NULL"
        name = self._q(col.name)
        if self.server_zone and not col.is_timestamp and self._zone() is None:
            return f"CONVERT_TZ({name}, @@global.time_zone, '+00:00')"
        return name

    def _read_time(self, col: Column | None, value: Any) -> datetime | None:
        parsed = parse_db_time(value)
        if parsed is None or col is None:
            return parsed
        zone = self._zone()
        if zone is None or (self.server_zone and col.is_timestamp):
            return parsed  # already UTC
        return from_wall_time(parsed, zone)

    def _todo_select(self, cur: Any) -> tuple[str, Callable[[Sequence[Any]], Todo]]:
        r = self._profile(cur)
        details = [self._q(c) if r.has(c) else "''" for c in DETAIL_COLUMNS]
        started, completed, updated = (r.first(role) for role in TIME_ROLES)
        select = ", ".join(
            [
                "id",
                self._q("title"),
                *details,
                "status",
                self._read_time_expr(started),
                self._read_time_expr(completed),
                self._read_time_expr(updated),
            ]
        )

        def todo(row: Sequence[Any]) -> Todo:
            return Todo(
                id=int(row[0]),
                title=row[1] or "",
                description=row[2] or "",
                working_directory=row[3] or "",
                status=row[4] or "",
                started_at=self._read_time(started, row[5]),
                completed_at=self._read_time(completed, row[6]),
                updated_at=self._read_time(updated, row[7]),
            )

        return select, todo

    # ---- Store
    def check_schema(self) -> list[str]:
        """Sentences naming each problem with the todo table and the audit table; [] = fine.

        Only what stops the agent is a problem: a missing required column, a column of the
        profile whose type cannot hold its value. Columns the table lacks are skipped and
        named by `describe_profile`.
        """
        with self._lock, self._transaction(write=False) as cur:
            todo_cols = self._columns(cur, self.table)
            log_cols = self._columns(cur, self.log_table)
        t = self.table
        never = "the agent never changes the structure of an existing table"
        if not todo_cols:
            problems = [
                f"table `{t}` does not exist: run `completionctl db init` to create it, "
                "or set database.table to the name of your todo table"
            ]
        else:
            problems = []
            for name, category in REQUIRED_COLUMNS.items():
                decl = todo_cols.get(name)
                if decl is None:
                    problems.append(
                        f"column `{name}` is missing from `{t}`: add it, e.g. ALTER TABLE `{t}` "
                        f"ADD COLUMN `{name}` {self._suggested_type(category)} ({never})"
                    )
                elif (want := self._type_problem(category, decl)) is not None:
                    problems.append(
                        f"column `{name}` of `{t}` is {decl} but must be {want}: "
                        f"change its type ({never}), or point database.table at the plugin's "
                        "current table"
                    )
            r = resolve(self.profile, todo_cols)
            for role, cols in r.present.items():
                for col in cols:
                    want = self._type_problem(ROLE_CATEGORIES[role], col.decl)
                    if want is not None:
                        problems.append(
                            f"column `{col.name}` of `{t}` ({role}) is {col.decl} but must be "
                            f"{want}: change its type ({never}) or set database.columns.{role}"
                        )
        if not log_cols:
            problems.append(
                f"table `{self.log_table}` does not exist yet: run `completionctl db init` "
                "(completiond also creates it when it starts)"
            )
        else:
            missing = [c for c in LOG_COLUMNS if c not in log_cols]
            if missing:
                problems.append(
                    f"table `{self.log_table}` lacks column(s) {', '.join(missing)}: it was not "
                    f"made by this agent; rename it and run `completionctl db init`"
                )
        return problems

    def describe_profile(self) -> list[str]:
        """Lines for `check`: which column gets what, what cannot be filled, the audit table."""
        with self._lock, self._transaction(write=False) as cur:
            todo_cols = self._columns(cur, self.table)
            log_cols = self._columns(cur, self.log_table)
            legacy = self._legacy_rows(cur)
        if not todo_cols:
            return [f"table `{self.table}` does not exist: nothing to map yet"]
        r = resolve(self.profile, todo_cols)
        zone = self.profile.time_zone
        if zone == "SYSTEM":
            zone = "SYSTEM (the database server's zone)" if self.server_zone else "SYSTEM (local)"
        lines = [f"time zone: {zone}"]
        for role, (_, purpose) in ROLES.items():
            cols = r.of(role)
            utc = " (TIMESTAMP, stored as UTC)"
            shown = ", ".join(
                c.name + (utc if c.is_timestamp and self.server_zone else "") for c in cols
            )
            lack = r.missing[role]
            if cols:
                line = f"{role:<10} -> {shown}"
                if lack:
                    line += f"  (the table has no {', '.join(lack)}: not written)"
            elif lack:
                line = (
                    f"{role:<10} -> nothing: the table has no {', '.join(lack)}; "
                    f"{purpose} is not written"
                )
            else:
                line = f'{role:<10} -> nothing (set to ""); {purpose} is not written'
            lines.append(line)
        for name in DETAIL_COLUMNS:
            if name not in todo_cols:
                lines.append(f"the table has no `{name}`: reports go without it")
        if not r.of("report") and "claude_output" in todo_cols:
            lines.append(
                "the table has `claude_output` (the plugin's old schema): set "
                'database.columns.report = "claude_output" to write the report there'
            )
        status = todo_cols.get("status", "")
        if status.startswith("enum("):
            values = Column("status", status).enum_values() or []
            absent = [v for v in ("offen", "in_progress", "completed") if v not in values]
            if absent:
                lines.append(
                    f"status cannot be {', '.join(absent)}: no start, completion or reset is "
                    "written to this table (every write is refused) until its status column "
                    "has them"
                )
        if log_cols and LOG_NOTE not in log_cols:
            lines.append(
                f"`{self.log_table}` has no `{LOG_NOTE}` column (it was made by an older "
                "completiond): the errors of failed sessions are not kept in its rows. completiond "
                "adds it when it starts, if its database user may ALTER that table; or run "
                f"ALTER TABLE `{self.log_table}` ADD COLUMN `{LOG_NOTE}` {self.note_decl}"
                " and restart completiond"
            )
        if legacy is not None:
            mine, total, target_rows = legacy
            if target_rows == 0 and mine:
                lines.append(
                    f"`{LOG_TABLE}` (no prefix) holds {mine} row(s) of this table's todos: "
                    f"completiond moves them into `{self.log_table}` at its next start, once"
                )
            else:
                lines.append(
                    f"`{LOG_TABLE}` (no prefix) is not used by this site (its audit table is "
                    f"`{self.log_table}`); it holds {total} row(s)"
                    + (
                        f", {mine} of them for ids this table also has (another site's, or "
                        "left after the move)"
                        if mine
                        else ""
                    )
                )
        return lines

    def _legacy_rows(self, cur: Any) -> tuple[int, int, int] | None:
        """(rows for this table's ids, all rows) of an unprefixed completion_log, and the
        prefixed table's row count; None when there is nothing to say."""
        if self.log_table == LOG_TABLE:
            return None
        legacy = self._columns(cur, LOG_TABLE)
        if not legacy or any(c not in legacy for c in LOG_COLUMNS):
            return None
        if not self._columns(cur, self.table):
            return None
        old = self._q(LOG_TABLE)
        (total,) = self._run(cur, f"SELECT COUNT(*) FROM {old}").fetchone()
        (mine,) = self._run(
            cur, f"SELECT COUNT(*) FROM {old} WHERE todo_id IN (SELECT id FROM {self._t})"
        ).fetchone()
        target = 0
        if self._columns(cur, self.log_table):
            (target,) = self._run(cur, f"SELECT COUNT(*) FROM {self._log}").fetchone()
        return int(mine), int(total), int(target)

    def _move_legacy_log(self) -> int:
        """Move this table's rows from an unprefixed completion_log into the prefixed audit
        table, in one transaction, once: only while the prefixed table is still empty."""
        if self.log_table == LOG_TABLE:
            return 0
        with self._lock, self._transaction(write=True) as cur:
            legacy = self._legacy_rows(cur)
            if legacy is None or legacy[2] != 0 or legacy[0] == 0:
                return 0
            copied = [c for c in LOG_COLUMNS if c != "id"]
            if LOG_NOTE in self._columns(cur, LOG_TABLE) and self._has_note(cur):
                copied.append(LOG_NOTE)
            cols = ", ".join(copied)
            old = self._q(LOG_TABLE)
            self._run(
                cur,
                f"INSERT INTO {self._log} ({cols}) SELECT {cols} FROM {old}"
                f" WHERE todo_id IN (SELECT id FROM {self._t}) ORDER BY id",
            )
            moved = int(cur.rowcount)
            self._run(
                cur,
                f"DELETE FROM {old} WHERE completion_id IN (SELECT completion_id FROM {self._log})",
            )
        self.moved_log_rows = moved
        return moved

    def add_todo(
        self,
        title: str,
        description: str = "",
        working_directory: str = "",
        *,
        priority: str | None = None,
        project_id: int | None = None,
        queued: bool = True,
    ) -> int:
        """Insert a todo the plugin's queue picks up (`status='offen' AND bearbeiten=1`).

        ValueError names a priority the column does not take.
        """
        if priority is not None:  # checked before the transaction, which would classify it
            with self._lock, self._transaction(write=False) as cur:
                cols = self._profile(cur).of("priority")
            for col in cols:
                _priority_value(col, priority)
        with self._lock, self._transaction(write=True) as cur:
            r = self._profile(cur)
            names = ["title", "status"]
            marks = ["?", "?"]
            values: list[Any] = [title, "offen"]
            for name, value in (
                ("description", description),
                ("working_directory", working_directory),
            ):
                if r.has(name):
                    names.append(name)
                    marks.append("?")
                    values.append(value)
            now = utcnow()
            created = [Column(c, r.table_columns[c]) for c in ("created_at",) if r.has(c)]
            for col in (*created, *r.of("updated")):
                expr, value = self._write_time(col, now)
                names.append(col.name)
                marks.append(expr)
                values.append(value)
            for col in r.of("queue_flag"):
                names.append(col.name)
                marks.append("?")
                values.append(1 if queued else 0)
            if project_id is not None:
                for col in r.of("project"):
                    names.append(col.name)
                    marks.append("?")
                    values.append(int(project_id))
            if priority is not None:
                for col in r.of("priority"):
                    names.append(col.name)
                    marks.append("?")
                    values.append(_priority_value(col, priority))
            quoted = ", ".join(self._q(n) for n in names)
            self._run(cur, f"INSERT INTO {self._t} ({quoted}) VALUES ({', '.join(marks)})", values)
            return int(cur.lastrowid)

    def get_todo(self, todo_id: int) -> Todo | None:
        with self._lock, self._transaction(write=False) as cur:
            select, todo = self._todo_select(cur)
            row = self._run(
                cur, f"SELECT {select} FROM {self._t} WHERE id = ?", (todo_id,)
            ).fetchone()
        return None if row is None else todo(row)

    def get_todos(self, todo_ids: Sequence[int]) -> dict[int, Todo]:
        """The rows of these todos that exist, by id, read with one statement."""
        ids = sorted({int(i) for i in todo_ids})
        if not ids:
            return {}
        with self._lock, self._transaction(write=False) as cur:
            select, todo = self._todo_select(cur)
            rows = self._run(
                cur, f"SELECT {select} FROM {self._t} WHERE id IN ({_marks(ids)})", ids
            ).fetchall()
        todos = [todo(r) for r in rows]
        return {t.id: t for t in todos}

    def project_ids(self, todo_ids: Sequence[int]) -> dict[int, int]:
        """todo id -> its project (the profile's `project` column, `project_id` by default),
        for the todos that have one; {} when the table has no such column."""
        ids = sorted({int(i) for i in todo_ids})
        if not ids:
            return {}
        with self._lock, self._transaction(write=False) as cur:
            project = self._profile(cur).first("project")
            if project is None:
                return {}
            col = self._q(project.name)
            rows = self._run(
                cur,
                f"SELECT id, {col} FROM {self._t} WHERE id IN ({_marks(ids)})"
                f" AND {col} IS NOT NULL",
                ids,
            ).fetchall()
        return {int(r[0]): int(r[1]) for r in rows}

    def row(self, todo_id: int) -> dict[str, Any] | None:
        """The todo's whole row, column name -> value, as the table holds it (for export)."""
        with self._lock, self._transaction(write=False) as cur:
            cur = self._run(cur, f"SELECT * FROM {self._t} WHERE id = ?", (todo_id,))
            row = cur.fetchone()
            names = [d[0] for d in cur.description or ()]
        return None if row is None else dict(zip(names, row, strict=True))

    def todos_with_status(self, status: str, limit: int = 10000) -> list[Todo]:
        with self._lock, self._transaction(write=False) as cur:
            select, todo = self._todo_select(cur)
            rows = self._run(
                cur,
                f"SELECT {select} FROM {self._t} WHERE status = ? ORDER BY id LIMIT ?",
                (status, int(limit)),
            ).fetchall()
        return [todo(r) for r in rows]

    def recent_todos(self, limit: int, status: str | None = None) -> list[Todo]:
        """The most recently changed todos (by the `updated` column, then the newest id): with
        `status`, those of that status; without, the live ones — `in_progress`, and `offen` ones
        in the plugin's queue (the queue flag set, where the table has one)."""
        with self._lock, self._transaction(write=False) as cur:
            r = self._profile(cur)
            select, todo = self._todo_select(cur)
            params: list[Any]
            if status is not None:
                where, params = "status = ?", [status]
            else:
                flag = r.first("queue_flag")
                queued = f" AND {self._q(flag.name)} = 1" if flag else ""
                where, params = f"status = 'in_progress' OR (status = 'offen'{queued})", []
            updated = r.first("updated")
            order = f"{self._q(updated.name)} DESC, id DESC" if updated else "id DESC"
            rows = self._run(
                cur,
                f"SELECT {select} FROM {self._t} WHERE {where} ORDER BY {order} LIMIT ?",
                [*params, int(limit)],
            ).fetchall()
        return [todo(r) for r in rows]

    def get_outputs(self, todo_id: int) -> tuple[str | None, str | None, str | None] | None:
        """(claude_summary, claude_text_output, claude_html_output) of a todo, or None."""
        with self._lock, self._transaction(write=False) as cur:
            row = self._run(
                cur,
                f"SELECT claude_summary, claude_text_output, claude_html_output FROM {self._t}"
                " WHERE id = ?",
                (todo_id,),
            ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def logged_kinds(self, todo_id: int) -> list[tuple[str, str]]:
        with self._lock, self._transaction(write=False) as cur:
            rows = self._run(
                cur,
                f"SELECT completion_id, kind FROM {self._log} WHERE todo_id = ? ORDER BY id",
                (todo_id,),
            ).fetchall()
        return [(str(a), str(b)) for a, b in rows]

    def audit_rows(self, todo_id: int) -> list[tuple[str, str, str | None]]:
        """(completion id, kind, note) of a todo's audit rows, oldest first."""
        with self._lock, self._transaction(write=False) as cur:
            note = self._q(LOG_NOTE) if self._has_note(cur) else "NULL"
            rows = self._run(
                cur,
                f"SELECT completion_id, kind, {note} FROM {self._log} WHERE todo_id = ?"
                " ORDER BY id",
                (todo_id,),
            ).fetchall()
        return [(str(a), str(b), None if c is None else str(c)) for a, b, c in rows]

    def apply(self, writes: Sequence[TodoWrite]) -> list[WriteOutcome]:
        """Apply the whole batch in ONE transaction; outcomes in the order of `writes`.

        The reads are one statement each for the whole batch: every todo row of the batch is
        locked at once, in id order (two writers never deadlock on each other), then the
        completion ids are looked up; the log rows go in with one multi-row INSERT at the end.
        """
        if not writes:
            return []
        with self._lock, self._transaction(write=True) as cur:
            ids = sorted({w.todo_id for w in writes})
            status = {
                int(r[0]): str(r[1])
                for r in self._run(
                    cur,
                    f"SELECT id, status FROM {self._t} WHERE id IN ({_marks(ids)})"
                    f" ORDER BY id{self.lock_clause}",
                    ids,
                ).fetchall()
            }
            cids = sorted({w.completion_id for w in writes})
            logged = {
                str(r[0]): str(r[1])
                for r in self._run(
                    cur,
                    f"SELECT completion_id, kind FROM {self._log}"
                    f" WHERE completion_id IN ({_marks(cids)})",
                    cids,
                ).fetchall()
            }
            born = self._created_after(cur, [w for w in writes if w.not_created_after])
            pending: list[tuple[Any, ...]] = []
            outcomes = [
                _refuse_if_newer(w, born.get(w.todo_id))
                or self._apply_one(cur, w, status, logged, pending)
                for w in writes
            ]
            if pending:
                names = [c for c in LOG_ROW_COLUMNS if c != "id"]
                if not self._has_note(cur):  # an older audit table the agent could not alter
                    names.pop()
                    pending = [row[:-1] for row in pending]
                cur.executemany(
                    self._sql(
                        f"INSERT INTO {self._log} ({', '.join(names)}) VALUES ({_marks(names)})"
                    ),
                    pending,
                )
            return outcomes

    def _created_after(self, cur: Any, writes: Sequence[TodoWrite]) -> dict[int, datetime]:
        """When the rows these writes name were created (UTC), where the table says so."""
        r = self._profile(cur)
        if not writes or not r.has("created_at"):
            return {}
        col = Column("created_at", r.table_columns["created_at"])
        ids = sorted({w.todo_id for w in writes})
        rows = self._run(
            cur,
            f"SELECT id, {self._read_time_expr(col)} FROM {self._t} WHERE id IN ({_marks(ids)})",
            ids,
        ).fetchall()
        born = {int(r[0]): self._read_time(col, r[1]) for r in rows}
        return {k: v for k, v in born.items() if v is not None}

    def _apply_one(
        self,
        cur: Any,
        w: TodoWrite,
        status: dict[int, str],
        logged: dict[str, str],
        pending: list[tuple[Any, ...]],
    ) -> WriteOutcome:
        def prior_kinds() -> list[str]:
            rows = self._run(
                cur, f"SELECT kind FROM {self._log} WHERE todo_id = ?", (w.todo_id,)
            ).fetchall()
            return [str(r[0]) for r in rows] + [row[2] for row in pending if row[1] == w.todo_id]

        d = decide(w, status.get(w.todo_id), logged.get(w.completion_id), prior_kinds)
        if d.status is not None:
            r = self._profile(cur)
            sets = ["status = ?"]
            params: list[Any] = [d.status]

            def set_time(col: Column, template: str = "{}") -> None:
                expr, value = self._write_time(col, w.at)
                sets.append(f"{self._q(col.name)} = {template.format(expr)}")
                params.append(value)

            for col in r.of("updated"):
                set_time(col)
            if d.started:
                for col in r.of("started"):
                    set_time(col, f"COALESCE({self._q(col.name)}, {{}})")
            if w.kind in ("reset", "failure") and d.status == "offen":
                sets.extend(f"{self._q(col.name)} = NULL" for col in r.of("started"))
            if d.completed:
                for col in r.of("completed"):
                    set_time(col)
            if d.uncompleted:
                sets.extend(f"{self._q(col.name)} = NULL" for col in r.of("completed"))
            if d.outputs:
                for role, value in zip(OUTPUT_ROLES, self._fit_outputs(cur, w), strict=True):
                    for col in r.of(role):
                        name = self._q(col.name)
                        sets.append(f"{name} = COALESCE(?, {name})")
                        params.append(value)
            params.append(w.todo_id)
            self._run(cur, f"UPDATE {self._t} SET {', '.join(sets)} WHERE id = ?", params)
            status[w.todo_id] = d.status
        if d.log_kind is not None and d.outcome != "already":
            pending.append(
                (
                    w.completion_id,
                    w.todo_id,
                    d.log_kind,
                    w.source[:MAX_SOURCES],
                    int(w.attempts),
                    db_time(w.at),
                    db_time(utcnow()),
                    None if not w.note else fit_text(w.note, None, MAX_NOTE, "utf8mb4"),
                )
            )
            logged[w.completion_id] = d.log_kind
        return WriteOutcome(w.completion_id, d.outcome, d.reason, d.log_kind)

    def verify_many(
        self, writes: Sequence[TodoWrite], outcomes: Sequence[WriteOutcome]
    ) -> list[bool]:
        """`verify` for a whole batch: one transaction of two statements."""
        if not writes:
            return []
        with self._lock, self._transaction(write=False) as cur:
            cids = sorted({w.completion_id for w in writes})
            logged = {
                str(r[0])
                for r in self._run(
                    cur,
                    f"SELECT completion_id FROM {self._log}"
                    f" WHERE completion_id IN ({_marks(cids)})",
                    cids,
                ).fetchall()
            }
            ids = sorted({w.todo_id for w in writes})
            completed = self._profile(cur).first("completed")
            # A table without a completion-time column: the status alone says it.
            when = self._q(completed.name) if completed else "'-'"
            rows = {
                int(r[0]): (r[1], r[2])
                for r in self._run(
                    cur,
                    f"SELECT id, status, {when} FROM {self._t} WHERE id IN ({_marks(ids)})",
                    ids,
                ).fetchall()
            }
        return [
            _holds(w, o, w.completion_id in logged, rows.get(w.todo_id))
            for w, o in zip(writes, outcomes, strict=True)
        ]

    def verify(self, write: TodoWrite, outcome: WriteOutcome) -> bool:
        """Read back, in a fresh transaction, whether `outcome` is what the database now holds."""
        return self.verify_many([write], [outcome])[0]


def _refuse_if_newer(w: TodoWrite, created: datetime | None) -> WriteOutcome | None:
    """The refusal of a write whose todo row is younger than the write's request."""
    if w.not_created_after is None or created is None:
        return None
    # Whole seconds on both sides (what a DATETIME column keeps): a row created within the
    # second the schedule was made counts as older.  A server clock ahead of ours errs towards
    # refusing, which the user sees and can redo; the other way would complete a stranger's todo.
    made = to_utc_naive(w.not_created_after)
    if to_utc_naive(created) <= made:
        return None
    return WriteOutcome(
        w.completion_id,
        "refused",
        f"todo {w.todo_id} was created at {to_utc_naive(created):%Y-%m-%d %H:%M:%S} UTC, after "
        f"this completion was scheduled ({made:%Y-%m-%d %H:%M:%S} UTC): a schedule only "
        "completes the todo that had its id then",
    )


def _priority_value(col: Column, priority: str) -> Any:
    """`priority` as `col` takes it: one of its ENUM values, or a number for an integer column."""
    values = col.enum_values()
    if values is not None:
        if priority not in values:
            raise ValueError(
                f"priority {priority!r} is not one of the column's values: {', '.join(values)}"
            )
        return priority
    if "int" in col.decl:
        try:
            return int(priority)
        except ValueError:
            raise ValueError(f"priority {priority!r} must be a number for this table") from None
    return priority


def _holds(write: TodoWrite, outcome: WriteOutcome, logged: bool, row: Any) -> bool:
    """Whether the database holds what `outcome` says was done (see `SqlStore.verify`)."""
    if outcome.outcome == "refused":
        return True
    if outcome.outcome == "already":
        return logged
    if outcome.outcome == "duplicate":
        return logged if outcome.log_kind else True
    status = None if row is None else str(row[0])
    if write.kind == "start":
        return status in ("in_progress", "completed")
    if write.kind in ("reset", "failure"):
        return status == "offen" and logged
    done = row is not None and (row[1] == "-" or parse_db_time(row[1]) is not None)
    return status == "completed" and done and logged


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)
