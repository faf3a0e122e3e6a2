"""Bench 2: end-to-end throughput into MariaDB.

Completions with 4 KB of output each are sent through ``ctl.Client`` (1, 4 and 16 concurrent
clients) until every one is verified (the writer read it back; the journal says so), versus a
direct writer doing the same UPDATE per row with autocommit from one process, and versus the
same UPDATEs batched 200 to a transaction (the database's own limit here). Runs alternate;
each figure is the median over the rounds.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path

from bench.common import (
    CpuMeter,
    Outcome,
    Row,
    arguments,
    database_server_process,
    finish,
    median,
    private_dir,
    verdict,
    wait_until,
)
from bench.db import (
    TABLE,
    Database,
    add_todos,
    count_completed,
    fresh_database,
    output_text,
    raw_update,
    rendered,
    server_answers,
)

TARGET = 1.5
HEADLINE_CLIENTS = 16
RAW_BATCH = 200


def agent_config(db: Database) -> dict:
    # The production defaults where the harness shortens them for tests.
    return {
        "database": {"url": db.url, "table": TABLE},
        "behavior": {"sweep_interval": 2.0, "health_check_interval": 300, "database_timeout": 30},
    }


def settled(journal: Path, ids: list[int]) -> tuple[int, int]:
    """(verified, finished otherwise) among the completions of these todos, from the journal."""
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        good, bad = db.execute(
            "SELECT COALESCE(SUM(state IN ('verified', 'cleaned')), 0),"
            " COALESCE(SUM(state IN ('failed', 'dead')), 0)"
            " FROM entries WHERE kind = 'normal' AND todo_id BETWEEN ? AND ?",
            (min(ids), max(ids)),
        ).fetchone()
    return good, bad


def wait_verified(journal: Path, ids: list[int], timeout: float = 600) -> None:
    def done() -> bool:
        good, bad = settled(journal, ids)
        if bad:
            raise SystemExit(f"{bad} completion(s) failed: see {journal.parent}/logs")
        return good >= len(ids)

    if not wait_until(done, timeout, 0.01):
        raise SystemExit(f"not all {len(ids)} completions were verified within {timeout:.0f} s")


def send_all(config_path: Path, outputs: dict[int, str], clients: int) -> None:
    """``clients`` threads, each a ctl.Client sending its share of the completions in turn."""
    from ctl import Client

    ids = list(outputs)
    start = threading.Barrier(clients)
    errors: list[BaseException] = []

    def sender(share: list[int]) -> None:
        client = Client(str(config_path), timeout=30)
        start.wait()
        try:
            for todo in share:
                ack = client.complete(todo, output=outputs[todo], queue_when_unreachable=False)
                assert ack.state == "accepted", ack
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=sender, args=(ids[i::clients],), name=f"client-{i}")
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def through_agent(
    agent, db: Database, count: int, clients: int, cpu: dict[str, list[float]] | None = None
) -> float:
    """Seconds from the first send to the last completion verified; with ``cpu``, the CPU time
    of each process per completion is appended there."""
    ids = add_todos(db, count)
    outputs = {todo: output_text(todo) for todo in ids}
    meter = CpuMeter(processes(agent)) if cpu is not None else None
    if meter is not None:
        meter.start()
    started = time.perf_counter()
    send_all(agent.config_path, outputs, clients)
    wait_verified(agent.state / "journal.db", ids)
    elapsed = time.perf_counter() - started
    if meter is not None and cpu is not None:
        for name, seconds in meter.stop().items():
            cpu.setdefault(name, []).append(seconds / count)
    if count_completed(db, ids) != count:
        raise SystemExit(f"throughput bench: not all {count} completions reached the database")
    return elapsed


def processes(agent) -> dict[str, object]:
    """The agent's processes by role, the database server, and this process (the clients)."""
    import psutil

    named: dict[str, object] = {}
    for proc in agent.family():
        command = proc.cmdline()
        role = command[-2] if "agent.child" in command else "parent"
        named[f"agent {role}"] = proc
    server = database_server_process()
    if server is not None:
        named["MariaDB server"] = server
    named["clients (this process)"] = psutil.Process()
    return named


