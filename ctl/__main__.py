"""``completionctl``: the command line over ctl.Client.

Exit codes: 0 done; 1 refused or failed; 2 usage or configuration error; 3 the agent did not
answer (for complete/start/heartbeat/emergency the request was queued).  ``health`` follows the
monitoring convention instead (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), and ``hook`` always
exits 0.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import protocol as p
from protocol.config import ConfigError, load, load_for_client

from . import AgentUnavailable, Client, CommandRefused, read_text_file

if TYPE_CHECKING:
    import argparse

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
HEALTH_EXIT = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}
ADMIN = ("add", "db", "check")


def _say_queued(client: Client) -> None:
    """What waits in the outbox for an agent that does not answer."""
    from protocol import outbox

    where = client.config.outbox_dir
    try:
        queued = len(outbox.pending(where, limit=1_000_000))
    except OSError as exc:
        print(f"completionctl: cannot read the outbox {where}: {exc}", file=sys.stderr)
        return
    if queued:
        print(
            f"completionctl: {queued} queued request(s) in {where} wait for the agent; "
            "they are delivered when it runs",
            file=sys.stderr,
        )
    else:
        print(f"completionctl: nothing is queued in {where}", file=sys.stderr)


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
    if argv is not None:
        return run(argv)
    code = run(sys.argv[1:])
    # The process exits next: spare the interpreter's final garbage collections their walk over
    # every object the imports made. It costs ~8 ms, more than a hook's whole work beyond
    # starting Python (docs/PERFORMANCE.md); nothing of ours waits for a collection to be done.
    gc.freeze()
    return code


def run(argv: list[str]) -> int:
    if _command_of(argv) == "hook":
        # The hook must never fail a session: parse as little as possible before handing over.
        from .hook import run_hook

        return run_hook(argv)
    from .parser import UsageError, build_parser

    parser = build_parser(_command_of(argv))
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_UNREACHABLE if _command_of(argv) == "health" else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        # The admin commands talk to the database themselves; the others only to the agent,
        # so they read the config through the cached copy that spares them the TOML parser.
        config = (load if args.command in ADMIN else load_for_client)(args.config)
    except ConfigError as exc:
        print(f"completionctl: configuration error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE if args.command == "health" else EXIT_USAGE
    if args.command in ADMIN:
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
        if args.command == "status":
            _say_queued(client)
        return EXIT_UNREACHABLE
    except CommandRefused as exc:
        print(f"completionctl: refused: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"completionctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        client.close()


# ---------------------------------------------------------------- commands


def _print_ack(args: argparse.Namespace, ack: p.Ack) -> int:
    if args.json:
        print(json.dumps(p.to_builtins(ack)))
    elif ack.state == "queued":
        print(f"completionctl: {ack.message}", file=sys.stderr)
    else:
        todo = f" for todo {ack.todo_id}" if ack.todo_id is not None else ""
        ident = f", id {ack.completion_id}" if ack.completion_id else ""
        note = f" ({ack.message})" if ack.message else ""
        print(f"{args.command}{todo}: {ack.state}{ident}{note}")
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
        shown = report.todo if report.todo is not None else report.agent
        print(json.dumps(p.to_builtins(shown) if shown is not None else None))
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
        if t.last_heard_at:
            print(f"  last heard {_when(t.last_heard_at)}")
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
