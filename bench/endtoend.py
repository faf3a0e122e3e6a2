"""Bench E: end to end at idle, ``Client.complete`` until the row is visible, beside the floor.

One completion at a time (the next is sent when the journal says the last one is verified),
with the same 4 KB Markdown answer as bench P, into two running agents: one on the embedded
default (SQLite, ``STATE_DIR/todos.db``) and one on MariaDB. The clock runs from the call until
the row reads ``completed`` here (polled every 0.5 ms); the ack (``Client.complete`` returning:
the request journaled) is stated beside it.

The floor is what any design must do for one such completion, measured in the same run, its
samples taking turns with the agents' (so a shared machine's drifting load falls on both), step
by step in this process:

- two local IPC round trips: a ZeroMQ REQ/REP over ``ipc://`` to an echo process, the first
  carrying the answer (the client's request), the second a few bytes (the hop to a worker);
- one journal-like commit: the request inserted into a SQLite table in WAL mode with
  ``synchronous=FULL`` (what the agent's journal does), so the commit waits for its fsync;
- the render of the report (``agent.report.render_report``, as bench P's peers do);
- one database commit of the same UPDATE bench P's peers make, then the row read back: into a
  todo table of the embedded schema (WAL, ``synchronous=FULL``, as the agent's SQLite store)
  or into MariaDB over TCP, as the agent's writer reaches it.

The targets (issue 20) are absolute: p50 ≤ 7 ms on SQLite and ≤ 9 ms on MariaDB; a row's ratio
is its p50 over that target, and its floor stands beside it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    PYTHON,
    Outcome,
    Row,
    arguments,
    compiled_env,
    finish,
    median,
    ms,
    private_dir,
    verdict,
    wait_until,
)
from bench.db import (
    TABLE,
    UPDATE,
    Database,
    add_todos,
    fresh_database,
    markdown_answer,
    rendered,
    server_answers,
)
from bench.throughput import agent_config, settled

TARGETS = {"sqlite": 0.007, "mariadb": 0.009}
LABELS = {"sqlite": "SQLite (the embedded default)", "mariadb": "MariaDB"}
POLL = 0.0005
ECHO = (
    "import sys, zmq\n"
    "sock = zmq.Context.instance().socket(zmq.REP)\n"
    "sock.bind(sys.argv[1])\n"
    "while True:\n"
    "    sock.recv()\n"
    "    sock.send(b'ok')\n"
)
STEPS = ("ipc", "journal", "render", "database")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# ------------------------------------------------------------------ the agents


@dataclass
class Target:
    """One running agent, its client, and how this bench sees its todo table."""

    name: str
    agent: Any
    client: Any
    add: Callable[[int], list[int]]
    status: Callable[[int], str | None]

    def complete_once(self) -> tuple[float, float]:
        """(ack, row visible) in seconds after ``Client.complete`` was called."""
        (todo,) = self.add(1)
        answer = markdown_answer(todo)
        started = time.perf_counter()
        self.client.complete(todo, output=answer, queue_when_unreachable=False)
        acked = time.perf_counter() - started
        if not wait_until(lambda: self.status(todo) == "completed", 60, POLL):
            raise SystemExit(f"end-to-end bench: {self.name}: todo {todo} not visible in 60 s")
        seen = time.perf_counter() - started
        # Idle means idle: the next completion waits until the agent is done with this one.
        journal = self.agent.state / "journal.db"
        if not wait_until(lambda: settled(journal, [todo])[0] >= 1, 60, 0.005):
            raise SystemExit(f"end-to-end bench: {self.name}: todo {todo} not verified in 60 s")
        return acked, seen


def sqlite_todos(path: Path) -> tuple[Callable[[int], list[int]], Callable[[int], str | None]]:
    """Adding todos to and reading them from an embedded todo database (the agent's schema)."""
    from agent.store import open_store

    store = open_store(f"sqlite:///{path}", table=TABLE)
    store.ensure_schema(create_todo_table=True)
    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)

    def add(count: int) -> list[int]:
        return [
            store.add_todo(f"end-to-end bench todo {i}", "a todo", "/tmp") for i in range(count)
        ]

    def status(todo: int) -> str | None:
        row = reader.execute(f"SELECT status FROM {TABLE} WHERE id = ?", (todo,)).fetchone()
        return row[0] if row else None

    return add, status


