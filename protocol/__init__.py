"""The wire protocol between completionctl, the hook and completiond.

Every frame is a MessagePack array ``[version, body]``; the body is one of the tagged, frozen
structs below.  The version is checked before the body is decoded, so an old client gets a
sentence instead of a decode error.  One ``except ProtocolError`` catches every bad input.
"""

from __future__ import annotations

import enum
import functools
import os
from typing import Annotated, Any

import msgspec

VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Room for the envelope and the other fields around a capped output.
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES + 64 * 1024

TODO_ID_MAX = 2**63 - 1
TodoId = Annotated[int, msgspec.Meta(ge=1, le=TODO_ID_MAX)]
ShortText = Annotated[str, msgspec.Meta(max_length=4096)]
# Short enough that derived journal ids ("start-<request id>") fit the 64-character log column.
RequestId = Annotated[str, msgspec.Meta(max_length=48, pattern=r"^[A-Za-z0-9_.:-]*$")]
# A completion's id: a request id, or one derived from it (completion_log's column holds 64).
CompletionId = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[A-Za-z0-9_.:-]*$")]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=30 * 24 * 3600)]
# A batch completion names at most this many todos; a larger one is refused whole.
MAX_BATCH = 10_000
# The journal keeps each todo's copy of a batch's output: their sum may not exceed this.
MAX_BATCH_JOURNAL_BYTES = 64 * 1024 * 1024


def parse_todo_id(text: str | None) -> int | None:
    """A todo id written as text ($TODO_ID, the CURRENT_TODO_ID file, a command line): ASCII
    digits around which blanks are ignored, from 1 to TODO_ID_MAX; anything else is None."""
    text = (text or "").strip()
    if not (text.isascii() and text.isdecimal()):
        return None
    value = int(text)
    return value if 1 <= value <= TODO_ID_MAX else None


class ErrorCode(enum.IntEnum):
    """Numbered reasons for an Error reply; the sentence says what to do."""

    BAD_FRAME = 1
    TOO_LARGE = 2
    BAD_VERSION = 3
    INVALID = 4
    UNKNOWN_TODO = 5
    NOT_FOUND = 6
    STOPPING = 7
    INTERNAL = 8
    UNAVAILABLE = 9  # the journal cannot be written now (disk full): not taken, queue it
    FORBIDDEN = 10  # this user may not use the agent, or not ask for that (SECURITY.md)
    OVER_QUOTA = 11  # this user sent more than the agent takes per second or per minute


class ProtocolError(Exception):
    """A frame that cannot be accepted; ``code`` and the message go into the Error reply."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def new_request_id() -> str:
    # 128 random bits in hex, what uuid4().hex is made of (without importing uuid, which costs
    # the hook more than a millisecond).
    return os.urandom(16).hex()


# ---------------------------------------------------------------- requests


class Request(
    msgspec.Struct, frozen=True, kw_only=True, tag_field="type", forbid_unknown_fields=True
):
    """Base of every request: the client-made id makes a delivered-and-queued request apply once."""

    request_id: RequestId = ""


class TodoRequest(Request, frozen=True, kw_only=True):
    """A request about one todo; the agent resolves which one (explicit id, session, hint)."""

    todo_id: TodoId | None = None
    session_id: ShortText | None = None
    todo_hint: ShortText | None = None  # content of the CURRENT_TODO_ID file, if any
    sent_at: float | None = None  # client's wall clock, for the report only
    # Who asked: set by the agent from the socket's peer credentials (or the outbox file's
    # owner) before the request is journaled; whatever a client puts here is overwritten.
    # REMOTE for a tcp:// peer, whose user the agent cannot know.
    requester_uid: int | None = None


REMOTE = -1  # requester_uid of a peer on a tcp:// endpoint


class Start(TodoRequest, frozen=True, kw_only=True, tag="start"):
    timeout: Seconds | None = None  # this todo's completion timeout
    transcript_path: ShortText | None = None
    cwd: ShortText | None = None
    # SessionStart's source: "startup", or "resume"/"clear"/"compact" of a session that may
    # have completed the todo already (then it is a heartbeat, never a refusal).
    source: ShortText | None = None


class Heartbeat(TodoRequest, frozen=True, kw_only=True, tag="heartbeat"):
    event: ShortText | None = None  # hook event that caused it (PostToolUse, StopFailure, ...)
    note: ShortText | None = None  # e.g. the StopFailure's error, recorded on the todo


class Waiting(TodoRequest, frozen=True, kw_only=True, tag="waiting"):
    """The session waits for a person (permission or idle prompt): report, don't force-complete."""

    reason: ShortText = ""


