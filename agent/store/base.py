"""The store's contract and the SQL both backends share.

This module owns:
- the value types (`Todo`, `TodoWrite`, `WriteOutcome`) and the error classes,
- the `Store` protocol the writer, collector and monitor program against,
- `decide()`: the compare-and-set rules of a write, as one pure function, so that SQLite and
  MySQL cannot drift apart,
- `SqlStore`: the transaction body of `apply`/`verify` and the plain reads, written once with `?`
  placeholders; a backend supplies connections, quoting, error classification and DDL.

Times: every datetime that goes in or comes out is *naive UTC*. An aware datetime passed in is
converted to UTC first. Columns hold 'YYYY-MM-DD HH:MM:SS' (whole seconds, like MySQL DATETIME).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

STATUSES = ("offen", "in_progress", "completed", "blocked", "cancelled", "cron")
KINDS = ("start", "normal", "emergency", "reset")
LOG_KINDS = ("normal", "emergency", "reset", "duplicate")
OUTCOMES = ("applied", "duplicate", "refused", "already")
LOG_TABLE = "completion_log"
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

    def ensure_schema(self, *, create_todo_table: bool) -> None: ...
    def check_schema(self) -> list[str]: ...
    def add_todo(self, title: str, description: str = "", working_directory: str = "") -> int: ...
    def get_todo(self, todo_id: int) -> Todo | None: ...
    def get_todos(self, todo_ids: Sequence[int]) -> dict[int, Todo]: ...
    def todos_with_status(self, status: str, limit: int = 10000) -> list[Todo]: ...
    def project_ids(self, todo_ids: Sequence[int]) -> dict[int, int]: ...
    def row(self, todo_id: int) -> dict[str, Any] | None: ...
    def apply(self, writes: Sequence[TodoWrite]) -> list[WriteOutcome]: ...
    def verify(self, write: TodoWrite, outcome: WriteOutcome) -> bool: ...
    def verify_many(
        self, writes: Sequence[TodoWrite], outcomes: Sequence[WriteOutcome]
    ) -> list[bool]: ...
    def logged_kinds(self, todo_id: int) -> list[tuple[str, str]]: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------- helpers


def check_table_name(table: str) -> str:
    """Return `table` if it is safe to interpolate (quoted) into SQL, else raise ValueError."""
    if not isinstance(table, str) or not _TABLE_RE.fullmatch(table):
        raise ValueError(
            f"table name {table!r} is not allowed: use 1-64 letters, digits or underscores"
        )
    if table == LOG_TABLE:
        raise ValueError(f"table name {table!r} is the agent's own audit table, not a todo table")
    return table


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
    set those columns to the write's time; `outputs` writes the three output columns.
    """

    outcome: str
    reason: str = ""
    log_kind: str | None = None
    status: str | None = None
    started: bool = False
    completed: bool = False
    outputs: bool = False


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
            return Decision("applied", f"todo {tid} was already in_progress")
        return Decision("refused", f"todo {tid} is {status}, only an offen todo can be started")
    if kind == "reset":
        if status == "in_progress":
            return Decision("applied", log_kind="reset", status="offen")
        if status == "offen":
            return Decision("duplicate", f"todo {tid} is already offen")
        if status == "completed":
            return Decision("refused", f"todo {tid} is already completed, nothing to reset")
        return Decision("refused", f"todo {tid} is {status}, only an in_progress todo is reset")
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