def cpu_section(cpu: dict[str, list[float]], direct: float) -> str:
    total = sum(median(values) for values in cpu.values())
    cores = os.cpu_count() or 1
    lines = [
        "| process | CPU per completion |",
        "|---|---|",
        *(f"| {name} | {median(values) * 1000:.2f} ms |" for name, values in cpu.items()),
        f"| **all** | **{total * 1000:.2f} ms** |",
        "",
        f"The direct writer's rate implies {1000 / direct:.2f} ms per autocommit UPDATE (mostly"
        f" the commit's flush). At {total * 1000:.1f} ms of CPU per completion on {cores} cores,"
        f" the agent can reach {TARGET:g}x the direct writer only where a commit takes longer than"
        f" about {TARGET * total * 1000 / cores:.1f} ms.",
    ]
    floor = sum(median(values) for name, values in cpu.items() if not name.startswith("agent "))
    if floor > 0:
        lines += [
            "",
            f"The clients and MariaDB alone use {floor * 1000:.2f} ms per completion: with no"
            f" CPU left for the agent's own processes that allows at most {cores / floor:.0f}/s on"
            f" {cores} cores, {cores / floor / direct:.2f}x the direct writer. To reach"
            f" {TARGET:g}x, the agent's processes would have to do with"
            f" {max(0.0, cores / (TARGET * direct) - floor) * 1000:.2f} ms per completion; they use"
            f" {(total - floor) * 1000:.2f} ms.",
        ]
    return "\n".join(lines)


def through_raw(db: Database, count: int, batch: int) -> float:
    ids = add_todos(db, count)
    rows = [rendered(todo, output_text(todo)) for todo in ids]
    started = time.perf_counter()
    raw_update(db, rows, batch=batch)
    elapsed = time.perf_counter() - started
    if count_completed(db, ids) != count:
        raise SystemExit("throughput bench: the raw writer did not complete every row")
    return elapsed


def run(size: str) -> Outcome:
    from tests.harness import Agent

    if not server_answers():
        raise SystemExit("throughput bench: MariaDB does not answer on 127.0.0.1:3306")
    count, rounds = (20, 1) if size == "tiny" else (1000, 3)
    levels = (1, 4, HEADLINE_CLIENTS)
    times: dict[str, list[float]] = {"direct": [], "batched": []}
    times |= {f"agent-{n}": [] for n in levels}
    cpu: dict[str, list[float]] = {}
    with private_dir("bt-") as root, fresh_database() as db:
        agent = Agent(root, agent_config(db))
        try:
            agent.start()
            through_agent(agent, db, min(count, 50), HEADLINE_CLIENTS)  # warm-up
            for index in range(rounds):
                runs = [("direct", lambda: through_raw(db, count, 1))]
                runs += [
                    (
                        f"agent-{n}",
                        lambda n=n: through_agent(
                            agent, db, count, n, cpu if n == HEADLINE_CLIENTS else None
                        ),
                    )
                    for n in levels
                ]
                runs.append(("batched", lambda: through_raw(db, count, RAW_BATCH)))
                if index % 2:
                    runs.reverse()
                for name, measure in runs:
                    times[name].append(measure())
        finally:
            agent.cleanup()

    rate = {name: count / median(values) for name, values in times.items()}
    direct, batched = rate["direct"], rate["batched"]
    rows = [
        Row(
            "2",
            f"throughput: direct writer, UPDATE per row with autocommit ({count} rows)",
            f"{direct:.0f}/s",
        ),
        Row(
            "2",
            f"throughput: raw UPDATEs batched {RAW_BATCH} per transaction",
            f"{batched:.0f}/s",
            f"direct {direct:.0f}/s",
            batched / direct,
        ),
    ]
    for n in levels:
        headline = n == HEADLINE_CLIENTS
        ratio = rate[f"agent-{n}"] / direct
        rows.append(
            Row(
                "2",
                f"throughput: agent, {n} concurrent client{'s' if n > 1 else ''},"
                f" {count} completions x 4 KB until verified",
                f"{rate[f'agent-{n}']:.0f}/s",
                f"direct {direct:.0f}/s",
                ratio,
                f"≥ {TARGET}x" if headline else "—",
                verdict(ratio, at_least=TARGET) if headline else None,
            )
        )
        rows.append(
            Row(
                "2",
                f"throughput: agent, {n} client{'s' if n > 1 else ''}, against batched raw UPDATEs",
                f"{rate[f'agent-{n}']:.0f}/s",
                f"batched {batched:.0f}/s",
                rate[f"agent-{n}"] / batched,
            )
        )
    section = f"#### Where a completion's CPU goes ({HEADLINE_CLIENTS} clients, medians)"
    return Outcome(rows, {section: cpu_section(cpu, direct)})


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    return finish(args, "2. Throughput into MariaDB", run(args.size))


if __name__ == "__main__":
    sys.exit(main())
