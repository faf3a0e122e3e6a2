"""``completionctl``: the command line over ctl.Client.

Exit codes: 0 done; 1 refused or failed; 2 usage or configuration error; 3 the agent did not
answer (for complete/start/heartbeat/emergency the request was queued).  ``health`` follows the
monitoring convention instead (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), and ``hook`` always
exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import protocol as p
from protocol.config import ConfigError, load

from . import AgentUnavailable, Client, CommandRefused, read_text_file

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
HEALTH_EXIT = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="completionctl",
        description="Talk to completiond: report todo starts, heartbeats and completions.",
    )
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    # --json is accepted after the command too; SUPPRESS keeps the global value when absent.
    json_flag = _Parser(add_help=False)
    json_flag.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
    )

    add = sub.add_parser(
        "add", parents=[json_flag], help="create a todo (opens the database directly)"
    )
    add.add_argument("title")
    add.add_argument("--description", default="")
    add.add_argument("--dir", dest="working_directory", default="")

    start = sub.add_parser(
        "start", parents=[json_flag], help="mark a todo in_progress and arm its deadlines"
    )
    start.add_argument("todo_id", type=int)
    start.add_argument("--session", dest="session_id")
    start.add_argument(
        "--timeout",
        dest="completion_timeout",
        type=float,
        metavar="S",
        help="this todo's completion timeout (default behavior.completion_timeout)",
    )
    start.add_argument("--transcript", dest="transcript_path")

    heartbeat = sub.add_parser(
        "heartbeat", parents=[json_flag], help="the session is alive: push the deadline back"
    )
    heartbeat.add_argument("todo_id", type=int)
    heartbeat.add_argument("--session", dest="session_id")

    complete = sub.add_parser("complete", parents=[json_flag], help="report a todo as done")
    complete.add_argument("todo_id", type=int)
    source = complete.add_mutually_exclusive_group()
    source.add_argument("--output", help="the session's result text")
    source.add_argument(
        "--output-file", metavar="PATH", help="read the result from PATH (- = stdin)"
    )
    complete.add_argument("--session", dest="session_id")
    complete.add_argument("--transcript", dest="transcript_path")
    complete.add_argument("--tmux-target", dest="tmux_target")

    emergency = sub.add_parser(
        "emergency", parents=[json_flag], help="force an emergency completion now"
    )
    emergency.add_argument("todo_id", type=int)
    emergency.add_argument("--reason")

    sub.add_parser(
        "health",
        parents=[json_flag],
        help="health checks (exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)",
    )

    status = sub.add_parser(
        "status", parents=[json_flag], help="the agent's state, or one todo's journal entries"
    )
    status.add_argument("todo_id", type=int, nargs="?")

    retry = sub.add_parser("retry", parents=[json_flag], help="queue dead completions again")
    retry.add_argument("completion_id", nargs="?")
    retry.add_argument("--dead", action="store_true", help="all dead completions")

    sub.add_parser(
        "check", parents=[json_flag], help="preflight: config, state dir, socket, database, tmux"
    )

    db = sub.add_parser("db", parents=[json_flag], help="database administration")
    db_sub = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", parser_class=_Parser)
    db_sub.add_parser(
        "init", parents=[json_flag], help="create completion_log (and the todo table where missing)"
    )

    sub.add_parser(
        "hook", parents=[json_flag], help="read a Claude Code hook's JSON on stdin (always exits 0)"
    )
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The command word, found without argparse (the hook path stays minimal)."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--config", "--timeout"):
            skip = True
        elif not token.startswith("-"):
            return token
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if _command_of(argv) == "hook":
        # The hook must never fail a session: parse as little as possible before handing over.
        from .hook import run_hook

        return run_hook(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_UNREACHABLE if _command_of(argv) == "health" else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"completionctl: configuration error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE if args.command == "health" else EXIT_USAGE
    if args.command in ("add", "db", "check"):
        from . import admin

        return admin.run(args, config)
    client = Client(config=config, timeout=args.wait)
    command = COMMANDS[args.command]
    try:
        return command(client, args)
    except AgentUnavailable as exc:
        if args.command == "health" and args.json:
            print(json.dumps({"status": "UNKNOWN", "checks": [], "message": str(exc)}))
        print(f"completionctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except CommandRefused as exc:
        print(f"completionctl: refused: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"completionctl: {exc}", file=sys.stderr)
        return EXIT_FAILED


# ---------------------------------------------------------------- commands


def _print_ack(args: argparse.Namespace, ack: p.Ack) -> int:
    if args.json:
        print(json.dumps(p.to_builtins(ack)))
    elif ack.state == "queued":
        print(ack.message, file=sys.stderr)
    else:
        what = f"completion {ack.completion_id}" if ack.completion_id else "request"
        todo = f" for todo {ack.todo_id}" if ack.todo_id is not None else ""
        print(f"{what}{todo}: {ack.state}" + (f" ({ack.message})" if ack.message else ""))
    return EXIT_UNREACHABLE if ack.state == "queued" else EXIT_OK


def _start(client: Client, args: argparse.Namespace) -> int:
    return _print_ack(
        args,
        client.start(
            args.todo_id,
            session_id=args.session_id,
            completion_timeout=args.completion_timeout,
            transcript_path=args.transcript_path,
        ),
    )


def _heartbeat(client: Client, args: argparse.Namespace) -> int:
    return _print_ack(args, client.heartbeat(args.todo_id, session_id=args.session_id))


def _complete(client: Client, args: argparse.Namespace) -> int:
    output = args.output
    if args.output_file:
        output = read_text_file(args.output_file)
    return _print_ack(
        args,
        client.complete(
            args.todo_id,
            output=output,
            session_id=args.session_id,
            transcript_path=args.transcript_path,
            tmux_target=args.tmux_target,
        ),
    )


def _emergency(client: Client, args: argparse.Namespace) -> int:
    return _print_ack(args, client.emergency(args.todo_id, reason=args.reason))


def _retry(client: Client, args: argparse.Namespace) -> int:
    if not args.completion_id and not args.dead:
        print("completionctl: retry needs a COMPLETION_ID or --dead", file=sys.stderr)
        return EXIT_USAGE
    return _print_ack(args, client.retry(args.completion_id, all_dead=args.dead))


def _health(client: Client, args: argparse.Namespace) -> int:
    report = client.health()
    if args.json:
        print(
            json.dumps(
                {
                    "status": report.status,
                    "checks": [
                        {
                            "name": c.name,
                            "status": c.status,
                            "message": c.message,
                            "todo_ids": c.todo_ids,
                        }
                        for c in report.checks
                    ],
                }
            )
        )
    else:
        print(f"completiond health: {report.status}")
        width = max(len(c.name) for c in report.checks) if report.checks else 0
        for c in report.checks:
            ids = f" [todos {', '.join(map(str, c.todo_ids))}]" if c.todo_ids else ""
            print(f"  {c.status:<8} {c.name:<{width}}  {c.message}{ids}")
    return HEALTH_EXIT.get(report.status, EXIT_UNREACHABLE)


def _status(client: Client, args: argparse.Namespace) -> int:
    report = client.status(args.todo_id)
    if args.json:
        data = p.to_builtins(report.todo if report.todo is not None else report.agent)
        print(json.dumps(data))
        return EXIT_OK
    if report.agent is not None:
        a = report.agent
        print(f"completiond pid {a.pid}, protocol {a.version}")
        print(f"  endpoint  {a.endpoint}")
        print(f"  state dir {a.state_dir}")
        print(f"  database  {a.database}")
        for name, pid in a.children.items():
            print(f"  {name:<9} pid {pid if pid else '(not running)'}, restarts {a.restarts[name]}")
        print(
            "  journal   "
            + (", ".join(f"{k} {v}" for k, v in sorted(a.journal.items())) or "empty")
        )
        if a.recoveries:
            print("  recovery  " + ", ".join(f"{k} {v}" for k, v in sorted(a.recoveries.items())))
    if report.todo is not None:
        t = report.todo
        print(f"todo {t.todo_id}" + (f" (session {t.session_id})" if t.session_id else ""))
        if t.waiting:
            print(f"  waiting for a person: {t.waiting}")
        if t.note:
            print(f"  note: {t.note}")
        for d in t.deadlines:
            print(f"  deadline {d.name}: {_when(d.due_at)}{' (fired)' if d.fired else ''}")
        for e in t.entries:
            extra = f", {e.outcome}" if e.outcome else ""
            error = f" — {e.last_error}" if e.last_error else ""
            print(
                f"  {e.completion_id}  {e.kind:<9} {e.state:<9} source {e.source or '-'},"
                f" attempts {e.attempts}{extra}{error}"
            )
    return EXIT_OK


def _when(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "start": _start,
    "heartbeat": _heartbeat,
    "complete": _complete,
    "emergency": _emergency,
    "retry": _retry,
    "health": _health,
    "status": _status,
}


if __name__ == "__main__":
    sys.exit(main())
