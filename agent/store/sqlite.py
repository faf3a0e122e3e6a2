"""The embedded SQLite backend: the default when no MySQL is configured.

Owns the SQLite connection (WAL, busy timeout, `BEGIN IMMEDIATE` for writes), the SQLite form of
the todo table and the audit table, and the mapping of sqlite3 errors to Transient/Permanent.
The schema mirrors the todo plugin's table (its columns, its statuses, its queue flag);
datetimes are TEXT 'YYYY-MM-DD HH:MM:SS' on the site's wall clock (`database.time_zone`, by
default the machine's zone).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .base import (
    STATUSES,
    PermanentError,
    SiteProfile,
    SqlStore,
    StoreError,
    TodoWrite,
    TransientError,
    fit_text,
)

# Primary result codes (code & 0xff) worth retrying: another process holds the lock, or the
# disk/IO trouble may pass. Everything else (no such table/column, constraint, corrupt, readonly,
# cannot open) needs a person.
_TRANSIENT_CODES = {
    5: "the database is busy (another process holds its lock)",  # SQLITE_BUSY
    6: "a table is locked",  # SQLITE_LOCKED
    7: "out of memory",  # SQLITE_NOMEM
    9: "the operation was interrupted",  # SQLITE_INTERRUPT
    10: "a disk I/O error happened",  # SQLITE_IOERR
    13: "the disk is full",  # SQLITE_FULL
    15: "a locking protocol error happened",  # SQLITE_PROTOCOL
}
_NOW = "(strftime('%Y-%m-%d %H:%M:%S', 'now'))"


def classify_sqlite(exc: BaseException, path: Path) -> StoreError:
    """Map a sqlite3 (or OS) error to a TransientError or PermanentError that says what to do."""
    if isinstance(exc, StoreError):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    text = f"SQLite database {path}: {exc}"
    if code is not None and (code & 0xFF) in _TRANSIENT_CODES:
        return TransientError(f"{text} ({_TRANSIENT_CODES[code & 0xFF]}; will retry)", errno=code)
    if code is None and isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return TransientError(f"{text} (will retry)")
    msg = str(exc)
    if "no such table" in msg or "no such column" in msg:
        hint = "the schema is incomplete: run `completionctl check`, then `completionctl db init`"
    elif isinstance(exc, OSError):
        hint = "check that the directory exists and is writable by this user"
    else:
        hint = "this needs a person: check the file, its permissions and `completionctl check`"
    return PermanentError(f"{text} ({hint})", errno=code)


class SqliteStore(SqlStore):
    """`Store` on a local SQLite file; the connection opens lazily on first use."""

    def __init__(
        self, path: Path, *, table: str, timeout: float, profile: SiteProfile | None = None
    ) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        super().__init__(table, timeout, profile)

    def __repr__(self) -> str:
        return f"SqliteStore(path={str(self.path)!r}, table={self.table!r})"

    def _q(self, name: str) -> str:
        return f'"{name}"'

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN ourselves; check_same_thread=False: the
            # store's lock serialises threads.
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                # A verified completion must survive a power cut: the journal is cleaned after it.
                conn.execute("PRAGMA synchronous = FULL")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Any]:
        try:
            conn = self._connect()
            # IMMEDIATE takes the write lock up front, so the read-decide-write of apply cannot
            # interleave with another writer (SQLite's answer to SELECT ... FOR UPDATE).
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            cur = conn.cursor()
            yield cur
            conn.execute("COMMIT")
        except Exception as exc:
            if self._conn is not None and self._conn.in_transaction:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    self._drop()
            raise classify_sqlite(exc, self.path) from exc

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(sqlite3.Error):
                conn.close()

    def _columns(self, cur: Any, table: str) -> dict[str, str]:
        rows = cur.execute(f"PRAGMA table_info({self._q(table)})").fetchall()
        return {str(r[1]): str(r[2] or "").lower() for r in rows}

    def _type_problem(self, category: str, decl: str) -> str | None:
        # SQLite types are affinities; reject only what clearly cannot hold the value.
        if category == "int":
            return None if "int" in decl else "INTEGER"
        if category == "priority":
            return None
        if category == "datetime":
            ok = decl == "" or any(k in decl for k in ("text", "char", "date", "time"))
            return None if ok else "TEXT (holding 'YYYY-MM-DD HH:MM:SS') or DATETIME"
        ok = decl == "" or any(k in decl for k in ("text", "char", "clob"))
        return None if ok else "TEXT"

    def _suggested_type(self, category: str) -> str:
        return {"int": "INTEGER", "status": "TEXT NOT NULL DEFAULT 'offen'"}.get(category, "TEXT")

    def _fit_outputs(self, cur: Any, write: TodoWrite) -> tuple[str | None, ...]:
        # No size limit worth the name in SQLite; only make the text encodable (lone surrogates).
        return tuple(
            None if v is None else fit_text(v, None, None, "utf8mb4")
            for v in (write.html, write.text, write.summary)
        )

    def ensure_schema(self, *, create_todo_table: bool) -> None:
        """Create the audit table (and the todo table if asked) where missing; the todo table
        is never altered, an older audit table gains its `note` column.

        Rows of an unprefixed completion_log for this table move into the prefixed one, once."""
        statuses = ", ".join(f"'{s}'" for s in STATUSES)
        with self._lock, self._transaction(write=True) as cur:
            if create_todo_table:
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._t} ("
                    "id INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "title TEXT NOT NULL, "
                    "description TEXT NOT NULL DEFAULT '', "
                    "working_directory TEXT NOT NULL DEFAULT '', "
                    f"status TEXT NOT NULL DEFAULT 'offen' CHECK (status IN ({statuses})), "
                    "priority TEXT NOT NULL DEFAULT 'mittel' CHECK (priority IN "
                    "('niedrig', 'mittel', 'hoch', 'kritisch')), "
                    "project_id INTEGER, "
                    "bearbeiten INTEGER NOT NULL DEFAULT 1, "
                    "started_at TEXT, execution_started_at TEXT, "
                    "completed_at TEXT, completed_date TEXT, "
                    f"created_at TEXT NOT NULL DEFAULT {_NOW}, "
                    f"updated_at TEXT NOT NULL DEFAULT {_NOW}, "
                    "claude_html_output TEXT, claude_text_output TEXT, claude_summary TEXT)"
                )
                cur.execute(
                    f'CREATE INDEX IF NOT EXISTS "ix_{self.table}_status" ON {self._t} (status)'
                )
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {self._log} ("
                "id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "completion_id TEXT NOT NULL UNIQUE, "
                "todo_id INTEGER NOT NULL, "
                "kind TEXT NOT NULL, "
                "sources TEXT NOT NULL DEFAULT '', "
                "attempts INTEGER NOT NULL DEFAULT 1, "
                "created_at TEXT NOT NULL, "
                "logged_at TEXT NOT NULL, "
                "note TEXT)"
            )
            cur.execute(
                f'CREATE INDEX IF NOT EXISTS "ix_{self.log_table}_todo_id" ON {self._log} (todo_id)'
            )
        self._resolved = None
        self._add_log_note()
        self._move_legacy_log()

    def ping(self) -> None:
        with self._lock, self._transaction(write=False) as cur:
            cur.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock:
            self._drop()