def mariadb_todos(db: Database) -> tuple[Callable[[int], list[int]], Callable[[int], str | None]]:
    reader = db.connect()

    def status(todo: int) -> str | None:
        with reader.cursor() as cur:
            cur.execute(f"SELECT status FROM {TABLE} WHERE id = %s", (todo,))
            row = cur.fetchone()
        return row[0] if row else None

    return (lambda count: add_todos(db, count)), status


# ------------------------------------------------------------------ the floor


@contextlib.contextmanager
def echo_process(root: Path) -> Iterator[str]:
    """A REP echo in a process of its own, as an agent's process is; its ipc endpoint."""
    path = root / "echo.sock"
    endpoint = f"ipc://{path}"
    proc = subprocess.Popen([PYTHON, "-c", ECHO, endpoint], stdin=subprocess.DEVNULL)
    try:
        if not wait_until(path.exists, 30, 0.01):
            raise SystemExit("end-to-end bench: the floor's echo process did not bind")
        yield endpoint
    finally:
        proc.kill()
        proc.wait()


def journal_like(path: Path) -> sqlite3.Connection:
    """A SQLite file set up as the agent's journal is: WAL, synchronous=FULL."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS floor_entries (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " completion_id TEXT NOT NULL UNIQUE, todo_id INTEGER NOT NULL, kind TEXT NOT NULL,"
        " state TEXT NOT NULL, request BLOB, created_at REAL NOT NULL, updated_at REAL NOT NULL)"
    )
    return conn


class Floor:
    """The floor's steps for one completion into one database, timed one by one."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        journal: sqlite3.Connection,
        add: Callable[[int], list[int]],
        write: Callable[[int, Any], None],
    ) -> None:
        import zmq

        self.name = name
        self.journal = journal
        self.add = add
        self.write = write
        self.sock = zmq.Context.instance().socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.samples: list[dict[str, float]] = []

    def once(self) -> dict[str, float]:
        (todo,) = self.add(1)
        answer = markdown_answer(todo)
        body = answer.encode()
        t0 = time.perf_counter()
        self.sock.send(body)  # the client's request, answer and all
        self.sock.recv()
        t1 = time.perf_counter()
        now = time.time()
        self.journal.execute("BEGIN IMMEDIATE")
        self.journal.execute(
            "INSERT INTO floor_entries (completion_id, todo_id, kind, state, request,"
            " created_at, updated_at) VALUES (?, ?, 'normal', 'accepted', ?, ?, ?)",
            (f"{self.name}-{todo}", todo, body, now, now),
        )
        self.journal.execute("COMMIT")
        t2 = time.perf_counter()
        report = rendered(todo, answer)
        t3 = time.perf_counter()
        self.sock.send(b"look")  # the hop to the worker that writes
        self.sock.recv()
        t4 = time.perf_counter()
        self.write(todo, report)
        t5 = time.perf_counter()
        return {
            "ipc": (t1 - t0) + (t4 - t3),
            "journal": t2 - t1,
            "render": t3 - t2,
            "database": t5 - t4,
            "total": t5 - t0,
        }

    def close(self) -> None:
        self.sock.close(0)