class Complete(TodoRequest, frozen=True, kw_only=True, tag="complete"):
    output: str | None = None
    transcript_path: ShortText | None = None
    tmux_target: ShortText | None = None
    cwd: ShortText | None = None
    event: ShortText | None = None  # "cli", "Stop", "SessionEnd", "marker"
    only_if_open: bool = False  # SessionEnd: complete only when no completion is known yet
    reason: ShortText | None = None  # SessionEnd's reason (logout, prompt_input_exit, ...)
    # Refuse the completion if the todo's row was created after this moment (epoch seconds):
    # a scheduled completion carries the time it was scheduled, so that it never completes a
    # todo created later under the id it named.
    not_created_after: float | None = None


class Emergency(TodoRequest, frozen=True, kw_only=True, tag="emergency"):
    reason: ShortText = "forced by completionctl emergency"


class BatchComplete(Request, frozen=True, kw_only=True, tag="batch-complete"):
    """Complete several todos with one request: one journal transaction, one ack that lists
    each todo's outcome.  Every todo gets its own completion (id ``<request id>-<todo id>``)."""

    todo_ids: list[TodoId]
    output: str | None = None
    event: ShortText | None = None
    sent_at: float | None = None


class Schedule(TodoRequest, frozen=True, kw_only=True, tag="schedule"):
    """Complete a todo at ``due_at`` (epoch seconds): journaled now, fired by the monitor then,
    cancelled by ``Cancel`` or by a completion that comes first."""

    due_at: float
    output: str | None = None


class Cancel(TodoRequest, frozen=True, kw_only=True, tag="cancel"):
    """Cancel the todo's scheduled completion."""


class Outcomes(Request, frozen=True, kw_only=True, tag="outcomes"):
    """Where these completions stand (a batch's ack names them): read-only."""

    completion_ids: Annotated[list[CompletionId], msgspec.Meta(max_length=MAX_BATCH)]


class Health(Request, frozen=True, kw_only=True, tag="health"):
    pass


class Acknowledge(Request, frozen=True, kw_only=True, tag="acknowledge"):
    """Clear a health check's warning now (``completionctl ack refused``)."""

    check: ShortText


class ListTodos(Request, frozen=True, kw_only=True, tag="list"):
    """What the journal knows about recent todos (``completionctl list``)."""

    since: float | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 50


class Status(Request, frozen=True, kw_only=True, tag="status"):
    todo_id: TodoId | None = None


class Ping(Request, frozen=True, kw_only=True, tag="ping"):
    pass


class Retry(Request, frozen=True, kw_only=True, tag="retry"):
    """Queue dead completions again: one by id, or all of them."""

    completion_id: RequestId | None = None
    all_dead: bool = False


class Metrics(Request, frozen=True, kw_only=True, tag="metrics"):
    """Counts and stage latencies of the entries made in the last ``since`` seconds."""

    since: Seconds = 3600.0


AnyRequest = (
    Start
    | Heartbeat
    | Waiting
    | Complete
    | Emergency
    | Health
    | Status
    | Ping
    | Retry
    | BatchComplete
    | Schedule
    | Cancel
    | Outcomes
    | Metrics
    | Acknowledge
    | ListTodos
)
# Requests that are queued in the outbox when the agent does not answer.
QUEUEABLE = (Start, Heartbeat, Waiting, Complete, Emergency, BatchComplete, Schedule, Cancel)


