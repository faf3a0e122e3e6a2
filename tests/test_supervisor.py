"""The supervisor's restart policy: a first crash is restarted at once, a crash loop backs off."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from agent.supervisor import (
    RESTART_BACKOFF_MAX,
    STABLE_AFTER,
    Child,
    Supervisor,
    restart_delay,
)
from tests.harness import Agent, wait_for


def test_restart_delay_is_zero_for_a_first_crash_and_doubles_for_a_crash_loop() -> None:
    assert restart_delay(0) == 0.0
    assert [restart_delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert restart_delay(50) == RESTART_BACKOFF_MAX


def _died(child: Child, lived: float, now: float) -> None:
    """Make ``child`` a process that exited after living ``lived`` seconds (a real one)."""
    child.process = subprocess.Popen([sys.executable, "-c", "pass"])
    child.process.wait()
    child.pidfd = None
    child.started_at = now - lived


@pytest.mark.slow
def test_reap_restarts_a_first_crash_at_once_and_backs_off_only_while_it_repeats() -> None:
    supervisor = Supervisor(("writer",), b"{}")
    child = supervisor.children["writer"]
    now = 1000.0
    _died(child, lived=STABLE_AFTER + 5, now=now)
    supervisor.reap(child, now)
    assert child.start_at == now  # at once
    assert supervisor.next_restart() == now
    # It dies again soon after that restart: now it waits, longer each time.
    delays = []
    for _ in range(3):
        now += 1.0
        _died(child, lived=1.0, now=now)
        supervisor.reap(child, now)
        delays.append(child.start_at - now)
    assert delays == [0.5, 1.0, 2.0]
    # After a stable run, a crash is a first crash again.
    now += 100
    _died(child, lived=STABLE_AFTER + 1, now=now)
    supervisor.reap(child, now)
    assert child.start_at == now
    assert child.restarts == 5


@pytest.mark.slow
def test_a_killed_writer_is_back_and_writing_within_a_second_or_so(agent: Agent) -> None:
    warm = agent.add("Before the kill")
    assert agent.ctl("complete", str(warm), "--output", "first").returncode == 0
    agent.wait_states(warm, "cleaned")
    todo = agent.add("Sent at the kill")
    writer = agent.children()["writer"]
    killed = time.monotonic()
    os.kill(writer, signal.SIGKILL)
    assert agent.ctl("complete", str(todo), "--output", "done").returncode == 0
    agent.wait_states(todo, "cleaned")
    # Generous for a loaded machine: a restart with the old backoff took 0.5 s plus the start,
    # and the figure that counts is measured by bench/recovery.py.
    assert time.monotonic() - killed < 8.0
    assert "writer exited with signal SIGKILL; restarting in 0.0 s" in agent.output()
    # A second death soon after the restart is a crash loop: it waits.
    second = agent.children()["writer"]
    assert second != writer
    os.kill(second, signal.SIGKILL)
    wait_for(
        lambda: "restarting in 0.5 s (restart 2)" in agent.output(),
        what="the second restart to back off",
    )
    wait_for(lambda: agent.children().get("writer") not in (None, second), what="a third writer")
