"""Claude Code's HTTP hooks: ``hook.http_listen`` takes the same event JSON as
``completionctl hook``, so a heartbeat costs Claude Code one local HTTP request instead of
starting a Python process.

It runs on threads of the parent.  Each event goes through ``ctl.hook.dispatch`` (the command
hook's mapping of events to requests) into the same intake as every other request, journaled
with its fsync before the answer: intake's code, on a journal connection of this endpoint's
own, called here rather than through the agent's socket (a ZeroMQ round trip passes four
threads, most of a heartbeat's time on a loaded machine).  The requester is the one the
socket saw (the agent's user over ipc://, a remote peer over tcp://); the doorbells ring as
intake's do.  When the journal stays locked past intake's lock wait the request is queued in
the outbox like the command hook's.  Nothing here touches the database.

Every request needs ``Authorization: Bearer <token>`` (``completionctl hook-token``); a wrong or
missing token gets 401 and nothing is journaled.  The answer is 200 with an empty body: Claude
Code would add a plain-text body to Claude's context, and an empty 2xx means "go on".  The
optional header ``X-Todo-Id`` (the settings fill it from ``$TODO_ID``) plays the part of the
command hook's environment.

The server is the small part of HTTP/1.1 a hook needs: POST with a Content-Length body,
keep-alive, ``Expect: 100-continue``; anything else is answered with an error and the
connection closed.  A heartbeat is a round trip Claude Code waits for on every tool call, so
the path is short: each thread accepts a connection itself and serves it (no hand-over from an
accepting thread, no thread started per connection while another waits in ``accept``), the
headers are split without the email parser, and the answers are prepared bytes.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import socket
import sqlite3
import threading
import time
from email.utils import formatdate

import zmq
from loguru import logger

import protocol as p
from ctl import AgentUnavailable, Client, CommandRefused
from ctl.hook import MAX_PAYLOAD, dispatch, read_payload
from protocol.config import Config, http_listen_address
from protocol.hooktoken import ensure_token

from .doorbell import CHILDREN, Bells
from .intake import Intake
from .journal import Journal
from .memory import Trimmer

SPARE_ACCEPTORS = 1  # threads waiting in accept() while the others serve connections
IDLE_THREADS = 8  # threads beyond this many waiting in accept() end
MAX_LINE = 65536  # bytes of the request line or of one header line (as http.server)
MAX_HEADERS = 100
BACKLOG = 128

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    405: "Method Not Allowed",
    411: "Length Required",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    505: "HTTP Version Not Supported",
}


class _Close(Exception):
    """Answer ``status`` and close the connection (the request cannot be read further)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


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
        if not data:
            self.left = 0  # the client went away mid-body
        return data


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._value = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
            self._second = now
        return self._value


def _answer(status: int, date: bytes, *, close: bool = False) -> bytes:
    head = f"HTTP/1.1 {status} {_REASONS[status]}\r\n".encode() + date
    extra = b"Allow: POST\r\n" if status == 405 else b""
    if close:
        extra += b"Connection: close\r\n"
    return head + extra + b"Content-Length: 0\r\n\r\n"


class _LocalIntake:
    """Intake for this endpoint's requests, on its own journal connection: the parent's intake
    code and policy (one transaction per request, fsynced before the answer; a journal lock held
    past ``intake.LOCK_WAIT`` answers UNAVAILABLE, which the client queues in the outbox)."""

    def __init__(self, config: Config) -> None:
        self._lock = threading.Lock()  # one connection, one request at a time
        self._journal = Journal(config.journal_path)
        self._intake = Intake(config, self._journal, dict, time.time())
        self._intake.wait_for_lock()
        self._bells = Bells(zmq.Context.instance(), config.state_path, CHILDREN)
        self._closed = False
        # Who the requests are from, as the parent's socket saw this process: its own user over
        # ipc://, a remote peer (trusted with no local path) when the endpoint is tcp://.
        self._requester = os.geteuid() if config.endpoint.startswith("ipc://") else p.REMOTE

    def request(self, message: p.Request) -> p.AnyReply:
        frame = p.encode(message)
        with self._lock:
            if self._closed:
                raise AgentUnavailable("completiond is stopping; the request was not taken")
            [reply], ring = self._intake.handle_frames([frame], time.time(), [self._requester])
            for name in ring:
                self._bells.ring(name)
        return reply  # type: ignore[return-value]

    def close(self) -> None:
        with self._lock:  # after a request under way
            self._closed = True
            self._bells.close()
            self._journal.close()


