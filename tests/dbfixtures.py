"""Pytest fixtures for the real databases the tests run against, and raw helpers around them.

Registered from tests/conftest.py with `pytest_plugins = ["tests.dbfixtures"]`.

- `mysql_server` (session): the MariaDB/MySQL server on 127.0.0.1:3306 as root. Skips when it
  does not answer, unless COMPLETION_REQUIRE_MYSQL=1, which turns the skip into a failure (CI).
- `mysql_url`: a fresh database per test (random name), dropped afterwards.
- `wordpress_table`: `stage_project_todos` in that database, made the way the WordPress plugin
  makes it (extra columns, enums, NOT NULL with defaults, TEXT/LONGTEXT outputs).
- `tcp_proxy`: a `TcpProxy` in front of the MySQL server (see tests/tcpproxy.py).
- `store_url`: parametrised over "sqlite" and "mysql", so one suite runs against both backends.

The helpers (`raw_execute`, `fetch_row`, `hold_row_lock`, ...) talk to a database behind the
store's back, with `?` placeholders on both backends, so tests can set up and inspect rows.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pymysql
import pytest

from agent.store.url import MysqlTarget, SqliteTarget, parse_url
from tests.tcpproxy import TcpProxy

MYSQL_HOST = "127.0.0.1"
MYSQL_PORT = 3306
MYSQL_USER = "root"
MYSQL_PASSWORD = ""
TODO_TABLE = "stage_project_todos"

# The plugin's own DDL (as dbDelta would leave it): more columns than the agent knows, enums,
# NOT NULL columns with defaults, and TEXT (64 KiB) for some of the output columns.
WORDPRESS_DDL = """
CREATE TABLE `{table}` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `project_id` int(11) DEFAULT NULL,
  `title` varchar(255) NOT NULL,
  `description` text DEFAULT NULL,
  `status` enum('offen','in_progress','completed','blocked','cancelled','cron')
      NOT NULL DEFAULT 'offen',
  `priority` enum('niedrig','mittel','hoch','kritisch') NOT NULL DEFAULT 'mittel',
  `scope` varchar(50) DEFAULT NULL,
  `working_directory` varchar(500) DEFAULT NULL,
  `created_by` bigint(20) unsigned NOT NULL DEFAULT 1,
  `assigned_to` varchar(100) NOT NULL DEFAULT 'claude',
  `bearbeiten` tinyint(1) NOT NULL DEFAULT 1,
  `claude_prompt` text DEFAULT NULL,
  `claude_output` longtext DEFAULT NULL,
  `claude_html_output` longtext DEFAULT NULL,
  `claude_text_output` text DEFAULT NULL,
  `claude_summary` text DEFAULT NULL,
  `is_recurring` tinyint(1) NOT NULL DEFAULT 0,
  `created_at` datetime NOT NULL DEFAULT current_timestamp(),
  `updated_at` datetime NOT NULL DEFAULT current_timestamp() ON UPDATE current_timestamp(),
  `started_at` datetime DEFAULT NULL,
  `completed_at` datetime DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `status` (`status`),
  KEY `project_id` (`project_id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_520_ci
"""


@dataclass(frozen=True)
class MysqlServer:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str, *, port: int | None = None) -> str:
        auth = self.user if not self.password else f"{self.user}:{self.password}"
        return f"mysql://{auth}@{self.host}:{port or self.port}/{database}"

    def connect(self, database: str | None = None, **kwargs: Any) -> pymysql.Connection:
        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=database,
            charset="utf8mb4",
            connect_timeout=5,
            **kwargs,
        )

    @contextlib.contextmanager
    def throwaway_user(self, database: str, grants: str = "ALL") -> Iterator[tuple[str, str]]:
        """(url, password) of a new user with a password and ``grants`` on ``database``,
        dropped afterwards."""
        user, password = f"cu_{secrets.token_hex(4)}", f"Pw-{secrets.token_hex(12)}"
        hosts = ("%", "localhost", "127.0.0.1")
        admin = self.connect(autocommit=True)
        try:
            with admin.cursor() as cur:
                for host in hosts:
                    # Names and password are hex: safe inline (a '%' host defeats placeholders).
                    cur.execute(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{password}'")
                    cur.execute(f"GRANT {grants} ON `{database}`.* TO '{user}'@'{host}'")
            yield f"mysql://{user}:{password}@{self.host}:{self.port}/{database}", password
        finally:
            with admin.cursor() as cur:
                for host in hosts:
                    with contextlib.suppress(pymysql.MySQLError):
                        cur.execute(f"DROP USER '{user}'@'{host}'")
            admin.close()


@pytest.fixture(scope="session")
def mysql_server() -> MysqlServer:
    server = MysqlServer(MYSQL_HOST, MYSQL_PORT, MYSQL_USER, MYSQL_PASSWORD)
    try:
        server.connect().close()
    except Exception as exc:
        reason = f"MariaDB/MySQL does not answer on {server.host}:{server.port} ({exc})"
        if os.environ.get("COMPLETION_REQUIRE_MYSQL") == "1":
            pytest.fail(f"COMPLETION_REQUIRE_MYSQL=1 but {reason}", pytrace=False)
        pytest.skip(f"{reason}; set COMPLETION_REQUIRE_MYSQL=1 to make this a failure")
    return server


@pytest.fixture
def mysql_url(mysql_server: MysqlServer) -> Iterator[str]:
    name = f"ctest_{secrets.token_hex(6)}"
    admin = mysql_server.connect(autocommit=True)
    try:
        with admin.cursor() as cur:
            cur.execute(
                f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
            )
        yield mysql_server.url(name)
    finally:
        with admin.cursor() as cur:
            # A connection a test left open (a held lock) would make DROP wait on its
            # metadata lock: end those first.
            cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST "
                "WHERE DB = %s AND ID <> CONNECTION_ID()",
                (name,),
            )
            for (pid,) in cur.fetchall():
                with contextlib.suppress(pymysql.MySQLError):
                    cur.execute(f"KILL {int(pid)}")
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


def create_wordpress_table(url: str, table: str = TODO_TABLE) -> str:
    raw_execute(url, WORDPRESS_DDL.format(table=table))
    return table


@pytest.fixture
def wordpress_table(mysql_url: str) -> str:
    """Create the plugin's `stage_project_todos` in `mysql_url`'s database; return its name."""
    return create_wordpress_table(mysql_url)


@pytest.fixture
def tcp_proxy(mysql_server: MysqlServer) -> Iterator[TcpProxy]:
    proxy = TcpProxy(mysql_server.host, mysql_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/todos.db"
    return str(request.getfixturevalue("mysql_url"))


# --------------------------------------------------------------------------- raw helpers


def backend_of(url: str) -> str:
    return "sqlite" if url.startswith("sqlite:") else "mysql"


def proxied_url(url: str, proxy: TcpProxy) -> str:
    """`url` (mysql://...) pointed at `proxy` instead of the server."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return f"{parts.scheme}://{auth}@{proxy.host}:{proxy.port}{parts.path}"


def mysql_connect(url: str) -> pymysql.Connection:
    """A PyMySQL connection (autocommit) to a mysql:// `url`, behind the store's back."""
    target = parse_url(url)
    assert isinstance(target, MysqlTarget)
    return pymysql.connect(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password,
        database=target.database,
        charset="utf8mb4",
        autocommit=True,
        connect_timeout=5,
    )


@contextlib.contextmanager
def raw_connection(url: str) -> Iterator[Any]:
    """A DB-API connection to `url` outside the store (autocommit)."""
    target = parse_url(url)
    if isinstance(target, SqliteTarget):
        conn: Any = sqlite3.connect(target.path, isolation_level=None, timeout=10)
    else:
        conn = mysql_connect(url)
    try:
        yield conn
    finally:
        conn.close()


def _sql(url: str, sql: str) -> str:
    return sql if backend_of(url) == "sqlite" else sql.replace("?", "%s")


def raw_execute(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement (placeholders `?`) and return its rows."""
    with raw_connection(url) as conn:
        cur = conn.cursor()
        cur.execute(_sql(url, sql), params)
        rows = list(cur.fetchall()) if cur.description else []
        cur.close()
        return rows


def fetch_row(url: str, todo_id: int, table: str = TODO_TABLE) -> dict[str, Any] | None:
    """Every column of one todo row, as a dict."""
    with raw_connection(url) as conn:
        cur = conn.cursor()
        cur.execute(_sql(url, f"SELECT * FROM {table} WHERE id = ?"), (todo_id,))
        row = cur.fetchone()
        names = [d[0] for d in cur.description]
        cur.close()
    return None if row is None else dict(zip(names, row, strict=True))


def set_status(url: str, todo_id: int, status: str, table: str = TODO_TABLE) -> None:
    raw_execute(url, f"UPDATE {table} SET status = ? WHERE id = ?", (status, todo_id))


def show_create_table(url: str, table: str = TODO_TABLE) -> str:
    if backend_of(url) == "sqlite":
        rows = raw_execute(url, "SELECT sql FROM sqlite_master WHERE name = ?", (table,))
    else:
        rows = [(r[1],) for r in raw_execute(url, f"SHOW CREATE TABLE `{table}`")]
    return str(rows[0][0])


@contextlib.contextmanager
def hold_row_lock(url: str, todo_id: int, table: str = TODO_TABLE) -> Iterator[None]:
    """Hold the todo row's lock from another session (MySQL: FOR UPDATE; SQLite: the write
    lock) until the block ends."""
    with raw_connection(url) as conn:
        cur = conn.cursor()
        if backend_of(url) == "sqlite":
            cur.execute("BEGIN IMMEDIATE")
            cur.execute(f"SELECT status FROM {table} WHERE id = ?", (todo_id,))
        else:
            cur.execute("BEGIN")
            cur.execute(f"SELECT status FROM `{table}` WHERE id = %s FOR UPDATE", (todo_id,))
        cur.fetchall()
        try:
            yield
        finally:
            conn.rollback()
