"""The MySQL/MariaDB backend through PyMySQL: the real deployment (a WordPress plugin's table).

Owns the connection (lazy, bounded by timeouts, dropped after any error and made afresh on the
next call), `classify()` of PyMySQL errors into Transient/Permanent by error number, the fitting
of output values to the site's column types and `max_allowed_packet`, and the MySQL DDL.

The site's table is not ours: only the named columns are read or written, extra columns are left
to their defaults, and an existing table is never altered.
"""

from __future__ import annotations

import math
import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import pymysql
from pymysql.constants import SERVER_STATUS

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
from .tunnel import SshTunnel, TunnelError
from .url import MysqlTarget, node_name

# Error numbers that say "try again later": the server is unreachable, went away, is shutting
# down, is read-only (failover), killed us, or a lock/deadlock made the transaction lose.
TRANSIENT_ERRNOS: dict[int, str] = {
    1040: "the server has too many connections",
    1047: "the Galera node is not ready (not part of the primary component)",
    1053: "the server is shutting down",
    1158: "network error reading from the server",
    1159: "network timeout reading from the server",
    1160: "network error writing to the server",
    1161: "network timeout writing to the server",
    1180: "the server failed during COMMIT",
    1205: "lock wait timeout: another session holds the todo's row lock",
    1213: "deadlock: the transaction was chosen as the victim",
    1290: "the server is read-only right now (--read-only; failover?)",
    1317: "the query was interrupted",
    1792: "the transaction is read-only",
    1836: "the server is in read-only mode",
    1927: "the connection was killed",
    2002: "cannot connect through the socket",
    2003: "cannot connect to the server",
    2006: "the server has gone away",
    2013: "the connection was lost during the query",
    2014: "commands out of sync (connection dropped)",
    2026: "SSL connection error",
    2055: "the connection was lost",
    4031: "the server disconnected this idle client",
}
# Error numbers that need a person: setup, grants, schema, or data the column cannot hold.
PERMANENT_ERRNOS: dict[int, str] = {
    1044: "the user may not use this database: GRANT it SELECT, INSERT, UPDATE, CREATE",
    1045: "access denied: check the user and password in database.url",
    1046: "no database selected: name one in database.url",
    1048: "a NOT NULL column got NULL",
    1049: "unknown database: create it or fix the database name in database.url",
    1054: "a column is missing: run `completionctl check` to see which",
    1064: "SQL syntax error (a bug in the agent: please report it)",
    1136: "column count does not match (a bug in the agent: please report it)",
    1142: "the user lacks a privilege on the table: GRANT SELECT, INSERT, UPDATE (and CREATE)",
    1143: "the user lacks a privilege on a column: GRANT SELECT, UPDATE on the table",
    1146: "a table is missing: check database.table, or run `completionctl db init`",
    1153: "a packet exceeded max_allowed_packet: raise it on the server",
    1227: "the user lacks a needed privilege",
    1264: "a value is out of range for its column",
    1265: "a value was truncated by the column",
    1292: "a datetime value was refused",
    1366: "a value has characters the column's charset cannot hold",
    1406: "a value is too long for its column",
    1452: "a foreign key refused the row",
    1698: "access denied for this user: check the user and its authentication",
    2059: "the authentication plugin cannot be loaded",
}
_NO_PRIVILEGE = (1044, 1142, 1227)  # the user may not do this (here: ALTER the audit table)
_PERMANENT_CLASSES = (
    pymysql.err.ProgrammingError,
    pymysql.err.DataError,
    pymysql.err.IntegrityError,
    pymysql.err.NotSupportedError,
)
_INT_TYPES = {"tinyint", "smallint", "mediumint", "int", "integer", "bigint"}
_TEXT_TYPES = {"char", "varchar", "tinytext", "text", "mediumtext", "longtext"}
_PACKET_SLACK = 64 * 1024  # room in a packet for the statement itself and the other values