class _LocalClient(Client):
    """``ctl.Client`` (outbox and all) whose requests go to ``_LocalIntake``, not a socket."""

    def __init__(self, config: Config, intake: _LocalIntake) -> None:
        super().__init__(config=config, timeout=config.hook.timeout)
        self._local = intake

    def request(self, message: p.Request, timeout: float | None = None) -> p.AnyReply:
        return self._local.request(message)


class _Server:
    """The listening socket, the threads that accept and serve, and the agent's clients."""

    def __init__(self, address: tuple[str, int], config: Config, token: str) -> None:
        self.config = config
        self.token = b"Bearer " + token.encode()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.create_server(address, family=family, backlog=BACKLOG)
        self.address = self.sock.getsockname()
        self.date = _Date()
        self._lock = threading.Lock()
        self._waiting = 0  # threads in accept()
        self._threads = 0
        self._stopping = False
        try:
            self.intake = _LocalIntake(config)
        except BaseException:
            self.sock.close()
            raise
        self.client = _LocalClient(config, self.intake)
        # Memory back to the system after a burst, as the parent's loop does after its own
        # requests (agent.memory): this work no longer passes through that loop.
        self._trimmer = Trimmer()
        self._trim_timer: threading.Timer | None = None

    # ------------------------------------------------------------ threads

    def start(self) -> None:
        for _ in range(1 + SPARE_ACCEPTORS):
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._threads += 1
        threading.Thread(target=self._run, name="http-hooks", daemon=True).start()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping or self._waiting >= IDLE_THREADS:
                        return
                    self._waiting += 1
                try:
                    conn, _ = self.sock.accept()
                except OSError as exc:
                    with self._lock:
                        self._waiting -= 1
                        if self._stopping:
                            return
                    logger.warning("HTTP hooks: accept failed: {}", exc)
                    time.sleep(0.1)  # out of descriptors: the others wait as well
                    continue
                with self._lock:
                    self._waiting -= 1
                    short = self._waiting < SPARE_ACCEPTORS
                if short:
                    self._spawn()  # the next connection must not wait for this one to end
                try:
                    self._serve(conn)
                except Exception:  # this thread must go back to accept() whatever happened
                    logger.exception("HTTP hook connection failed")
        finally:
            with self._lock:
                self._threads -= 1

    def _worked(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._trimmer.worked(now)
            if self._trim_timer is None and not self._stopping:
                self._trim_timer = threading.Timer(self._trimmer.quiet, self._trim)
                self._trim_timer.daemon = True
                self._trim_timer.start()

    def _trim(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._trim_timer = None
            due = self._trimmer.due()
            if due is not None and now < due and not self._stopping:
                self._trim_timer = threading.Timer(due - now, self._trim)
                self._trim_timer.daemon = True
                self._trim_timer.start()
                return
        self._trimmer.run(now)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            if self._trim_timer is not None:
                self._trim_timer.cancel()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the threads in accept()
        self.sock.close()
        # A request still under way finishes first; any later one is queued in the outbox.
        self.intake.close()

    # ------------------------------------------------------------ one connection

    def _serve(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self._stopping:
                try:
                    keep = self._request(conn, rfile)
                except _Close as answer:
                    conn.sendall(_answer(answer.status, self.date(), close=True))
                    keep = False
                if not keep:
                    break
        except OSError:
            pass  # the client went away
        finally:
            rfile.close()
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
            conn.close()

    def _request(self, conn: socket.socket, rfile) -> bool:
        """Read and answer one request; whether the connection stays open."""
        line = rfile.readline(MAX_LINE + 1)
        if not line:
            return False  # closed between requests
        if len(line) > MAX_LINE:
            raise _Close(414)
        words = line.decode("iso-8859-1").split()
        if len(words) != 3:
            raise _Close(400)
        method, _target, version = words
        if not version.startswith("HTTP/1."):
            raise _Close(505 if version.startswith("HTTP/") else 400)
        headers = _read_headers(rfile)
        connection = headers.get("connection", "").lower()
        keep = "close" not in connection if version != "HTTP/1.0" else "keep-alive" in connection
        if method != "POST":
            raise _Close(405)
        if not hmac.compare_digest(headers.get("authorization", "").encode(), self.token):
            # Nothing of the body is read: the connection is closed after the answer.
            logger.warning("HTTP hook from {}: wrong or missing token", _peer(conn))
            raise _Close(401)
        if "transfer-encoding" in headers:
            raise _Close(411)  # chunked bodies are not taken: the length must be known
        length_text = headers.get("content-length", "0").strip()
        if not length_text.isdigit():
            raise _Close(411)
        if headers.get("expect", "").lower() == "100-continue" and version != "HTTP/1.0":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = _Body(rfile, int(length_text))
        try:
            payload = read_payload(body, MAX_PAYLOAD)
        except ValueError as exc:
            logger.warning("HTTP hook: {}", exc)
            if body.left:
                raise _Close(400) from None
            conn.sendall(_answer(400, self.date(), close=not keep))
            return keep
        raw_id = headers.get("x-todo-id", "").strip()
        todo_id = int(raw_id) if raw_id.isdigit() and 0 < int(raw_id) < 2**63 else None
        self._dispatch(payload, todo_id)
        # Always 2xx and empty: the event was journaled, queued, or its problem logged; a body
        # would become context for Claude.
        conn.sendall(_answer(200, self.date(), close=not keep))
        self._worked()
        return keep

    def _dispatch(self, payload: dict, todo_id: int | None) -> None:
        try:
            outcome = dispatch(self.client, payload, todo_id=todo_id)
            if outcome.startswith("ignored"):
                logger.info("HTTP hook: {}", outcome)
        except CommandRefused as exc:
            logger.warning("HTTP hook {}: refused: {}", payload.get("hook_event_name"), exc)
        except (AgentUnavailable, OSError, ValueError) as exc:
            logger.warning("HTTP hook {}: {}", payload.get("hook_event_name"), exc)
        except Exception:
            logger.exception("HTTP hook failed")


def _peer(conn: socket.socket) -> str:
    try:
        return str(conn.getpeername()[0])
    except OSError:
        return "a client gone since"


def _read_headers(rfile) -> dict[str, str]:
    """The header lines up to the blank line, by lower-case name (the first of a repeated
    name, as http.server's; a repeated Content-Length that differs is refused)."""
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise _Close(431)
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise _Close(400)  # the client closed mid-headers
        name, sep, value = line.decode("iso-8859-1").partition(":")
        name = name.strip().lower()
        if not sep or not name or line[:1] in (b" ", b"\t"):
            raise _Close(400)  # not a header line (or an obsolete folded one)
        value = value.strip()
        if name in headers:
            if name == "content-length" and headers[name] != value:
                raise _Close(400)
            continue
        headers[name] = value
    raise _Close(431)


class HttpHooks:
    """The endpoint's server and its threads; ``start`` returns False when it cannot bind."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.server: _Server | None = None

    def start(self) -> bool:
        address = http_listen_address(self.config.hook.http_listen)
        if address is None:
            return False
        token = ensure_token(self.config.hook_token_path)
        try:
            self.server = _Server(address, self.config, token)
        except (OSError, sqlite3.Error) as exc:
            logger.error(
                "HTTP hooks: cannot listen on {}: {}; the command hooks still work "
                '(set hook.http_listen to a free HOST:PORT, or "" to turn this off)',
                self.config.hook.http_listen,
                exc,
            )
            return False
        self.server.start()
        logger.info("HTTP hooks on http://{}:{}/", *address[:2])
        return True

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
