"""The command line's grammar: argparse, one subparser per command.

Kept apart from ``ctl.__main__`` so that ``completionctl hook``, the hottest path, never imports
argparse; the other commands build only their own subparser (see ``build_parser``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import protocol as p


class UsageError(Exception):
    """argparse refused the command line; the message says why."""


def todo_id(text: str) -> int:
    """A todo id as the database knows them: a whole number from 1 up."""
    value = p.parse_todo_id(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a todo id (a whole number from 1 up)")
    return value


def positive_seconds(text: str) -> float:
    """A number of seconds above zero (a timeout)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 30 * 24 * 3600:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a timeout (seconds, above 0 and at most 30 days)"
        )
    return value


def limit(text: str) -> int:
    """How many rows to show: a whole number from 1 to 100,000."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a limit (a whole number, 1..100000)")
    return value


class VersionAction(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog} {package_version()}")
        parser.exit()


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("completion-agent")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _terminal_width() -> int:
    """What shutil.get_terminal_size() answers, without importing shutil (and with it bz2 and
    lzma): argparse asks for the width on every add_argument, help or not."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0 and sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str, indent_increment=2, max_help_position=24, width=None) -> None:
        if width is None:
            width = _terminal_width() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


Grammar = Callable[[Any, list[argparse.ArgumentParser]], None]
# Each command's arguments, registered with ``@grammar``; `completionctl --help` lists them in
# the order they are defined here.
SUBPARSERS: dict[str, Grammar] = {}


def grammar(name: str) -> Callable[[Grammar], Grammar]:
    """Register a command's subparser builder under its name."""

    def register(build: Grammar) -> Grammar:
        SUBPARSERS[name] = build
        return build

    return register


@grammar("add")
def _add_add(sub, parents) -> None:
    add = sub.add_parser("add", parents=parents, help="create a todo (opens the database directly)")
    add.add_argument("title")
    add.add_argument("--description", default="")
    add.add_argument("--dir", dest="working_directory", default="")
    add.add_argument(
        "--priority", help="one of the priority column's values (the plugin: niedrig..kritisch)"
    )
    add.add_argument("--project-id", dest="project_id", type=int, help="the plugin's project id")
    add.add_argument(
        "--queue",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="put it into the plugin's queue (bearbeiten=1; default) or not (--no-queue)",
    )


@grammar("start")
def _add_start(sub, parents) -> None:
    start = sub.add_parser(
        "start", parents=parents, help="mark a todo in_progress and arm its deadlines"
    )
    start.add_argument("todo_id", type=todo_id)
    start.add_argument("--session", dest="session_id")
    start.add_argument(
        "--timeout",
        dest="completion_timeout",
        type=positive_seconds,
        metavar="S",
        help="this todo's completion timeout (default behavior.completion_timeout)",
    )
    start.add_argument("--transcript", dest="transcript_path")


@grammar("heartbeat")
def _add_heartbeat(sub, parents) -> None:
    heartbeat = sub.add_parser(
        "heartbeat", parents=parents, help="the session is alive: push the deadline back"
    )
    heartbeat.add_argument("todo_id", type=todo_id)
    heartbeat.add_argument("--session", dest="session_id")


@grammar("complete")
def _add_complete(sub, parents) -> None:
    complete = sub.add_parser(
        "complete",
        parents=parents,
        help="report a todo as done (several ids: one batch; --in/--at: scheduled)",
    )
    complete.add_argument("todo_ids", type=todo_id, nargs="*", metavar="TODO_ID")
    complete.add_argument(
        "--ids-from",
        metavar="FILE",
        help="also complete the ids listed in FILE (- = stdin), as one batch",
    )
    when = complete.add_mutually_exclusive_group()
    when.add_argument(
        "--in", dest="delay", metavar="DURATION", help="complete after DURATION (90s, 10m, 1h30m)"
    )
    when.add_argument(
        "--at",
        dest="at",
        metavar="TIME",
        help="complete at TIME (2026-12-24T18:00; the site's zone unless it has an offset)",
    )
    complete.add_argument(
        "--wait",
        dest="batch_wait",
        type=float,
        metavar="S",
        help="a batch: wait up to S seconds for the database's outcome of each todo",
    )
    source = complete.add_mutually_exclusive_group()
    source.add_argument("--output", help="the session's result text")
    source.add_argument(
        "--output-file", metavar="PATH", help="read the result from PATH (- = stdin)"
    )
    complete.add_argument("--session", dest="session_id")
    complete.add_argument("--transcript", dest="transcript_path")
    complete.add_argument("--tmux-target", dest="tmux_target")


@grammar("emergency")
def _add_emergency(sub, parents) -> None:
    emergency = sub.add_parser(
        "emergency", parents=parents, help="force an emergency completion now"
    )
    emergency.add_argument("todo_id", type=todo_id)
    emergency.add_argument("--reason")


@grammar("cancel")
def _add_cancel(sub, parents) -> None:
    cancel = sub.add_parser("cancel", parents=parents, help="cancel a todo's scheduled completion")
    cancel.add_argument("todo_id", type=todo_id)


@grammar("export")
def _add_export(sub, parents) -> None:
    export = sub.add_parser(
        "export",
        parents=parents,
        help="one .tar.gz with a todo's archive, report, journal history and database row",
    )
    export.add_argument("todo_id", type=todo_id)
    export.add_argument("-o", "--output", dest="export_path", metavar="FILE")
    export.add_argument(
        "--format",
        dest="export_format",
        choices=("tar", "json"),
        default="tar",
        help="json: print the metadata only, write no file",
    )


