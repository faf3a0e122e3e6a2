"""``completiond [--config PATH]``: run the agent in the foreground (supervisord, systemd)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from loguru import logger

from ctl.parser import VersionAction
from protocol.config import ConfigError, load

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_LOCKED = 0, 1, 2, 3


def raise_open_file_limit() -> None:
    """Every client connection holds a descriptor: the soft limit (often 1,024) is raised to
    the hard one, so a connection flood meets the peer cap (limits.max_peers), not EMFILE."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return
    with contextlib.suppress(ValueError, OSError):  # the limit stays; the peer cap still holds
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="completiond",
        description="The completion agent: journals completions, collects, writes and monitors.",
    )
    parser.add_argument("--config", metavar="PATH", help="config file (.toml or .json)")
    parser.add_argument("--version", action=VersionAction, help="print the version and exit")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"completiond: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from .web import missing_web_packages

    if (problem := missing_web_packages(config)) is not None:
        print(f"completiond: configuration error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if config.database.ssh or config.database.tls != "off":
        from .dbroute import preflight

        problems = preflight(config)
        if problems:
            for problem in problems:
                print(f"completiond: configuration error: {problem}", file=sys.stderr)
            return EXIT_CONFIG

    # Journal, logs, archive and outbox hold session output: nobody else may read them.
    os.umask(0o077)
    raise_open_file_limit()
    from .daemon import Parent, PidLock, StartupError, StateDirLocked, prepare_state_dir
    from .logs import LogSinks
    from .loop import Signals, serve

    try:
        prepare_state_dir(config)
    except StartupError as exc:
        print(f"completiond: {exc}", file=sys.stderr)
        return EXIT_FAILED
    lock = PidLock(config.pid_path)
    # The pid file names us from here on; logrotate's SIGHUP must not kill us before Signals.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        lock.acquire()
    except StateDirLocked as exc:
        print(f"completiond: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    sinks = LogSinks("agent", config.logs_dir)
    signals = Signals()
    try:
        sinks.open()
        signals.install()
        parent = Parent(config)

        def reopen() -> None:
            sinks.reopen()
            parent.reopen_logs()

        serve(parent, signals, on_reopen=reopen)
    except Exception as exc:
        logger.exception("completiond failed: {}", exc)
        print(f"completiond: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        lock.release()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
