"""Claude Code's HTTP hooks: ``hook.http_listen`` takes the same event JSON as
``completionctl hook``, so a heartbeat costs Claude Code one local HTTP request instead of
starting a Python process.

It runs on a thread of the parent.  The thread is only a client of the agent: each event goes
through ``ctl.hook.dispatch`` and the agent's own socket into the same intake as every other
request, journaled before the answer, and when intake does not answer within ``hook.timeout``
the request is queued in the outbox like the command hook's.  Nothing here touches the journal
or the database, so it never delays intake beyond the one request it sends.

Every request needs ``Authorization: Bearer <token>`` (``completionctl hook-token``); a wrong or
missing token gets 401 and nothing is journaled.  The answer is 200 with an empty body: Claude
Code would add a plain-text body to Claude's context, and an empty 2xx means "go on".  The
optional header ``X-Todo-Id`` (the settings fill it from ``$TODO_ID``) plays the part of the
command hook's environment.
"""

from __future__ import annotations

import hmac
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loguru import logger

from ctl import AgentUnavailable, Client, CommandRefused
from ctl.hook import MAX_PAYLOAD, dispatch, read_payload
from protocol.config import Config, http_listen_address
from protocol.hooktoken import ensure_token


class _Body:
    """The request body as a stream that ends at Content-Length (the socket does not)."""

    def __init__(self, rfile, length: int) -> None:
        self.rfile = rfile
        self.left = length

    def read(self, size: int) -> bytes:
        size = min(size, self.left)
        if size <= 0:
            return b""
        data = self.rfile.read(size)
        self.left -= len(data)
        return data


IDLE_CLIENTS = 8  # connections to the agent's socket kept open between requests


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], config: Config, token: str) -> None:
        self.config = config
        self.token = token.encode()
        # Clients kept between requests, each used by one request at a time: a new one would
        # open a new connection to the agent's socket (a handshake, and the agent's peer
        # accounting) for every heartbeat.
        self._idle: list[Client] = []
        self._idle_lock = threading.Lock()
        self._closed = False
        super().__init__(address, _Handler)

    def take_client(self) -> Client:
        with self._idle_lock:
            if self._idle:
                return self._idle.pop()
        return Client(config=self.config, timeout=self.config.hook.timeout)

    def give_back(self, client: Client) -> None:
        with self._idle_lock:
            if not self._closed and len(self._idle) < IDLE_CLIENTS:
                self._idle.append(client)
                return
        client.close()

    def server_close(self) -> None:
        super().server_close()
        with self._idle_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: Claude Code may reuse the connection

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not self._authorized():
            # Nothing of the body is read: the connection is closed after the answer.
            self.close_connection = True
            self._answer(HTTPStatus.UNAUTHORIZED, close=True)
            logger.warning("HTTP hook from {}: wrong or missing token", self.client_address[0])
            return
        if length < 0:
            self._answer(HTTPStatus.LENGTH_REQUIRED)
            return
        try:
            payload = read_payload(_Body(self.rfile, length), MAX_PAYLOAD)
        except ValueError as exc:
            self._answer(HTTPStatus.BAD_REQUEST)
            logger.warning("HTTP hook: {}", exc)
            return
        raw_id = (self.headers.get("X-Todo-Id") or "").strip()
        todo_id = int(raw_id) if raw_id.isdigit() and 0 < int(raw_id) < 2**63 else None
        client = self.server.take_client()
        try:
            outcome = dispatch(client, payload, todo_id=todo_id)
            if outcome.startswith("ignored"):
                logger.info("HTTP hook: {}", outcome)
        except CommandRefused as exc:
            logger.warning("HTTP hook {}: refused: {}", payload.get("hook_event_name"), exc)
        except (AgentUnavailable, OSError, ValueError) as exc:
            logger.warning("HTTP hook {}: {}", payload.get("hook_event_name"), exc)
        except Exception:
            logger.exception("HTTP hook failed")
        finally:
            # A request that timed out left the client without a connection (it opens a new one
            # when next used), so every client can go back.
            self.server.give_back(client)
        # Always 2xx and empty: the event was journaled, queued, or its problem logged; a body
        # would become context for Claude.
        self._answer(HTTPStatus.OK)

    def do_GET(self) -> None:
        self._answer(HTTPStatus.METHOD_NOT_ALLOWED)

    def _authorized(self) -> bool:
        given = (self.headers.get("Authorization") or "").encode()
        return hmac.compare_digest(given, b"Bearer " + self.server.token)

    def _answer(self, status: HTTPStatus, *, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        if close:
            self.send_header("Connection", "close")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per heartbeat would flood the log; problems are logged above


class HttpHooks:
    """The endpoint's server and its thread; ``start`` returns False when it cannot bind."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.server: _Server | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> bool:
        address = http_listen_address(self.config.hook.http_listen)
        if address is None:
            return False
        token = ensure_token(self.config.hook_token_path)
        try:
            self.server = _Server(address, self.config, token)
        except OSError as exc:
            logger.error(
                "HTTP hooks: cannot listen on {}: {}; the command hooks still work "
                '(set hook.http_listen to a free HOST:PORT, or "" to turn this off)',
                self.config.hook.http_listen,
                exc,
            )
            return False
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="http-hooks",
            daemon=True,
        )
        self.thread.start()
        logger.info("HTTP hooks on http://{}:{}/", *address[:2])
        return True

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