# Required columns of the todo table and the category of type each needs.
TODO_COLUMNS: dict[str, str] = {
    "id": "int",
    "title": "text",
    "description": "text",
    "working_directory": "text",
    "status": "status",
    "started_at": "datetime",
    "completed_at": "datetime",
    "updated_at": "datetime",
    "claude_html_output": "text",
    "claude_text_output": "text",
    "claude_summary": "text",
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
_TODO_SELECT = "id, title, description, working_directory, status, started_at, completed_at"


def _todo(row: Sequence[Any]) -> Todo:
    return Todo(
        id=int(row[0]),
        title=row[1] or "",
        description=row[2] or "",
        working_directory=row[3] or "",
        status=row[4] or "",
        started_at=parse_db_time(row[5]),
        completed_at=parse_db_time(row[6]),
    )


class SqlStore:
    """`Store` on a DB-API connection; subclasses provide the backend-specific parts.

    Every public method is one transaction on one connection, under a lock so that a store can be
    shared by threads. Subclasses implement `_transaction` (begin, commit, and on failure roll
    back and raise a classified `StoreError`), `_q` (quote an identifier), `_columns`,
    `_type_problem`, `_fit_outputs`, `ensure_schema` and `ping`.
    """

    placeholder = "?"
    lock_clause = ""  # MySQL: " FOR UPDATE"

    def __init__(self, table: str, timeout: float) -> None:
        self.table = check_table_name(table)
        self.timeout = float(timeout)
        self._lock = threading.RLock()
        self._t = self._q(self.table)
        self._log = self._q(LOG_TABLE)

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

    # ---- Store
    def check_schema(self) -> list[str]:
        """Sentences naming each problem with the todo table and completion_log; [] = fine."""
        with self._lock, self._transaction(write=False) as cur:
            todo_cols = self._columns(cur, self.table)
            log_cols = self._columns(cur, LOG_TABLE)
        t = self.table
        never = "the agent never changes the structure of an existing table"
        if not todo_cols:
            problems = [
                f"table `{t}` does not exist: run `completionctl db init` to create it, "
                "or set database.table to the name of your todo table"
            ]
        else:
            problems = []
            for name, category in TODO_COLUMNS.items():
                decl = todo_cols.get(name)
                if decl is None:
                    problems.append(
                        f"column `{name}` is missing from `{t}`: add it, e.g. ALTER TABLE `{t}` "
                        f"ADD COLUMN `{name}` {self._suggested_type(category)} ({never})"
                    )
                elif (want := self._type_problem(category, decl)) is not None:
                    problems.append(
                        f"column `{name}` of `{t}` is {decl} but must be {want}: "
                        f"change its type ({never})"
                    )
        if not log_cols:
            problems.append(
                f"table `{LOG_TABLE}` does not exist yet: run `completionctl db init` "
                "(completiond also creates it when it starts)"
            )
        else:
            missing = [c for c in LOG_COLUMNS if c not in log_cols]
            if missing:
                problems.append(
                    f"table `{LOG_TABLE}` lacks column(s) {', '.join(missing)}: it was not made "
                    f"by this agent; rename it and run `completionctl db init`"
                )
        return problems

    def add_todo(self, title: str, description: str = "", working_directory: str = "") -> int:
        with self._lock, self._transaction(write=True) as cur:
            cols = self._columns(cur, self.table)
            names = ["title", "description", "working_directory", "status"]
            values: list[Any] = [title, description, working_directory, "offen"]
            now = db_time(utcnow())
            for extra in ("created_at", "updated_at"):
                if extra in cols:
                    names.append(extra)
                    values.append(now)
            marks = ", ".join("?" for _ in names)
            self._run(cur, f"INSERT INTO {self._t} ({', '.join(names)}) VALUES ({marks})", values)
            return int(cur.lastrowid)

    def get_todo(self, todo_id: int) -> Todo | None:
        with self._lock, self._transaction(write=False) as cur:
            row = self._run(
                cur, f"SELECT {_TODO_SELECT} FROM {self._t} WHERE id = ?", (todo_id,)
            ).fetchone()
        return None if row is None else _todo(row)

    def get_todos(self, todo_ids: Sequence[int]) -> dict[int, Todo]:
        """The rows of these todos that exist, by id, read with one statement."""
        ids = sorted({int(i) for i in todo_ids})
        if not ids:
            return {}
        with self._lock, self._transaction(write=False) as cur:
            rows = self._run(
                cur, f"SELECT {_TODO_SELECT} FROM {self._t} WHERE id IN ({_marks(ids)})", ids
            ).fetchall()
        todos = [_todo(r) for r in rows]
        return {t.id: t for t in todos}

    def project_ids(self, todo_ids: Sequence[int]) -> dict[int, int]:
        """todo id -> its `project_id`, for the todos that have one; {} when the table has no
        such column (the embedded default)."""
        ids = sorted({int(i) for i in todo_ids})
        if not ids:
            return {}
        with self._lock, self._transaction(write=False) as cur:
            if "project_id" not in self._columns(cur, self.table):
                return {}
            rows = self._run(
                cur,
                f"SELECT id, project_id FROM {self._t} WHERE id IN ({_marks(ids)})"
                " AND project_id IS NOT NULL",
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
            rows = self._run(
                cur,
                f"SELECT {_TODO_SELECT} FROM {self._t} WHERE status = ? ORDER BY id LIMIT ?",
                (status, int(limit)),
            ).fetchall()
        return [_todo(r) for r in rows]

    def logged_kinds(self, todo_id: int) -> list[tuple[str, str]]:
        with self._lock, self._transaction(write=False) as cur:
            rows = self._run(
                cur,
                f"SELECT completion_id, kind FROM {self._log} WHERE todo_id = ? ORDER BY id",
                (todo_id,),
            ).fetchall()
        return [(str(a), str(b)) for a, b in rows]

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
            pending: list[tuple[Any, ...]] = []
            outcomes = [self._apply_one(cur, w, status, logged, pending) for w in writes]
            if pending:
                cur.executemany(
                    self._sql(
                        f"INSERT INTO {self._log} (completion_id, todo_id, kind, sources,"
                        " attempts, created_at, logged_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    ),
                    pending,
                )
            return outcomes

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
        at = db_time(w.at)
        if d.status is not None:
            sets = ["status = ?", "updated_at = ?"]
            params: list[Any] = [d.status, at]
            if d.started:
                sets.append("started_at = ?")
                params.append(at)
            if d.completed:
                sets.append("completed_at = ?")
                params.append(at)
            if d.outputs:
                for col, value in zip(
                    ("claude_html_output", "claude_text_output", "claude_summary"),
                    self._fit_outputs(cur, w),
                    strict=True,
                ):
                    sets.append(f"{col} = COALESCE(?, {col})")
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
                    at,
                    db_time(utcnow()),
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
            rows = {
                int(r[0]): (r[1], r[2])
                for r in self._run(
                    cur,
                    f"SELECT id, status, completed_at FROM {self._t} WHERE id IN ({_marks(ids)})",
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
    if write.kind == "reset":
        return status == "offen" and logged
    return (
        status == "completed" and row is not None and parse_db_time(row[1]) is not None
    ) and logged


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)
