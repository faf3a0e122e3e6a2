"""``completionctl``: the command line over ctl.Client.

Exit codes: 0 done; 1 refused or failed; 2 usage or configuration error; 3 the agent did not
answer (for complete/start/heartbeat/emergency the request was queued).  ``health`` follows the
monitoring convention instead (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), and ``hook`` always
exits 0.
"""

from __future__ import annotations

import gc
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import protocol as p
from protocol.config import ConfigError, load, load_for_client

from . import AgentUnavailable, Client, CommandRefused, read_text_file

if TYPE_CHECKING:
    import argparse

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
HEALTH_EXIT = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}
ADMIN = ("add", "db", "check", "list", "show")


def _json(value: object, **options: object) -> str:
    """``json.dumps``, imported when a command prints JSON (the hook never does)."""
    import json

    return json.dumps(value, **options)  # type: ignore[arg-type]


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
    try:
        code = run(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:
        # `completionctl check | head -1`: the reader left; that is no error worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
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
        # export reads the database itself: it needs the password the client's copy lacks.
        fleet = args.command == "health" and getattr(args, "fleet", False)
        full = args.command in ADMIN or args.command in ("export", "notify", "dashboard") or fleet
        config = (load if full else load_for_client)(args.config)
    except ConfigError as exc:
        print(f"completionctl: configuration error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE if args.command == "health" else EXIT_USAGE
    if args.command == "notify":
        return _notify(args, config)
    if args.command == "dashboard":
        return _dashboard(args, config)
    if args.command == "hook-token":
        from protocol.hooktoken import ensure_token

        try:
            print(ensure_token(config.hook_token_path))
        except OSError as exc:
            print(f"completionctl: cannot read or make the hook token: {exc}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    if args.command == "logrotate":
        from .logrotate import run as write_logrotate

        return write_logrotate(config)
    if args.command in ADMIN or fleet:
        from . import admin

        return admin.run(args, config)
    client = Client(config=config, timeout=args.wait, one_shot=True)
    command = COMMANDS[args.command]
    try:
        return command(client, args)
    except AgentUnavailable as exc:
        if args.command == "health" and args.json:
            print(_json({"status": "UNKNOWN", "checks": [], "message": str(exc)}))
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

Command = Callable[["Client", "argparse.Namespace"], int]
# The commands that talk to the agent, registered with ``@command`` (their grammar is in
# ctl/parser.py; the database's own commands are in ctl/admin.py).
COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(run: Command) -> Command:
        COMMANDS[name] = run
        return run

    return register


def _print_ack(args: argparse.Namespace, ack: p.Ack) -> int:
    if args.json:
        print(_json(p.to_builtins(ack)))
    elif ack.state == "queued":
        print(f"completionctl: {ack.message}", file=sys.stderr)
    else:
        todo = f" for todo {ack.todo_id}" if ack.todo_id is not None else ""
        ident = f", id {ack.completion_id}" if ack.completion_id else ""
        note = f" ({ack.message})" if ack.message else ""
        print(f"{args.command}{todo}: {ack.state}{ident}{note}")
    return EXIT_UNREACHABLE if ack.state == "queued" else EXIT_OK


@command("start")
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


@command("heartbeat")
def _heartbeat(client: Client, args: argparse.Namespace) -> int:
    return _print_ack(args, client.heartbeat(args.todo_id, session_id=args.session_id))


@command("complete")
def _complete(client: Client, args: argparse.Namespace) -> int:
    ids = list(args.todo_ids)
    try:
        if args.ids_from:
            ids += read_ids(args.ids_from)
    except ValueError as exc:
        print(f"completionctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not ids:
        print("completionctl: complete needs a TODO_ID (or --ids-from FILE)", file=sys.stderr)
        return EXIT_USAGE
    batch = len(ids) > 1 or bool(args.ids_from)
    if (args.delay or args.at) and batch:
        print("completionctl: a scheduled completion takes one TODO_ID", file=sys.stderr)
        return EXIT_USAGE
    output = args.output
    if args.output_file:
        output = read_text_file(args.output_file)
    if args.delay or args.at:
        return _schedule(client, args, ids[0], output)
    if batch:
        return _batch(client, args, ids, output)
    args.todo_id = ids[0]
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


def read_ids(source: str) -> list[int]:
    """Todo ids from a file (- = stdin): separated by white space or commas; # starts a comment."""
    from .parser import todo_id

    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    ids = []
    for number, line in enumerate(text.splitlines(), 1):
        for token in re.split(r"[\s,]+", line.split("#", 1)[0].strip()):
            if not token:
                continue
            try:
                ids.append(todo_id(token))
            except Exception:
                raise ValueError(f"{source}, line {number}: {token!r} is not a todo id") from None
    return ids


def _schedule(client: Client, args: argparse.Namespace, todo_id: int, output: str | None) -> int:
    from .timespec import parse_at, parse_duration

    try:
        if args.delay:
            ack = client.schedule_completion(todo_id, parse_duration(args.delay), output=output)
        else:
            at = parse_at(args.at, client.config)
            if at.timestamp() < time.time() - 60:
                print(f"completionctl: --at {args.at}: that time has passed", file=sys.stderr)
                return EXIT_USAGE
            ack = client.schedule_completion(todo_id, at=at, output=output)
    except ValueError as exc:
        print(f"completionctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.json and ack.state != "queued" and ack.due_at is not None:
        print(
            f"complete for todo {todo_id}: scheduled for {_when(ack.due_at)}, id {ack.request_id}"
        )
        return EXIT_OK
    return _print_ack(args, ack)


# Journal states in which a completion's fate is settled.
_SETTLED = ("verified", "cleaned", "failed", "dead")


def _batch(client: Client, args: argparse.Namespace, ids: list[int], output: str | None) -> int:
    ack = client.batch_complete(ids, output=output)
    if ack.state == "queued":
        return _print_ack(args, ack)
    items = ack.items
    if args.batch_wait:
        deadline = time.monotonic() + args.batch_wait
        while True:
            items = client.batch_outcomes(ack)
            pending = [i for i in items if i.state is not None and i.state not in _SETTLED]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    failed = [i for i in items if i.outcome in ("refused", "unknown") or i.state == "dead"]
    if args.json:
        print(_json(p.to_builtins(msgspec_replace(ack, items=items))))
    else:
        for item in items:
            reason = f": {item.reason}" if item.reason else ""
            state = f" ({item.state})" if item.state else ""
            print(f"todo {item.todo_id}: {item.outcome}{state}{reason}")
        print(f"complete: batch of {len(ids)}: {ack.message}")
    return EXIT_FAILED if failed else EXIT_OK


def msgspec_replace(struct, **changes):
    import msgspec

    return msgspec.structs.replace(struct, **changes)


@command("cancel")
def _cancel(client: Client, args: argparse.Namespace) -> int:
    return _print_ack(args, client.cancel_scheduled(args.todo_id))


@command("export")
def _export(client: Client, args: argparse.Namespace) -> int:
    from .export import ExportError

    metadata_only = args.export_format == "json"
    try:
        metadata = client.export_session_data(
            args.todo_id, args.export_path, metadata_only=metadata_only
        )
    except ExportError as exc:
        print(f"completionctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if metadata_only or args.json:
        print(_json(metadata, default=str))
    else:
        print(f"todo {args.todo_id} exported to {metadata['path']}")
        for problem in (metadata["journal_problem"], metadata["database_problem"]):
            if problem:
                print(f"  note: {problem}")
    return EXIT_OK


@command("emergency")
def _emergency(client: Client, args: argparse.Namespace) -> int:
    return _print_ack(args, client.emergency(args.todo_id, reason=args.reason))


@command("retry")
def _retry(client: Client, args: argparse.Namespace) -> int:
    if not args.completion_id and not args.dead:
        print("completionctl: retry needs a COMPLETION_ID or --dead", file=sys.stderr)
        return EXIT_USAGE
    return _print_ack(args, client.retry(args.completion_id, all_dead=args.dead))


@command("ack")
def _ack(client: Client, args: argparse.Namespace) -> int:
    return _print_ack(args, client.acknowledge(args.check))


@command("health")
def _health(client: Client, args: argparse.Namespace) -> int:
    report = client.health()
    if args.json:
        print(
            _json(
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


@command("status")
def _status(client: Client, args: argparse.Namespace) -> int:
    try:
        report = client.status(args.todo_id)
    except CommandRefused as exc:
        if args.todo_id is None or exc.code != p.ErrorCode.NOT_FOUND:
            raise
        # The agent never saw it: say what the database holds instead.
        from .admin import describe_row

        print(f"completionctl: refused: {exc}", file=sys.stderr)
        return describe_row(client.config, args.todo_id, as_json=args.json)
    if args.json:
        shown = report.todo if report.todo is not None else report.agent
        print(_json(p.to_builtins(shown) if shown is not None else None))
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
        for s in a.scheduled:
            print(f"  scheduled todo {s.todo_id}: completes {_when(s.due_at)} (id {s.request_id})")
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
        if t.predicted_hang:
            print(f"  predicted hang: {t.predicted_hang}")
        for s in t.scheduled:
            reason = f" — {s.reason}" if s.reason else ""
            print(f"  scheduled completion {_when(s.due_at)}: {s.state}{reason}")
        for e in t.entries:
            extra = f", {e.outcome}" if e.outcome else ""
            error = f" — {e.last_error}" if e.last_error else ""
            print(
                f"  {e.completion_id}  {e.kind:<9} {e.state:<9} source {e.source or '-'},"
                f" attempts {e.attempts}{extra}{error}"
            )
    return EXIT_OK


@command("metrics")
def _metrics(client: Client, args: argparse.Namespace) -> int:
    report = client.metrics(args.since)
    if args.json:
        print(_json(p.to_builtins(report)))
        return EXIT_OK
    print(f"completiond metrics, last {_span(report.since)}")
    for kind, outcomes in sorted(report.counts.items()):
        shown = ", ".join(f"{name} {n}" for name, n in sorted(outcomes.items()))
        print(f"  {kind:<9} {shown}")
    if not report.counts:
        print("  no journal entries in this window")
    print(
        f"  backlog {report.backlog}, dead now {report.dead_now}; in the window: retries "
        f"{report.retries}, dead {report.dead}, deadline fires {report.deadline_fires}, "
        f"recoveries {report.recoveries}, revisions {report.revisions}"
    )
    if report.oldest_waiting_age is not None:
        print(f"  the oldest waiting entry is {_span(report.oldest_waiting_age)} old")
    if report.stages:
        print(f"  {'stage':<22} {'count':>6} {'p50':>9} {'p95':>9} {'p99':>9}")
        for name, q in report.stages.items():
            cells = " ".join(f"{_secs(v):>9}" for v in (q.p50, q.p95, q.p99))
            print(f"  {name:<22} {q.count:>6} {cells}")
    return EXIT_OK


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:.0f}s"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _dashboard(args: argparse.Namespace, config) -> int:
    from pathlib import Path

    from agent.webauth import bearer_token, new_login_token
    from protocol.config import split_listen

    if not config.web.listen:
        print(
            'completionctl: the dashboard is off: set web.listen (e.g. "127.0.0.1:8765")',
            file=sys.stderr,
        )
        return EXIT_USAGE
    state = Path(config.state_dir)
    if not state.is_dir():
        print(f"completionctl: no state dir {state}: is completiond set up?", file=sys.stderr)
        return EXIT_FAILED
    if args.token:
        print(bearer_token(state))
        return EXIT_OK
    host, port = split_listen(config.web.listen, "web.listen")
    scheme = "https" if config.web.tls_cert and config.web.tls_key else "http"
    shown = f"[{host}]" if ":" in host else host
    print(f"{scheme}://{shown}:{port}/login?token={new_login_token(state)}")
    return EXIT_OK


def _notify(args: argparse.Namespace, config) -> int:
    if args.notify_command != "test":
        print("completionctl: notify needs a subcommand: test", file=sys.stderr)
        return EXIT_USAGE
    from protocol.config import mask_secret_url

    targets = [t for t in config.notify if args.name is None or t.name == args.name]
    if not targets:
        which = f"named {args.name!r} " if args.name else ""
        print(
            f"completionctl: no [[notify]] target {which}in {config.source or 'the config'}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from agent.notify import test_message

    failed = 0
    results = []
    for target in targets:
        result = test_message(target)
        failed += not result.ok
        results.append(
            {
                "name": target.name,
                "url": mask_secret_url(target.url),
                "ok": result.ok,
                "detail": result.detail,
            }
        )
    if args.json:
        print(_json(results))
    else:
        for r in results:
            print(f"{r['name']} ({r['url']}): {'ok' if r['ok'] else 'FAILED'} — {r['detail']}")
    return EXIT_FAILED if failed else EXIT_OK


def _when(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


if __name__ == "__main__":
    sys.exit(main())
