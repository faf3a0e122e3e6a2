"""The way to the todo database from one process: direct, over TLS, or through an ssh tunnel.

Every process that opens the database builds its own `DbRoute` and opens stores through it:

- the writer (its tunnel lives as long as the writer, restarted with backoff when ssh dies),
- the monitor's health checks (their own tunnel, so `health` tests the path itself and names
  the ssh cause when it breaks),
- the collector's todo facts for emergency reports (its own tunnel, started on first use),
- `completionctl add / db init / check` (a tunnel for the command's life).

One ssh per process costs a few idle TCP connections to the host; in return no process depends
on another's tunnel, and a restart of one child never cuts the others off.  Each tunnel forwards
a Unix socket in `state_dir/tunnel/` (0700): `ssh-<role>.sock`.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from protocol.config import Config, parse_ssh

from .store import SiteProfile, SshSettings, SshTunnel, Store, open_store, parse_url
from .store.tunnel import known_host_problem
from .store.url import MysqlTarget, node_name, with_nodes

TUNNEL_DIR = "tunnel"
NODE_FILE = "writer-node"  # the node the writer uses, with several hosts (for health)


def writer_node(config: Config) -> str | None:
    try:
        return (config.state_path / NODE_FILE).read_text().strip() or None
    except OSError:
        return None


class DbRoute:
    """Opens stores for one process (`role`); owns that process's ssh tunnel, if any."""

    def __init__(self, config: Config, role: str) -> None:
        self.config = config
        self.role = role
        self.tunnel: SshTunnel | None = None
        self.tls: ssl.SSLContext | None = None
        self._node: str | None = None
        db = config.database
        self.nodes: list[str] = []
        if config.database_url.startswith("mysql://"):
            target = parse_url(config.database_url)
            assert isinstance(target, MysqlTarget)
            self.nodes = [node_name(h, p) for h, p in with_nodes(target, db.hosts).all_nodes]
        if db.ssh:
            target = parse_url(config.database_url)
            assert isinstance(target, MysqlTarget)  # the config allows ssh only with mysql://
            remote = target.unix_socket or _hostport(target.host, target.port)
            self.tunnel = SshTunnel(
                ssh_settings(config),
                remote=remote,
                socket_path=tunnel_dir(config) / f"ssh-{role}.sock",
            )
        if db.tls != "off":
            self.tls = tls_context(config)

    def open(self, *, timeout: float | None = None) -> Store:
        db = self.config.database
        return open_store(
            self.config.database_url,
            table=db.table,
            timeout=timeout or self.config.behavior.database_timeout,
            tunnel=self.tunnel,
            tls=self.tls,
            nodes=list(db.hosts) or None,
            failback_after=db.failback_after,
            profile=SiteProfile.of_config(db),
        )

    def describe(self) -> str:
        """How this route reaches the database, for logs and `check`."""
        if self.tunnel is not None:
            return f"through {self.tunnel.describe()}"
        if self.tls is not None:
            return f"direct, TLS ({self.config.database.tls})"
        return "direct"

    def events(self) -> list[str]:
        """What the tunnel did since the last call ("tunnel up: ...", "tunnel down: ...")."""
        return self.tunnel.events() if self.tunnel is not None else []

    def log_events(self, logger) -> None:
        for event in self.events():
            if event.startswith("tunnel down"):
                logger.warning("database {}", event)
            else:
                logger.info("database {}", event)

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()

    def note_node(self, store: Store | None, logger) -> None:
        """With several hosts: log a change of node, and leave it where `health` reads it."""
        node = getattr(store, "node", None)
        if node is None or len(self.nodes) < 2 or node == self._node:
            return
        if self._node is not None:
            logger.warning("database: failed over from node {} to node {}", self._node, node)
        else:
            logger.info("database: using node {} of {}", node, ", ".join(self.nodes))
        self._node = node
        path = self.config.state_path / NODE_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(f"{node}\n")
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("cannot record the database node in {}: {}", path, exc)


def tunnel_dir(config: Config) -> Path:
    return config.state_path / TUNNEL_DIR


def ssh_settings(config: Config) -> SshSettings:
    user, host, port = parse_ssh(config.database.ssh)
    return SshSettings(
        user=user,
        host=host,
        port=port,
        identity=config.database.ssh_identity,
        known_hosts=config.database.ssh_known_hosts,
        timeout=config.behavior.ssh_timeout,
    )


def tls_context(config: Config) -> ssl.SSLContext:
    """The client context for database.tls: "require" encrypts; "verify" also checks the
    server's certificate against tls_ca (or the system's CAs) and its name against the host."""
    db = config.database
    try:
        if db.tls == "verify":
            ctx = ssl.create_default_context(cafile=db.tls_ca or None)
            # A private CA's certificates often lack what X509_STRICT insists on (key ids).
            ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if db.tls_cert:
            ctx.load_cert_chain(db.tls_cert, db.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"database.tls: cannot load the certificate files: {exc}") from None
    return ctx


def preflight(config: Config) -> list[str]:
    """Problems with the ssh and TLS settings that stop the agent from starting (exit 2):
    unreadable files, an ssh server whose host key is not known."""
    db = config.database
    problems: list[str] = []
    for key in ("ssh_identity", "ssh_known_hosts", "tls_ca", "tls_cert", "tls_key"):
        path = getattr(db, key)
        if path and not os.access(path, os.R_OK):
            problems.append(f"database.{key}: {path} is missing or not readable")
    if problems:
        return problems
    if db.tls != "off":
        try:
            tls_context(config)
        except ValueError as exc:
            problems.append(str(exc))
    if db.ssh:
        problem = known_host_problem(ssh_settings(config))
        if problem is not None:
            problems.append(f"database.ssh: {problem}")
    return problems


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
