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

HTTP/1.1 itself is h11's (framing by Content-Length or chunks, keep-alive, ``Expect:
100-continue``, the protocol's errors); this module takes POSTs and answers everything else
with an error and a closed connection.  A heartbeat is a round trip Claude Code waits for on
every tool call, so the path is short: each thread accepts a connection itself and serves it
(no hand-over from an accepting thread, no thread started per connection while another waits
in ``accept``).  A connection silent for ``IDLE_TIMEOUT`` is closed.
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

import h11
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
MAX_HEAD = 16384  # bytes of the request line and headers together (h11's default limit)
IDLE_TIMEOUT = 300.0  # seconds a connection may stay silent
BACKLOG = 128
_CHUNK = 65536


class _Close(Exception):
    """Answer ``status`` and close the connection (the request cannot be read further)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Exchange:
    """One connection's HTTP/1.1 (h11 does the protocol: framing, keep-alive, 100-continue)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)

    def next_event(self):
        """The next request, body piece or end; None when the client closed between requests."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Close(exc.error_status_hint) from None
            if event is h11.NEED_DATA:
                self.h11.receive_data(self.conn.recv(_CHUNK))
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            return event

    def send(self, event) -> None:
        data = self.h11.send(event)
        if data:
            self.conn.sendall(data)

    def answer(self, status: int, date: bytes, *, close: bool = False) -> None:
        headers = [(b"Content-Length", b"0"), (b"Date", date)]
        if status == 405:
            headers.append((b"Allow", b"POST"))
        if close:
            headers.append((b"Connection", b"close"))
        self.send(h11.Response(status_code=status, headers=headers))
        self.send(h11.EndOfMessage())


class _Body:
    """The request body as a stream (``read_payload`` reads it like stdin)."""

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self.ended = False
        self._buffer = b""

    def read(self, size: int) -> bytes:
        while not self.ended and len(self._buffer) < size:
            event = self.exchange.next_event()
            if isinstance(event, h11.Data):
                self._buffer += event.data
            else:  # EndOfMessage (or the client gone mid-body)
                self.ended = True
                if event is None:
                    raise _Close(400)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._value = formatdate(now, usegmt=True).encode()
            self._second = now
        return self._value


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
        exchange = _Exchange(conn)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A connection that sends nothing for this long is closed (a kept-alive one between
            # two sessions' tool calls, or one that never finishes its request): it holds a
            # thread while open.
            conn.settimeout(IDLE_TIMEOUT)
            while not self._stopping:
                try:
                    keep = self._request(exchange)
                except _Close as answer:
                    with contextlib.suppress(h11.LocalProtocolError):
                        exchange.answer(answer.status, self.date(), close=True)
                    keep = False
                if not keep:
                    break
                exchange.h11.start_next_cycle()
        except OSError:
            pass  # the client went away
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
            conn.close()

    def _request(self, exchange: _Exchange) -> bool:
        """Read and answer one request; whether the connection stays open."""
        request = exchange.next_event()
        if request is None:
            return False  # closed between requests
        assert isinstance(request, h11.Request)
        if not request.http_version.startswith(b"1."):
            raise _Close(505)
        if request.method != b"POST":
            raise _Close(405)
        headers = {name: value for name, value in reversed(request.headers)}  # the first wins
        if not hmac.compare_digest(headers.get(b"authorization", b""), self.token):
            # Nothing of the body is read: the connection is closed after the answer.
            logger.warning("HTTP hook from {}: wrong or missing token", _peer(exchange.conn))
            raise _Close(401)
        if exchange.h11.they_are_waiting_for_100_continue:
            exchange.send(h11.InformationalResponse(status_code=100, headers=[]))
        body = _Body(exchange)
        try:
            payload = read_payload(body, MAX_PAYLOAD)
        except ValueError as exc:
            logger.warning("HTTP hook: {}", exc)
            payload = None
        while not body.ended:  # what read_payload left of a body it did not need
            body.read(_CHUNK)
        if payload is None:
            exchange.answer(400, self.date())
            return exchange.h11.our_state is h11.DONE and exchange.h11.their_state is h11.DONE
        raw_id = headers.get(b"x-todo-id", b"").strip()
        todo_id = int(raw_id) if raw_id.isdigit() and 0 < int(raw_id) < 2**63 else None
        self._dispatch(payload, todo_id)
        # Always 2xx and empty: the event was journaled, queued, or its problem logged; a body
        # would become context for Claude.
        exchange.answer(200, self.date())
        return exchange.h11.our_state is h11.DONE and exchange.h11.their_state is h11.DONE

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
