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
        pong = Client(config=config, timeout=args.wait or 2.0).ping()
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
