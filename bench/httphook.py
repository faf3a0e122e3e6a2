"""Bench 7: what a heartbeat costs Claude Code: an HTTP hook versus ``completionctl hook``.

One PostToolUse heartbeat three ways, alternating, against one running agent: a POST to the
agent's HTTP hook endpoint (``hook.http_listen``; what Claude Code does for a ``"type": "http"``
hook, timed from the request to the empty 200), ``completionctl hook`` with the same payload on
stdin (a command hook: a Python process per event), and ``python -S -c pass`` (the floor of any
command hook written in Python). The ratios are medians of the per-round ratios of one run.
"""

from __future__ import annotations

import http.client
import json
import sys
import time

from bench.common import (
    COMPLETIONCTL,
    PYTHON,
    Outcome,
    Row,
    Timed,
    alternate,
    arguments,
    finish,
    free_port,
    median,
    ms,
    paired_ratio,
    private_dir,
    python_env,
    run_timed,
    verdict,
)

BASELINE = [PYTHON, "-S", "-c", "pass"]


def _post(port: int, body: bytes, token: str) -> Timed:
    """One HTTP hook request on a fresh connection, as Claude Code sends it."""
    started = time.perf_counter()
    cpu = time.process_time()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST",
            "/hook",
            body=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        response = conn.getresponse()
        response.read()
        status = response.status
    finally:
        conn.close()
    wall = time.perf_counter() - started
    return Timed(wall, time.process_time() - cpu, 0 if status == 200 else status)


def run(size: str) -> Outcome:
    from tests.harness import Agent

    rounds = 3 if size == "tiny" else 40
    with private_dir("bw-") as root:
        port = free_port()
        agent = Agent(
            root,
            {
                "behavior": {"sweep_interval": 2.0, "health_check_interval": 60},
                "hook": {"http_listen": f"127.0.0.1:{port}"},
            },
        )
        try:
            agent.start()
            todo = agent.add("heartbeat bench")
            env = python_env(root, agent.env)
            ctl = [COMPLETIONCTL] if COMPLETIONCTL else [PYTHON, "-m", "ctl"]
            token = agent.ctl("hook-token").stdout.decode().strip()
            session = "bench-heartbeats"
            start = {
                "hook_event_name": "SessionStart",
                "session_id": session,
                "source": "startup",
                "transcript_path": str(root / "none.jsonl"),
                "cwd": str(root),
            }
            started = agent.ctl("hook", input=json.dumps(start), env={"TODO_ID": str(todo)})
            if started.returncode != 0:
                raise SystemExit("heartbeat bench: the SessionStart hook failed")
            event = {
                "hook_event_name": "PostToolUse",
                "session_id": session,
                "transcript_path": str(root / "none.jsonl"),
                "cwd": str(root),
                "permission_mode": "default",
                "tool_name": "Bash",
                "tool_input": {"command": "pytest -q"},
                "tool_response": {"stdout": "12 passed", "exit_code": 0},
                "tool_use_id": "toolu_bench",
            }
            body = json.dumps(event).encode()
            payload = root / "post-tool-use.json"
            payload.write_bytes(body)
            hook = [*ctl, "--config", str(agent.config_path), "hook"]
            samples = alternate(
                {
                    "baseline": lambda: run_timed(BASELINE, env=env),
                    "hook": lambda: run_timed(hook, env=env, stdin=payload),
                    "http": lambda: _post(port, body, token),
                },
                rounds,
            )
            failed = [
                name for name, runs in samples.items() if any(t.returncode != 0 for t in runs)
            ]
            if failed:
                raise SystemExit(f"heartbeat bench: {failed} failed; is the agent up?")
        finally:
            agent.cleanup()

    base, hook_runs, http_runs = samples["baseline"], samples["hook"], samples["http"]
    base_ms = f"`python -S -c pass` {ms(median([t.wall for t in base]))}"
    http_vs_base = paired_ratio(http_runs, base)
    hook_vs_base = paired_ratio(hook_runs, base)
    http_vs_hook = paired_ratio(http_runs, hook_runs)
    rows = [
        Row(
            "7",
            "heartbeat: HTTP hook round trip (POST → empty 200, journaled)",
            ms(median([t.wall for t in http_runs])),
            base_ms,
            http_vs_base,
            "< 1x",
            verdict(http_vs_base, at_most=1.0),
        ),
        Row(
            "7",
            "heartbeat: `completionctl hook` (PostToolUse), a process per event",
            ms(median([t.wall for t in hook_runs])),
            base_ms,
            hook_vs_base,
            "—",
            None,
        ),
        Row(
            "7",
            "heartbeat: HTTP hook versus `completionctl hook`",
            ms(median([t.wall for t in http_runs])),
            f"`completionctl hook` {ms(median([t.wall for t in hook_runs]))}",
            http_vs_hook,
            "< 1x",
            verdict(http_vs_hook, at_most=1.0),
        ),
    ]
    return Outcome(rows, {})


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    return finish(args, "7. Heartbeat cost: HTTP hook vs command hook", run(args.size))


if __name__ == "__main__":
    sys.exit(main())
