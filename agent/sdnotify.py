"""systemd's notify protocol, without a dependency: one datagram per state to $NOTIFY_SOCKET.

The parent sends ``READY=1`` once its socket is bound and its children are started,
``WATCHDOG=1`` from its loop at half the interval systemd asks for (``$WATCHDOG_USEC``), and
``STOPPING=1`` when it begins to stop.  Outside systemd (no ``$NOTIFY_SOCKET``) every call is a
no-op.  The variables are removed from the environment so the children never talk to systemd.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address: str | bytes | None = None
        if address:
            # An abstract socket is written "@name"; the kernel wants a leading NUL byte.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = (
            watchdog_usec / 1_000_000 / 2 if watchdog_usec and self._address else None
        )
        self._next_watchdog = time.monotonic()
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, *, unset: bool = True) -> Notifier:
        env = os.environ
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for; another one stays quiet.
        if raw_usec.isdigit() and watchdog_pid in ("", str(os.getpid())):
            usec = int(raw_usec) or None
        if unset:
            for name in _VARIABLES:
                env.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False when not under systemd or it failed."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError:
            return False  # systemd gone or the socket unwritable: never a reason to fail
        return True

    def ready(self, status: str = "") -> bool:
        fields = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            fields.append(f"STATUS={status}")
        return self.send(*fields)

    def stopping(self, status: str = "") -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self, now_wall: float) -> float | None:
        """Ping the watchdog when due; returns the wall-clock time of the next ping, or None."""
        if self.watchdog_interval is None:
            return None
        mono = time.monotonic()
        if mono >= self._next_watchdog:
            self.send("WATCHDOG=1")
            self._next_watchdog = mono + self.watchdog_interval
        return now_wall + (self._next_watchdog - mono)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