@grammar("health")
def _add_health(sub, parents) -> None:
    health = sub.add_parser(
        "health",
        parents=parents,
        help="health checks (exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)",
    )
    health.add_argument(
        "--fleet",
        action="store_true",
        help="every agent on this database (MySQL), read from its fleet registry",
    )


@grammar("status")
def _add_status(sub, parents) -> None:
    status = sub.add_parser(
        "status", parents=parents, help="the agent's state, or one todo's journal entries"
    )
    status.add_argument("todo_id", type=todo_id, nargs="?")


@grammar("retry")
def _add_retry(sub, parents) -> None:
    retry = sub.add_parser("retry", parents=parents, help="queue dead completions again")
    retry.add_argument("completion_id", nargs="?")
    retry.add_argument("--dead", action="store_true", help="all dead completions")


def duration(text: str) -> float:
    """ "90", "90s", "30m", "1h", "2d" -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(value) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration like 90s, 30m, 1h or 2d"
        ) from None
    if not 0 < seconds <= 30 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: give a duration up to 30d")
    return seconds


@grammar("metrics")
def _add_metrics(sub, parents) -> None:
    metrics = sub.add_parser(
        "metrics",
        parents=parents,
        help="counts, stage latencies (p50/p95/p99), backlog and recoveries",
    )
    metrics.add_argument(
        "--since", type=duration, default=3600.0, help="the window: 90s, 30m, 1h (default), 2d"
    )


@grammar("notify")
def _add_notify(sub, parents) -> None:
    notify = sub.add_parser("notify", parents=parents, help="notification targets")
    notify_sub = notify.add_subparsers(dest="notify_command", metavar="SUBCOMMAND")
    test = notify_sub.add_parser(
        "test", parents=parents, help="send a test message to each target (or NAME)"
    )
    test.add_argument("name", nargs="?", help="only this [[notify]] entry")


@grammar("dashboard")
def _add_dashboard(sub, parents) -> None:
    dashboard = sub.add_parser(
        "dashboard", parents=parents, help="print the dashboard's URL with a one-time login"
    )
    dashboard.add_argument(
        "--token", action="store_true", help="print the bearer token for scripts instead"
    )


@grammar("check")
def _add_check(sub, parents) -> None:
    sub.add_parser(
        "check", parents=parents, help="preflight: config, state dir, socket, database, tmux"
    )


@grammar("db")
def _add_db(sub, parents) -> None:
    db = sub.add_parser("db", parents=parents, help="database administration")
    db_sub = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", parser_class=Parser)
    db_sub.add_parser(
        "init", parents=parents, help="create completion_log (and the todo table where missing)"
    )


@grammar("hook")
def _add_hook(sub, parents) -> None:
    sub.add_parser(
        "hook", parents=parents, help="read a Claude Code hook's JSON on stdin (always exits 0)"
    )


@grammar("hook-token")
def _add_hook_token(sub, parents) -> None:
    sub.add_parser(
        "hook-token",
        parents=parents,
        help="print the HTTP hooks' bearer token (made, 0600, in the state dir if missing)",
    )


@grammar("ack")
def _add_ack(sub, parents) -> None:
    ack = sub.add_parser("ack", parents=parents, help="clear a health check's warning now")
    ack.add_argument("check", choices=["refused"])


@grammar("logrotate")
def _add_logrotate(sub, parents) -> None:
    sub.add_parser(
        "logrotate", parents=parents, help="print the logrotate file for this config's paths"
    )


@grammar("list")
def _add_list(sub, parents) -> None:
    lister = sub.add_parser(
        "list", parents=parents, help="todos with their status, times, marks and deadlines"
    )
    lister.add_argument("--status", help="only todos with this database status")
    lister.add_argument(
        "--since", type=positive_seconds, metavar="S", help="only todos heard from in the last S s"
    )
    lister.add_argument("--limit", type=limit, default=50, help="at most this many (1..100000)")


@grammar("show")
def _add_show(sub, parents) -> None:
    show = sub.add_parser(
        "show", parents=parents, help="one todo: row, summary, revisions, archive and report"
    )
    show.add_argument("todo_id", type=todo_id)
    show.add_argument("--report", action="store_true", help="print the report")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI; given a known ``command``, only that command's subparser.

    Building every subparser costs more than the rest of a hot-path call (``complete``,
    ``start``, ...), and parsing one command never needs the others.
    """
    parser = Parser(
        prog="completionctl",
        description="Talk to completiond: report todo starts, heartbeats and completions.",
    )
    parser.add_argument("--version", action=VersionAction, help="print the version and exit")
    parser.add_argument("--config", metavar="PATH", help="config file (.toml or .json)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--timeout",
        dest="wait",
        type=float,
        default=None,
        metavar="S",
        help="seconds to wait for the agent's reply (default 2)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    # --json is accepted after the command too; SUPPRESS keeps the global value when absent.
    json_flag = Parser(add_help=False)
    json_flag.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
    )
    names = [command] if command in SUBPARSERS else list(SUBPARSERS)
    for name in names:
        SUBPARSERS[name](sub, [json_flag])
    return parser
