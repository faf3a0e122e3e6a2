"""The benches' own MariaDB database: made fresh for one run, the WordPress table in it, dropped
after. The server itself is never reconfigured."""

from __future__ import annotations

import contextlib
import random
import secrets
import string
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pymysql

from tests.dbfixtures import MYSQL_HOST, MYSQL_PASSWORD, MYSQL_PORT, MYSQL_USER, WORDPRESS_DDL

TABLE = "stage_project_todos"
OUTPUT_BYTES = 4096


@dataclass(frozen=True)
class Database:
    name: str

    @property
    def url(self) -> str:
        auth = MYSQL_USER if not MYSQL_PASSWORD else f"{MYSQL_USER}:{MYSQL_PASSWORD}"
        return f"mysql://{auth}@{MYSQL_HOST}:{MYSQL_PORT}/{self.name}"

    def socket_url(self, path: str) -> str:
        """The URL through the server's unix socket at ``path`` (which may not exist yet)."""
        auth = MYSQL_USER if not MYSQL_PASSWORD else f"{MYSQL_USER}:{MYSQL_PASSWORD}"
        return f"mysql://{auth}@localhost/{self.name}?unix_socket={path}"

    def connect(
        self, *, autocommit: bool = True, unix_socket: str | None = None
    ) -> pymysql.Connection:
        return connect(self.name, autocommit=autocommit, unix_socket=unix_socket)


def connect(
    database: str | None = None, *, autocommit: bool = True, unix_socket: str | None = None
) -> pymysql.Connection:
    return pymysql.connect(
        host=MYSQL_HOST,
        port=MYSQL_PORT,
        unix_socket=unix_socket,
        user=MYSQL_USER,
        password=MYSQL_PASSWORD,
        database=database,
        charset="utf8mb4",
        autocommit=autocommit,
        connect_timeout=5,
    )


def server_socket() -> str | None:
    """The server's unix socket, if it has one this process can use."""
    with contextlib.suppress(pymysql.MySQLError), connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT @@socket")
        (path,) = cur.fetchone()
        with connect(unix_socket=path):
            return str(path)
    return None


def server_answers() -> bool:
    try:
        connect().close()
    except pymysql.MySQLError:
        return False
    return True


