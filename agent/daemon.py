"""completiond's parent process: the public socket, the journal's intake, and the children.

It takes the state dir's lock, binds the ROUTER endpoint (socket 0600 in a 0700 dir), journals
every request before replying, ingests the outbox, supervises the children and stops them in order.
It does no slow work: no database, no tmux, no session files.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import signal
import sqlite3
import time
from pathlib import Path

import msgspec
import zmq
from loguru import logger

import protocol as p
from protocol import outbox
from protocol.config import Config
from protocol.dburl import mask_url

from .doorbell import CHILDREN, Bells, children_for
from .intake import ChildInfo, Intake
from .journal import Journal
from .memory import Trimmer
from .sdnotify import Notifier
from .supervisor import Supervisor

BATCH = 512  # requests journaled in one transaction (group commit)
STOP_ORDER = ("web", "notify", "monitor", "collector", "writer")
STOP_BUDGET = 8.0  # seconds for all children; the whole stop stays under 10 s


class StateDirLocked(Exception):
    pass


class StartupError(Exception):
    pass


class PidLock:
    """An exclusive flock on state_dir/completiond.pid, held for the agent's life."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateDirLocked(
                f"another completiond (pid {holder}) is running on state dir {self.path.parent}; "
                "stop it first, or give this one its own state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None


def prepare_state_dir(config: Config) -> Path:
    state = config.state_path
    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = 0o710 if config.socket_group else 0o700
        state.chmod(mode)
        for sub in (config.outbox_dir, config.archive_dir, config.logs_dir):
            sub.mkdir(exist_ok=True, mode=0o700)
        probe = state / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(
            f"state dir {state} is not usable: {exc.strerror}; "
            "make it writable by this user or set state_dir"
        ) from None
    return state


