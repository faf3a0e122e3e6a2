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

from .checks import ChildInfo
from .doorbell import CHILDREN, Bells, children_for
from .httphook import HttpHooks
from .intake import Intake
from .journal import Journal
from .memory import Trimmer
from .sdnotify import Notifier
from .streamdoor import StreamDoor
from .supervisor import Supervisor

BATCH = 512  # requests journaled in one transaction (group commit)
# Connections another local user may hold on the ZeroMQ socket (see Parent._count_peers).
ZMQ_PEERS_PER_LOCAL_USER = 16
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
        if config.socket_group:
            # The group must reach the socket: traversable (x), not readable (no listing).
            os.chown(state, -1, _group_id(config.socket_group))
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


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartupError(
            f"socket_group {name!r} does not exist; create it or fix the config"
        ) from None


def peer_uid(frame: zmq.Frame, ipc: bool) -> int:
    """The uid of the process that sent ``frame``: libzmq appends the ipc peer's SO_PEERCRED to
    the frame's "Peer-Address" (``host:uid:gid:pid``).  A tcp:// peer, or an ipc peer whose
    credentials are unknown, is REMOTE: trusted with nothing a local user would need."""
    if not ipc:
        return p.REMOTE
    try:
        address = frame.get("Peer-Address")
    except zmq.ZMQError:
        return p.REMOTE
    parts = str(address).rsplit(":", 3)
    if len(parts) == 4 and parts[1].isdigit():
        return int(parts[1])
    return p.REMOTE


