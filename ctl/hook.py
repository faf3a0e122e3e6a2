"""``completionctl hook``: a Claude Code hook's JSON on stdin becomes the matching request.

It never fails the session: it exits 0 when the message was delivered or queued, and also on any
error of its own (the reason goes to stderr; stdout stays empty, since Claude Code reads it).  It
waits at most ``hook.timeout`` and not at all when the agent's socket is missing.
"""

from __future__ import annotations

import os
import sys
from typing import TypedDict

import msgspec

import protocol as p
from protocol.config import Config, ConfigError, load_for_client, read_todo_hint

from . import AgentUnavailable, Client, CommandRefused, NotQueued

# PostToolUse carries the tool's whole response and Stop the whole last message: read generously
# (the client caps the output it sends); only a runaway stream is refused.
MAX_PAYLOAD = 64 * 1024 * 1024
WAITING_TYPES = ("permission_prompt", "idle_prompt")
HEARTBEAT_EVENTS = (
    "PostToolUse",
    "UserPromptSubmit",
    "SubagentStop",
    "TaskCompleted",
    "PreToolUse",
)


class _HookClient(Client):
    """Remembers the last reply, so the hook can say on stderr that a request was queued."""

    last: p.Ack | None = None

    def _deliver(
        self, message: p.Request, *, queue: bool = True, timeout: float | None = None
    ) -> p.Ack:
        self.last = super()._deliver(message, queue=queue, timeout=timeout)
        return self.last


def _todo_id() -> int | None:
    raw = os.environ.get("TODO_ID", "").strip()
    if not raw:
        return None
    todo_id = p.parse_todo_id(raw)
    if todo_id is not None:
        return todo_id
    print(f"completionctl hook: ignoring $TODO_ID={raw[:40]!r} (not a todo id)", file=sys.stderr)
    return None


def _hint(config: Config) -> str | None:
    return read_todo_hint(config)


def _config_path(argv: list[str]) -> str | None:
    for index, token in enumerate(argv):
        if token == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if token.startswith("--config="):
            return token[len("--config=") :]
        if token == "hook":
            break  # options of the command itself come after it
    return None


def _notification_kind(payload: dict) -> str | None:
    kind = payload.get("notification_type")
    if isinstance(kind, str):
        return kind if kind in WAITING_TYPES else None
    # Older Claude Code versions send only the message.
    message = str(payload.get("message", "")).lower()
    if "permission" in message:
        return "permission_prompt"
    if "waiting for your input" in message:
        return "idle_prompt"
    return None


class _Common(TypedDict):
    """What every request of the hook carries: the session, the CURRENT_TODO_ID hint, the wait."""

    session_id: str | None
    todo_hint: str | None
    wait: float


def dispatch(client: Client, payload: dict) -> str:
    """Send what the event means; returns a word for the log line."""
    config = client.config
    event = payload.get("hook_event_name")
    todo_id = _todo_id()
    common: _Common = {
        "session_id": _str(payload.get("session_id")),
        # $TODO_ID wins anyway (DESIGN): the hint file is not even opened then.
        "todo_hint": _hint(config) if todo_id is None else None,
        "wait": config.hook.timeout,
    }
    transcript = _str(payload.get("transcript_path"))
    cwd = _str(payload.get("cwd"))
    if event == "SessionStart":
        if payload.get("source") == "compact":
            # A compaction inside a running session: it is alive, it did not start anew.
            client.heartbeat(todo_id, event="SessionStart", **common)
            return "heartbeat"
        if todo_id is None and common["todo_hint"] is None:
            return "ignored (no $TODO_ID and no CURRENT_TODO_ID file: no todo for this session)"
        client.start(todo_id, transcript_path=transcript, cwd=cwd, **common)
        return "start"
    if event == "Stop":
        if payload.get("stop_hook_active") or config.hook.stop_means == "heartbeat":
            client.heartbeat(todo_id, event="Stop", **common)
            return "heartbeat"
        client.complete(
            todo_id,
            output=_text(payload.get("last_assistant_message")),
            transcript_path=transcript,
            cwd=cwd,
            event="Stop",
            **common,
        )
        return "complete"
    if event == "SessionEnd":
        means = config.hook.session_end_means
        if means == "nothing":
            return "ignored"
        if means == "heartbeat":
            client.heartbeat(todo_id, event="SessionEnd", **common)
            return "heartbeat"
        client.complete(
            todo_id,
            transcript_path=transcript,
            cwd=cwd,
            event="SessionEnd",
            only_if_open=means == "complete_if_open",
            **common,
        )
        return "complete"
    if event == "Notification":
        kind = _notification_kind(payload)
        if kind is None:
            client.heartbeat(todo_id, event="Notification", **common)
            return "heartbeat"
        client.waiting(todo_id, reason=f"{kind}: {_str(payload.get('message')) or ''}", **common)
        return "waiting"
    if event == "StopFailure":
        note = (
            f"{_str(payload.get('error')) or 'error'}: {_str(payload.get('error_details')) or ''}"
        )
        client.heartbeat(todo_id, event="StopFailure", note=note.strip(": "), **common)
        return "heartbeat"
    if event in HEARTBEAT_EVENTS:
        client.heartbeat(todo_id, event=event, **common)
        return "heartbeat"
    if not event:
        return "ignored (the payload has no hook_event_name)"
    return f"ignored (event {event!r} is not one the hook acts on)"


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _text(value: object) -> str | None:
    """An output worth sending; an empty one lets the collector fall back to the transcript."""
    return value if isinstance(value, str) and value.strip() else None


def tell_user(text: str) -> None:
    """Claude Code shows a hook's ``systemMessage`` to the user; the object holds nothing else
    (no field that could block the session), and it is the only thing on stdout."""
    sys.stdout.write(msgspec.json.encode({"systemMessage": text}).decode() + "\n")
    sys.stdout.flush()


def run_hook(argv: list[str]) -> int:
    try:
        config = load_for_client(_config_path(argv))
    except ConfigError as exc:
        print(f"completionctl hook: configuration error: {exc}", file=sys.stderr)
        return 0
    try:
        raw = sys.stdin.buffer.read(MAX_PAYLOAD + 1)
        if len(raw) > MAX_PAYLOAD:
            raise ValueError(f"stdin is not a hook payload (over {MAX_PAYLOAD >> 20} MiB)")
        try:
            payload = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ValueError(f"stdin is not a hook payload (not JSON: {exc})") from None
        if not isinstance(payload, dict):
            raise ValueError("stdin is not a hook payload (JSON, but not an object)")
        client = _HookClient(config=config, timeout=config.hook.timeout)
        outcome = dispatch(client, payload)
        if outcome.startswith("ignored"):
            print(f"completionctl hook: {outcome}", file=sys.stderr)
        elif client.last is not None and client.last.state == "queued":
            print(f"completionctl hook: {outcome} queued: {client.last.message}", file=sys.stderr)
    except NotQueued as exc:
        # Lost, not queued: the user must hear it, not only the hook's stderr.
        print(f"completionctl hook: {exc}", file=sys.stderr)
        tell_user(f"completiond did not record this session's event: {exc}")
    except CommandRefused as exc:
        print(f"completionctl hook: the agent refused: {exc}", file=sys.stderr)
    except (AgentUnavailable, OSError, ValueError) as exc:
        print(f"completionctl hook: {exc}", file=sys.stderr)
    except Exception as exc:  # a hook must never break the session it reports on
        print(f"completionctl hook: unexpected error: {exc!r}", file=sys.stderr)
    return 0
