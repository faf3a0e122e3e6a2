"""Bench 5: ``completionctl health`` at size.

MariaDB holds 10,000 todos (1,000 of them in_progress) and the session directory template
matches 1,000 directories. ``completionctl health`` answers from the monitor's latest round plus
the children's liveness, so it must stay fast however large the round was; the round itself
(run here in-process on the same config) is stated beside it. Auto-recovery is off so that the
round leaves the directories and todos as they are from one run to the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from bench.common import (
    COMPLETIONCTL,
    PYTHON,
    Outcome,
    Row,
    alternate,
    arguments,
    finish,
    median,
    ms,
    private_dir,
    python_env,
    run_timed,
    verdict,
    wait_until,
)
from bench.db import TABLE, add_todos, fresh_database, server_answers

LIMIT = 0.200  # seconds


def run(size: str) -> Outcome:
    from protocol.config import load
    from tests.harness import Agent

    if not server_answers():
        raise SystemExit("health bench: MariaDB does not answer on 127.0.0.1:3306")
    todos, dirs, rounds = (200, 20, 3) if size == "tiny" else (10_000, 1_000, 30)
    with private_dir("bhl-") as root, fresh_database() as db:
        in_progress = add_todos(db, todos // 10)
        completed = add_todos(db, todos - len(in_progress), status="completed")
        agent = Agent(
            root,
            {
                "database": {"url": db.url, "table": TABLE},
                "behavior": {
                    "health_check_interval": 300,
                    "auto_recovery": False,
                    "hanging_after": 3600,
                },
            },
        )
        # Half belong to in_progress todos, half to completed ones (orphans, left alone).
        for todo in in_progress[: dirs // 2] + completed[: dirs - dirs // 2]:
            session = agent.sessions / f"claude_session_{todo}"
            session.mkdir()
            (session / "output.md").write_text("work in progress\n")
            old = time.time() - 7200  # older than hanging_after: the check looks at them all
            os.utime(session, (old, old))
        try:
            agent.start()
            ctl = [COMPLETIONCTL] if COMPLETIONCTL else [PYTHON, "-m", "ctl"]
            health = [*ctl, "--config", str(agent.config_path), "health"]
            env = python_env(root, agent.env)

            def checked() -> dict | None:
                result = subprocess.run(
                    [*health[:-1], "--json", "health"], env=env, capture_output=True
                )
                report = json.loads(result.stdout or b"{}")
                names = {c["name"]: c for c in report.get("checks", [])}
                ready = names.get("database", {}).get("status") not in (None, "UNKNOWN")
                return report if ready else None

            report = wait_until(checked, 120, 0.2)
            if not report:
                raise SystemExit("health bench: the monitor's first round never finished")
            samples = alternate(
                {
                    "baseline": lambda: run_timed([PYTHON, "-c", "import zmq, msgspec"], env=env),
                    "health": lambda: run_timed(health, env=env),
                },
                rounds,
            )
            if any(t.returncode == 3 for t in samples["health"]):
                raise SystemExit("health bench: completionctl health did not reach the agent")
            # One round of the checks at this size, as the monitor runs it (on its thread).
            from loguru import logger

            from agent.health import HealthChecker

            logger.remove()  # its findings are in the table, not on the terminal
            checker = HealthChecker(load(str(agent.config_path)))
            started = time.perf_counter()
            results = checker.run_round(time.time())
            round_time = time.perf_counter() - started
        finally:
            agent.cleanup()

    wall = median([t.wall for t in samples["health"]])
    base = median([t.wall for t in samples["baseline"]])
    found = {r.name: len(r.todo_ids) for r in results}
    return Outcome(
        [
            Row(
                "5",
                f"`completionctl health`, {todos} todos ({len(in_progress)} in_progress),"
                f" {dirs} session dirs",
                ms(wall),
                f'`python -c "import zmq, msgspec"` {ms(base)}',
                wall / base,
                f"≤ {LIMIT * 1000:.0f} ms",
                verdict(wall, at_most=LIMIT),
            ),
            Row(
                "5",
                "one health round at that size, in the monitor's thread (db_consistency"
                f" {found.get('db_consistency', 0)} ids, orphaned_sessions"
                f" {found.get('orphaned_sessions', 0)} ids), for information",
                ms(round_time),
            ),
        ]
    )


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    return finish(args, "5. Health at size", run(args.size))


if __name__ == "__main__":
    sys.exit(main())
