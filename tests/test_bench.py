"""The benches still run (each at a tiny size: not timed, only that it works, prints its rows and
leaves nothing running), and the hook's hot path keeps loguru, PyMySQL and the agent out of its
imports."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from bench import __main__ as runner
from bench.common import Outcome, Row
from bench.hook import forbidden, imported
from tests.harness import REPO, wait_for

BENCHES = {  # name: needs MariaDB
    "hook": False,
    "httphook": False,
    "report": False,
    "throughput": True,
    "drain": True,
    "idle": True,
    "health": True,
    "recovery": True,
    "peers": True,
    "endtoend": True,
    "abcpu": True,
    "web": False,
}
# Rows a bench must print, by what their measure says (the modes and targets of issue 20).
ROWS = {
    "peers": (
        "agent: `completionctl hook` (Stop) as a process: hook wall",
        "agent: the Stop event POSTed to the HTTP hook",
        "hook start → row visible: agent HTTP hook",
        "POSTed to the HTTP hook (4 kept-alive connections)",
        "from a loop (4 threads): agent, against huey's enqueue loop",
    ),
    "endtoend": (
        "end to end at idle, SQLite (the embedded default): `Client.complete` → row visible",
        "end to end at idle, MariaDB: `Client.complete` → row visible",
        "the floor, SQLite (the embedded default)",
        "the floor, MariaDB",
    ),
}
TABLE_HEAD = "| # | measure | result | baseline (same run) | ratio | target | met |"


# Every process a bench starts inherits its environment: a mark there finds what a bench left
# running (an agent is started in a session of its own, so nothing else stops it).
RUN_MARK = "COMPLETION_TEST_BENCH_RUN"


@dataclass
class BenchRun:
    proc: subprocess.Popen
    mark: str


def start_bench(name: str) -> BenchRun:
    mark = f"{name}-{secrets.token_hex(6)}"
    proc = subprocess.Popen(
        [sys.executable, "-m", f"bench.{name}", "--size", "tiny"],
        cwd=REPO,
        env={**os.environ, RUN_MARK: mark},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return BenchRun(proc, mark)


def left_running(mark: str, *, agents_only: bool = False) -> list[str]:
    """The command lines of the processes that carry this mark and still run."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(RUN_MARK) != mark:
                continue
            command = proc.info["cmdline"] or []
            if not agents_only or command[1:3] == ["-m", "agent"]:
                found.append(" ".join(command))
    return found


def stop(run: BenchRun) -> None:
    """A bench still running gets SIGTERM, which it turns into its own cleanup; only one that
    ignores that for a minute is killed."""
    if run.proc.poll() is not None:
        return
    run.proc.send_signal(signal.SIGTERM)
    try:
        run.proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.communicate()


@pytest.fixture(scope="module")
def bench_runs(request: pytest.FixtureRequest) -> Iterator[dict[str, BenchRun]]:
    """The benches by name, started at their tiny size. In a plain run every selected bench
    starts here at once (each waits mostly on its own agent; ``-k NAME`` starts only that one).
    Under pytest-xdist a worker cannot know which of the tests it will get (and xdist_group does
    not keep them together under pytest 9), so there each test starts its own bench: set up on
    both workers, the fixture ran every bench twice. Whatever still runs at the end is stopped."""
    selected = {
        item.callspec.params["name"]
        for item in request.session.items
        if hasattr(item, "callspec") and "name" in item.callspec.params
    }
    runs: dict[str, BenchRun] = {}
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        mysql = True
        try:
            request.getfixturevalue("mysql_server")
        except pytest.skip.Exception:
            mysql = False
        runs = {
            name: start_bench(name)
            for name, needs_mysql in BENCHES.items()
            if (mysql or not needs_mysql) and name in selected
        }
    yield runs
    for run in runs.values():
        stop(run)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[pytest.mark.mysql] if needs_mysql else [])
        for name, needs_mysql in BENCHES.items()
    ],
)
def test_bench_runs_at_tiny_size_prints_its_rows_and_leaves_nothing_running(
    name: str, bench_runs: dict[str, BenchRun], request: pytest.FixtureRequest
) -> None:
    if BENCHES[name]:
        request.getfixturevalue("mysql_server")  # skips, or fails on CI, without MariaDB
    run = bench_runs.get(name) or bench_runs.setdefault(name, start_bench(name))
    # The hook and peers benches build the production layout (a venv) first; on 2 cores.
    stdout, stderr = run.proc.communicate(timeout=280)
    assert run.proc.returncode == 0, stderr[-2000:]
    wait_for(lambda: not left_running(run.mark), 30, what=f"bench.{name}'s processes to end")
    assert TABLE_HEAD in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert len(rows) >= 2
    for measure in ROWS.get(name, ()):
        assert any(measure in row for row in rows), f"no row says {measure!r}:\n{stdout}"


def test_a_bench_stopped_by_sigterm_stops_the_agent_it_started() -> None:
    run = start_bench("httphook")  # needs no MariaDB
    try:
        wait_for(lambda: left_running(run.mark, agents_only=True), 120, what="its agent to start")
        run.proc.send_signal(signal.SIGTERM)
        run.proc.communicate(timeout=60)
        assert run.proc.returncode == 128 + signal.SIGTERM
        wait_for(lambda: not left_running(run.mark), 30, what="the bench's processes to end")
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


def test_runner_gathers_the_rows_into_one_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--size", "tiny", "--only", "report", "--no-write"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert TABLE_HEAD in result.stdout
    assert "| nproc |" in result.stdout


def test_runner_rewrites_only_the_results_between_its_markers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(f"# Performance\n\nprose before\n\n{runner.BEGIN}\nold\n{runner.END}\n\nafter\n")
    monkeypatch.setattr(runner, "DOC", doc)
    outcome = Outcome([Row("6", "a measure", "1 ms", "2 ms", 0.5, "≤ 1x", True)])
    runner.write_doc(runner.results_block({"report": outcome}, "tiny", 1.0))
    text = doc.read_text()
    assert "prose before" in text and text.rstrip().endswith("after")
    assert "old" not in text
    assert "| 6 | a measure | 1 ms | 2 ms | 0.50x | ≤ 1x | yes |" in text


@pytest.fixture
def unreachable_config(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A config whose agent is not running: the hot path queues into the outbox and exits."""
    config = tmp_path / "config.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TODO_ID": "7"}
    return config, env


def test_completionctl_complete_imports_no_loguru_pymysql_or_agent(
    unreachable_config: tuple[Path, dict[str, str]],
) -> None:
    config, env = unreachable_config
    modules = imported(["-m", "ctl", "--config", str(config), "complete", "7"], env)
    assert any(m[0] == "ctl" for m in modules)  # the import log was read
    assert forbidden(modules) == []


def test_completionctl_hook_imports_no_loguru_pymysql_or_agent(
    unreachable_config: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    config, env = unreachable_config
    payload = tmp_path / "stop.json"
    payload.write_text(json.dumps({"hook_event_name": "Stop", "last_assistant_message": "done"}))
    modules = imported(["-m", "ctl", "--config", str(config), "hook"], env, payload)
    assert any(m[0] == "ctl.hook" for m in modules)
    assert forbidden(modules) == []
    # The TOML was parsed once; from now on its cached copy serves, without the TOML parser.
    assert "tomllib" in forbidden(modules, ("tomllib",))
    again = imported(["-m", "ctl", "--config", str(config), "hook"], env, payload)
    assert any(m[0] == "ctl.hook" for m in again)
    assert forbidden(again, ("tomllib",)) == []
