"""A small threaded TCP proxy for fault injection in tests.

`TcpProxy(host, port)` listens on 127.0.0.1 (an ephemeral port, `.port`) and forwards to the
target. The test controls it while it runs:

- `.mode = "pass"`: forward both ways.
- `.mode = "refuse"`: the listening socket is closed, so new connections are refused; existing
  ones are left alone. Setting another mode listens again on the same port.
- `.mode = "blackhole"`: accept, but forward nothing in either direction (data is held, not
  lost: switching back to "pass" delivers it, like a network stall that ends).
- `.mode = "delay"`: every chunk is held `.delay` seconds before it is forwarded.
- `.cut()`: close every open connection now.
- `.cut_on_client_data(pattern)`: the first client chunk containing `pattern` is dropped and its
  connection cut (the server never sees it).
- `.cut_on_server_reply_after(pattern)`: the client chunk containing `pattern` IS forwarded,
  then the connection is cut instead of forwarding the server's reply (for MySQL and
  b"COMMIT": the commit happens, its acknowledgement is lost).
- `.close()`: stop listening, cut everything, and join the threads (all daemon, bounded).

Trigger methods return a `threading.Event` set when the cut happened.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from dataclasses import dataclass, field

MODES = ("pass", "refuse", "blackhole", "delay")
_POLL = 0.05  # how often idle threads look at the proxy's state; bounds close() and mode changes


@dataclass(eq=False)
class _Trigger:
    pattern: bytes
    forward_then_cut_reply: bool
    fired: threading.Event = field(default_factory=threading.Event)


class _Pair:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = False
        self.cut_next_reply: _Trigger | None = None
        self.tail = {"client": b"", "server": b""}
        self._lock = threading.Lock()

    def set_upstream(self, up: socket.socket) -> bool:
        with self._lock:
            if self.closed:
                return False
            self.upstream = up
            return True

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            socks = [s for s in (self.client, self.upstream) if s is not None]
        for s in socks:
            # shutdown wakes a thread blocked in recv() on the same socket; close alone may not.
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.delay = 0.0
        self.accepted = 0  # connections accepted so far
        self._mode = "pass"
        self._cond = threading.Condition()
        self._closed = False
        self._stopped = threading.Event()
        self._pairs: set[_Pair] = set()
        self._triggers: list[_Trigger] = []
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._listener: socket.socket | None = self._listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._spawn(self._accept_loop, "tcpproxy-accept")

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def open_connections(self) -> int:
        with self._cond:
            return len(self._pairs)

    # ---- control
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        with self._cond:
            self._mode = mode
            if mode == "refuse" and self._listener is not None:
                self._stop_listening()
            elif mode != "refuse" and self._listener is None and not self._closed:
                self._listener = self._listen(self.port)
            self._cond.notify_all()

    def cut(self) -> None:
        with self._cond:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.close()

    def cut_on_client_data(self, pattern: bytes) -> threading.Event:
        return self._arm(_Trigger(pattern, forward_then_cut_reply=False))

    def cut_on_server_reply_after(self, pattern: bytes) -> threading.Event:
        return self._arm(_Trigger(pattern, forward_then_cut_reply=True))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            if self._listener is not None:
                self._stop_listening()
            self._cond.notify_all()
        self._stopped.set()
        self.cut()
        deadline = time.monotonic() + 5
        with self._threads_lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    @property
    def threads_alive(self) -> int:
        with self._threads_lock:
            return sum(t.is_alive() for t in self._threads)

    # ---- internals
    def _arm(self, trigger: _Trigger) -> threading.Event:
        with self._cond:
            self._triggers.append(trigger)
        return trigger.fired

    def _stop_listening(self) -> None:
        assert self._listener is not None
        # close() alone leaves the port listening while the accept thread's select() still
        # holds the socket; shutdown() stops a Linux listening socket at once.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._listener = None

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, port))
        s.listen(64)
        s.setblocking(False)
        return s

    def _spawn(self, target: object, name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        with self._threads_lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                listener = self._listener
                if listener is None:
                    self._cond.wait(_POLL)
                    continue
            try:
                ready, _, _ = select.select([listener], [], [], _POLL)
            except (OSError, ValueError):  # closed by a mode change while we waited
                continue
            if not ready:
                continue
            with self._cond:
                if listener is not self._listener or self._closed:
                    continue
                try:
                    client, _ = listener.accept()
                except OSError:
                    continue
                client.setblocking(True)
                pair = _Pair(client)
                self._pairs.add(pair)
                self.accepted += 1
            self._spawn(self._serve, "tcpproxy-conn", pair)

    def _wait_unblocked(self, pair: _Pair) -> bool:
        """Hold while blackholed; False if the pair or the proxy closed meanwhile."""
        with self._cond:
            while self._mode == "blackhole" and not pair.closed and not self._closed:
                self._cond.wait(_POLL)
            return not (pair.closed or self._closed)

    def _serve(self, pair: _Pair) -> None:
        try:
            if not self._wait_unblocked(pair):
                return
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                return
            up.settimeout(None)
            if not pair.set_upstream(up):
                up.close()
                return
            self._spawn(self._pump, "tcpproxy-pump", pair, up, pair.client, "server")
            self._pump(pair, pair.client, up, "client")
        finally:
            pair.close()
            with self._cond:
                self._pairs.discard(pair)

    def _match(self, pair: _Pair, direction: str, data: bytes) -> str:
        """'forward' or 'drop_and_cut' for this chunk; may arm the pair to cut at the reply."""
        if direction == "server":
            if pair.cut_next_reply is not None:
                pair.cut_next_reply.fired.set()
                return "drop_and_cut"
            return "forward"
        with self._cond:
            if not self._triggers:
                return "forward"
            longest = max(len(t.pattern) for t in self._triggers)
            window = pair.tail[direction] + data
            pair.tail[direction] = window[-(longest - 1) :] if longest > 1 else b""
            for trigger in self._triggers:
                if trigger.pattern in window:
                    self._triggers.remove(trigger)
                    if trigger.forward_then_cut_reply:
                        pair.cut_next_reply = trigger
                        return "forward"
                    trigger.fired.set()
                    return "drop_and_cut"
        return "forward"

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    return
                if not data or not self._wait_unblocked(pair):
                    return
                if self._mode == "delay" and self.delay > 0 and self._stopped.wait(self.delay):
                    return
                if self._match(pair, direction, data) == "drop_and_cut":
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return
        finally:
            pair.close()