class Quota:
    """What one requester other than the agent's user may send: requests per second (a token
    bucket) and bytes per minute (a sliding window of one-second buckets)."""

    def __init__(self, per_second: float, bytes_per_minute: int) -> None:
        self.per_second = per_second
        self.bytes_per_minute = bytes_per_minute
        self._tokens: dict[int, tuple[float, float]] = {}
        self._bytes: dict[int, dict[int, int]] = {}

    def refusal(self, uid: int, size: int, now: float) -> str | None:
        """Why this request is over the requester's quota, or None (then it is counted)."""
        burst = max(1.0, self.per_second)
        tokens, at = self._tokens.get(uid, (burst, now))
        tokens = min(burst, tokens + (now - at) * self.per_second)
        window = self._bytes.setdefault(uid, {})
        second = int(now)
        for old in [s for s in window if s <= second - 60]:
            del window[old]
        if tokens < 1.0:
            self._tokens[uid] = (tokens, now)
            return (
                f"more than {self.per_second:g} requests per second from uid {uid} "
                "(limits.requests_per_second); not taken, send it again later"
            )
        if sum(window.values()) + size > self.bytes_per_minute:
            self._tokens[uid] = (tokens, now)
            return (
                f"more than {self.bytes_per_minute} bytes per minute from uid {uid} "
                "(limits.bytes_per_minute); not taken, send it again later"
            )
        self._tokens[uid] = (tokens - 1.0, now)
        window[second] = window.get(second, 0) + size
        return None


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
        self._ipc = config.endpoint.startswith("ipc://")
        self.quota = Quota(config.limits.requests_per_second, config.limits.bytes_per_minute)
        self._peers_monitor: zmq.Socket | None = None
        self._peers: dict[int, int] = {}  # descriptor of a connected client -> its uid
        self._door: StreamDoor | None = None  # the one-shot clients' stream socket
        self.http_hooks = HttpHooks(config)

    # ------------------------------------------------------------ lifecycle

    def initialize(self) -> None:
        config = self.config
        self.journal = Journal.create(config.journal_path)
        self.intake = Intake(config, self.journal, self._children_info, self.started_at)
        self._ctx = zmq.Context()
        self._router = self._bind()
        self.poller.register(self._router, zmq.POLLIN)
        self._peers_monitor = self._router.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
        )
        self.poller.register(self._peers_monitor, zmq.POLLIN)
        self._door = self._open_door()
        self._bells = Bells(self._ctx, config.state_path, CHILDREN)
        self._ingest_outbox(self.clock())
        self.intake.wait_for_lock()  # the children may hold the journal's lock from now on
        self._event("started", pid=os.getpid())
        self.supervisor.start_all(self.clock())
        for child in self.supervisor.children.values():
            self.poller.register(child.pidfd, zmq.POLLIN)
        self.http_hooks.start()
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
        # A frame a little over the limit is still answered TOO_LARGE; a bigger one ends its
        # connection. libzmq buffers up to this much of a message per connection.
        router.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES + 64 * 1024)
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

    def _open_door(self) -> StreamDoor | None:
        """The stream socket beside an ipc endpoint, with the same mode and group."""
        path = self.config.stream_socket_path
        if path is None:
            return None
        limits = self.config.limits
        door = StreamDoor(
            path,
            self.poller,
            max_peers=limits.max_peers,
            # No more waiting at once than the quota would take in a minute.
            max_held=limits.bytes_per_minute,
            allowed=self.config.socket_allowed_uids,
        )
        gid = grp.getgrnam(self.config.socket_group).gr_gid if self.config.socket_group else None
        door.bind(int(self.config.socket_mode, 8), gid)
        return door

    def run_once(self, now: float) -> float:
        self._count_peers()
        served = self._serve_requests(now)
        if self._door is not None:
            served += self._door.serve(now, self._answer)
        if served:
            self.trimmer.worked(now)
        self._supervise(now)
        if now >= self._next_sweep:
            self._ingest_outbox(now)
            self._next_sweep = now + self.config.behavior.sweep_interval
        wake = self._next_sweep
        restart = self.supervisor.next_restart()
        if restart is not None:
            wake = min(wake, restart)
        if self._door is not None and (door := self._door.next_deadline()) is not None:
            wake = min(wake, door)
        watchdog = self.notifier.watchdog(now)
        if watchdog is not None:
            wake = min(wake, watchdog)
        self.trimmer.run(now)
        trim = self.trimmer.due()
        return wake if trim is None else min(wake, trim)

    def shutdown(self) -> None:
        logger.info("stopping: no new requests; stopping children")
        self.notifier.stopping("stopping the children")
        self.http_hooks.stop()  # its requests would only be queued in the outbox from here on
        if self._socket_path is not None:
            # New clients find no socket and queue in the outbox at once.
            with contextlib.suppress(FileNotFoundError):
                self._socket_path.unlink()
        if self._door is not None:
            # Answer the frames already whole; a client still writing queues its request.
            self._door.serve(self.clock(), self._answer)
            self._door.close()
            self._door = None
        if self._peers_monitor is not None:
            self.poller.unregister(self._peers_monitor)
            assert self._router is not None
            with contextlib.suppress(zmq.ZMQError):
                self._router.disable_monitor()
            self._peers_monitor.close(0)
            self._peers_monitor = None
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
        """Answer every request waiting on the ZeroMQ socket; how many there were."""
        assert self._router is not None
        served = 0
        while True:
            envelopes: list[list[zmq.Frame]] = []
            while len(envelopes) < BATCH:
                try:
                    envelopes.append(self._router.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
            if not envelopes:
                return served
            served += len(envelopes)
            routes: list[list[bytes]] = []
            frames: list[bytes] = []
            requesters: list[int] = []
            for parts in envelopes:
                # REQ sends [identity, b"", frame]; anything else is garbage with a return address.
                if len(parts) == 3 and parts[1].bytes == b"":
                    routes.append([parts[0].bytes, b""])
                    frames.append(parts[2].bytes)
                elif len(parts) >= 2:
                    routes.append([parts[0].bytes, b""])
                    frames.append(b"")  # decodes to a BAD_FRAME error
                else:
                    continue
                requesters.append(peer_uid(parts[-1], self._ipc))
            for route, reply in zip(routes, self._answer(frames, requesters, now), strict=True):
                with contextlib.suppress(zmq.ZMQError):
                    self._router.send_multipart([*route, reply], zmq.NOBLOCK)

    def _answer(self, frames: list[bytes], requesters: list[int], now: float) -> list[bytes]:
        """The reply to each request frame, whichever socket it came on: the gate first (not
        allowed, over quota), then intake in one transaction; the children are rung after."""
        assert self.intake is not None
        answered: dict[int, p.Reply] = {}
        for index, (frame, uid) in enumerate(zip(frames, requesters, strict=True)):
            refusal = self._gate(uid, len(frame), now)
            if refusal is not None:
                answered[index] = refusal
        taken = [i for i in range(len(frames)) if i not in answered]
        handled, ring = self.intake.handle_frames(
            [frames[i] for i in taken], now, [requesters[i] for i in taken]
        )
        replies = answered | dict(zip(taken, handled, strict=True))
        for name in ring:
            assert self._bells is not None
            self._bells.ring(name)
        return [p.encode(replies[index]) for index in range(len(frames))]

    def _gate(self, uid: int, size: int, now: float) -> p.Error | None:
        """Refuse a requester the config does not let in, or one over its quota."""
        if uid == os.geteuid():
            return None
        allowed = self.config.socket_allowed_uids
        if allowed and uid not in allowed:
            logger.warning("refused a request from uid {} (not in socket_allowed_uids)", uid)
            return p.Error(
                code=p.ErrorCode.FORBIDDEN,
                message=f"uid {uid} may not use this agent (socket_allowed_uids); "
                "ask its administrator",
            )
        refusal = self.quota.refusal(uid, size, now)
        if refusal is not None:
            return p.Error(code=p.ErrorCode.OVER_QUOTA, message=refusal)
        return None

    def _count_peers(self) -> None:
        """Track connected clients by user; a user other than the agent's with more than its
        cap of connections has the new one shut at once, so a connection flood costs
        descriptors (and libzmq's buffers, a message each) only up to the cap, and the agent
        keeps answering its own user.  The cap is limits.max_peers, and for another local user
        at most ZMQ_PEERS_PER_LOCAL_USER: their one-shot commands use the stream socket, whose
        bytes are counted per user (agent.streamdoor), and libzmq cannot count them."""
        if self._peers_monitor is None:
            return
        from zmq.utils.monitor import recv_monitor_message

        refused: dict[int, int] = {}
        while True:
            try:
                event = recv_monitor_message(self._peers_monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            fd = int(event["value"])
            if event["event"] != zmq.EVENT_ACCEPTED:
                self._peers.pop(fd, None)
                continue
            uid = _socket_uid(fd) if self._ipc else p.REMOTE
            if uid != os.geteuid():
                held = sum(1 for other in self._peers.values() if other == uid)
                if held >= self._peer_cap(uid):
                    _shut(fd)  # libzmq sees the end of the stream and closes it itself
                    refused[uid] = refused.get(uid, 0) + 1
                    continue
            self._peers[fd] = uid
        for uid, count in refused.items():
            logger.warning(
                "closed {} connection(s) of uid {} over its cap of {} (limits.max_peers)",
                count,
                uid,
                self._peer_cap(uid),
            )

    def _peer_cap(self, uid: int) -> int:
        limit = self.config.limits.max_peers
        return limit if uid == p.REMOTE else min(limit, ZMQ_PEERS_PER_LOCAL_USER)

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
        try:
            waiting = outbox.pending(self.config.outbox_dir)
        except OSError as exc:  # out of descriptors, say: the next sweep tries again
            logger.error("outbox: cannot list {}: {}", self.config.outbox_dir, exc)
            return
        for path in waiting:
            try:
                owner, frame = outbox.read(path)
                request = p.decode_request(frame)
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
            if isinstance(request, p.TodoRequest):
                # The file's owner queued it: the outbox is the agent user's, so it is theirs.
                request = msgspec.structs.replace(request, requester_uid=owner)
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


def _socket_uid(fd: int) -> int:
    import socket
    import struct

    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return p.REMOTE
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    except OSError:
        return p.REMOTE
    finally:
        sock.detach()  # the descriptor stays libzmq's


def _shut(fd: int) -> None:
    import socket

    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()  # the descriptor stays libzmq's
