"""The parent's children: start each in a fresh interpreter, restart one that dies, stop in order.

A child is ``python -m agent.child NAME`` with the resolved config on its stdin (never on its
command line: the database URL may hold a password).  Its exit is seen through a pidfd in the
parent's poller, so a death is noticed at once, not on a timer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from loguru import logger

RESTART_BACKOFF_FIRST = 0.5  # the delay before the second restart in a row
RESTART_BACKOFF_MAX = 10.0
STABLE_AFTER = 10.0  # a child that ran this long starts its backoff from scratch


@dataclass
class Child:
    name: str
    process: subprocess.Popen | None = None
    pidfd: int | None = None
    started_at: float = 0.0
    restarts: int = 0
    failures_in_a_row: int = 0
    start_at: float = 0.0  # when it may be (re)started
    exits: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(self, names: tuple[str, ...], config_json: bytes) -> None:
        self.children = {name: Child(name) for name in names}
        self._config_json = config_json

    def start(self, child: Child, now: float) -> None:
        env = dict(os.environ)
        # The child inherits a blocked SIGHUP until its handlers are installed (agent.child):
        # a log rotation during its start-up must not kill it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "agent.child", child.name, str(os.getpid())],
                stdin=subprocess.PIPE,
                close_fds=True,
                env=env,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        assert process.stdin is not None
        try:
            process.stdin.write(self._config_json)
            process.stdin.close()
        except BrokenPipeError:
            pass
        child.process = process
        child.pidfd = os.pidfd_open(process.pid)
        child.started_at = now
        logger.info("started {} (pid {})", child.name, process.pid)

    def start_all(self, now: float) -> None:
        for child in self.children.values():
            self.start(child, now)

    def reap(self, child: Child, now: float) -> None:
        """The child exited: note it and schedule its restart.

        A first crash is restarted at once, as supervisord does: every moment the child is away
        is a moment of lost service. Only a child that keeps dying within ``STABLE_AFTER`` of its
        start waits, 0.5 s doubling up to ``RESTART_BACKOFF_MAX``, so that a crash loop does not
        burn the CPU.
        """
        assert child.process is not None
        code = child.process.wait()
        if child.pidfd is not None:
            os.close(child.pidfd)
        child.pidfd = None
        child.process = None
        child.exits.append(code)
        if now - child.started_at >= STABLE_AFTER:
            child.failures_in_a_row = 0
        delay = restart_delay(child.failures_in_a_row)
        child.failures_in_a_row += 1
        child.restarts += 1
        child.start_at = now + delay
        logger.warning(
            "{} exited with {}; restarting in {:.1f} s (restart {})",
            child.name,
            _describe(code),
            delay,
            child.restarts,
        )

    def restart_due(self, now: float) -> list[Child]:
        started = []
        for child in self.children.values():
            if child.process is None and now >= child.start_at:
                self.start(child, now)
                started.append(child)
        return started

    def next_restart(self) -> float | None:
        due = [c.start_at for c in self.children.values() if c.process is None]
        return min(due) if due else None

    def stop_all(self, order: tuple[str, ...], budget: float) -> None:
        """SIGTERM each child in order and wait for it; SIGKILL what outlives the budget."""
        deadline = time.monotonic() + budget
        for name in order:
            child = self.children[name]
            if child.process is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
            share = max((deadline - time.monotonic()) / 2, 0.5)
            try:
                child.process.wait(timeout=share)
            except subprocess.TimeoutExpired:
                logger.warning("{} did not stop in {:.1f} s; killing it", name, share)
                child.process.kill()
                child.process.wait()
            if child.pidfd is not None:
                os.close(child.pidfd)
                child.pidfd = None
            logger.info("{} stopped", name)
            child.process = None

    def signal_all(self, signum: int) -> None:
        for child in self.children.values():
            if child.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signum)


def restart_delay(failures_in_a_row: int) -> float:
    """Seconds before restarting a child that died after ``failures_in_a_row`` quick deaths."""
    if failures_in_a_row == 0:
        return 0.0
    return min(RESTART_BACKOFF_FIRST * 2.0 ** (failures_in_a_row - 1), RESTART_BACKOFF_MAX)


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"
