"""The client: ``from ctl import Client``, one method per command.

The hot path (complete, start, heartbeat, emergency, hook) imports only ``protocol``: a
``one_shot`` client (every ``completionctl`` process) sends its request over the agent's stream
socket (agent.streamdoor) with the standard library, and pyzmq is imported only by a client that
lives on (the library, the HTTP hook endpoint) or when the stream socket is not there.
A request that the agent does not answer in time is queued in the state dir's outbox (written
atomically) and the method returns an Ack with ``state == "queued"``; the agent ingests it later,
and the client-made request id makes a delivered-and-queued request apply once.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import protocol as p
from protocol import outbox
from protocol.config import Config, load

if TYPE_CHECKING:
    from datetime import datetime, timedelta

    import zmq

__all__ = ["AgentUnavailable", "Client", "CommandRefused", "NotQueued"]

DEFAULT_WAIT = 2.0
# Error codes that mean "not taken now", not "refused": the request is queued like a timeout.
_NOT_TAKEN = (p.ErrorCode.STOPPING, p.ErrorCode.UNAVAILABLE)
_NOTE_RESERVE = 1024


class AgentUnavailable(Exception):
    """The agent did not answer in time (not running, stuck, or a wrong endpoint)."""


class NotQueued(AgentUnavailable):
    """The agent did not take the request and the outbox could not be written either (on a
    shared socket only the agent's user may write it): the request is lost unless sent again."""


class CommandRefused(Exception):
    """The agent answered with an error; ``code`` is a protocol.ErrorCode."""

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def cap_output(text: str, limit: int = p.MAX_MESSAGE_BYTES - 64 * 1024) -> str:
    """Keep the head and the tail of an output that is too large to send, with a visible note."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    half = (limit - _NOTE_RESERVE) // 2
    omitted = len(data) - 2 * half
    head = data[:half].decode("utf-8", "ignore")
    tail = data[-half:].decode("utf-8", "ignore")
    note = f"\n\n[... {omitted} bytes omitted by completionctl: the output was too large ...]\n\n"
    return head + note + tail


class Client:
    def __init__(
        self,
        config_path: str | None = None,
        *,
        config: Config | None = None,
        timeout: float | None = None,
        one_shot: bool = False,
    ) -> None:
        self.config = config if config is not None else load(config_path)
        self.timeout = DEFAULT_WAIT if timeout is None else timeout
        # A process that sends a request or two and exits: the stream socket spares it the
        # import of pyzmq, which would be most of its run time.
        self.one_shot = one_shot
        # One REQ socket for the client's life: a connection per request costs the client and
        # the agent ~0.2 ms of CPU each. Threads sharing a Client take turns on it.
        self._sock: zmq.Socket | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ transport

    def _socket_missing(self) -> bool:
        endpoint = self.config.endpoint
        return endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://") :])

    def request(self, message: p.Request, timeout: float | None = None) -> p.AnyReply:
        """Send one request and wait for its reply (the lazy-pirate pattern: one try, bounded)."""
        wait = self.timeout if timeout is None else timeout
        if self._socket_missing():
            raise AgentUnavailable(
                f"no agent socket at {self.config.endpoint}: is completiond running "
                f"with state dir {self.config.state_dir}?"
            )
        stream = self.config.stream_socket_path if self.one_shot else None
        if stream is not None and os.path.exists(stream):
            return p.decode_reply(self._over_stream(stream, p.encode(message), wait))
        with self._lock:
            return p.decode_reply(self._over_zmq(p.encode(message), wait))

    def _over_zmq(self, frame: bytes, wait: float) -> bytes:
        import zmq

        if self._sock is None:
            self._sock = self._connect()
        try:
            self._sock.send(frame)
            if not self._sock.poll(int(wait * 1000), zmq.POLLIN):
                raise AgentUnavailable(self._silent(wait))
            return self._sock.recv()
        except BaseException as exc:
            # A REQ socket that got no reply cannot send again: the next request starts
            # afresh (the lazy pirate's rule).
            self.close()
            if isinstance(exc, zmq.ZMQError):
                raise AgentUnavailable(f"cannot reach {self.config.endpoint}: {exc}") from None
            raise

    def _over_stream(self, path: Path, frame: bytes, wait: float) -> bytes:
        """One request on a connection of its own: write the frame, shut the writing side (the
        agent reads to the end), read the reply until the agent closes; ``wait`` in all."""
        # The C module itself: socket.py's wrappers and enums cost more than the whole request.
        import _socket

        deadline = time.monotonic() + wait
        reply = bytearray()
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(wait)
            while True:
                try:
                    sock.connect(os.fspath(path))
                    break
                except BlockingIOError:
                    # The listen backlog is full (a burst of clients, or a flood another user
                    # makes): wait for room as a blocking connect would, within ``wait``.
                    if time.monotonic() >= deadline:
                        raise TimeoutError from None
                    time.sleep(0.002)
            sock.sendall(frame)
            sock.shutdown(_socket.SHUT_WR)
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                reply += chunk
        except TimeoutError:
            raise AgentUnavailable(self._silent(wait)) from None
        except OSError as exc:
            raise AgentUnavailable(f"cannot reach completiond at {path}: {exc}") from None
        finally:
            sock.close()
        if not reply:
            # Closed unanswered: stopping, or it gave up on a connection too slow to finish.
            raise AgentUnavailable(f"completiond closed {path} without answering")
        return bytes(reply)

    def _silent(self, wait: float) -> str:
        return (
            f"completiond did not answer within {wait:g} s at {self.config.endpoint}; "
            "it may be stopped, stuck, or listening elsewhere (check --config)"
        )

    def _connect(self) -> zmq.Socket:
        import zmq

        sock: zmq.Socket = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.config.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise AgentUnavailable(f"cannot reach {self.config.endpoint}: {exc}") from None
        return sock

    def close(self) -> None:
        """Close the connection to the agent; the next request opens a new one."""
        sock = self._sock
        self._sock = None
        if sock is not None:
            sock.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _deliver(self, message: p.Request, *, queue: bool = True, timeout: float | None = None):
        """Send a request that changes state; queue it in the outbox when the agent is away."""
        try:
            reply = self.request(message, timeout)
        except AgentUnavailable as exc:
            if not queue:
                raise
            return self._queue(message, exc)
        if isinstance(reply, p.Error):
            if queue and reply.code in _NOT_TAKEN:
                # The agent is up but could not take it now (stopping, journal full): queue it.
                return self._queue(message, reply.message)
            raise CommandRefused(reply.code, reply.message)
        if not isinstance(reply, p.Ack):
            raise CommandRefused(p.ErrorCode.INTERNAL, f"unexpected reply {type(reply).__name__}")
        return reply

    def _queue(self, message: p.Request, reason: object) -> p.Ack:
        try:
            path = outbox.put(self.config.outbox_dir, message.request_id, p.encode(message))
        except OSError as exc:
            raise NotQueued(
                f"{reason}; and the request could NOT be kept in the outbox either: cannot write "
                f"{self.config.outbox_dir} ({exc.strerror or exc}); it is lost unless sent again "
                "once completiond answers"
            ) from None
        return p.Ack(
            request_id=message.request_id,
            state="queued",
            todo_id=getattr(message, "todo_id", None),
            message=f"{reason}; the request was queued in {path.parent} and will be delivered "
            "when the agent takes it (on its next outbox sweep, or when it starts)",
        )

    def _read(self, message: p.Request, expected: type):
        reply = self.request(message)
        if isinstance(reply, p.Error):
            raise CommandRefused(reply.code, reply.message)
        if not isinstance(reply, expected):
            raise CommandRefused(p.ErrorCode.INTERNAL, f"unexpected reply {type(reply).__name__}")
        return reply

    # ------------------------------------------------------------ commands

    def start(
        self,
        todo_id: int | None,
        *,
        session_id: str | None = None,
        completion_timeout: float | None = None,
        transcript_path: str | None = None,
        cwd: str | None = None,
        todo_hint: str | None = None,
        source: str | None = None,
        request_id: str | None = None,
        wait: float | None = None,
    ) -> p.Ack:
        return self._deliver(
            p.Start(
                source=source,
                request_id=request_id or p.new_request_id(),
                todo_id=todo_id,
                session_id=session_id,
                todo_hint=todo_hint,
                timeout=completion_timeout,
                transcript_path=transcript_path,
                cwd=cwd,
                sent_at=time.time(),
            ),
            timeout=wait,
        )

    def heartbeat(
        self,
        todo_id: int | None,
        *,
        session_id: str | None = None,
        todo_hint: str | None = None,
        event: str | None = None,
        note: str | None = None,
        request_id: str | None = None,
        wait: float | None = None,
    ) -> p.Ack:
        return self._deliver(
            p.Heartbeat(
                request_id=request_id or p.new_request_id(),
                todo_id=todo_id,
                session_id=session_id,
                todo_hint=todo_hint,
                event=event,
                note=note,
                sent_at=time.time(),
            ),
            timeout=wait,
        )

    def waiting(
        self,
        todo_id: int | None,
        *,
        reason: str = "",
        session_id: str | None = None,
        todo_hint: str | None = None,
        wait: float | None = None,
    ) -> p.Ack:
        return self._deliver(
            p.Waiting(
                request_id=p.new_request_id(),
                todo_id=todo_id,
                session_id=session_id,
                todo_hint=todo_hint,
                reason=reason,
                sent_at=time.time(),
            ),
            timeout=wait,
        )

    def complete(
        self,
        todo_id: int | None,
        *,
        output: str | None = None,
        session_id: str | None = None,
        transcript_path: str | None = None,
        tmux_target: str | None = None,
        cwd: str | None = None,
        todo_hint: str | None = None,
        event: str = "cli",
        only_if_open: bool = False,
        reason: str | None = None,
        request_id: str | None = None,
        queue_when_unreachable: bool = True,
        wait: float | None = None,
    ) -> p.Ack:
        return self._deliver(
            p.Complete(
                request_id=request_id or p.new_request_id(),
                todo_id=todo_id,
                session_id=session_id,
                todo_hint=todo_hint,
                output=cap_output(output) if output is not None else None,
                transcript_path=transcript_path,
                tmux_target=tmux_target,
                cwd=cwd,
                event=event,
                only_if_open=only_if_open,
                reason=reason,
                sent_at=time.time(),
            ),
            queue=queue_when_unreachable,
            timeout=wait,
        )

    def emergency(
        self, todo_id: int, *, reason: str | None = None, request_id: str | None = None
    ) -> p.Ack:
        return self._deliver(
            p.Emergency(
                request_id=request_id or p.new_request_id(),
                todo_id=todo_id,
                reason=reason or "forced by completionctl emergency",
                sent_at=time.time(),
            )
        )

    def retry(self, completion_id: str | None = None, *, all_dead: bool = False) -> p.Ack:
        return self._deliver(
            p.Retry(request_id=p.new_request_id(), completion_id=completion_id, all_dead=all_dead),
            queue=False,
        )

    def batch_complete(
        self,
        todo_ids: list[int],
        *,
        output: str | None = None,
        event: str | None = None,
        request_id: str | None = None,
        wait: float | None = None,
    ) -> p.Ack:
        """Complete several todos with one request; the Ack's ``items`` give each todo's
        outcome at intake ("accepted", or "refused" and why).  The database's own verdict comes
        later, as for any completion: ``batch_outcomes(ack)`` asks for it."""
        if len(todo_ids) > p.MAX_BATCH:
            raise CommandRefused(
                p.ErrorCode.TOO_LARGE,
                f"a batch completes at most {p.MAX_BATCH:,} todos and this one names "
                f"{len(todo_ids):,}; nothing was sent: split it into smaller batches",
            )
        if not todo_ids:
            raise ValueError("a batch completion needs at least one todo id")
        return self._deliver(
            p.BatchComplete(
                request_id=request_id or p.new_request_id(),
                todo_ids=list(todo_ids),
                output=cap_output(output) if output is not None else None,
                event=event,
                sent_at=time.time(),
            ),
            timeout=wait,
        )

    def batch_outcomes(self, ack: p.Ack) -> list[p.ItemOutcome]:
        """Where each accepted completion of a batch stands now: ``state`` (accepted ...
        cleaned, failed, dead) and ``outcome`` ("pending", "applied", "duplicate", "refused"
        with the database's reason).  Items refused at intake are returned as they were."""
        ids = [item.completion_id for item in ack.items if item.outcome == "accepted"]
        now: dict[str, p.ItemOutcome] = {}
        for start in range(0, len(ids), p.MAX_BATCH):
            chunk = [cid for cid in ids[start : start + p.MAX_BATCH] if cid]
            report = self._read(
                p.Outcomes(request_id=p.new_request_id(), completion_ids=chunk), p.OutcomeReport
            )
            now.update({item.completion_id or "": item for item in report.items})
        return [
            now.get(item.completion_id or "", item) if item.outcome == "accepted" else item
            for item in ack.items
        ]

    def schedule_completion(
        self,
        todo_id: int,
        delay: float | timedelta | None = None,
        *,
        at: float | datetime | None = None,
        output: str | None = None,
        request_id: str | None = None,
    ) -> p.Ack:
        """Complete ``todo_id`` after ``delay`` (seconds or a timedelta) or ``at`` a time (epoch
        seconds, or an aware datetime): journaled now, fired by the agent's monitor then, even
        across restarts; cancelled by ``cancel_scheduled`` or by a completion that comes first."""
        if (delay is None) == (at is None):
            raise ValueError("give either a delay or a time (at), not both")
        if delay is not None:
            # A timedelta, or seconds (datetime is not imported on the client's hot path).
            seconds = delay.total_seconds() if hasattr(delay, "total_seconds") else float(delay)
            if not seconds >= 0:
                raise ValueError(f"the delay must be zero or more seconds, not {seconds!r}")
            due_at = time.time() + seconds
        elif isinstance(at, int | float):
            due_at = float(at)
        else:
            assert at is not None
            if at.tzinfo is None:
                raise ValueError("give an aware datetime (with a time zone)")
            due_at = at.timestamp()
        return self._deliver(
            p.Schedule(
                request_id=request_id or p.new_request_id(),
                todo_id=todo_id,
                due_at=due_at,
                output=cap_output(output) if output is not None else None,
                sent_at=time.time(),
            )
        )

    def cancel_scheduled(self, todo_id: int, *, request_id: str | None = None) -> p.Ack:
        """Cancel the todo's scheduled completion (refused when none waits)."""
        return self._deliver(
            p.Cancel(
                request_id=request_id or p.new_request_id(), todo_id=todo_id, sent_at=time.time()
            )
        )

    def export_session_data(
        self, todo_id: int, path: str | None = None, *, metadata_only: bool = False
    ) -> dict:
        """Write one .tar.gz with everything known about a todo (archive dirs, report, journal
        history, database row; never a secret) and return its metadata.  Needs no running
        agent: it reads the state dir's archive and journal, and the database when it answers."""
        from .export import export_todo

        return export_todo(self.config, todo_id, path, metadata_only=metadata_only)

    def acknowledge(self, check: str) -> p.Ack:
        return self._deliver(p.Acknowledge(request_id=p.new_request_id(), check=check), queue=False)

    def list_todos(self, *, since: float | None = None, limit: int = 50) -> p.TodoList:
        return self._read(
            p.ListTodos(request_id=p.new_request_id(), since=since, limit=limit), p.TodoList
        )

    def health(self) -> p.HealthReport:
        return self._read(p.Health(request_id=p.new_request_id()), p.HealthReport)

    def status(self, todo_id: int | None = None) -> p.StatusReport:
        return self._read(p.Status(request_id=p.new_request_id(), todo_id=todo_id), p.StatusReport)

    def metrics(self, since: float = 3600.0) -> p.MetricsReport:
        """Counts, stage latencies (p50/p95/p99), backlog and recoveries of the last ``since``
        seconds, and per hour for the last 24 h."""
        return self._read(p.Metrics(request_id=p.new_request_id(), since=since), p.MetricsReport)

    def ping(self) -> p.Pong:
        return self._read(p.Ping(request_id=p.new_request_id()), p.Pong)


def read_text_file(path: str) -> str:
    """--output-file: a path, or - for stdin; bytes that are not UTF-8 are kept as replacement
    characters, and a huge file is read only as far as the cap needs."""
    import sys

    limit = p.MAX_MESSAGE_BYTES * 4
    if path == "-":
        data = sys.stdin.buffer.read(limit)
    else:
        with Path(path).open("rb") as f:
            data = f.read(limit)
    return data.decode("utf-8", "replace")
