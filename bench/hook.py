"""Bench 1: what a hook costs.

Wall time of ``completionctl hook`` (a Stop payload, which completes, and a PostToolUse payload,
the heartbeat every tool call sends) and of ``completionctl complete`` against a running agent,
versus ``python -c "import zmq"`` with the same interpreter: the floor for any Python ZeroMQ
client. The one-shot clients send over the agent's stream socket (agent.streamdoor), so they
import no pyzmq at all. They alternate; a ratio is the median of the per-round ratios.

Measured in the production layout the README gives (``pip install .``: the project from its
wheel, the runtime dependencies only, bytecode compiled), built offline into the bench's private
directory; the development venv (editable install, test extra) is stated beside it. Also:
``python -X importtime`` of the hot path, which must not import loguru, PyMySQL or the agent,
nor pyzmq, tomllib (the config comes from its cached copy) or typing_extensions.
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
    Timed,
    alternate,
    arguments,
    deployed_env,
    deployed_python,
    finish,
    median,
    ms,
    paired_ratio,
    private_dir,
    python_env,
    run_timed,
    verdict,
)

TARGET = 1.0
FORBIDDEN = ("loguru", "pymysql", "agent", "zmq")
NOT_ON_THE_HOT_PATH = ("tomllib", "typing_extensions")
BASELINE_CODE = "import zmq"


def imported(
    argv: list[str], env: dict[str, str], stdin: Path | None = None, python: str = PYTHON
) -> list[tuple]:
    """(module, self µs, cumulative µs, depth) for each import, from ``-X importtime``."""
    with stdin.open("rb") if stdin else open("/dev/null", "rb") as source:
        result = subprocess.run(
            [python, "-X", "importtime", *argv], env=env, stdin=source, capture_output=True
        )
    rows = []
    for line in result.stderr.decode(errors="replace").splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative, name = line[len("import time:") :].split("|")
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((name.strip(), int(self_us), int(cumulative), depth))
    return rows


def importable(python: str, env: dict[str, str], names: set[str]) -> set[str]:
    """Those of ``names`` that the interpreter can find (without importing them)."""
    probe = (
        "import importlib.util, json, sys\n"
        "found = []\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        if importlib.util.find_spec(name) is not None: found.append(name)\n"
        "    except (ImportError, ValueError): pass\n"
        "print(json.dumps(found))\n"
    )
    result = subprocess.run(
        [python, "-c", probe, json.dumps(sorted(names))],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(result.stdout))


def forbidden(modules: list[tuple], names: tuple[str, ...] = FORBIDDEN) -> list[str]:
    return sorted(
        {m[0] for m in modules if any(m[0] == f or m[0].startswith(f + ".") for f in names)}
    )


def import_table(modules: list[tuple], baseline: set[str]) -> str:
    """The hot path's imports beyond a bare interpreter's, as a tree, with their own times."""
    extra = [m for m in modules if m[0] not in baseline]
    lines = [
        "```",
        "self µs  module (those `python -c pass` does not import, in -X importtime's"
        " order: each after the modules it imported)",
    ]
    lines += [f"{self_us:>7}  {'  ' * depth}{name}" for name, self_us, _cum, depth in extra]
    lines.append(f"{sum(m[1] for m in extra):>7}  in all")
    lines.append("```")
    return "\n".join(lines)


def payload(root: Path, event: str) -> Path:
    path = root / f"{event}.json"
    body: dict[str, object] = {
        "hook_event_name": event,
        "session_id": "bench-session",
        "transcript_path": str(root / "no-transcript.jsonl"),
        "cwd": str(root),
    }
    if event == "Stop":
        body |= {"stop_hook_active": False, "last_assistant_message": "All done: tests pass."}
    else:
        body |= {"tool_name": "Bash", "tool_input": {"command": "ls"}, "tool_response": "ok"}
    path.write_text(json.dumps(body))
    return path


def run(size: str) -> Outcome:
    from tests.harness import Agent

    rounds = 3 if size == "tiny" else 40
    with private_dir("bh-") as root:
        python = str(deployed_python(root))
        ctl_deployed = [str(Path(python).parent / "completionctl")]
        agent = Agent(root, {"behavior": {"sweep_interval": 2.0, "health_check_interval": 60}})
        try:
            agent.start()
            todo = agent.add("hook bench")
            env = deployed_env(agent.env)
            dev_env = python_env(root, agent.env)
            config = ["--config", str(agent.config_path)]
            stop, tool = payload(root, "Stop"), payload(root, "PostToolUse")
            hook_env = {**env, "TODO_ID": str(todo)}
            dev_ctl = [COMPLETIONCTL] if COMPLETIONCTL else [PYTHON, "-m", "ctl"]

            def hook(ctl: list[str], which: Path, environ: dict[str, str]) -> Timed:
                return run_timed([*ctl, *config, "hook"], env=environ, stdin=which)

            complete = [*ctl_deployed, *config, "complete", str(todo), "--output", "done"]
            samples = alternate(
                {
                    "baseline": lambda: run_timed([python, "-c", BASELINE_CODE], env=env),
                    "hook-stop": lambda: hook(ctl_deployed, stop, hook_env),
                    "hook-tool": lambda: hook(ctl_deployed, tool, hook_env),
                    "complete": lambda: run_timed(complete, env=env),
                },
                rounds,
            )
            dev_hook_env = {**dev_env, "TODO_ID": str(todo)}
            dev = alternate(
                {
                    "baseline": lambda: run_timed([PYTHON, "-c", BASELINE_CODE], env=dev_env),
                    "hook-tool": lambda: hook(dev_ctl, tool, dev_hook_env),
                },
                max(3, rounds // 4),
                warmup=1,
            )
            failed = [
                name
                for name, runs in (samples | {f"dev {k}": v for k, v in dev.items()}).items()
                if any(t.returncode != 0 for t in runs)
            ]
            if failed:
                raise SystemExit(f"hook bench: {failed} exited non-zero; is the agent up?")
            base_modules = {m[0] for m in imported(["-c", "pass"], env, python=python)}
            # The scripts run as ``python -X importtime SCRIPT ...``.
            hook_modules = imported([*ctl_deployed, *config, "hook"], hook_env, tool, python)
            complete_modules = imported(complete, env, None, python)
            dev_script = dev_ctl if len(dev_ctl) == 1 else dev_ctl[1:]
            dev_modules = imported([*dev_script, *config, "hook"], dev_hook_env, tool)
            deployed_has = importable(python, env, {m[0] for m in hook_modules})
        finally:
            agent.cleanup()

    base = samples["baseline"]
    baseline_text = f'`python -c "{BASELINE_CODE}"` {ms(median([t.wall for t in base]))}'
    rows = []
    for name, label, judged in (
        ("hook-tool", "`completionctl hook` (PostToolUse: a heartbeat, every tool call)", True),
        ("hook-stop", "`completionctl hook` (Stop: a completion)", True),
        ("complete", "`completionctl complete`", False),
    ):
        ratio = paired_ratio(samples[name], base)
        cpu = paired_ratio(samples[name], base, "cpu")
        rows.append(
            Row(
                "1",
                f"hook cost, deployed (`pip install .`): {label}, wall (CPU ratio {cpu:.2f}x)",
                ms(median([t.wall for t in samples[name]])),
                baseline_text,
                ratio,
                f"≤ {TARGET:g}x" if judged else "—",
                verdict(ratio, at_most=TARGET) if judged else None,
            )
        )
    rows.append(
        Row(
            "1",
            "the same PostToolUse hook in the development venv (editable install's finder, test"
            " extra), for information",
            ms(median([t.wall for t in dev["hook-tool"]])),
            f"its own baseline {ms(median([t.wall for t in dev['baseline']]))}",
            paired_ratio(dev["hook-tool"], dev["baseline"]),
            "—",
            None,
        )
    )
    bad = forbidden(complete_modules) + forbidden(hook_modules)
    rows.append(
        Row(
            "1",
            "hot path imports loguru / PyMySQL / agent / pyzmq",
            ", ".join(bad) or "none",
            "",
            None,
            "none",
            not bad,
        )
    )
    # -X importtime lists failed attempts too (msgspec tries typing_extensions): a module counts
    # where it can be imported at all.
    heavy = [m for m in forbidden(hook_modules, NOT_ON_THE_HOT_PATH) if m in deployed_has]
    dev_heavy = forbidden(dev_modules, NOT_ON_THE_HOT_PATH)
    rows.append(
        Row(
            "1",
            "deployed hook imports tomllib / typing_extensions (the development venv's: "
            f"{', '.join(dev_heavy) or 'none'})",
            ", ".join(heavy) or "none",
            "",
            None,
            "none",
            not heavy,
        )
    )
    sections = {
        "#### `python -X importtime` of the deployed `completionctl hook` (PostToolUse)": (
            import_table(hook_modules, base_modules)
        ),
        "#### `python -X importtime` of the deployed `completionctl complete`": import_table(
            complete_modules, base_modules
        ),
    }
    if bad:
        raise SystemExit(f"the hot path imports {bad}: it must import only protocol")
    return Outcome(rows, sections)


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    return finish(args, "1. Hook cost", run(args.size))


if __name__ == "__main__":
    sys.exit(main())
