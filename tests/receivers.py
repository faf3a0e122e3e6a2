"""Local HTTP endpoints for the notification tests: a webhook receiver that verifies Standard
Webhooks signatures with the `standardwebhooks` library and can answer 500 or hang, and a
blackholed port (connections are never answered, not even refused)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    verified: bool | None  # None: no secret to check against
    answered: int | None = None  # the status sent, None when it hung or dropped

    @property
    def msg_id(self) -> str:
        return self.headers.get("webhook-id", "")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """``mode``: "ok" (200), "500", or "hang" (hold the request until ``release()``, then drop)."""

    secret: str | None = None
    mode: str = "ok"
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    processed: dict[str, int] = field(default_factory=dict)  # id -> times acted on (dedup'd)
    _release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver._handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        body = handler.rfile.read(length)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        verified = None
        if self.secret is not None:
            from standardwebhooks.webhooks import Webhook, WebhookVerificationError

            try:
                Webhook(self.secret).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        record = Received(handler.path, headers, body, time.time(), verified)
        with self._lock:
            self.requests.append(record)
            mode = self.mode
        if mode == "hang":
            self._release.wait(120)
            return  # the sender gave up long ago: drop the connection unanswered
        status = 200 if mode == "ok" and verified is not False else 500
        if status == 200:
            with self._lock:
                # What a receiver that drops replays does: act on each id once.
                msg_id = record.msg_id or f"anon-{len(self.requests)}"
                self.processed[msg_id] = self.processed.get(msg_id, 0) + (
                    0 if msg_id in self.processed else 1
                )
        record.answered = status
        reply = b"{}"
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(reply)))
        handler.end_headers()
        handler.wfile.write(reply)

    def set_mode(self, mode: str) -> None:
        with self._lock:
            self.mode = mode
        if mode != "hang":
            self._release.set()
        else:
            self._release.clear()

    def accepted(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.answered == 200]

    def events(self) -> list[dict[str, Any]]:
        """The data of every accepted event (a batch unpacked), each id once."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for record in self.accepted():
            if record.msg_id in seen:
                continue
            seen.add(record.msg_id)
            data = record.json()["data"]
            out.extend(data["events"] if data.get("event") == "batch" else [data])
        return out

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


class Blackhole:
    """A port whose connections are never answered: the listener's accept queue is full, so the
    kernel drops every further SYN and the connecting side waits until its own timeout."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(16):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.3)
            try:
                filler.connect(("127.0.0.1", self.port))
            except OSError:
                filler.close()
                break
            self.fillers.append(filler)

    def swallows(self) -> bool:
        """Whether a connection attempt now hangs (the proof that it is a blackhole)."""
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(("127.0.0.1", self.port))
        except TimeoutError:
            return True
        except OSError:
            return False
        finally:
            probe.close()
        return False

    def close(self) -> None:
        for filler in self.fillers:
            with contextlib.suppress(OSError):
                filler.close()
        self.listener.close()