class Parent:
    name = "agent"

    def __init__(self, config: Config, *, clock=time.time) -> None:
        self.config = config
        self.clock = clock
        self.poller = zmq.Poller()
        self.started_at = clock()
        self.supervisor = Supervisor(children_for(config), msgspec.json.encode(config))
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._bells: Bells | None = None
        self.journal: Journal | None = None
        self.intake: Intake | None = None
        self._socket_path: Path | None = None
        self._next_sweep = 0.0
        self.notifier = Notifier.from_env()  # systemd Type=notify; a no-op elsewhere
        self.trimmer = Trimmer()

    # ------------------------------------------------------------ lifecycle

    def initialize(self) -> None:
        config = self.config
        self.journal = Journal.create(config.journal_path)
        self.intake = Intake(config, self.journal, self._children_info, self.started_at)
        self._ctx = zmq.Context()
        self._router = self._bind()
        self.poller.register(self._router, zmq.POLLIN)
        self._bells = Bells(self._ctx, config.state_path, CHILDREN)
        self._ingest_outbox(self.clock())
        self.intake.wait_for_lock()  # the children may hold the journal's lock from now on
        self._event("started", pid=os.getpid())
        self.supervisor.start_all(self.clock())
        for child in self.supervisor.children.values():
            self.poller.register(child.pidfd, zmq.POLLIN)
        logger.info(
            "completiond {} listening on {} (state {}, database {})",
            os.getpid(),
            config.endpoint,
            config.state_dir,
            mask_url(config.database_url),
        )
        self.notifier.ready(f"listening on {config.endpoint}")

    def _bind(self) -> zmq.Socket:
        assert self._ctx is not None
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        router.setsockopt(zmq.MAXMSGSIZE, 4 * p.MAX_FRAME_BYTES)
        endpoint = self.config.endpoint
        if endpoint.startswith("ipc://"):
            path = Path(endpoint[len("ipc://") :])
            # We hold the state dir's lock, so a socket file left here is stale.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            old_umask = os.umask(0o177)
            try:
                router.bind(endpoint)
            finally:
                os.umask(old_umask)
            mode = int(self.config.socket_mode, 8)
            if self.config.socket_group:
                os.chown(path, -1, grp.getgrnam(self.config.socket_group).gr_gid)
            path.chmod(mode)
            self._socket_path = path
        else:
            router.bind(endpoint)
        return router

    def run_once(self, now: float) -> float:
        if self._serve_requests(now):
            self.trimmer.worked(now)
        self._supervise(now)
        if now >= self._next_sweep:
            self._ingest_outbox(now)
            self._next_sweep = now + self.config.behavior.sweep_interval
        wake = self._next_sweep
        restart = self.supervisor.next_restart()
        if restart is not None:
            wake = min(wake, restart)
        watchdog = self.notifier.watchdog(now)
        if watchdog is not None:
            wake = min(wake, watchdog)
        self.trimmer.run(now)
        trim = self.trimmer.due()
        return wake if trim is None else min(wake, trim)

    def shutdown(self) -> None:
        logger.info("stopping: no new requests; stopping children")
        self.notifier.stopping("stopping the children")
        if self._socket_path is not None:
            # New clients find no socket and queue in the outbox at once.
            with contextlib.suppress(FileNotFoundError):
                self._socket_path.unlink()
        if self._router is not None:
            # Journal and answer what already arrived (a refusal would make the client drop it,
            # silence makes it queue), then close the door.
            self._serve_requests(self.clock())
            if self.intake is not None:
                self.intake.stopping = True
            self._router.close(linger=500)
            self._router = None
        self.supervisor.stop_all(
            tuple(name for name in STOP_ORDER if name in self.supervisor.children), STOP_BUDGET
        )
        self._event("stopped", pid=os.getpid())
        if self._bells is not None:
            self._bells.close()
        if self._ctx is not None:
            self._ctx.term()
        if self.journal is not None:
            self.journal.close()
        self.notifier.close()
        logger.info("completiond stopped")

    def reopen_logs(self) -> None:
        self.supervisor.signal_all(signal.SIGHUP)

    # ------------------------------------------------------------ work

    def _serve_requests(self, now: float) -> int:
        """Answer every request waiting on the socket; how many there were."""
        assert self._router is not None and self.intake is not None
        served = 0
        while True:
            envelopes: list[list[bytes]] = []
            while len(envelopes) < BATCH:
                try:
                    envelopes.append(self._router.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
            if not envelopes:
                return served
            served += len(envelopes)
            routes: list[list[bytes]] = []
            frames: list[bytes] = []
            for parts in envelopes:
                # REQ sends [identity, b"", frame]; anything else is garbage with a return address.
                if len(parts) == 3 and parts[1] == b"":
                    routes.append(parts[:2])
                    frames.append(parts[2])
                elif len(parts) >= 2:
                    routes.append([parts[0], b""])
                    frames.append(b"")  # decodes to a BAD_FRAME error
                else:
                    continue
            replies, ring = self.intake.handle_frames(frames, now)
            for route, reply in zip(routes, replies, strict=True):
                with contextlib.suppress(zmq.ZMQError):
                    self._router.send_multipart([*route, p.encode(reply)], zmq.NOBLOCK)
            for name in ring:
                assert self._bells is not None
                self._bells.ring(name)

    def _supervise(self, now: float) -> None:
        for child in self.supervisor.children.values():
            if child.process is not None and child.process.poll() is not None:
                if child.pidfd is not None:
                    self.poller.unregister(child.pidfd)
                self.supervisor.reap(child, now)
                self._event("child restarted", child=child.name, exit=child.exits[-1])
        for child in self.supervisor.restart_due(now):
            self.poller.register(child.pidfd, zmq.POLLIN)

    def _event(self, what: str, **details: object) -> None:
        """An ``agent`` event for the notifications (start, stop, a child's restart)."""
        if self.journal is None:
            return
        try:
            with self.journal.transaction() as db:
                self.journal.add_event(db, "agent", self.clock(), {"what": what, **details})
        except sqlite3.Error as exc:
            logger.warning("could not record the agent event {!r}: {}", what, exc)

    def _children_info(self) -> dict[str, ChildInfo]:
        return {
            name: ChildInfo(pid=child.pid, alive=child.alive, restarts=child.restarts)
            for name, child in self.supervisor.children.items()
        }

    def _ingest_outbox(self, now: float) -> None:
        assert self.intake is not None
        ring: set[str] = set()
        for path in outbox.pending(self.config.outbox_dir):
            try:
                request = p.decode_request(path.read_bytes())
            except (p.ProtocolError, OSError) as exc:
                kept = outbox.reject(path)
                logger.error("outbox file {} is unusable ({}); kept as {}", path.name, exc, kept)
                continue
            if not isinstance(request, p.QUEUEABLE):
                kept = outbox.reject(path)
                logger.error(
                    "outbox file {} holds a {}; kept as {}", path.name, type(request), kept
                )
                continue
            try:
                outcome = self.intake.apply(request, now)
            except sqlite3.Error as exc:
                # The journal cannot be written (disk full, or a child holds its lock): the file
                # stays for the next sweep.
                logger.error("outbox: the journal could not record {}: {}", path.name, exc)
                break
            if isinstance(outcome.reply, p.Error):
                kept = outbox.reject(path)
                logger.error(
                    "queued request {} refused: {}; kept as {}",
                    request.request_id,
                    outcome.reply.message,
                    kept,
                )
                continue
            outbox.remove(path)
            ring |= outcome.ring
            logger.info("ingested queued request {} from the outbox", request.request_id)
        if self._bells is not None:
            for name in ring:
                self._bells.ring(name)
