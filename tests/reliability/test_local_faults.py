"""Local faults: the journal's disk full under a stream of completions (no false ack; recovery
when space returns), and a state dir that cannot be written (a clear error at start, exit 1)."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Agent, render_toml, wait_for
from tests.reliability.ledger import Ledger, Observer, budget, scaled, wait_recovered
from tests.reliability.nobody import run_as_nobody
from tests.reliability.scenario import all_up, run_scenario

pytestmark = [pytest.mark.reliability]


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A small filesystem of its own at `path` (needs root, as on CI)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full, to the last block."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


@pytest.mark.mysql
@pytest.mark.slow
@pytest.mark.timeout(budget(300))
def test_journal_disk_full(mysql_agent, mysql_url, tmpdir_short: Path) -> None:
    hold = 3.0
    figures: dict[str, int] = {}
    with tmpfs(tmpdir_short / "small", "size=8m,mode=0700") as small:
        config = {"state_dir": str(small / "state")}

        def inject(agent: Agent, ledger: Ledger, observer: Observer, rng: random.Random) -> None:
            for _ in range(scaled(1)):
                time.sleep(rng.uniform(0.2, 1.0))
                parent = agent.proc.pid if agent.proc else None
                fault = ledger.fault(f"state dir full {hold:.0f} s")
                filler = fill(small)
                full_at = time.monotonic()
                wait_for(lambda at=full_at: time.monotonic() - at >= hold, hold + 5, what="hold")
                tried = [s for s in ledger.sent.values() if s.sent_at >= full_at]
                figures["tried"] = figures.get("tried", 0) + len(tried)
                figures["refused"] = figures.get("refused", 0) + sum(
                    1 for s in tried if s.state is None
                )
                # Intake survives: the same completiond answers, it only refuses to ack.
                assert agent.proc is not None and agent.proc.poll() is None, agent.output()[-3000:]
                assert agent.proc.pid == parent
                filler.unlink()
                fault.ended = time.monotonic()
                wait_recovered(ledger, observer, fault, ready=all_up(agent))
                # The children waited for space instead of crashing into restarts.
                restarts = (agent.status_json() or {}).get("restarts")
                assert restarts and not any(restarts.values()), restarts

        run_scenario(
            "journal disk full -> space returns",
            mysql_agent,
            mysql_url,
            config,
            scaled(2000),
            inject,
            note="state dir on an 8 MiB tmpfs filled to ENOSPC; unacked requests fail loudly",
        )
    assert figures["tried"] > 0
    assert figures["refused"] > 0, "nothing was refused while the disk was full"


def _run_completiond(agent: Agent, state_dir: Path) -> subprocess.CompletedProcess:
    config = dict(agent.config)
    config["state_dir"] = str(state_dir)
    agent.config_path.write_text(render_toml(config))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(agent.config_path)],
        env=agent.env,
        capture_output=True,
        timeout=30,
    )
    assert time.monotonic() - started < 10
    return result


def _assert_clear_refusal(result: subprocess.CompletedProcess, state_dir: Path, why: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, err)
    assert f"state dir {state_dir}" in err, err
    assert why in err, err
    assert "Traceback" not in err, err


def test_state_dir_under_a_file_is_a_clear_error(make_agent, tmpdir_short: Path) -> None:
    agent = make_agent()
    (tmpdir_short / "plain-file").write_text("x")
    state = tmpdir_short / "plain-file" / "state"
    _assert_clear_refusal(_run_completiond(agent, state), state, "Not a directory")


def test_state_dir_on_read_only_filesystem_is_a_clear_error(make_agent, tmpdir_short) -> None:
    agent = make_agent()
    with tmpfs(tmpdir_short / "ro", "size=1m,mode=0755") as mount:
        (mount / "state").mkdir(mode=0o700)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        for state in (mount / "state", mount / "missing"):
            _assert_clear_refusal(_run_completiond(agent, state), state, "Read-only file system")
        assert not (mount / "missing").exists()


def test_state_dir_not_writable_by_the_user_is_a_clear_error(make_agent, tmpdir_short) -> None:
    """completiond run as nobody, on a state dir that belongs to root (mode 0755)."""
    agent = make_agent()
    state = tmpdir_short / "rootowned"
    state.mkdir(mode=0o755)
    config = dict(agent.config)
    config["state_dir"] = str(state)
    config_path = tmpdir_short / "nobody.toml"
    config_path.write_text(render_toml(config))
    config_path.chmod(0o644)
    tmpdir_short.chmod(0o755)
    started = time.monotonic()
    result = run_as_nobody(["-m", "agent", "--config", str(config_path)])
    assert time.monotonic() - started < 10
    _assert_clear_refusal(result, state, "not usable")
    assert not (state / "journal.db").exists()
