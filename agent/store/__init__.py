"""The todo database: one `Store` interface, a SQLite and a MySQL/MariaDB backend.

`open_store(url)` is the only constructor the agent's processes use; each process builds its own
store from plain arguments after it starts. This package imports nothing else from `agent` and
no logging library: callers log what it raises. Datetimes in and out are naive UTC; what the
columns hold follows the site profile (`profile.py`).
"""

from __future__ import annotations

import ssl

from .base import (
    STATUSES,
    PermanentError,
    Store,
    StoreError,
    Todo,
    TodoWrite,
    TransientError,
    WriteOutcome,
    check_table_name,
)
from .profile import SiteProfile
from .tunnel import SshSettings, SshTunnel, TunnelError
from .url import MysqlTarget, SqliteTarget, parse_url, redact_url, with_nodes

__all__ = [
    "STATUSES",
    "MysqlTarget",
    "PermanentError",
    "SiteProfile",
    "SqliteTarget",
    "SshSettings",
    "SshTunnel",
    "Store",
    "StoreError",
    "Todo",
    "TodoWrite",
    "TransientError",
    "TunnelError",
    "WriteOutcome",
    "open_store",
    "parse_url",
    "redact_url",
]


def open_store(
    url: str,
    *,
    table: str = "stage_project_todos",
    timeout: float = 30.0,
    tunnel: SshTunnel | None = None,
    tls: ssl.SSLContext | None = None,
    nodes: list[str] | None = None,
    failback_after: float = 60.0,
    profile: SiteProfile | None = None,
) -> Store:
    """A store for `url` (sqlite:///ABS/PATH.db or mysql://USER[:PASS]@HOST[:PORT]/DB).

    `nodes` (MySQL only: "host[:port]" each) replace the URL's hosts: a cluster, failed over in
    order and back to the first after `failback_after` seconds.  `tunnel` leads to the server
    through ssh; `tls` makes TLS required with that
    context.  Both belong to the caller, who closes the tunnel.
    Nothing connects yet: the first call does, and every error after that comes as a
    TransientError or PermanentError. A bad URL, table name or timeout raises ValueError here.
    """
    check_table_name(table)
    if not (isinstance(timeout, int | float) and 0 < timeout <= 86400):
        raise ValueError(f"timeout must be a number of seconds in (0, 86400], got {timeout!r}")
    target = parse_url(url)
    if isinstance(target, SqliteTarget):
        from .sqlite import SqliteStore

        return SqliteStore(target.path, table=table, timeout=timeout, profile=profile)
    # PyMySQL is imported only when a MySQL URL is used.
    from .mysql import MysqlStore

    if nodes:
        target = with_nodes(target, nodes)
    return MysqlStore(
        target,
        table=table,
        timeout=timeout,
        tunnel=tunnel,
        tls=tls,
        failback_after=failback_after,
        profile=profile,
    )