def sqlite_writer(path: Path) -> Callable[[int, Any], None]:
    """The UPDATE committed and read back in an embedded todo database (the agent's pragmas)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    update = UPDATE.replace("%s", "?")

    def write(todo: int, report: Any) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(update, (stamp, stamp, report.html, report.text, report.summary, todo))
        conn.execute("COMMIT")
        status, html = conn.execute(
            f"SELECT status, claude_html_output FROM {TABLE} WHERE id = ?", (todo,)
        ).fetchone()
        if status != "completed" or html != report.html:
            raise SystemExit(f"end-to-end bench: the floor's row {todo} reads back wrong")

    return write


def mariadb_writer(db: Database) -> Callable[[int, Any], None]:
    conn = db.connect(autocommit=False)

    def write(todo: int, report: Any) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        with conn.cursor() as cur:
            cur.execute(UPDATE, (stamp, stamp, report.html, report.text, report.summary, todo))
            conn.commit()
            cur.execute(f"SELECT status, claude_html_output FROM {TABLE} WHERE id = %s", (todo,))
            status, html = cur.fetchone()
            conn.commit()
        if status != "completed" or html != report.html:
            raise SystemExit(f"end-to-end bench: the floor's row {todo} reads back wrong")

    return write


# ------------------------------------------------------------------ the run


def run(size: str) -> Outcome:
    from ctl import Client
    from tests.harness import Agent

    if not server_answers():
        raise SystemExit("end-to-end bench: MariaDB does not answer on 127.0.0.1:3306")
    samples, warm = (3, 2) if size == "tiny" else (100, 5)
    with private_dir("be-") as root, fresh_database() as db:
        for name in TARGETS:
            (root / name).mkdir()
        agents = {
            "sqlite": Agent(root / "sqlite", {"behavior": agent_config(db)["behavior"]}),
            "mariadb": Agent(root / "mariadb", agent_config(db)),
        }
        try:
            for agent in agents.values():
                agent.env = compiled_env(agent.root, agent.env)
                agent.start()
            tables = {
                "sqlite": sqlite_todos(agents["sqlite"].sqlite_path),
                "mariadb": mariadb_todos(db),
            }
            targets = {
                name: Target(name, agent, Client(str(agent.config_path), timeout=30), *tables[name])
                for name, agent in agents.items()
            }
            with echo_process(root) as endpoint, fresh_database("floor") as floor_db:
                floor_sqlite = root / "floor-todos.db"
                sqlite_add, _ = sqlite_todos(floor_sqlite)
                floors = {
                    "sqlite": Floor(
                        "sqlite",
                        endpoint,
                        journal_like(root / "floor-journal.db"),
                        sqlite_add,
                        sqlite_writer(floor_sqlite),
                    ),
                    "mariadb": Floor(
                        "mariadb",
                        endpoint,
                        journal_like(root / "floor-journal.db"),
                        lambda count: add_todos(floor_db, count),
                        mariadb_writer(floor_db),
                    ),
                }
                runs: dict[str, Callable[[], Any]] = {}
                for name in targets:
                    runs[name] = targets[name].complete_once
                    runs[f"{name} floor"] = floors[name].once
                results: dict[str, list[Any]] = {key: [] for key in runs}
                names = list(runs)
                for index in range(samples + warm):
                    shift = index % len(names)
                    for key in names[shift:] + names[:shift]:
                        result = runs[key]()
                        if index >= warm:
                            results[key].append(result)
                for floor in floors.values():
                    floor.close()
            for target in targets.values():
                target.client.close()
        finally:
            for agent in agents.values():
                agent.cleanup()
    return Outcome(rows(results, samples))


def rows(results: dict[str, list[Any]], samples: int) -> list[Row]:
    out = []
    for name, target in TARGETS.items():
        acks = [a for a, _ in results[name]]
        seen = [s for _, s in results[name]]
        floor = median([f["total"] for f in results[f"{name} floor"]])
        p50 = median(seen)
        out.append(
            Row(
                "E",
                f"end to end at idle, {LABELS[name]}: `Client.complete` → row visible, p50 of"
                f" {samples} (p95 {ms(quantile(seen, 0.95))}; ack {ms(median(acks))});"
                " ratio: p50 / target",
                ms(p50),
                f"floor {ms(floor)} (p50 is {p50 / floor:.1f}x it)",
                p50 / target,
                f"p50 ≤ {target * 1000:g} ms",
                verdict(p50, at_most=target),
            )
        )
    for name in TARGETS:
        steps = results[f"{name} floor"]
        parts = {step: median([s[step] for s in steps]) for step in STEPS}
        out.append(
            Row(
                "E",
                f"the floor, {LABELS[name]}, p50 of {samples}: two ZeroMQ REQ/REP round trips over"
                f" ipc {ms(parts['ipc'])}, a journal-like SQLite commit (WAL, fsync)"
                f" {ms(parts['journal'])}, the render of the 4 KB answer {ms(parts['render'])},"
                f" the UPDATE committed and read back {ms(parts['database'])}",
                ms(median([s["total"] for s in steps])),
                f"p95 {ms(quantile([s['total'] for s in steps], 0.95))}",
                None,
                "",
                None,
            )
        )
    return out


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    return finish(args, "E. End to end at idle, beside the floor", run(args.size))


if __name__ == "__main__":
    sys.exit(main())
