"""Entry point of a child process: ``python -m agent.child NAME PARENT_PID``, config on stdin.

The child builds its own ZeroMQ context, journal, database connection and log sink after it
starts, and exits when its parent dies (PR_SET_PDEATHSIG, and a check of getppid as a backstop).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import msgspec
from loguru import logger

from protocol.config import Config

from .logs import LogSinks
from .loop import Signals, serve

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(0)


def build(name: str, config: Config, parent_pid: int):
    if name == "collector":
        from .collector import Collector

        return Collector(config, parent_pid=parent_pid)
    if name == "writer":
        from .writer import Writer

        return Writer(config, parent_pid=parent_pid)
    if name == "monitor":
        from .monitor import Monitor

        return Monitor(config, parent_pid=parent_pid)
    if name == "web":
        from .web import Web

        return Web(config, parent_pid=parent_pid)
    if name == "notify":
        from .notify import Notifier

        return Notifier(config, parent_pid=parent_pid)
    raise SystemExit(f"unknown child {name!r}")


def main() -> int:
    # The parent started us with SIGHUP blocked: one relayed from logrotate while we import
    # stays pending instead of killing us, and is handled once Signals is installed.
    name, parent_pid = sys.argv[1], int(sys.argv[2])
    _die_with_parent(parent_pid)
    config = msgspec.json.decode(sys.stdin.buffer.read(), type=Config)
    sys.stdin.close()
    sinks = LogSinks(name, config.logs_dir)
    sinks.open()
    signals = Signals()
    signals.install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    process = build(name, config, parent_pid)
    try:
        serve(process, signals, on_reopen=sinks.reopen)
    except Exception:
        logger.exception("{} crashed", name)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
