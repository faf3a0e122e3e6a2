"""The ``web`` child: Prometheus's endpoint (``metrics.listen``) and the dashboard (``web.listen``).

It reads the journal through a read-only connection and asks the parent for live state (children,
health) over the agent's own socket, so it never holds a lock that intake, the writer or the
monitor wait for.  The HTTP servers (Uvicorn, serving Starlette apps) run on an event loop in a
thread of their own; the main thread keeps the loop every child has (signals, parent check).  It
is started only when one of the two addresses is set; its death is like any child's.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from loguru import logger

from protocol.config import Config, split_listen

from .journal import COMPLETION_KINDS, Journal, StageRow, State
from .loop import ChildBase
from .metrics import WAITING, durations

STAGE_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
)
LIVE_TIMEOUT = 0.5  # how long a scrape waits for the parent's answer
HEALTH_LEVEL = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}


# The web extra's packages (pyproject.toml), by import name.
WEB_PACKAGES = ("starlette", "uvicorn", "jinja2", "multipart", "prometheus_client")


def missing_web_packages(
    config: Config, find: Callable[[str], object | None] | None = None
) -> str | None:
    """Why the web process cannot run as configured (its extra is not installed), or None."""
    if not (config.metrics.listen or config.web.listen):
        return None
    from importlib.util import find_spec

    look = find or find_spec
    missing = [name for name in WEB_PACKAGES if look(name) is None]
    if not missing:
        return None
    keys = " and ".join(
        k
        for k, v in (("metrics.listen", config.metrics.listen), ("web.listen", config.web.listen))
        if v
    )
    need = "need" if " and " in keys else "needs"
    return (
        f"{keys} {need} the web extra, which is not installed (missing: {', '.join(missing)}): "
        "pip install 'completion-agent[web]' (from a checkout: pip install '.[web]'), "
        f"or leave {keys} empty"
    )


def error_class(text: str | None, stage: str) -> str | None:
    """A low-cardinality label for what went wrong in an attempt (never the message itself)."""
    if stage == State.DEAD:
        return "permanent"
    if not text:
        return None
    lowered = text.lower()
    if "verif" in lowered or "read back" in lowered:
        return "verification"
    if "lock" in lowered or "deadlock" in lowered:
        return "lock"
    if re.search(
        r"connect|unreachable|gone away|lost connection|timed out|timeout|refused", lowered
    ):
        return "connection"
    return "other"


class Exporter:
    """prometheus-client metrics kept up to date from the journal's stage rows.

    Histograms and counters only grow while this process lives: at start they take in what the
    journal still holds (its retention), then every new stage row once, in order.  A restart of
    the process is a counter reset, which Prometheus's rate() handles.
    """

    def __init__(self, journal: Journal, config: Config, *, live: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.journal = journal
        self.config = config
        self.live = live  # a ctl.Client, or None (no live state: the gauges that need it go)
        self.registry = CollectorRegistry(auto_describe=True)
        self.stage_seconds = Histogram(
            "completiond_stage_duration_seconds",
            "Seconds a completion spent in each stage (intake, collect, write, verify, clean, "
            "end_to_end = the hook's send to the verified row).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.source_seconds = Histogram(
            "completiond_source_duration_seconds",
            "Seconds each collection source took when tried.",
            ["source"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "completiond_entries_finished",
            "Journal entries that reached an end: by kind and outcome.",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "completiond_write_attempts",
            "Database write or verification attempts.",
            registry=self.registry,
        )
        self.errors = Counter(
            "completiond_errors",
            "Failed attempts and permanent failures, by error class.",
            ["error_class"],
            registry=self.registry,
        )
        self.registry.register(_Gauges(self))
        self._last_rowid = 0
        self._lock = threading.Lock()

    def sync(self) -> None:
        """Take in every stage row written since the last call."""
        with self._lock:
            while True:
                rows = self.journal.stages_after(self._last_rowid)
                if not rows:
                    return
                self._take(rows)
                self._last_rowid = rows[-1].rowid

    def _take(self, rows: list[StageRow]) -> None:
        touched = sorted({r.completion_id for r in rows})
        heads = self.journal.kinds_and_outcomes(touched)
        by_completion: dict[str, list[StageRow]] = {}
        for row in self.journal.stages_of(touched):
            by_completion.setdefault(row.completion_id, []).append(row)
        new = {r.rowid for r in rows}
        for cid, stages in by_completion.items():
            kind, outcome = heads.get(cid, ("unknown", None))
            # A stage is observed once: when the row that ends it is among the new ones.
            known = Counter(
                name for name, _, _ in durations(s for s in stages if s.rowid not in new)
            )
            for name, seconds, _ in durations(stages):
                if known[name]:
                    known[name] -= 1
                    continue
                if name.startswith("source:"):
                    self.source_seconds.labels(name.removeprefix("source:")).observe(seconds)
                elif kind in COMPLETION_KINDS:
                    self.stage_seconds.labels(name).observe(seconds)
            for stage in stages:
                if stage.rowid in new:
                    self._count(stage, kind, outcome)

    def _count(self, stage: StageRow, kind: str, outcome: str | None) -> None:
        if stage.stage == "attempt":
            self.attempts.inc()
            cls = error_class(stage.detail, "attempt")
            if cls is not None:
                self.errors.labels(cls).inc()
        elif stage.stage == State.DEAD:
            self.errors.labels("permanent").inc()
            self.finished.labels(kind, State.DEAD).inc()
        elif stage.stage == State.FAILED:
            self.finished.labels(kind, outcome or State.FAILED).inc()
        elif stage.stage == State.VERIFIED or (
            stage.stage == State.CLEANED and kind not in COMPLETION_KINDS
        ):
            self.finished.labels(kind, outcome or "applied").inc()

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.sync()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Gauges:
    """What is true now: read at each scrape (journal, and the parent for live state)."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        journal = self.exporter.journal
        now = time.time()
        states = journal.count_by_state()
        yield GaugeMetricFamily(
            "completiond_backlog",
            "Entries on their way to the database (accepted, collected, written).",
            value=sum(states.get(s, 0) for s in WAITING),
        )
        yield GaugeMetricFamily(
            "completiond_dead_entries",
            "Entries dead after a permanent error.",
            states.get(State.DEAD, 0),
        )
        oldest = journal.oldest_unfinished_at()
        yield GaugeMetricFamily(
            "completiond_oldest_waiting_entry_age_seconds",
            "Age of the oldest entry still on its way to the database (0 when none).",
            value=0.0 if oldest is None else max(now - oldest, 0.0),
        )
        yield GaugeMetricFamily(
            "completiond_deadlines_armed",
            "Todos with a completion or emergency deadline still to fire.",
            value=journal.armed_count(),
        )
        pending = GaugeMetricFamily(
            "completiond_notifications_pending",
            "Notifications waiting to be delivered, by target.",
            labels=["target"],
        )
        for (target, state), count in sorted(journal.delivery_counts().items()):
            if state in ("pending", "sending"):
                pending.add_metric([target], count)
        yield pending
        live = self.exporter.live
        agent_up = 0
        status = health = None
        if live is not None:
            try:
                status = live.status()
                health = live.health()
                agent_up = 1
            except Exception as exc:
                logger.debug("live state unavailable for a scrape: {}", exc)
        yield GaugeMetricFamily(
            "completiond_agent_up", "Whether the agent's parent answered this scrape.", agent_up
        )
        if status is not None and status.agent is not None:
            up = GaugeMetricFamily(
                "completiond_child_up", "Whether each child process runs.", labels=["child"]
            )
            restarts = CounterMetricFamily(
                "completiond_child_restarts",
                "Restarts of each child since the agent started.",
                labels=["child"],
            )
            for name, pid in sorted(status.agent.children.items()):
                up.add_metric([name], 1 if pid else 0)
                restarts.add_metric([name], status.agent.restarts.get(name, 0))
            yield up
            yield restarts
        if health is not None:
            checks = {c.name: c.status for c in health.checks}
            level = GaugeMetricFamily(
                "completiond_health_check_status",
                "Each health check: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
                labels=["check"],
            )
            for name, state in sorted(checks.items()):
                level.add_metric([name], HEALTH_LEVEL.get(state, 3))
            yield level
            if "database" in checks and checks["database"] != "UNKNOWN":
                yield GaugeMetricFamily(
                    "completiond_database_up",
                    "Whether the database answered the monitor's latest check.",
                    value=1 if checks["database"] == "OK" else 0,
                )
            database = next((c for c in health.checks if c.name == "database"), None)
            if self.exporter.config.database.ssh and database and database.status != "UNKNOWN":
                # The database check names the hop that failed: "ssh to ..." is the tunnel.
                down = database.status != "OK" and "ssh to " in database.message
                yield GaugeMetricFamily(
                    "completiond_tunnel_up",
                    "Whether the agent's SSH tunnel to the database is up (database.ssh).",
                    value=0 if down else 1,
                )


