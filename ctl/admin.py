"""Admin commands that open the database themselves and need no running agent:
``add``, ``db init`` and ``check``.  Imported lazily, so the hot path never pays for the store."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys

from protocol.config import Config, tmux_socket_args
from protocol.dburl import mask_url

from . import AgentUnavailable, Client

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


_routes: list = []  # the command's ways to the database (an ssh tunnel), closed by run()


def _route(config: Config):
    from agent.dbroute import DbRoute

    if not _routes:
        _routes.append(DbRoute(config, f"ctl-{os.getpid()}"))
    return _routes[0]


def _open(config: Config):
    return _route(config).open()


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        return _run(args, config)
    finally:
        while _routes:
            _routes.pop().close()


def _run(args: argparse.Namespace, config: Config) -> int:
    from agent.store import StoreError

    # The embedded database this may create holds session output: private, like the agent's files.
    os.umask(0o077)

    try:
        if args.command == "add":
            return _add(args, config)
        if args.command == "list":
            return _list(args, config)
        if args.command == "show":
            return _show(args, config)
        if args.command == "db":
            if args.db_command != "init":
                print("completionctl: db needs a subcommand: init", file=sys.stderr)
                return EXIT_USAGE
            return _db_init(args, config)
        if args.command == "health":
            return _fleet(args, config)
        return _check(args, config)
    except StoreError as exc:
        print(f"completionctl: database error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"completionctl: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _time(value) -> str:
    from datetime import UTC, datetime

    if value is None:
        return "-"
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC).replace(tzinfo=None)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _agent_view(config: Config, call):
    """Ask the agent; None (with a note on stderr) when it does not answer."""
    from . import CommandRefused

    try:
        with Client(config=config, one_shot=True) as client:
            return call(client)
    except (AgentUnavailable, CommandRefused) as exc:
        print(f"completionctl: the agent's view is missing: {exc}", file=sys.stderr)
        return None


def _list(args: argparse.Namespace, config: Config) -> int:
    """Todos with their database status and what the agent knows of them (UTC times), the
    most recently active first.

    Plain: the todos the journal knows and the database's live ones (in progress, or queued)
    even if this agent never heard of them; ``--status``: the database's todos of that status;
    ``--since``: only todos heard from in that window (which only the journal knows).
    """
    limit = max(args.limit, 1)
    listing = _agent_view(config, lambda c: c.list_todos(since=args.since, limit=limit))
    known = {t.todo_id: t for t in (listing.todos if listing else [])}
    store = _open(config)
    try:
        if args.status:
            rows = store.recent_todos(limit, status=args.status)
            if args.since:
                rows = [r for r in rows if r.id in known]
        else:
            found = store.get_todos(list(known))
            rows = list(found.values())
            if not args.since:
                rows += [t for t in store.recent_todos(limit) if t.id not in found]
    finally:
        store.close()
    rows = sorted(rows, key=lambda t: _last_active(t, known.get(t.id)), reverse=True)[:limit]
    out = []
    for todo in rows:
        k = known.get(todo.id)
        marks = []
        if k is not None and k.waiting:
            marks.append("waiting")
        if k is not None and k.hanging:
            marks.append("hanging")
        if k is not None and k.predicted_hang:
            marks.append(f"predicted hang: {k.predicted_hang}")
        if k is not None and k.scheduled_at:
            marks.append(f"scheduled {_time(k.scheduled_at)} UTC")
        if k is None and listing is not None and todo.status == "in_progress":
            marks.append("not started through this agent")
        out.append(
            {
                "todo_id": todo.id,
                "title": todo.title,
                "status": todo.status,
                "started_at": _time(todo.started_at),
                "completed_at": _time(todo.completed_at),
                "last_heard_at": _time(k.last_heard_at) if k else "-",
                "marks": marks,
                "completion_due": _time(k.completion_due) if k else "-",
                "emergency_due": _time(k.emergency_due) if k else "-",
                "latest": f"{k.latest_kind} {k.latest_state}" if k and k.latest_kind else "-",
                "revisions": k.revisions if k else 0,
                "known_to_agent": k is not None,
            }
        )
    if args.json:
        print(json.dumps(out))
        return EXIT_OK
    print(
        f"{'id':>6}  {'status':<11} {'started (UTC)':<19}  {'completed':<19}  "
        f"{'last heard':<19}  {'deadline':<19}  latest / marks"
    )
    for row in out:
        flags = f" [{', '.join(row['marks'])}]" if row["marks"] else ""
        revisions = f", {row['revisions']} revision(s)" if row["revisions"] else ""
        print(
            f"{row['todo_id']:>6}  {row['status']:<11} {row['started_at']:<19}  "
            f"{row['completed_at']:<19}  {row['last_heard_at']:<19}  "
            f"{row['completion_due']:<19}  {row['latest']}{revisions}{flags}  {row['title'][:40]}"
        )
    return EXIT_OK


def _last_active(todo, known) -> tuple[float, int]:
    """When the todo last showed a sign of life, in the database or to this agent; then its
    id (the newest first among todos of the same moment or with no time at all)."""
    from datetime import UTC

    moments = [
        t.replace(tzinfo=UTC).timestamp()
        for t in (todo.updated_at, todo.started_at, todo.completed_at)
        if t is not None
    ]
    if known is not None:
        moments += [t for t in (known.last_heard_at, known.started_at) if t is not None]
    return max(moments, default=0.0), todo.id


def _show(args: argparse.Namespace, config: Config) -> int:
    """One todo: its row, summary, times, every revision, the archive and the report."""
    from pathlib import Path

    store = _open(config)
    try:
        todo = store.get_todo(args.todo_id)
        outputs = store.get_outputs(args.todo_id)
        logged = store.audit_rows(args.todo_id)
    finally:
        store.close()
    if todo is None or outputs is None:
        print(f"completionctl: todo {args.todo_id} does not exist", file=sys.stderr)
        return EXIT_FAILED
    report = _agent_view(config, lambda c: c.status(args.todo_id))
    entries = report.todo.entries if report is not None and report.todo is not None else []
    archive = next((e.archive_path for e in reversed(entries) if e.archive_path), None)
    report_path = str(Path(archive) / "report.html") if archive else None
    summary, text, html = outputs
    if args.report:
        if report_path and Path(report_path).is_file():
            sys.stdout.write(Path(report_path).read_text(encoding="utf-8", errors="replace"))
        else:
            sys.stdout.write(html or text or "")
        return EXIT_OK
    shown = {
        "todo_id": todo.id,
        "title": todo.title,
        "status": todo.status,
        "summary": summary,
        "started_at": _time(todo.started_at),
        "completed_at": _time(todo.completed_at),
        "log": [{"completion_id": c, "kind": k, "note": n} for c, k, n in logged],
        "entries": [
            {"completion_id": e.completion_id, "kind": e.kind, "state": e.state} for e in entries
        ],
        "archive_path": archive,
        "report_path": report_path,
    }
    if args.json:
        print(json.dumps(shown))
        return EXIT_OK
    print(f"todo {todo.id}: {todo.title}")
    print(f"  status     {todo.status}")
    print(f"  started    {shown['started_at']} UTC")
    print(f"  completed  {shown['completed_at']} UTC")
    print(f"  summary    {summary or '-'}")
    for c, k, n in logged:
        print(f"  log        {k:<10} {c}" + (f"  ({n})" if n else ""))
    print(f"  archive    {archive or '- (not archived yet: the result is not final)'}")
    print(f"  report     {report_path or '- (the database holds it: show --report)'}")
    return EXIT_OK


def describe_row(config: Config, todo_id: int, *, as_json: bool) -> int:
    """What the database holds for a todo the agent knows nothing about (``status N``)."""
    from agent.store import StoreError
    from protocol.config import ConfigError, load

    try:
        # The client's cached config has no database password: read the whole file.
        config = load(config.source or None)
    except ConfigError as exc:
        print(f"completionctl: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        store = _open(config)
        try:
            todo = store.get_todo(todo_id)
        finally:
            store.close()
    except (StoreError, ValueError) as exc:
        print(f"completionctl: and the database cannot be read: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if todo is None:
        print(f"todo {todo_id} does not exist in {mask_url(config.database_url)}")
        return EXIT_FAILED
    started = todo.started_at.isoformat(" ") if todo.started_at else "never"
    completed = todo.completed_at.isoformat(" ") if todo.completed_at else "not yet"
    if as_json:
        print(
            json.dumps(
                {
                    "todo_id": todo_id,
                    "database_status": todo.status,
                    "started_at": todo.started_at.isoformat() if todo.started_at else None,
                    "completed_at": todo.completed_at.isoformat() if todo.completed_at else None,
                    "entries": [],
                    "deadlines": [],
                }
            )
        )
    else:
        print(
            f"todo {todo_id} ({todo.title!r}) is {todo.status} in the database; started "
            f"{started}, completed {completed}. This agent has not seen it start (no journal "
            "entries, no deadlines)."
        )
    return EXIT_FAILED  # still "not known to the agent"; the line above says what is


def _add(args: argparse.Namespace, config: Config) -> int:
    if not args.title.strip():
        print("completionctl: add needs a non-empty title", file=sys.stderr)
        return EXIT_USAGE
    store = _open(config)
    try:
        if config.database_url.startswith("sqlite:"):
            # The embedded default has no WordPress in front of it to create the table.
            store.ensure_schema(create_todo_table=True)
        todo_id = store.add_todo(
            args.title,
            args.description,
            args.working_directory,
            priority=args.priority,
            project_id=args.project_id,
            queued=args.queue,
        )
    finally:
        store.close()
    if args.json:
        print(json.dumps({"id": todo_id}))
    else:
        print(f"todo {todo_id} added")
    return EXIT_OK


def _db_init(args: argparse.Namespace, config: Config) -> int:
    table = config.database.table
    store = _open(config)
    try:
        existed = not _missing_table(store.check_schema(), table)
        store.ensure_schema(create_todo_table=True)
        problems = store.check_schema()
    finally:
        store.close()
    if args.json:
        print(json.dumps({"ok": not problems, "todo_table_existed": existed, "problems": problems}))
    elif problems:
        print("schema problems:\n  " + "\n  ".join(problems))
    else:
        what = "exists and was left as it is" if existed else "was created"
        print(
            f"schema ready in {mask_url(config.database_url)}: table {table} {what}, "
            f"its audit table {store.log_table} is there"
        )
    if store.moved_log_rows and not args.json:
        print(
            f"moved {store.moved_log_rows} row(s) of this table's todos from the unprefixed "
            f"completion_log into {store.log_table}"
        )
    return EXIT_FAILED if problems else EXIT_OK


def _fleet(args: argparse.Namespace, config: Config) -> int:
    """`health --fleet`: the registry's rows, read from the database (no agent needed).
    Exit 0 when every agent was seen within fleet.stale_after, 1 when one was not, 3 when the
    registry cannot be read."""
    from agent.fleet import describe
    from agent.store import StoreError
    from agent.store.fleet import fleet_of

    stale_after = config.fleet.stale_after
    store = None
    try:
        store = _open(config)
        members = fleet_of(store).members()
    except (StoreError, ValueError) as exc:
        if args.json:
            print(json.dumps({"status": "UNKNOWN", "agents": [], "message": str(exc)}))
        print(f"completionctl: the fleet registry cannot be read: {exc}", file=sys.stderr)
        return 3
    finally:
        if store is not None:
            store.close()
    stale = [m for m in members if m.age > stale_after]
    status = "WARNING" if stale or not members else "OK"
    if args.json:
        print(
            json.dumps(
                {
                    "status": status,
                    "stale_after": stale_after,
                    "agents": [
                        {
                            "agent_id": m.agent_id,
                            "host": m.host,
                            "pid": m.pid,
                            "version": m.version,
                            "started_at": m.started_at.isoformat() + "Z",
                            "last_seen": m.last_seen.isoformat() + "Z",
                            "age": round(m.age, 3),
                            "backlog": m.backlog,
                            "health": m.health,
                            "node": m.node,
                            "stale": m.age > stale_after,
                        }
                        for m in members
                    ],
                }
            )
        )
    else:
        print(f"fleet: {len(members)} agent(s), {len(stale)} silent over {stale_after:.0f} s")
        for m in members:
            print(f"  {describe(m, stale_after)}")
    return 1 if status == "WARNING" else 0


def _transport_steps(config: Config, results: list[tuple[str, bool, str]]) -> bool:
    """The ssh and TLS steps before the database, each its own line; False if one failed."""
    from agent.dbroute import preflight
    from agent.store import TunnelError

    db = config.database
    if not db.ssh and db.tls == "off":
        return True
    problems = preflight(config)
    if db.tls != "off":
        bad = [p for p in problems if p.startswith("database.tls")]
        detail = f"{db.tls}" + (f", CA {db.tls_ca}" if db.tls_ca else "")
        results.append(("tls", not bad, "; ".join(bad) or detail))
    if not db.ssh:
        return not problems
    results.append(
        (
            "ssh config",
            not problems,
            "; ".join(problems)
            or f"{db.ssh}: identity {db.ssh_identity or '(ssh default)'}, host key known",
        )
    )
    if problems:
        return False
    try:
        route = _route(config)
        assert route.tunnel is not None
        route.tunnel.ensure()
    except TunnelError as exc:
        results.append(("ssh tunnel", False, str(exc)))
        return False
    results.append(("ssh tunnel", True, f"{route.tunnel.describe()}: forward up"))
    return True


def _missing_table(problems: list[str], table: str) -> bool:
    return any(problem.startswith(f"table `{table}` does not exist") for problem in problems)


def _check(args: argparse.Namespace, config: Config) -> int:
    from agent.store import StoreError

    results: list[tuple[str, bool, str]] = []
    results.append(("config", True, config.source or "no file: built-in defaults"))

    state = config.state_path
    if state.is_dir():
        mode = stat.S_IMODE(state.stat().st_mode)
        writable = os.access(state, os.W_OK)
        ok = writable and not mode & 0o007
        results.append(
            (
                "state dir",
                ok,
                f"{state} mode {mode:04o}"
                + ("" if writable else ", not writable")
                + (", readable by others: chmod 700 it" if mode & 0o007 else ""),
            )
        )
    else:
        results.append(("state dir", True, f"{state} does not exist yet (completiond creates it)"))

    try:
        pong = Client(config=config, timeout=args.wait or 2.0, one_shot=True).ping()
        results.append(("socket", True, f"completiond pid {pong.pid} answers at {config.endpoint}"))
    except AgentUnavailable as exc:
        results.append(("socket", False, str(exc)))

    problems: list[str] = []
    mapping: list[str] = []
    if _transport_steps(config, results):
        try:
            store = _open(config)
            try:
                store.ping()
                problems = store.check_schema()
                mapping = store.describe_profile()
            finally:
                store.close()
            if problems:
                results.append(("database", False, "\n".join(problems)))
            else:
                via = f" ({_route(config).describe()})" if config.database.ssh else ""
                results.append(
                    ("database", True, f"{mask_url(config.database_url)}{via} schema ok")
                )
            # What the agent will write where, and what it cannot fill: information only.
            results.append(("columns", True, "\n".join(mapping)))
        except StoreError as exc:
            results.append(("database", False, str(exc)))
        except ValueError as exc:  # a database.url or table the store cannot use
            results.append(("database", False, str(exc)))
    else:
        results.append(("database", False, "not tried: the way to it failed (see above)"))

    tmux = shutil.which("tmux")
    if tmux is None:
        results.append(("tmux", not config.collect.tmux_target, "tmux is not installed"))
    elif config.collect.tmux_target:
        probe = subprocess.run(
            [
                tmux,
                *tmux_socket_args(config.collect.tmux_socket),
                "has-session",
                "-t",
                config.collect.tmux_target,
            ],
            capture_output=True,
            timeout=5,
        )
        results.append(
            (
                "tmux",
                probe.returncode == 0,
                f"target {config.collect.tmux_target}"
                + (" found" if probe.returncode == 0 else " not found"),
            )
        )
    else:
        results.append(("tmux", True, f"{tmux} (no collect.tmux_target configured)"))

    ok = all(good for _, good, _ in results)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": ok,
                    "checks": [
                        {"name": n, "ok": g, "message": m.replace("\n", "; ")}
                        for n, g, m in results
                    ],
                    "schema_problems": problems,
                    "columns": mapping,
                }
            )
        )
    else:
        for name, good, message in results:
            # One line per problem, so a missing column is not buried in a long line.
            first, *rest = message.split("\n")
            print(f"  {'ok  ' if good else 'FAIL'} {name:<10} {first}")
            for line in rest:
                print(f"  {'':4} {'':<10} {line}")
    return EXIT_OK if ok else EXIT_FAILED
