"""The legacy marker bridge: sessions that still write the seed's TASK_COMPLETED file.

When the marker appears, the bridge sends a completion through the agent's own socket (the same
path as ``completionctl complete``), with the todo id from CURRENT_TODO_ID.  The marker files are
removed only after the agent acknowledged the completion, that is after it is in the journal — the
seed deleted CURRENT_TODO_ID first and lost completions that way.

The monitor polls this every sweep on its own thread, so a send waits at most ``SEND_TIMEOUT``,
and after a failure the same marker is tried again only after a backoff.  Each marker is logged
about once, not once per sweep.  A marker without a usable todo id is left for a person.
"""

from __future__ import annotations

import contextlib
import os

from loguru import logger

import protocol as p
from protocol.config import Config, read_todo_hint
from protocol.markers import trusted_stat

from . import access

SEND_TIMEOUT = 1.0  # the parent acks within milliseconds; this bounds the monitor's wait
RETRY_MIN = 1.0
RETRY_MAX = 10.0


class MarkerBridge:
    def __init__(self, config: Config, *, client=None) -> None:
        self.config = config
        self._client = client
        self._key: tuple[int, int] | None = None  # the marker file the state below is about
        self._reported: set[str] = set()  # what was already logged about this marker
        self._failures = 0
        self._retry_at = 0.0
        self.owners = access.served_uids(config)

    def poll(self, now: float) -> None:
        marker = self.config.marker
        try:
            st = trusted_stat(marker.completed_file, self.owners)
        except FileNotFoundError:
            self._forget(None)
            return
        except OSError as exc:
            # Another user's plant, a symlink, a FIFO: not a session of ours speaking.
            self._forget((-1, -1))
            self._once("untrusted", "warning", "marker {} ignored: {}", marker.completed_file, exc)
            return
        key = (st.st_ino, st.st_mtime_ns)
        if key != self._key:
            self._forget(key)  # a new marker: act on it at once
        elif now < self._retry_at:
            return
        hint = self._read_hint()
        todo_id = _todo_id(hint)
        if todo_id is None:
            self._once(
                "no-id",
                "warning",
                "marker {} found, but {} holds no todo id ({}); leaving both for a person",
                marker.completed_file,
                marker.current_todo_file,
                "missing or empty" if not hint else repr(hint[:40]),
            )
            return  # looked at again next sweep: reading two small files costs nothing
        # The same marker file always makes the same request id: a retry is applied once.
        request_id = f"marker-{st.st_ino}-{st.st_mtime_ns}"
        from ctl import AgentUnavailable, Client, CommandRefused

        if self._client is None:
            self._client = Client(config=self.config, timeout=SEND_TIMEOUT)
        try:
            ack = self._client.complete(
                todo_id, request_id=request_id, event="marker", queue_when_unreachable=False
            )
        except AgentUnavailable as exc:
            self._once("away", "warning", "marker for todo {} kept: {}", todo_id, exc)
            self._back_off(now)
            return
        except (CommandRefused, p.ProtocolError) as exc:
            self._once("refused", "error", "marker for todo {} refused: {}", todo_id, exc)
            self._back_off(now)
            return
        if ack.state != "accepted":
            self._once("pending", "warning", "marker for todo {} not acknowledged yet", todo_id)
            self._back_off(now)
            return
        # A retry of a request the agent had already taken answers with the todo it went to.
        todo_id = ack.todo_id or todo_id
        removed = self._consume(key, todo_id)
        logger.bind(todo_id=todo_id, completion_id=ack.completion_id).info(
            "marker {} turned into a completion; removed {}",
            marker.completed_file,
            ", ".join(removed) or "nothing (the files changed meanwhile)",
        )
        self._forget(None)

    def _read_hint(self) -> str | None:
        return read_todo_hint(self.config, self.owners)

    def _consume(self, key: tuple[int, int], todo_id: int) -> list[str]:
        """Remove the marker files this completion came from, and only those: a session that
        already wrote the next todo's marker must not lose it."""
        marker = self.config.marker
        removed = []
        with contextlib.suppress(OSError):  # gone, or not ours to remove (a sticky /tmp)
            st = os.lstat(marker.completed_file)
            if (st.st_ino, st.st_mtime_ns) == key:
                os.unlink(marker.completed_file)
                removed.append(marker.completed_file)
        if _todo_id(self._read_hint()) == todo_id:
            with contextlib.suppress(OSError):
                os.unlink(marker.current_todo_file)
                removed.append(marker.current_todo_file)
        return removed

    def _forget(self, key: tuple[int, int] | None) -> None:
        self._key = key
        self._reported.clear()
        self._failures = 0
        self._retry_at = 0.0

    def _back_off(self, now: float) -> None:
        self._failures += 1
        self._retry_at = now + min(RETRY_MAX, RETRY_MIN * 2 ** (self._failures - 1))

    def _once(self, what: str, level: str, message: str, *args: object) -> None:
        if what not in self._reported:
            self._reported.add(what)
            logger.log(level.upper(), message, *args)


def _todo_id(hint: str | None) -> int | None:
    return p.parse_todo_id(hint)