# ---------------------------------------------------------------- the process


def bind(listen: str, key: str) -> socket.socket:
    """Bind the listening socket here, so a taken port fails the start with a sentence."""
    host, port = split_listen(listen, key)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"{key}: cannot listen on {listen}: {exc.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def metrics_app(exporter: Exporter):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    async def metrics(request: Request) -> Response:
        body, content_type = await run_in_threadpool(exporter.exposition)
        return Response(body, media_type=content_type)

    async def root(request: Request) -> Response:
        return PlainTextResponse("completiond metrics: see /metrics\n")

    return Starlette(routes=[Route("/metrics", metrics), Route("/", root)])


class Web(ChildBase):
    name = "web"

    def open(self) -> None:
        from ctl import Client

        self.ro = Journal.open_readonly(self.config.journal_path)
        self.live = Client(config=self.config, timeout=LIVE_TIMEOUT)
        self.exporter = Exporter(self.ro, self.config, live=self.live)
        self.servers: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        apps: list[tuple[Any, socket.socket, tuple[str, str] | None]] = []
        if self.config.metrics.listen:
            sock = bind(self.config.metrics.listen, "metrics.listen")
            apps.append((metrics_app(self.exporter), sock, None))
            logger.info(
                "serving Prometheus metrics on http://{}/metrics", self.config.metrics.listen
            )
        if self.config.web.listen:
            from .dashboard import dashboard_app

            sock = bind(self.config.web.listen, "web.listen")
            tls = (self.config.web.tls_cert, self.config.web.tls_key)
            apps.append((dashboard_app(self.config, self.ro, self.live), sock, tls))
            scheme = "https" if all(tls) else "http"
            logger.info("serving the dashboard on {}://{}/", scheme, self.config.web.listen)
        self._thread = threading.Thread(target=self._serve, args=(apps,), name="web", daemon=True)
        self._thread.start()

    def _serve(self, apps: list) -> None:
        import uvicorn

        loop = asyncio.new_event_loop()
        self._loop = loop
        servers = []
        for app, _sock, tls in apps:
            options: dict[str, Any] = {}
            if tls and all(tls):
                options = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]}
            config = uvicorn.Config(
                app,
                log_config=None,
                log_level="warning",
                access_log=False,
                lifespan="off",
                server_header=False,
                timeout_keep_alive=5,
                **options,
            )
            servers.append(uvicorn.Server(config))
        self.servers = servers

        async def serve_all() -> None:
            await asyncio.gather(
                *(
                    server.serve(sockets=[sock])
                    for server, (_, sock, _) in zip(servers, apps, strict=True)
                )
            )

        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve_all())
        except Exception:
            logger.exception("the web server failed")
        finally:
            loop.close()

    def work(self, now: float) -> float:
        if not self._thread.is_alive():
            raise SystemExit("the web server stopped; the supervisor restarts this process")
        return now + self.sweep

    def close(self) -> None:
        for server in self.servers:
            server.should_exit = True
        self._thread.join(timeout=3.0)
        self.live.close()
        self.ro.close()
