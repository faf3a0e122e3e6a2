"""Doorbells between the agent's processes.

The journal is the truth; a doorbell only says "look at the journal now".  Each child binds a PULL
socket in the state dir; whoever has news connects a PUSH and rings without blocking.  A ring that
is lost (child restarting, queue full) costs at most one sweep interval.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import zmq

CHILDREN = ("collector", "writer", "monitor")
# Started only when configured: web (metrics.listen or web.listen), notify ([[notify]] targets).
OPTIONAL = ("web", "notify")
_FILES = {
    "collector": "bell-c.sock",
    "writer": "bell-w.sock",
    "monitor": "bell-m.sock",
    "web": "bell-x.sock",
    "notify": "bell-n.sock",
}


def children_for(config) -> tuple[str, ...]:
    """The children this configuration runs."""
    extra = []
    if config.metrics.listen or config.web.listen:
        extra.append("web")
    if config.notify:
        extra.append("notify")
    return (*CHILDREN, *extra)


def bell_path(state_dir: Path, name: str) -> Path:
    return state_dir / _FILES[name]


def listen(ctx: zmq.Context, state_dir: Path, name: str) -> zmq.Socket:
    """The child's own bell; drained in its loop."""
    path = bell_path(state_dir, name)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"ipc://{path}")
    return sock


def identify(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the socket file at ``path``, or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def remove_if_same(path: Path, identity: tuple[int, int] | None) -> None:
    """Remove the socket file at ``path`` if it is still the one ``identify`` saw."""
    if identity is not None and identify(path) == identity:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def drain(sock: zmq.Socket) -> int:
    rung = 0
    while True:
        try:
            sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return rung
        rung += 1


class Bells:
    """The ringing side: one PUSH per child that this process has news for."""

    def __init__(self, ctx: zmq.Context, state_dir: Path, names: tuple[str, ...]) -> None:
        self._socks: dict[str, zmq.Socket] = {}
        for name in names:
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 4)
            sock.connect(f"ipc://{bell_path(state_dir, name)}")
            self._socks[name] = sock

    def ring(self, name: str) -> None:
        with contextlib.suppress(zmq.Again):
            self._socks[name].send(b"!", zmq.NOBLOCK)

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close(0)
        self._socks.clear()
