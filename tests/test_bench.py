"""The benches still run (each at a tiny size: not timed, only that it works and prints its
table), and the hook's hot path keeps loguru, PyMySQL and the agent out of its imports."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import __main__ as runner
from bench.common import Outcome, Row
from bench.hook import forbidden, imported
from tests.harness import REPO

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
    "abcpu": True,
    "web": False,
}
TABLE_HEAD = "| # | measure | result | baseline (same run) | ratio | target | met |"


@pytest.fixture(scope="module")
def bench_runs(request: pytest.FixtureRequest) -> Iterator[dict[str, subprocess.Popen]]:
    """Every selected bench at its tiny size, all at once (each waits mostly on its own agent);
    ``-k NAME`` starts only that one."""
    selected = {
        item.callspec.params["name"]
        for item in request.session.items
        if hasattr(item, "callspec") and "name" in item.callspec.params
    }
    mysql = True
    try:
        request.getfixturevalue("mysql_server")
    except pytest.skip.Exception:
        mysql = False
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"bench.{name}", "--size", "tiny"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, needs_mysql in BENCHES.items()
        if (mysql or not needs_mysql) and name in selected
    }
    yield runs
    for proc in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[pytest.mark.mysql] if needs_mysql else [])
        for name, needs_mysql in BENCHES.items()
    ],
)
def test_bench_runs_at_tiny_size_and_prints_its_table(
    name: str, bench_runs: dict[str, subprocess.Popen]
) -> None:
    if name not in bench_runs:
        pytest.skip("MariaDB does not answer on 127.0.0.1:3306")
    # The hook bench builds the production layout (a venv) first; all run at once on 2 cores.
    stdout, stderr = bench_runs[name].communicate(timeout=280)
    assert bench_runs[name].returncode == 0, stderr[-2000:]
    assert TABLE_HEAD in stdout
    assert len([line for line in stdout.splitlines() if line.startswith("| ")]) >= 2


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
