"""Bench 1: what a hook costs.

Wall time of ``completionctl complete`` (and of ``completionctl hook`` with a Stop payload)
against a running agent, versus ``python -c "import zmq, msgspec"`` with the same interpreter:
the floor for any Python ZeroMQ client. The three alternate; the ratio is the median of the
per-round ratios. Also: ``python -X importtime`` of the hot path, which must not import loguru,
PyMySQL or the agent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    paired_ratio,
    private_dir,
    python_env,
    run_timed,
    verdict,
)

TARGET = 1.2
FORBIDDEN = ("loguru", "pymysql", "agent")
BASELINE = [PYTHON, "-c", "import zmq, msgspec"]


def imported(argv: list[str], env: dict[str, str], stdin: Path | None = None) -> list[tuple]:
    """(module, self µs, cumulative µs, depth) for each import, from ``-X importtime``."""
    with stdin.open("rb") if stdin else open("/dev/null", "rb") as source:
        result = subprocess.run(
            [PYTHON, "-X", "importtime", *argv], env=env, stdin=source, capture_output=True
        )
    rows = []
    for line in result.stderr.decode(errors="replace").splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative, name = line[len("import time:") :].split("|")
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((name.strip(), int(self_us), int(cumulative), depth))
    return rows


def forbidden(modules: list[tuple]) -> list[str]:
    return sorted(
        {m[0] for m in modules if any(m[0] == f or m[0].startswith(f + ".") for f in FORBIDDEN)}
    )


def import_table(modules: list[tuple], baseline: set[str]) -> str:
    """The hot path's imports beyond the baseline's, as a tree, with their own import times."""
    extra = [m for m in modules if m[0] not in baseline]
    lines = [
        "```",
        "self µs  module (those `import zmq, msgspec` does not import, in -X importtime's"
        " order: each after the modules it imported)",
    ]
    lines += [f"{self_us:>7}  {'  ' * depth}{name}" for name, self_us, _cum, depth in extra]
    lines.append(f"{sum(m[1] for m in extra):>7}  in all")
    lines.append("```")
    return "\n".join(lines)


def run(size: str) -> Outcome:
    from tests.harness import Agent

    rounds = 3 if size == "tiny" else 40
    with private_dir("bh-") as root:
        agent = Agent(root, {"behavior": {"sweep_interval": 2.0, "health_check_interval": 60}})
        try:
            agent.start()
            todo = agent.add("hook bench")
            env = python_env(root, agent.env)
            ctl = [COMPLETIONCTL] if COMPLETIONCTL else [PYTHON, "-m", "ctl"]
            config = ["--config", str(agent.config_path)]
            complete = [*ctl, *config, "complete", str(todo), "--output", "done"]
            hook = [*ctl, *config, "hook"]
            payload = root / "stop.json"
            payload.write_text(
                json.dumps(
                    {
                        "hook_event_name": "Stop",
                        "session_id": "bench-session",
                        "transcript_path": str(root / "no-transcript.jsonl"),
                        "cwd": str(root),
                        "stop_hook_active": False,
                        "last_assistant_message": "All done: the tests pass.",
                    }
                )
            )
            hook_env = {**env, "TODO_ID": str(todo)}
            samples = alternate(
                {
                    "baseline": lambda: run_timed(BASELINE, env=env),
                    "complete": lambda: run_timed(complete, env=env),
                    "hook": lambda: run_timed(hook, env=hook_env, stdin=payload),
                },
                rounds,
            )
            failed = [
                name for name, runs in samples.items() if any(t.returncode != 0 for t in runs)
            ]
            if failed:
                raise SystemExit(f"hook bench: {failed} exited non-zero; is the agent up?")
            # The same, without a bytecode cache: how this machine's PYTHONDONTWRITEBYTECODE=1
            # would make every hook compile ctl/ and protocol/ from source (stated, not judged).
            raw_env = {**agent.env, "PYTHONDONTWRITEBYTECODE": "1"}
            uncached = alternate(
                {
                    "baseline": lambda: run_timed(BASELINE, env=raw_env),
                    "complete": lambda: run_timed(complete, env=raw_env),
                },
                max(3, rounds // 4),
                warmup=1,
            )
            base_modules = {m[0] for m in imported(["-c", "import zmq, msgspec"], env)}
            complete_modules = imported(complete, env)
            hook_modules = imported(hook, hook_env, payload)
        finally:
            agent.cleanup()

    base = samples["baseline"]
    rows = []
    for name, label in (
        ("complete", "`completionctl complete`"),
        ("hook", "`completionctl hook` (Stop)"),
    ):
        ratio = paired_ratio(samples[name], base)
        cpu = paired_ratio(samples[name], base, "cpu")
        rows.append(
            Row(
                "1",
                f"hook cost: {label}, wall (CPU ratio {cpu:.2f}x)",
                ms(median([t.wall for t in samples[name]])),
                f'`python -c "import zmq, msgspec"` {ms(median([t.wall for t in base]))}',
                ratio,
                f"≤ {TARGET}x",
                verdict(ratio, at_most=TARGET),
            )
        )
    ratio = paired_ratio(uncached["complete"], uncached["baseline"])
    rows.append(
        Row(
            "1",
            "hook cost without a bytecode cache (PYTHONDONTWRITEBYTECODE=1), for information",
            ms(median([t.wall for t in uncached["complete"]])),
            ms(median([t.wall for t in uncached["baseline"]])),
            ratio,
            "—",
            None,
        )
    )
    bad = forbidden(complete_modules) + forbidden(hook_modules)
    rows.append(
        Row(
            "1",
            "hot path imports loguru / PyMySQL / agent",
            ", ".join(bad) or "none",
            "",
            None,
            "none",
            not bad,
        )
    )
    sections = {
        "#### `python -X importtime` of `completionctl complete`": import_table(
            complete_modules, base_modules
        ),
        "#### `python -X importtime` of `completionctl hook` (Stop)": import_table(
            hook_modules, base_modules
        ),
    }
    if bad:
        raise SystemExit(f"the hot path imports {bad}: it must import only protocol and pyzmq")
    return Outcome(rows, sections)


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    return finish(args, "1. Hook cost", run(args.size))


if __name__ == "__main__":
    sys.exit(main())
