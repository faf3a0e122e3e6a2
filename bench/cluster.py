"""Bench 9: completions per second with 1, 2 and 3 agents on a three-node Galera cluster (each
agent on its own node first), against the same agents all on one MariaDB server.

Each agent gets its own share of the completions (4 KB of output each, 4 client threads per
agent) and the clock stops when every one is verified in every agent's journal.  The cluster is
started by the bench (tests/galera.py: user mysql, small nodes), the single server is the one on
127.0.0.1:3306.  Runs alternate; each figure is the median over the rounds.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pymysql

from bench.common import Outcome, Row, arguments, finish, median, private_dir
from bench.db import TABLE, Database, fresh_database, output_text, server_answers
from bench.throughput import send_all, wait_verified
from tests.dbfixtures import WORDPRESS_DDL

CLIENTS_PER_AGENT = 4


def agent_config(url: str) -> dict:
    return {
        "database": {"url": url, "table": TABLE},
        "behavior": {"sweep_interval": 2.0, "health_check_interval": 300, "database_timeout": 30},
    }


def add_todos(connect: Callable[[], pymysql.Connection], count: int) -> list[int]:
    batch = secrets.token_hex(4)
    conn = connect()
    try:
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {TABLE} (title, description, working_directory, status)"
                " VALUES (%s, %s, %s, 'in_progress')",
                [(f"bench {batch} todo {i}", "cluster bench", "/tmp") for i in range(count)],
            )
            cur.execute(
                f"SELECT id FROM {TABLE} WHERE title LIKE %s ORDER BY id", (f"bench {batch} %",)
            )
            ids = [int(r[0]) for r in cur.fetchall()]
        conn.commit()
        return ids
    finally:
        conn.close()


def through_agents(agents: list, connect: Callable[[], pymysql.Connection], count: int) -> float:
    """Seconds until `count` completions per agent, sent to all agents at once, are verified."""
    shares = [add_todos(connect, count) for _ in agents]
    errors: list[BaseException] = []

    def drive(agent, ids: list[int]) -> None:
        try:
            send_all(agent.config_path, {t: output_text(t) for t in ids}, CLIENTS_PER_AGENT)
            wait_verified(agent.state / "journal.db", ids)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=drive, args=(a, ids), daemon=True)
        for a, ids in zip(agents, shares, strict=True)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def measure(
    urls: list[str], connect: Callable[[], pymysql.Connection], count: int, rounds: int, root: Path
) -> dict[int, float]:
    """Completions per second with the first 1, 2, 3 of `urls` (one agent each)."""
    from tests.harness import Agent

    agents = []
    for i, url in enumerate(urls):
        (root / f"agent{i}").mkdir(parents=True, exist_ok=True)
        agents.append(Agent(root / f"agent{i}", agent_config(url)))
    times: dict[int, list[float]] = {n: [] for n in range(1, len(urls) + 1)}
    try:
        for agent in agents:
            agent.start()
        through_agents(agents, connect, min(count, 10))  # warm-up: schema, connections
        for index in range(rounds):
            order = list(times) if index % 2 == 0 else list(reversed(times))
            for n in order:
                times[n].append(through_agents(agents[:n], connect, count))
    finally:
        for agent in agents:
            agent.cleanup()
    return {n: n * count / median(values) for n, values in times.items()}


def cluster_database(cluster) -> tuple[str, Callable[[], pymysql.Connection]]:
    from tests.galera import PASSWORD, USER

    name = f"bench_{secrets.token_hex(4)}"
    cluster.nodes[0].execute(
        f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4",
        f"USE `{name}`",
        WORDPRESS_DDL.format(table=TABLE),
    )

    def connect() -> pymysql.Connection:
        return pymysql.connect(
            host="127.0.0.1",
            port=cluster.ports[0]["mysql"],
            user=USER,
            password=PASSWORD,
            database=name,
            autocommit=False,
        )

    return name, connect


def run(size: str, cluster=None) -> Outcome:
    """With `cluster` (a running tests.galera.GaleraCluster) it is used; else one is started."""
    from tests.galera import GaleraCluster, have_galera

    if not server_answers():
        raise SystemExit("cluster bench: MariaDB does not answer on 127.0.0.1:3306")
    count, rounds = (10, 1) if size == "tiny" else (150, 2)
    with private_dir("bc-") as root:
        own = cluster is None
        if own:
            if not have_galera():
                raise SystemExit("cluster bench: needs galera-4, rsync, mariadbd and root")
            cluster = GaleraCluster(root / "galera").start_all()
        try:
            name, connect = cluster_database(cluster)
            ports = [p["mysql"] for p in cluster.ports]
            urls = [cluster.url(name, ports=ports[i:] + ports[:i]) for i in range(3)]
            on_cluster = measure(urls, connect, count, rounds, root / "c")
        finally:
            if own:
                cluster.stop_all()
        with fresh_database("benchc") as db:
            single = measure([db.url] * 3, lambda: _single(db), count, rounds, root / "s")
    rows = []
    for n in (1, 2, 3):
        rows.append(
            Row(
                "9",
                f"cluster: {n} agent{'s' if n > 1 else ''} on {n} Galera node{'s' if n > 1 else ''}"
                f" (3-node cluster), {count} completions x 4 KB each until verified",
                f"{on_cluster[n]:.0f}/s",
                f"one server {single[n]:.0f}/s",
                on_cluster[n] / single[n],
            )
        )
    return Outcome(rows)


def _single(db: Database) -> pymysql.Connection:
    return db.connect(autocommit=False)


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    return finish(args, "9. Several agents on a Galera cluster", run(args.size))


if __name__ == "__main__":
    sys.exit(main())