# ---------------------------------------------------------------- replies


class Reply(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    pass


class ItemOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """One todo of a batch: "accepted" or "refused" at intake (and why); with ``Outcomes``
    also where its completion stands now (state, and the database's outcome)."""

    todo_id: int
    outcome: str
    completion_id: str | None = None
    reason: str = ""
    state: str | None = None


class Ack(Reply, frozen=True, kw_only=True, tag="ack"):
    request_id: str
    state: str  # "accepted" | "queued" (set by the client) | "duplicate-request"
    todo_id: int | None = None
    completion_id: str | None = None
    message: str = ""
    items: list[ItemOutcome] = []  # a batch: each todo's outcome
    due_at: float | None = None  # a scheduled completion: when it fires


class OutcomeReport(Reply, frozen=True, kw_only=True, tag="outcomes"):
    items: list[ItemOutcome]


class Error(Reply, frozen=True, kw_only=True, tag="error"):
    code: ErrorCode
    message: str


class Pong(Reply, frozen=True, kw_only=True, tag="pong"):
    version: int
    pid: int


class Check(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    status: str  # OK | WARNING | CRITICAL | UNKNOWN
    message: str
    todo_ids: list[int] = []


class HealthReport(Reply, frozen=True, kw_only=True, tag="health"):
    status: str
    checks: list[Check]
    checked_at: float = 0.0


class Deadline(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # "completion" | "emergency"
    due_at: float
    fired: bool = False


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One journal row of a todo, as status shows it."""

    completion_id: str
    kind: str
    state: str
    source: str | None
    attempts: int
    last_error: str | None
    outcome: str | None
    created_at: float
    updated_at: float
    # Seconds per stage (intake, collect, write, verify, clean, end_to_end, source:NAME)
    timings: dict[str, float] = {}
    archive_path: str | None = None


class Scheduled(msgspec.Struct, frozen=True, kw_only=True):
    """A scheduled completion: "pending" until it fires ("fired") or is "cancelled"."""

    request_id: str
    todo_id: int
    due_at: float
    state: str
    reason: str | None = None


class TodoStatus(msgspec.Struct, frozen=True, kw_only=True):
    todo_id: int
    entries: list[Entry]
    deadlines: list[Deadline]
    waiting: str | None = None
    session_id: str | None = None
    last_heard_at: float | None = None
    note: str | None = None
    scheduled: list[Scheduled] = []
    predicted_hang: str | None = None  # the predicted_hangs check's sentence for this todo


class AgentStatus(msgspec.Struct, frozen=True, kw_only=True):
    pid: int
    version: int
    endpoint: str
    state_dir: str
    database: str  # URL with the password masked
    started_at: float
    children: dict[str, int | None]
    restarts: dict[str, int]
    journal: dict[str, int]  # count per state
    recoveries: dict[str, int] = {}
    scheduled: list[Scheduled] = []  # pending scheduled completions, soonest first


class StatusReport(Reply, frozen=True, kw_only=True, tag="status"):
    agent: AgentStatus | None = None
    todo: TodoStatus | None = None


class Percentiles(msgspec.Struct, frozen=True, kw_only=True):
    count: int
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class HourBucket(msgspec.Struct, frozen=True, kw_only=True):
    start: float  # the hour's first second (epoch)
    completions: int  # normal and emergency completions accepted in that hour
    verified: int
    failed: int
    dead: int
    p50_end_to_end: float | None = None
    p95_end_to_end: float | None = None


class MetricsReport(Reply, frozen=True, kw_only=True, tag="metrics"):
    since: float  # the window, seconds
    now: float
    counts: dict[str, dict[str, int]]  # kind -> outcome (or "pending") -> entries
    stages: dict[str, Percentiles]  # intake, collect, write, verify, clean, end_to_end, source:*
    backlog: int  # entries on their way to the database now
    dead_now: int  # dead entries now, of any age
    retries: int
    dead: int
    deadline_fires: int
    recoveries: int
    revisions: int
    oldest_waiting_age: float | None = None
    hourly: list[HourBucket] = []  # the last 24 h, oldest first


class TodoSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One todo as the journal knows it, for ``completionctl list``."""

    todo_id: int
    session_id: str | None = None
    started_at: float | None = None
    last_heard_at: float | None = None
    completion_due: float | None = None
    emergency_due: float | None = None
    waiting: str | None = None
    note: str | None = None
    done: bool = False
    hanging: bool = False
    latest_kind: str | None = None  # the newest completion entry's kind (normal, revision, ...)
    latest_state: str | None = None
    completed_at: float | None = None  # when the first completion was accepted
    revisions: int = 0
    archive_path: str | None = None
    scheduled_at: float | None = None  # a pending scheduled completion fires then
    predicted_hang: str | None = None  # the predicted_hangs check's sentence for this todo


class TodoList(Reply, frozen=True, kw_only=True, tag="list"):
    todos: list[TodoSummary]


AnyReply = (
    Ack | Error | Pong | HealthReport | StatusReport | OutcomeReport | MetricsReport | TodoList
)


# ---------------------------------------------------------------- framing


class _Frame(msgspec.Struct, array_like=True):
    version: int
    body: Any


class _RawFrame(msgspec.Struct, array_like=True):
    version: int
    body: msgspec.Raw


_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(_RawFrame)


# The typed decoders are built on first use: the client never decodes a request and the agent
# never a reply, and building one compiles the types of every struct in its union.
@functools.cache
def _request_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(AnyRequest)


@functools.cache
def _reply_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(AnyReply)


@functools.cache
def _ack_decoder() -> msgspec.msgpack.Decoder:
    # The answer to every state-changing request (the hook's hot path): a quarter of the cost
    # of compiling the whole reply union, which drags in the health and status structs.
    return msgspec.msgpack.Decoder(Ack | Error)


def encode(message: Request | Reply) -> bytes:
    return _encoder.encode(_Frame(VERSION, message))


def _unwrap(frame: bytes) -> msgspec.Raw:
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"message of {len(frame)} bytes is over the {MAX_FRAME_BYTES}-byte limit; "
            "send the output with --output-file so the client can cap it",
        )
    try:
        raw = _frame_decoder.decode(frame)
    except RecursionError:
        raise ProtocolError(
            ErrorCode.BAD_FRAME, "not a protocol frame: nested too deeply"
        ) from None
    except Exception as exc:  # any decode failure is the frame's fault, never the agent's end
        raise ProtocolError(ErrorCode.BAD_FRAME, f"not a protocol frame: {exc}") from None
    if raw.version != VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION,
            f"protocol version {raw.version} is not supported (this agent speaks {VERSION}); "
            "use a completionctl from the same release as completiond",
        )
    return raw.body


def decode_request(frame: bytes) -> AnyRequest:
    body = _unwrap(frame)
    try:
        return _request_decoder().decode(body)
    except RecursionError:
        # msgspec bounds nesting by the interpreter's recursion limit and says so this way.
        raise ProtocolError(
            ErrorCode.BAD_FRAME, "not a protocol frame: nested too deeply"
        ) from None
    except Exception as exc:  # DecodeError, and anything else a hostile frame provokes
        raise ProtocolError(ErrorCode.INVALID, f"invalid request: {exc}") from None


def decode_reply(frame: bytes) -> AnyReply:
    body = _unwrap(frame)
    try:
        return _ack_decoder().decode(body)
    except msgspec.DecodeError:
        pass  # not an Ack or an Error: decode it against every reply type
    try:
        return _reply_decoder().decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID, f"invalid reply: {exc}") from None


def to_builtins(message: msgspec.Struct) -> Any:
    """The JSON-ready form used by ``completionctl --json``."""
    return msgspec.to_builtins(message)
