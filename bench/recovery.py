"""Recovery: what a single ``kill -9`` of one child costs in service.

A running agent (MariaDB behind it) loses one child at a time: the collector, the writer, the
monitor, each killed once per round while it has lived long enough to count as stable (a first
crash, not a crash loop). Right after the kill a completion is sent; the time from the kill until
that completion is done end to end (collected, written, read back, archived and cleaned, so every
child took part) is the recovery. The same completion without a kill, sent in the same round, is
the baseline: what the work takes when nobody died. Also stated: kill until the new child process
runs.

    .venv/bin/python -m bench.recovery              # prints its table
    .venv/bin/python -m bench.recovery --doc        # also writes the figures into RELIABILITY.md
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

from bench.common import (
    REPO,
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
from bench.db import add_todos, fresh_database, output_text, server_answers
from bench.throughput import agent_config

TARGET = 1.0  # seconds, median, per child
CHILDREN = ("collector", "writer", "monitor")
DOC = REPO / "docs" / "RELIABILITY.md"
BEGIN = "<!-- bench:recovery:begin (written by `python -m bench.recovery --doc`) -->"
END = "<!-- bench:recovery:end -->"


def child_pids(agent) -> dict[str, int]:
    """The agent's running children by name, read from /proc (no request to the agent)."""
    import psutil

    found: dict[str, int] = {}
    for proc in agent.family()[1:]:
        with contextlib.suppress(psutil.Error):
            command = proc.cmdline()
            if "agent.child" in command and proc.status() != psutil.STATUS_ZOMBIE:
                found[command[command.index("agent.child") + 1]] = proc.pid
    return found


def restarted(agent, name: str, old: int) -> bool:
    return child_pids(agent).get(name) not in (None, old)


def entry_state(journal: Path, todo: int) -> str | None:
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        row = db.execute(
            "SELECT state FROM entries WHERE todo_id = ? AND kind = 'normal'", (todo,)
        ).fetchone()
    return row[0] if row else None


def send(client, todo: int) -> None:
    ack = client.complete(todo, output=output_text(todo), queue_when_unreachable=False)
    assert ack.state == "accepted", ack


def wait_done(journal: Path, todo: int, since: float) -> tuple[float, float]:
    """(seconds until the row was read back, seconds until cleaned), both from ``since``."""
    verified_at = None

    def done() -> bool:
        nonlocal verified_at
        state = entry_state(journal, todo)
        if state in ("failed", "dead"):
            raise SystemExit(f"recovery bench: todo {todo} ended {state}")
        if verified_at is None and state in ("verified", "cleaned"):
            verified_at = time.perf_counter()
        return state == "cleaned"

    if not wait_until(done, 60, 0.002):
        raise SystemExit(f"recovery bench: todo {todo} not done within 60 s")
    cleaned_at = time.perf_counter()
    return (verified_at or cleaned_at) - since, cleaned_at - since


def process_age(pid: int) -> float:
    """Seconds since ``pid`` started, from /proc in one clock (since boot).  psutil's
    create_time adds the boot time, which /proc/stat gives in whole seconds: up to a second
    off, enough to kill a child at 9.6 s that the bench thought 10.5 s old (a crash loop to the
    supervisor, which then backs off)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in ticks
    with open("/proc/uptime") as uptime:
        return float(uptime.read().split()[0]) - started


def stable(agent, name: str, age: float) -> None:
    """Wait until the child has lived ``age`` seconds: its death is then a first crash."""
    pid = wait_until(lambda: child_pids(agent).get(name), 30, 0.01)
    if not pid:
        raise SystemExit(f"recovery bench: no {name} running")
    lived = process_age(pid)
    if lived < age:
        time.sleep(age - lived)


def run(size: str) -> Outcome:
    from agent.supervisor import STABLE_AFTER
    from ctl import Client
    from tests.harness import Agent

    if not server_answers():
        raise SystemExit("recovery bench: MariaDB does not answer on 127.0.0.1:3306")
    rounds = 1 if size == "tiny" else 7
    restart: dict[str, list[float]] = {name: [] for name in CHILDREN}
    row: dict[str, list[float]] = {name: [] for name in CHILDREN}
    done: dict[str, list[float]] = {name: [] for name in CHILDREN}
    baseline_row: list[float] = []
    baseline_done: list[float] = []
    with private_dir("br-") as root, fresh_database() as db:
        agent = Agent(root, agent_config(db))
        agent.env = compiled_env(root, agent.env)  # as deployed: no child compiles at its start
        try:
            agent.start()
            journal = agent.state / "journal.db"
            with Client(str(agent.config_path), timeout=30) as client:
                warm = add_todos(db, 3)
                for todo in warm:
                    started = time.perf_counter()
                    send(client, todo)
                    wait_done(journal, todo, started)
                for index in range(rounds):
                    for name in CHILDREN:
                        if index:  # the first round's children are fresh: a first crash too
                            stable(agent, name, STABLE_AFTER + 0.5)
                        (todo,) = add_todos(db, 1)
                        started = time.perf_counter()
                        send(client, todo)
                        seen, finished = wait_done(journal, todo, started)
                        baseline_row.append(seen)
                        baseline_done.append(finished)

                        old = child_pids(agent)[name]
                        (todo,) = add_todos(db, 1)
                        killed = time.perf_counter()
                        os.kill(old, signal.SIGKILL)
                        send(client, todo)
                        back = wait_until(lambda n=name, o=old: restarted(agent, n, o), 30, 0.001)
                        if not back:
                            raise SystemExit(f"recovery bench: {name} not restarted in 30 s")
                        restart[name].append(time.perf_counter() - killed)
                        seen, finished = wait_done(journal, todo, killed)
                        row[name].append(seen)
                        done[name].append(finished)
        finally:
            agent.cleanup()

    rows = [
        Row(
            "R",
            "no kill: a completion sent, until its row is read back / until done (archived,"
            " cleaned)",
            f"{ms(median(baseline_row))} / {ms(median(baseline_done))}",
            "",
            None,
            "",
            None,
        )
    ]
    for name in CHILDREN:
        worst = max(done[name])
        rows.append(
            Row(
                "R",
                f"kill -9 {name} (x{len(done[name])}): until a completion sent at the kill is done"
                f" (row read back after {ms(median(row[name]))}; new {name} running after"
                f" {ms(median(restart[name]))}; worst {ms(worst)})",
                ms(median(done[name])),
                f"no kill {ms(median(baseline_done))}",
                median(done[name]) / median(baseline_done),
                f"≤ {TARGET:g} s median",
                verdict(median(done[name]), at_most=TARGET),
            )
        )
    return Outcome(rows)


def write_doc(outcome: Outcome, size: str) -> None:
    from bench.common import machine, render_table

    facts = machine()
    block = "\n".join(
        [
            BEGIN,
            "",
            f"Measured {facts['date']} with `.venv/bin/python -m bench.recovery --doc`"
            + (" --size tiny (a smoke run: these numbers mean nothing)" if size == "tiny" else "")
            + f"; {facts['nproc']} CPUs, load average at start {facts['load average at start']}.",
            "",
            render_table(outcome.rows),
            "",
            END,
        ]
    )
    text = DOC.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Recovery after a single kill -9\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> int:
    doc = "--doc" in sys.argv
    if doc:
        sys.argv.remove("--doc")
    args = arguments(__doc__.splitlines()[0])
    outcome = run(args.size)
    if doc:
        write_doc(outcome, args.size)
    return finish(args, "Recovery after kill -9 of a child", outcome)


if __name__ == "__main__":
    sys.exit(main())