def classify(exc: BaseException) -> StoreError:
    """Map an exception from PyMySQL or the socket to a TransientError or PermanentError.

    PyMySQL raises OperationalError both for a lost connection and for many permanent errors, so
    the error number decides first; only an unknown number falls back to the class.
    """
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, pymysql.err.MySQLError):
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        detail = (str(exc.args[1]) if len(exc.args) > 1 else str(exc)) or type(exc).__name__
        text = f"MySQL error {code}: {detail}" if code else f"MySQL error: {detail}"
        if code in TRANSIENT_ERRNOS:
            return TransientError(f"{text} ({TRANSIENT_ERRNOS[code]}; will retry)", errno=code)
        if code in PERMANENT_ERRNOS:
            return PermanentError(f"{text} ({PERMANENT_ERRNOS[code]}; not retried)", errno=code)
        if isinstance(exc, _PERMANENT_CLASSES):
            return PermanentError(f"{text} (not retried)", errno=code)
        # OperationalError, InternalError, InterfaceError, "Already closed": the connection.
        return TransientError(f"{text} (will retry)", errno=code or None)
    if isinstance(exc, OSError | socket.timeout):
        return TransientError(f"network error talking to MySQL: {exc!r} (will retry)")
    return PermanentError(
        f"unexpected {type(exc).__name__} from the MySQL store: {exc} (a bug? please report it)"
    )


@dataclass(frozen=True, slots=True)
class _Limits:
    """What the output columns and one packet can hold; read once per connection."""

    columns: dict[str, tuple[int | None, int | None, str]]  # name -> (bytes, chars, charset)
    packet: int


def escape_string(value: str) -> str:
    """PyMySQL's ``converters.escape_string``, exactly (tests/test_store.py compares them), at
    a fraction of its cost: it maps every character through a table (``str.translate``, ~65 us
    for a 4 KB report), where seven ``str.replace`` scans take ~9 us.  The backslash goes first,
    so the backslashes the others add are not doubled."""
    return (
        value.replace("\\", "\\\\")
        .replace("\0", "\\0")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\032", "\\Z")
        .replace("'", "\\'")
        .replace('"', '\\"')
    )


class _Connection(pymysql.connections.Connection):
    """A PyMySQL connection that quotes strings with ``escape_string`` above (the writer sends
    every report and output escaped: PyMySQL's table was a fifth of the writer's CPU).  The
    cursor quotes each parameter through ``escape``; anything but a string, and every string
    on a server in NO_BACKSLASH_ESCAPES mode, is left to PyMySQL."""

    def escape(self, obj: object, mapping: Any = None) -> str:
        if type(obj) is str and not (
            self.server_status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES
        ):
            return "'" + escape_string(obj) + "'"
        return super().escape(obj, mapping)


def _wire_size(value: str | None) -> int:
    # Bytes the value takes in the statement PyMySQL sends: escaped, quoted, utf8mb4.
    return 4 if value is None else len(escape_string(value).encode("utf-8")) + 2


def _wire_size_bound(value: str | None) -> int:
    # At least _wire_size(value): escaping adds at most one byte per byte.
    return 4 if value is None else 2 * len(value.encode("utf-8", "surrogatepass")) + 2


