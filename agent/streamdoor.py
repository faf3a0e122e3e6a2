"""The one-shot clients' door: a Unix stream socket beside the ZeroMQ socket.

A process that sends one request and exits (``completionctl hook``, every ``completionctl``
command) would spend most of its life importing pyzmq.  Through this door it needs only the
standard library's ``socket``: it connects, writes one protocol frame (the same bytes as a
ZeroMQ request), shuts its side for writing, and reads the one reply frame until the agent
closes.  The frame goes through the same gate and intake as a ZeroMQ request; the requester is
the connecting process's uid, from the kernel (SO_PEERCRED).

The door is owned by the parent and served from its loop without ever blocking it: every
descriptor is non-blocking and registered in the loop's poller, a frame is read as it arrives
(at most ``MAX_FRAME_BYTES`` + 1 bytes are kept; more is refused as too large by the decoder),
a connection that has not finished within ``CONNECTION_TIMEOUT`` is closed without an answer
(its client then queues the request in the outbox, as for a silent ZeroMQ socket), and a user
other than the agent's may hold at most ``limits.max_peers`` connections at once.  What such a
user's unfinished frames keep in memory is bounded too: ``max_held`` bytes over all its
connections (a frame that would pass it is read, dropped and answered ``OVER_QUOTA``), and
nothing for a user not in ``allowed`` (its frame reaches the gate empty and is refused there).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from loguru import logger

import protocol as p

CONNECTION_TIMEOUT = 10.0  # seconds from accept to the whole frame having arrived
# Connections waiting to be accepted; a client finding it full retries within its wait.  Every
# loop accepts all that wait, and one over its user's cap is closed at once.
BACKLOG = 1024
# After accept() failed (out of descriptors): the listener is left alone this long, so the loop
# neither spins on it nor logs each try; clients wait in the backlog meanwhile.
ACCEPT_PAUSE = 0.25
_CHUNK = 1 << 16
_CREDS = struct.Struct("3i")

# The parent's answer to a batch: (frames, their requesters, now) -> one reply frame each.
Answer = Callable[[list[bytes], list[int], float], list[bytes]]


@dataclass
class _Connection:
    sock: socket.socket
    uid: int
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    keep: bool = True  # False: read and dropped (over its user's bytes, or a user not allowed)
    over: str | None = None  # why it is refused here, not answered by the parent
    reply: bytes | None = None  # set once answered; what is left of it to send


class StreamDoor:
    """Accepts, reads, answers and closes one-request connections on ``path``."""

    def __init__(
        self,
        path: Path,
        poller: zmq.Poller,
        *,
        max_peers: int,
        max_held: int,
        allowed: Collection[int] = (),
    ) -> None:
        self.path = path
        self._poller = poller
        self._max_peers = max_peers
        # Bytes of unfinished frames kept for one user other than the agent's, over all its
        # connections: without it max_peers connections of ~4 MB each (2 GB at the defaults).
        self._max_held = max_held
        self._allowed = frozenset(allowed)  # empty: whoever the socket's mode lets in
        self._held: dict[int, int] = {}  # uid -> bytes kept for it now
        # Connections of all users other than the agent's together: at most half the agent's
        # descriptors (many users' max_peers would be past it), so its own work still gets some.
        self._room = max(1, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)
        self._listener: socket.socket | None = None
        self._resume_at: float | None = None  # set while accepting is paused (ACCEPT_PAUSE)
        self._connections: dict[int, _Connection] = {}  # descriptor -> connection

    def bind(self, mode: int, gid: int | None) -> None:
        """Listen on ``path`` (a stale file there is replaced: the caller holds the state lock)
        with the same mode and group as the ZeroMQ socket."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(os.fspath(self.path))
        finally:
            os.umask(old_umask)
        if gid is not None:
            os.chown(self.path, -1, gid)
        self.path.chmod(mode)
        listener.listen(BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._poller.register(listener.fileno(), zmq.POLLIN)

    def serve(self, now: float, answer: Answer) -> int:
        """Accept what waits, read what arrived, answer every whole frame; how many frames."""
        if self._listener is None:
            return 0
        if self._resume_at is None or now >= self._resume_at:
            self._accept(now)
        ready: list[_Connection] = []
        for conn in list(self._connections.values()):
            if conn.reply is None:
                if self._read(conn):
                    if conn.over is None:
                        ready.append(conn)
                    else:
                        conn.reply = p.encode(
                            p.Error(code=p.ErrorCode.OVER_QUOTA, message=conn.over)
                        )
                        self._send(conn)
            else:
                self._send(conn)
        if ready:
            replies = answer([bytes(c.received) for c in ready], [c.uid for c in ready], now)
            for conn, reply in zip(ready, replies, strict=True):
                self._release(conn)
                conn.reply = reply
                self._send(conn)
        self._expire(now)
        return len(ready)

    def next_deadline(self) -> float | None:
        """When the oldest unfinished connection is to be closed (or accepting resumes)."""
        deadline = min((c.deadline for c in self._connections.values()), default=None)
        if self._resume_at is not None:
            return self._resume_at if deadline is None else min(deadline, self._resume_at)
        return deadline

    def close(self) -> None:
        """Stop listening (new clients find no socket) and drop every open connection."""
        for conn in list(self._connections.values()):
            self._drop(conn)
        if self._listener is not None:
            if self._resume_at is None:
                self._poller.unregister(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    # ------------------------------------------------------------ the steps

    def _accept(self, now: float) -> None:
        assert self._listener is not None
        if self._resume_at is not None:
            self._resume_at = None
            self._poller.register(self._listener.fileno(), zmq.POLLIN)
        refused: dict[int, int] = {}
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # out of descriptors: the rest wait in the backlog
                logger.warning(
                    "stream socket: cannot accept connections for {} s: {}", ACCEPT_PAUSE, exc
                )
                self._resume_at = now + ACCEPT_PAUSE
                self._poller.unregister(self._listener.fileno())
                break
            uid = _peer_uid(sock)
            if uid != os.geteuid():
                held = sum(1 for c in self._connections.values() if c.uid == uid)
                others = sum(1 for c in self._connections.values() if c.uid != os.geteuid())
                if held >= self._max_peers or others >= self._room:
                    sock.close()
                    refused[uid] = refused.get(uid, 0) + 1
                    continue
            sock.setblocking(False)
            conn = _Connection(sock, uid, now + CONNECTION_TIMEOUT)
            # A user the gate refuses anyway gets there with an empty frame: nothing is kept.
            conn.keep = not self._allowed or uid in self._allowed or uid == os.geteuid()
            self._connections[sock.fileno()] = conn
            self._poller.register(sock.fileno(), zmq.POLLIN)
        for uid, count in refused.items():
            logger.warning(
                "closed {} stream connection(s) of uid {} over its cap of {} (limits.max_peers) "
                "or all other users' of {} (half the open file limit)",
                count,
                uid,
                self._max_peers,
                self._room,
            )

    def _read(self, conn: _Connection) -> bool:
        """Read what arrived; True once the client has shut its side (the frame is whole)."""
        while True:
            try:
                chunk = conn.sock.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self._drop(conn)
                return False
            if not chunk:
                return True
            if conn.keep and len(conn.received) <= p.MAX_FRAME_BYTES:
                # One byte over the limit is enough for the decoder to refuse it as too large;
                # the rest is read and dropped so the client's write completes.
                kept = chunk[: p.MAX_FRAME_BYTES + 1 - len(conn.received)]
                if conn.uid != os.geteuid():
                    held = self._held.get(conn.uid, 0) + len(kept)
                    if held > self._max_held:
                        self._over(conn)
                        continue
                    self._held[conn.uid] = held
                conn.received += kept

    def _send(self, conn: _Connection) -> None:
        assert conn.reply is not None
        try:
            sent = conn.sock.send(conn.reply)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the client went away: it queues or retries with the same request id
            self._drop(conn)
            return
        conn.reply = conn.reply[sent:]
        if conn.reply:
            self._poller.modify(conn.sock.fileno(), zmq.POLLOUT)
            return
        self._drop(conn)

    def _expire(self, now: float) -> None:
        for conn in list(self._connections.values()):
            if now >= conn.deadline:
                self._drop(conn)

    def _over(self, conn: _Connection) -> None:
        """Its user has ``max_held`` bytes waiting already: read the rest and drop it, and
        refuse the frame as over the user's quota (what the gate would do with those bytes)."""
        self._release(conn)
        conn.keep = False
        conn.over = (
            f"uid {conn.uid} had more than {self._max_held} bytes of unfinished requests at once "
            "(limits.bytes_per_minute); not taken, send it again later"
        )
        logger.warning("stream socket: {}", conn.over)

    def _release(self, conn: _Connection) -> None:
        """Forget the bytes kept for ``conn`` (answered, refused or closed)."""
        if conn.received and conn.uid in self._held:
            left = self._held[conn.uid] - len(conn.received)
            if left > 0:
                self._held[conn.uid] = left
            else:
                del self._held[conn.uid]
        conn.received = bytearray()

    def _drop(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if self._connections.pop(fd, None) is None:
            return
        self._release(conn)
        self._poller.unregister(fd)
        conn.sock.close()


def _peer_uid(sock: socket.socket) -> int:
    try:
        return _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))[1]
    except OSError:
        return p.REMOTE
