"""Bench 3: draining the journal after a database outage.

The agent starts with MariaDB unreachable (its database.url names a unix socket path that does
not exist yet), takes 5,000 completions with 4 KB of output each, and collects them into the
journal. Then the database "returns" (the path becomes a symlink to the server's socket: a proxy
that costs nothing) and the clock runs until all are verified. The baseline is the raw UPDATEs
of the same rows batched 200 to a transaction through the same socket, timed before and after.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import time
from pathlib import Path

from bench.common import Outcome, Row, arguments, finish, median, private_dir, verdict
from bench.db import (
    TABLE,
    add_todos,
    count_completed,
    fresh_database,
    output_text,
    raw_update,
    rendered,
    server_answers,
    server_socket,
)
from bench.throughput import send_all, wait_verified

TARGET = 2.0
RAW_BATCH = 200


def states(journal: Path, ids: list[int]) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        return dict(
            db.execute(
                "SELECT state, COUNT(*) FROM entries WHERE kind = 'normal'"
                " AND todo_id BETWEEN ? AND ? GROUP BY state",
                (min(ids), max(ids)),
            ).fetchall()
        )


def one_drain(root: Path, db, count: int, server: str, round_: int) -> float:
    """Seconds from the database's return to the last of ``count`` completions verified."""
    from tests.harness import Agent

    link = root / f"db{round_}.sock"
    ids = add_todos(db, count)
    outputs = {todo: output_text(todo) for todo in ids}
    agent = Agent(
        root / f"agent{round_}",
        {
            "database": {"url": db.socket_url(str(link)), "table": TABLE},
            "behavior": {"health_check_interval": 300, "database_timeout": 30},
        },
    )
    try:
        agent.start()
        send_all(agent.config_path, outputs, 16)
        journal = agent.state / "journal.db"
        deadline = time.monotonic() + 1200
        while states(journal, ids).get("collected", 0) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"drain bench: the backlog never formed: {states(journal, ids)}")
            time.sleep(0.2)
        time.sleep(1.5)  # the writer has failed at least once and waits for its next probe
        returned = time.perf_counter()
        os.symlink(server, link)
        wait_verified(journal, ids, timeout=1200)
        elapsed = time.perf_counter() - returned
    finally:
        agent.cleanup()
    if count_completed(db, ids) != count:
        raise SystemExit("drain bench: not every completion reached the database")
    return elapsed


def one_raw(db, count: int, server: str) -> float:
    ids = add_todos(db, count)
    rows = [rendered(todo, output_text(todo)) for todo in ids]
    started = time.perf_counter()
    raw_update(db, rows, batch=RAW_BATCH, unix_socket=server)
    return time.perf_counter() - started


def run(size: str) -> Outcome:
    if not server_answers():
        raise SystemExit("drain bench: MariaDB does not answer on 127.0.0.1:3306")
    server = server_socket()
    if server is None:
        raise SystemExit("drain bench: the MariaDB server has no unix socket this user can use")
    count, rounds = (30, 1) if size == "tiny" else (5000, 2)
    drains: list[float] = []
    raws: list[float] = []
    with private_dir("bd-") as root, fresh_database() as db:
        for index in range(rounds):
            (root / f"agent{index}").mkdir()
            raws.append(one_raw(db, count, server))
            drains.append(one_drain(root, db, count, server, index))
        raws.append(one_raw(db, count, server))
    drain, raw = median(drains), median(raws)
    ratio = drain / raw
    return Outcome(
        [
            Row(
                "3",
                f"drain after an outage: {count} journaled completions, database return to all"
                " verified",
                f"{drain:.2f} s ({count / drain:.0f}/s)",
                f"raw UPDATEs batched {RAW_BATCH}/transaction {raw:.2f} s ({count / raw:.0f}/s)",
                ratio,
                f"≤ {TARGET:g}x",
                verdict(ratio, at_most=TARGET),
            )
        ]
    )


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    return finish(args, "3. Drain after an outage", run(args.size))


if __name__ == "__main__":
    sys.exit(main())
