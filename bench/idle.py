"""Bench 4: what the agent costs when nothing happens, and whether it grows.

CPU of all the agent's processes over 30 s of idling (no busy polling: each sleeps until its
next deadline or message), their resident memory together, and that memory again after 10,000
completions (against MariaDB, 4 KB of output each) compared with after the first 1,000.
"""

from __future__ import annotations

import sys
import time

import psutil

from bench.common import (
    MIB,
    Outcome,
    Row,
    arguments,
    compiled_env,
    finish,
    private_dir,
    verdict,
)
from bench.db import add_todos, fresh_database, output_text, server_answers
from bench.throughput import agent_config, send_all, wait_verified

CPU_LIMIT = 1.0  # % of one core
RSS_LIMIT = 150 * MIB
GROWTH_LIMIT = 10 * MIB  # all processes together, after the first 1,000 completions


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def memory(processes: list[psutil.Process]) -> tuple[int, int]:
    """(RSS, PSS) of the processes together; PSS counts shared pages once."""
    rss = pss = 0
    for proc in processes:
        info = proc.memory_full_info()
        rss += info.rss
        pss += info.pss
    return rss, pss


def idle_cpu(agent, seconds: float) -> float:
    """Percent of one core used by the whole agent over ``seconds``."""
    family = agent.family()
    before, started = cpu_seconds(family), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(family) - before) / (time.monotonic() - started) * 100


def complete(agent, db, count: int) -> None:
    ids = add_todos(db, count)
    send_all(agent.config_path, {todo: output_text(todo) for todo in ids}, 4)
    wait_verified(agent.state / "journal.db", ids)


def settled_memory(agent, pause: float) -> tuple[int, int]:
    time.sleep(pause)  # the monitor cleans up after the last verification
    return memory(agent.family())


def run(size: str) -> Outcome:
    from tests.harness import Agent

    if not server_answers():
        raise SystemExit("idle bench: MariaDB does not answer on 127.0.0.1:3306")
    window, settle, warm, total = (1.0, 0.5, 20, 50) if size == "tiny" else (30.0, 5.0, 1000, 10000)
    with private_dir("bi-") as root, fresh_database() as db:
        agent = Agent(root, agent_config(db))
        agent.env = compiled_env(root, agent.env)  # as deployed: memory without the compiler's
        try:
            agent.start()
            time.sleep(settle)  # the first health round runs at start
            idle_fresh = idle_cpu(agent, window)
            rss_fresh, pss_fresh = memory(agent.family())
            complete(agent, db, warm)
            rss_warm, pss_warm = settled_memory(agent, settle)
            for _ in range((total - warm) // 1000):
                complete(agent, db, 1000)
            if (total - warm) % 1000:
                complete(agent, db, (total - warm) % 1000)
            rss_after, pss_after = settled_memory(agent, settle)
            idle_after = idle_cpu(agent, window)
            processes = len(agent.family())
        finally:
            agent.cleanup()

    growth = rss_after - rss_warm
    return Outcome(
        [
            Row(
                "4",
                f"idle CPU of all {processes} agent processes over {window:g} s, fresh",
                f"{idle_fresh:.2f}% of one core",
                "",
                None,
                f"≤ {CPU_LIMIT:g}%",
                verdict(idle_fresh, at_most=CPU_LIMIT),
            ),
            Row(
                "4",
                f"idle CPU over {window:g} s after {total} completions",
                f"{idle_after:.2f}% of one core",
                "",
                None,
                f"≤ {CPU_LIMIT:g}%",
                verdict(idle_after, at_most=CPU_LIMIT),
            ),
            Row(
                "4",
                "resident memory of all agent processes together, fresh (RSS; PSS counts shared"
                f" pages once: {pss_fresh / MIB:.0f} MiB)",
                f"{rss_fresh / MIB:.0f} MiB",
                "",
                None,
                f"≤ {RSS_LIMIT // MIB} MiB",
                verdict(rss_fresh, at_most=RSS_LIMIT),
            ),
            Row(
                "4",
                f"resident memory of all agent processes together after {total} completions"
                f" (PSS {pss_after / MIB:.0f} MiB)",
                f"{rss_after / MIB:.0f} MiB",
                "",
                None,
                f"≤ {RSS_LIMIT // MIB} MiB",
                verdict(rss_after, at_most=RSS_LIMIT),
            ),
            Row(
                "4",
                f"RSS growth from {warm} to {total} completions (PSS"
                f" {pss_warm / MIB:.0f} → {pss_after / MIB:.0f} MiB)",
                f"{growth / MIB:+.1f} MiB",
                f"after {warm}: {rss_warm / MIB:.0f} MiB",
                rss_after / rss_warm,
                f"≤ +{GROWTH_LIMIT // MIB} MiB",
                verdict(growth, at_most=GROWTH_LIMIT),
            ),
        ]
    )


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    return finish(args, "4. Idle cost and memory", run(args.size))


if __name__ == "__main__":
    sys.exit(main())
