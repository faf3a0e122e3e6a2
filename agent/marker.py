"""The legacy marker bridge: sessions that still write the seed's TASK_COMPLETED file.

When the marker appears, the bridge sends a completion through the agent's own socket (the same
path as ``completionctl complete``), with the todo id from CURRENT_TODO_ID as the hint.  The
marker files are removed only after the agent acknowledged the completion — the seed deleted
CURRENT_TODO_ID first and lost completions that way.
"""

from __future__ import annotations

import contextlib
import os

from loguru import logger

import protocol as p
from protocol.config import Config


class MarkerBridge:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._client = None

    def poll(self, now: float) -> None:
        marker = self.config.marker
        try:
            st = os.stat(marker.completed_file)
        except OSError:
            return
        hint = None
        with (
            contextlib.suppress(OSError),
            open(marker.current_todo_file, encoding="utf-8", errors="replace") as f,
        ):
            hint = f.read(64).strip() or None
        if not hint or not hint.isdigit():
            logger.warning(
                "marker {} found, but {} holds no todo id; leaving both for a person",
                marker.completed_file,
                marker.current_todo_file,
            )
            return
        # The same marker file always makes the same request id: a retry is applied once.
        request_id = f"marker-{st.st_ino}-{st.st_mtime_ns}"
        from ctl import Client, CommandRefused

        if self._client is None:
            self._client = Client(config=self.config)
        try:
            ack = self._client.complete(
                int(hint), request_id=request_id, event="marker", queue_when_unreachable=False
            )
        except CommandRefused as exc:
            logger.error("marker completion for todo {} refused: {}", hint, exc)
            return
        except p.ProtocolError as exc:
            logger.error("marker completion for todo {} failed: {}", hint, exc)
            return
        if ack.state != "accepted":
            logger.warning("marker completion for todo {} not acknowledged yet; will retry", hint)
            return
        for name in (marker.completed_file, marker.current_todo_file):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        logger.bind(todo_id=int(hint), completion_id=ack.completion_id).info(
            "marker {} turned into a completion; marker files removed", marker.completed_file
        )