@contextlib.contextmanager
def fresh_database(prefix: str = "bench") -> Iterator[Database]:
    """A database of our own with the site's todo table, dropped afterwards."""
    db = Database(f"{prefix}_{secrets.token_hex(5)}")
    admin = connect()
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{db.name}` CHARACTER SET utf8mb4")
        with db.connect() as conn, conn.cursor() as cur:
            cur.execute(WORDPRESS_DDL.format(table=TABLE))
        yield db
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s "
                "AND ID <> CONNECTION_ID()",
                (db.name,),
            )
            for (pid,) in cur.fetchall():
                with contextlib.suppress(pymysql.MySQLError):
                    cur.execute(f"KILL {int(pid)}")
            cur.execute(f"DROP DATABASE IF EXISTS `{db.name}`")
        admin.close()


def add_todos(db: Database, count: int, *, status: str = "in_progress") -> list[int]:
    """``count`` new todos, in one transaction; their ids in order."""
    batch = secrets.token_hex(4)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    with db.connect(autocommit=False) as conn, conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {TABLE} (title, description, working_directory, status, started_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            [
                (f"bench {batch} todo {i}", "a todo made by the bench", "/tmp", status, now)
                for i in range(count)
            ],
        )
        cur.execute(
            f"SELECT id FROM {TABLE} WHERE title LIKE %s ORDER BY id", (f"bench {batch} %",)
        )
        ids = [int(row[0]) for row in cur.fetchall()]
        conn.commit()
    return ids


def count_completed(db: Database, ids: list[int]) -> int:
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT COUNT(*) FROM {TABLE} WHERE id BETWEEN %s AND %s AND status = 'completed'"
            " AND claude_html_output IS NOT NULL",
            (min(ids), max(ids)),
        )
        return int(cur.fetchone()[0])


def output_text(seed: int, size: int = OUTPUT_BYTES) -> str:
    """A session's output of ``size`` bytes: markdown-ish prose, different for each seed."""
    rnd = random.Random(seed)
    lines = [f"## Result of todo {seed}", ""]
    while sum(len(line) + 1 for line in lines) < size:
        words = (
            "".join(rnd.choice(string.ascii_lowercase) for _ in range(rnd.randint(2, 9)))
            for _ in range(rnd.randint(6, 14))
        )
        lines.append(("- " if rnd.random() < 0.3 else "") + " ".join(words))
    return "\n".join(lines)[:size]


@dataclass(frozen=True)
class RowValues:
    """What the agent writes into one todo row, precomputed for the raw writers."""

    todo_id: int
    html: str
    text: str
    summary: str


def rendered(todo_id: int, output: str) -> RowValues:
    """The report the agent would write for this output (same sizes for the raw writers): its
    database value in the default ``report.db_format``, rendered as the agent renders it."""
    from agent.report import render_report
    from agent.sources import Collected, TodoFacts

    report = render_report(
        todo_id=todo_id,
        todo=TodoFacts(f"bench todo {todo_id}", "a todo made by the bench", "/tmp"),
        collected=Collected(output, "message", (), is_markdown=True, is_html=False),
        kind="normal",
        started_at=None,
        completed_at=datetime.now(UTC),
    )
    return RowValues(todo_id, report.for_database, report.text, report.summary)


UPDATE = (
    f"UPDATE {TABLE} SET status = 'completed', completed_at = %s, updated_at = %s,"
    " claude_html_output = %s, claude_text_output = %s, claude_summary = %s WHERE id = %s"
)


def raw_update(
    db: Database, rows: list[RowValues], *, batch: int, unix_socket: str | None = None
) -> None:
    """The same UPDATE per row from one connection: autocommit (batch=1) or ``batch`` rows per
    transaction."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    with (
        db.connect(autocommit=batch == 1, unix_socket=unix_socket) as conn,
        conn.cursor() as cur,
    ):
        for index, row in enumerate(rows, 1):
            cur.execute(UPDATE, (now, now, row.html, row.text, row.summary, row.todo_id))
            if batch > 1 and index % batch == 0:
                conn.commit()
        if batch > 1:
            conn.commit()


def markdown_answer(seed: int, size: int = OUTPUT_BYTES) -> str:
    """A realistic final answer of a coding session, ``size`` bytes of Markdown: headings, a
    bulleted and a numbered list, code fences, a table, links and inline markup."""
    rnd = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(
            "".join(rnd.choice(string.ascii_lowercase) for _ in range(rnd.randint(2, 9)))
            for _ in range(rnd.randint(low, high))
        )

    parts = [
        f"## Result of todo {seed}",
        "",
        f"I changed **{words(2, 4)}** and `{words(1, 1)}()` so that {words(8, 14)}.",
        "",
        "### What changed",
        "",
        *(
            f"- `{words(1, 1)}.py`: {words(5, 10)} ([docs](https://example.com/{seed}/{i}))"
            for i in range(5)
        ),
        "",
        "### How to check",
        "",
        *(f"{i}. {words(4, 9)}" for i in range(1, 5)),
        "",
        "```python",
        *(
            f"def {words(1, 1)}(x: int) -> int:\n    return x * {i}  # {words(2, 5)}"
            for i in range(4)
        ),
        "```",
        "",
        "| file | tests | result |",
        "|:-----|------:|:------:|",
        *(f"| `{words(1, 1)}.py` | {rnd.randint(1, 40)} | *passed* |" for _ in range(6)),
        "",
        "```sh",
        f"pytest -q tests/test_{words(1, 1)}.py  # {words(3, 6)}",
        "```",
        "",
    ]
    text = "\n".join(parts)
    while len(text) < size:
        text += f"\n{words(10, 16)} — see <https://example.org/{rnd.randint(1, 999)}>.\n"
    return text[:size].rsplit("\n", 1)[0] + "\n"
