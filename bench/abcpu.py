"""A/B: the agent's CPU per completion, this tree against an older commit, in one run.

    .venv/bin/python -m bench.abcpu                  # against e828304, the tree before issue 20
    .venv/bin/python -m bench.abcpu COMMIT --size tiny

Both agents run from this venv against MariaDB (the older one from ``git archive`` of the commit,
put first on its PYTHONPATH), each with compiled bytecode; 4 ``ctl.Client`` threads send the
same 4 KB Markdown answers (bench.db.markdown_answer) until every completion is verified. The
rounds alternate; the figure is the median per process over the rounds.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
from pathlib import Path

from bench.common import (
    REPO,
    CpuMeter,
    Outcome,
    Row,
    compiled_env,
    database_server_process,
    exit_on_sigterm,
    finish,
    median,
    private_dir,
    verdict,
)
from bench.db import add_todos, fresh_database, server_answers
from bench.throughput import agent_config, wait_verified

CLIENTS = 4
BEFORE = "e828304"  # main before issue 20 (its renderer, markdown-it-py, is in the test extra)


def unpack(commit: str, into: Path) -> Path:
    data = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "agent", "ctl", "protocol"],
        check=True,
        capture_output=True,
    ).stdout
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def old_config(agent) -> None:
    """The harness's config without the keys the older tree does not know (it refuses them)."""
    from tests.harness import render_toml

    agent.config.get("hook", {}).pop("http_listen", None)
    if not agent.config.get("hook", True):
        agent.config.pop("hook")
    agent.config_path.write_text(render_toml(agent.config))


def agent_processes(agent) -> dict[str, object]:
    """The parent and its three children by role (not a tool a child runs for a moment)."""
    named: dict[str, object] = {}
    for proc in agent.family():
        command = proc.cmdline()
        if "agent.child" in command:
            named[f"agent {command[command.index('agent.child') + 1]}"] = proc
        elif command[1:3] == ["-m", "agent"]:
            named["agent parent"] = proc
    return named


SEND = """
import json, sys
from bench.db import markdown_answer
from bench.throughput import send_all
ids = json.loads(sys.argv[2])
send_all(sys.argv[1], {todo: markdown_answer(todo) for todo in ids}, int(sys.argv[3]))
"""


def send_from(tree: Path, config: Path, ids: list[int]) -> None:
    """Send with the client of the agent's own tree (the wire protocol may have moved on)."""
    import json
    import os

    env = {**os.environ, "PYTHONPATH": f"{tree}:{REPO}"}
    subprocess.run(
        [sys.executable, "-c", SEND, str(config), json.dumps(ids), str(CLIENTS)],
        env=env,
        cwd=tree,  # python -c puts its cwd first on the path: the tree's ctl must win
        check=True,
    )


def one_round(agent, db, count: int, tree: Path) -> dict[str, float]:
    ids = add_todos(db, count)
    named = agent_processes(agent)
    server = database_server_process()
    if server is not None:
        named["MariaDB server"] = server
    meter = CpuMeter(named)
    meter.start()
    send_from(tree, agent.config_path, ids)
    wait_verified(agent.state / "journal.db", ids)
    return {name: seconds / count for name, seconds in meter.stop().items()}


def run(commit: str, size: str) -> Outcome:
    from tests.harness import Agent

    if not server_answers():
        raise SystemExit("abcpu: MariaDB does not answer on 127.0.0.1:3306")
    count, rounds = (20, 1) if size == "tiny" else (500, 3)
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with private_dir("bab-") as root:
        old = unpack(commit, root / "old")
        agents = {}
        with fresh_database() as db_before, fresh_database() as db_after:
            dbs = {"before": db_before, "after": db_after}
            try:
                for side, tree in (("before", old), ("after", REPO)):
                    (root / side).mkdir()
                    agent = Agent(root / side, agent_config(dbs[side]))
                    if side == "before":
                        old_config(agent)
                    agent.env["PYTHONPATH"] = str(tree)
                    agent.env = compiled_env(root / side, agent.env)
                    agents[side] = agent.start()
                    one_round(agent, dbs[side], min(count, 50), tree)  # warm-up
                for index in range(rounds):
                    order = ["before", "after"] if index % 2 == 0 else ["after", "before"]
                    for side in order:
                        tree = old if side == "before" else REPO
                        results[side].append(one_round(agents[side], dbs[side], count, tree))
            except BaseException:
                for side, agent in agents.items():
                    print(f"--- {side} agent's output\n{agent.output()[-4000:]}", file=sys.stderr)
                raise
            finally:
                for agent in agents.values():
                    agent.cleanup()

    def per_process(side: str) -> dict[str, float]:
        names = results[side][0].keys()
        return {name: median([r.get(name, 0.0) for r in results[side]]) for name in names}

    before, after = per_process("before"), per_process("after")
    rows = []
    for name in before:
        rows.append(
            Row(
                "A",
                f"{name}: CPU per completion ({count} x 4 KB Markdown, {CLIENTS} clients)",
                f"{after.get(name, 0.0) * 1000:.2f} ms",
                f"{commit} {before[name] * 1000:.2f} ms",
                after.get(name, 0.0) / before[name] if before[name] else None,
            )
        )
    agent_before = sum(v for k, v in before.items() if k.startswith("agent "))
    agent_after = sum(v for k, v in after.items() if k.startswith("agent "))
    rows.append(
        Row(
            "A",
            "the agent's processes together: CPU per completion",
            f"{agent_after * 1000:.2f} ms",
            f"{commit} {agent_before * 1000:.2f} ms",
            agent_after / agent_before,
            "≤ 0.5x",
            verdict(agent_after / agent_before, at_most=0.5),
        )
    )
    return Outcome(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", nargs="?", default=BEFORE)
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    exit_on_sigterm()
    return finish(args, f"A/B against {args.commit}", run(args.commit, args.size))


if __name__ == "__main__":
    sys.exit(main())