class MysqlStore(SqlStore):
    """`Store` on MySQL/MariaDB. Connects lazily; never retries by itself (the writer does)."""

    placeholder = "%s"
    note_decl = "TEXT NULL"
    lock_clause = " FOR UPDATE"
    server_zone = True

    def __init__(
        self,
        target: MysqlTarget,
        *,
        table: str,
        timeout: float,
        tunnel: SshTunnel | None = None,
        tls: ssl.SSLContext | None = None,
        failback_after: float = 60.0,
        profile: SiteProfile | None = None,
    ) -> None:
        self.target = target
        # Several nodes: the one in use, whether the next connection must try the one after it
        # (this one failed), since when it is in use; back to the first after failback_after.
        self._node = 0
        self._advance = False
        self._since = 0.0
        self.failback_after = failback_after
        self.failovers = 0
        self.galera = False
        self.tunnel = tunnel  # owned by the caller: it outlives this store's connections
        self.tls = tls  # a context = TLS required (PyMySQL refuses a server without it)
        self._conn: pymysql.connections.Connection | None = None
        self._limits: _Limits | None = None
        super().__init__(table, timeout, profile)
        # The server's lock wait must end before our socket read gives up, so that a held row
        # lock comes back as the clear 1205, not as a lost connection.
        self.lock_wait = max(1, math.ceil(self.timeout) - 1)
        self.read_timeout = max(self.timeout, self.lock_wait + 1.0)

    def __repr__(self) -> str:
        return f"MysqlStore(url={self.target.redacted()!r}, table={self.table!r})"

    def _q(self, name: str) -> str:
        return f"`{name}`"

    # ---- connection
    @property
    def node(self) -> str:
        """The node in use (or last used): host:port of one of database.url's hosts."""
        return node_name(*self.target.all_nodes[self._node])

    def _connect(self) -> pymysql.connections.Connection:
        nodes = self.target.all_nodes
        if (
            self._conn is not None
            and self._node != 0
            and time.monotonic() - self._since > self.failback_after
        ):
            # Back to the first node (it may have rejoined); if it still fails, on we go.
            self._drop()
            self._node, self._advance = 0, False
        if self._conn is None:
            self._limits = None
            if len(nodes) == 1:
                self._conn = self._open(*nodes[0])
                self._advance = False
                return self._conn
            start = (self._node + 1) % len(nodes) if self._advance else self._node
            problems: list[str] = []
            for k in range(len(nodes)):
                index = (start + k) % len(nodes)
                try:
                    conn = self._open(*nodes[index])
                except Exception as exc:
                    err = classify(exc)
                    if isinstance(err, PermanentError):
                        raise
                    problems.append(f"{node_name(*nodes[index])}: {err}")
                    continue
                if index != self._node:
                    self.failovers += 1
                self._node, self._conn, self._advance = index, conn, False
                self._since = time.monotonic()
                break
            else:
                self._node = (start + len(nodes) - 1) % len(nodes)
                raise TransientError(f"no node answered: {'; '.join(problems)}")
        return self._conn

    def _open(self, host: str, port: int) -> pymysql.connections.Connection:
        t = self.target
        unix_socket = t.unix_socket
        if self.tunnel is not None:
            host, port, unix_socket = "localhost", 3306, self.tunnel.ensure()
        conn = _Connection(
            host=host,
            port=port,
            user=t.user,
            password=t.password,
            database=t.database,
            unix_socket=unix_socket,
            ssl=self.tls,
            ssl_disabled=self.tls is None,
            charset="utf8mb4",
            autocommit=False,
            connect_timeout=self.timeout,
            read_timeout=self.read_timeout,
            write_timeout=self.timeout,
            init_command=(
                f"SET SESSION innodb_lock_wait_timeout = {self.lock_wait},"
                f" lock_wait_timeout = {self.lock_wait}, time_zone = '+00:00'"
            ),
        )
        try:
            self._galera(conn, node_name(host, port))
        except Exception:
            with suppress(Exception):
                conn.close()
            raise
        return conn

    def _galera(self, conn: pymysql.connections.Connection, where: str) -> None:
        """On a Galera node: refuse one that is not ready, and make this session's reads wait
        until the node has applied what the cluster committed before them (wsrep_sync_wait), so
        a read-back after a failover sees a write made through another node."""
        with conn.cursor() as cur:
            cur.execute("SHOW VARIABLES LIKE 'wsrep_on'")
            row = cur.fetchone()
            if not row or str(row[1]).upper() != "ON":
                self.galera = False
                return
            self.galera = True
            cur.execute("SHOW STATUS LIKE 'wsrep_ready'")
            ready = cur.fetchone()
            if not ready or str(ready[1]).upper() != "ON":
                raise pymysql.err.OperationalError(
                    1047, f"Galera node {where} is not ready (wsrep_ready = OFF)"
                )
            cur.execute("SET SESSION wsrep_sync_wait = 1")

    def _drop(self) -> None:
        """Roll back (best effort) and forget the connection; the next call makes a fresh one."""
        conn, self._conn, self._limits = self._conn, None, None
        if conn is None or not conn.open:
            return
        with suppress(Exception):
            conn.rollback()
        with suppress(Exception):
            conn.close()

    def _classify(self, exc: BaseException) -> StoreError:
        err = classify(exc)
        tls_error = getattr(exc, "original_exception", exc)
        if isinstance(tls_error, ssl.SSLCertVerificationError):
            # A refused certificate is a setup problem, not an outage.
            err = PermanentError(
                f"TLS to {self.target.host}:{self.target.port}: the server's certificate was "
                f"refused: {tls_error.verify_message or tls_error} (check database.tls_ca, and "
                "that the certificate names this host; not retried)"
            )
        elif self.tls is not None and "SSL is required but the server" in str(exc):
            err = PermanentError(
                f"TLS to {self.target.host}:{self.target.port}: the server does not offer TLS "
                "but database.tls asks for it (configure ssl_cert/ssl_key on the server; "
                "not retried)",
                errno=2026,
            )
        elif isinstance(tls_error, ssl.SSLError):
            where = f"{self.target.host}:{self.target.port}"
            err = TransientError(f"TLS to {where} failed: {tls_error} (will retry)")
        if isinstance(err, TransientError) and err.errno not in (1205, 1213, 1062):
            self._advance = True  # this node failed us: the next connection tries another
        if self.tunnel is not None and not isinstance(err, TunnelError):
            # The tunnel may have died under the connection: then that is the cause to report.
            failure = self.tunnel.failure()
            if failure is not None:
                err = failure
            else:
                err = type(err)(f"MySQL through the tunnel: {err}", errno=err.errno)
        if err.errno == 1062 and "uq_completion_id" in str(exc):
            # Another writer recorded the same completion id at the same moment; a retry will
            # find it in completion_log and answer "already".
            err = TransientError(f"{err}: another writer recorded it; will retry", errno=1062)
        if len(self.target.all_nodes) > 1 and self.node not in str(err):
            err = type(err)(f"{err} [node {self.node}]", errno=err.errno)
        pw = self.target.password
        if pw and pw in str(err):  # never let a password reach a log line
            err = type(err)(str(err).replace(pw, "***"), errno=err.errno)
        return err

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Any]:
        try:
            conn = self._connect()
            with conn.cursor() as cur:
                yield cur
            conn.commit()
        except Exception as exc:
            err = self._classify(exc)
            self._drop()
            raise err from exc

    # ---- schema
    def _columns(self, cur: Any, table: str) -> dict[str, str]:
        cur.execute(
            "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
            (table,),
        )
        return {str(name): str(ctype).lower() for name, ctype in cur.fetchall()}

    def _type_problem(self, category: str, decl: str) -> str | None:
        base = re.split(r"[ (]", decl, maxsplit=1)[0]
        if category == "int":
            return None if base in _INT_TYPES else "an integer type (INT or BIGINT)"
        if category == "datetime":
            return None if base in ("datetime", "timestamp") else "DATETIME or TIMESTAMP"
        if category == "text":
            return None if base in _TEXT_TYPES else "a text type (LONGTEXT, TEXT or VARCHAR)"
        if category == "priority":
            ok = base in ("enum", "varchar", "char") or base in _INT_TYPES
            return None if ok else "an ENUM, a VARCHAR or an integer type"
        # status
        want = f"ENUM({', '.join(repr(s) for s in STATUSES)}) or a VARCHAR of 11 or more"
        if base == "enum":
            values = set(re.findall(r"'((?:[^']|'')*)'", decl))
            missing = [s for s in ("offen", "in_progress", "completed") if s not in values]
            return f"{want} (it lacks {', '.join(missing)})" if missing else None
        if base in ("varchar", "char"):
            size = re.search(r"\((\d+)\)", decl)
            return None if size and int(size.group(1)) >= len("in_progress") else want
        return want

    def _suggested_type(self, category: str) -> str:
        return {
            "int": "BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY",
            "datetime": "DATETIME NULL",
            "status": f"ENUM({', '.join(repr(s) for s in STATUSES)}) NOT NULL DEFAULT 'offen'",
        }.get(category, "LONGTEXT NULL")

    def ensure_schema(self, *, create_todo_table: bool) -> None:
        """Create the audit table (and the todo table if asked) where missing; the todo table
        is never altered, an older audit table gains its `note` column.

        Existence is checked first, so a user without CREATE privilege can still run the agent
        once the audit table exists; one that may not ALTER it runs without `note` (`check`
        says how to add it). An unprefixed completion_log's rows for this table move
        into the prefixed audit table in a transaction of their own (MySQL commits DDL).
        """
        statuses = ", ".join(f"'{s}'" for s in STATUSES)
        with self._lock, self._transaction(write=True) as cur:
            if create_todo_table and not self._columns(cur, self.table):
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._t} ("
                    "`id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT, "
                    "`title` VARCHAR(255) NOT NULL, "
                    "`description` LONGTEXT NULL, "
                    "`working_directory` VARCHAR(1024) NULL, "
                    f"`status` ENUM({statuses}) NOT NULL DEFAULT 'offen', "
                    "`priority` ENUM('niedrig','mittel','hoch','kritisch') NOT NULL "
                    "DEFAULT 'mittel', "
                    "`project_id` INT NULL DEFAULT NULL, "
                    "`bearbeiten` TINYINT(1) NOT NULL DEFAULT 1, "
                    "`started_at` DATETIME NULL DEFAULT NULL, "
                    "`execution_started_at` DATETIME NULL DEFAULT NULL, "
                    "`completed_at` DATETIME NULL DEFAULT NULL, "
                    "`completed_date` DATETIME NULL DEFAULT NULL, "
                    "`created_at` DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP, "
                    "`updated_at` DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP "
                    "ON UPDATE CURRENT_TIMESTAMP, "
                    "`claude_html_output` LONGTEXT NULL, "
                    "`claude_text_output` LONGTEXT NULL, "
                    "`claude_summary` LONGTEXT NULL, "
                    "PRIMARY KEY (`id`), KEY `status` (`status`)"
                    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
                )
            if not self._columns(cur, self.log_table):
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._log} ("
                    "`id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT, "
                    "`completion_id` VARCHAR(64) COLLATE utf8mb4_bin NOT NULL, "
                    "`todo_id` BIGINT NOT NULL, "
                    "`kind` VARCHAR(16) NOT NULL, "
                    "`sources` VARCHAR(255) NOT NULL DEFAULT '', "
                    "`attempts` INT NOT NULL DEFAULT 1, "
                    "`created_at` DATETIME NOT NULL, "
                    "`logged_at` DATETIME NOT NULL, "
                    "`note` TEXT NULL, "
                    "PRIMARY KEY (`id`), "
                    "UNIQUE KEY `uq_completion_id` (`completion_id`), "
                    "KEY `ix_todo_id` (`todo_id`)"
                    ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
                )
        self._resolved = None
        try:
            self._add_log_note()
        except StoreError as exc:
            # 1060: another agent added it a moment ago; a refused ALTER, or one that waited
            # past lock_wait_timeout for a transaction on the audit table (1205: another agent,
            # a backup), leaves the rows without notes rather than the agent without a
            # database: `check` names the missing column, and the next start tries again.
            if exc.errno not in (1060, 1205, *_NO_PRIVILEGE):
                raise
        self._move_legacy_log()

    # ---- output fitting
    def _load_limits(self, cur: Any) -> _Limits:
        if self._limits is None:
            cur.execute(
                "SELECT COLUMN_NAME, CHARACTER_OCTET_LENGTH, CHARACTER_MAXIMUM_LENGTH, "
                "CHARACTER_SET_NAME FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
                (self.table,),
            )
            columns = {
                str(name): (
                    None if octets is None else int(octets),
                    None if chars is None else int(chars),
                    str(charset or "utf8mb4"),
                )
                for name, octets, chars, charset in cur.fetchall()
            }
            cur.execute("SELECT @@max_allowed_packet")
            (packet,) = cur.fetchone()
            self._limits = _Limits(columns, int(packet))
        return self._limits

    def _fit_outputs(self, cur: Any, write: TodoWrite) -> tuple[str | None, ...]:
        """The three outputs cut to their columns, and together to one packet."""
        limits = self._load_limits(cur)
        names = self._output_names(cur)
        originals = (write.html, write.text, write.summary)
        caps: list[int | None] = [None, None, None]

        def fit(i: int) -> str | None:
            value = originals[i]
            if value is None:
                return None
            octets, chars, charset = limits.columns.get(names[i] or "", (None, None, ""))
            cap = caps[i]
            if cap is not None:
                chars = cap if chars is None else min(chars, cap)
            return fit_text(value, octets, chars, charset)

        fitted = [fit(i) for i in range(3)]
        budget = max(limits.packet - _PACKET_SLACK, 4096)
        # Escaping at most doubles a value: when even that fits, there is nothing to measure
        # (escaping only to count would cost as much as the escaping PyMySQL does to send it).
        if sum(_wire_size_bound(v) for v in fitted) <= budget:
            return tuple(fitted)
        sizes = [_wire_size(v) for v in fitted]
        # Shrink the largest value in proportion to the excess until the statement fits; the
        # character cap is independent of the column's charset, so this converges in a few steps.
        for _ in range(16):
            excess = sum(sizes) - budget
            if excess <= 0:
                break
            i = max(range(3), key=sizes.__getitem__)
            current = fitted[i] or ""
            keep = max(0.0, (sizes[i] - excess) / sizes[i]) * 0.97
            caps[i] = int(len(current) * keep)
            fitted[i] = fit(i)
            sizes[i] = _wire_size(fitted[i])
        return tuple(fitted)

    # ---- the rest of Store
    def ping(self) -> None:
        """Raise TransientError when the server is unreachable (PermanentError if it refuses us)."""
        with self._lock:
            try:
                self._connect().ping(reconnect=False)
            except Exception as exc:
                err = self._classify(exc)
                self._drop()
                raise err from exc

    def close(self) -> None:
        with self._lock:
            self._drop()
