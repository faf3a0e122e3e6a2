"""``completionctl hook``: a Claude Code hook's JSON on stdin becomes the matching request.

It never fails the session: it exits 0 when the message was delivered or queued, and also on any
error of its own (the reason goes to stderr).  It waits at most ``hook.timeout`` and not at all
when the agent's socket is missing.  When it cannot do its job (a configuration error, no todo
for the session, a refusal it got at once) it prints ONE JSON object holding only
``systemMessage`` on stdout, at most once per session and problem, so the user sees it without
a broken setup speaking on every tool call.  It never prints a blocking field.

``dispatch`` is shared with the agent's HTTP hook endpoint (``agent.httphook``), so an event
means the same whichever way it arrives.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TypedDict

import msgspec

import protocol as p
from protocol.config import Config, ConfigError, default_state_dir, load_for_client, read_todo_hint

from . import AgentUnavailable, Client, CommandRefused, NotQueued, cap_output

# PostToolUse carries the tool's whole response and Stop the whole last message: read up to
# this much; a larger payload is capped (see _parse) instead of dropped.
MAX_PAYLOAD = 64 * 1024 * 1024
# Notification types that mean a person has to act (the reference's notification_type values).
WAITING_TYPES = ("permission_prompt", "idle_prompt", "elicitation_dialog")
# Events that only say "the session is alive": each moves the todo's completion deadline.
HEARTBEAT_EVENTS = (
    "UserPromptSubmit",
    "PreToolUse",
    "PostToolUse",
    "PostToolUseFailure",  # a failing tool call is activity too
    "SubagentStart",
    "SubagentStop",
    "PreCompact",
    "PostCompact",
    "TaskCompleted",  # Claude's own task list: a step, not the todo
    "TeammateIdle",
)
NOTICE_MAX_AGE = 7 * 24 * 3600  # remembered "already told" notes are forgotten after this

HELP = """\
usage: completionctl [--config PATH] hook

For Claude Code's hooks: reads the hook's JSON object on stdin and tells completiond what the
event means for the session's todo (see contrib/README.md for the table of events):
  SessionStart        start the todo ($TODO_ID, else the CURRENT_TODO_ID file); a resume,
                      clear or compact of a session that already completed it is a heartbeat
  Stop                complete the todo with the last assistant message; a later Stop of the
                      same session is a revision (the latest answer wins)
  StopFailure         recorded; a SessionEnd after it applies hook.on_failure
  SessionEnd          by its reason (hook.session_end_means)
  Notification,       waiting for a person (permission, idle or elicitation prompt)
  PermissionRequest
  every other event   a heartbeat: the session is alive

It always exits 0 (Claude Code reads exit 2 as "block"). When it cannot do its job it prints
one JSON object with only a systemMessage, at most once per session and problem. It waits at
most hook.timeout (default 0.5 s) for the agent and queues the request in STATE_DIR/outbox/
when the agent does not answer.
"""


class _HookClient(Client):
    """Remembers the last reply, so the hook can say on stderr that a request was queued."""

    last: p.Ack | None = None

    def _deliver(
        self, message: p.Request, *, queue: bool = True, timeout: float | None = None
    ) -> p.Ack:
        self.last = super()._deliver(message, queue=queue, timeout=timeout)
        return self.last


def env_todo_id(raw: str | None) -> int | None:
    raw = (raw or "").strip()
    if not raw:
        return None
    todo_id = p.parse_todo_id(raw)
    if todo_id is not None:
        return todo_id
    print(f"completionctl hook: ignoring $TODO_ID={raw[:40]!r} (not a todo id)", file=sys.stderr)
    return None


def read_hint(config: Config) -> str | None:
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


class NoTodo(Exception):
    """The session maps to no todo as far as the hook can tell (no $TODO_ID, no hint)."""


def failure_note(payload: dict) -> str:
    """StopFailure's error in one line (the reference's ``error``/``error_details``; some
    versions send ``error_type``/``error_message``)."""
    parts = [
        _str(payload.get(key))
        for key in ("error_type", "error", "error_message", "error_details")
        if _str(payload.get(key))
    ]
    seen: list[str] = []
    for part in parts:
        if part and part not in seen:
            seen.append(part)
    return ": ".join(seen)[:2000] or "the turn ended with an API error"


def dispatch(client: Client, payload: dict, *, todo_id: int | None = None) -> str:
    """Send what the event means; returns a word for the log line.

    ``todo_id`` is the session's $TODO_ID (the command hook's environment; None over HTTP).
    """
    config = client.config
    event = payload.get("hook_event_name")
    common: _Common = {
        "session_id": _str(payload.get("session_id")),
        # $TODO_ID wins anyway (DESIGN): the hint file is not even opened then.
        "todo_hint": read_hint(config) if todo_id is None else None,
        "wait": config.hook.timeout,
    }
    transcript = _str(payload.get("transcript_path"))
    cwd = _str(payload.get("cwd"))
    if event == "SessionStart":
        source = _str(payload.get("source")) or "startup"
        if source == "compact":
            # A compaction inside a running session: it is alive, it did not start anew.
            client.heartbeat(todo_id, event="SessionStart", **common)
            return "heartbeat"
        if source == "startup" and todo_id is None and common["todo_hint"] is None:
            raise NoTodo("no $TODO_ID and no CURRENT_TODO_ID file")
        # resume/clear: the agent knows whether this session's todo is already completed (then
        # it is a heartbeat of that session, never a refusal) or still to be started.
        client.start(todo_id, transcript_path=transcript, cwd=cwd, source=source, **common)
        return "start"
    if event == "Stop":
        if config.hook.stop_means == "heartbeat":
            client.heartbeat(todo_id, event="Stop", **common)
            return "heartbeat"
        # Every Stop carries an answer, also one with stop_hook_active (another Stop hook kept
        # Claude going; this is the answer after that): the agent makes the first the
        # completion and each later one of the same session a revision.
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
        reason = _str(payload.get("reason"))
        means = config.hook.session_end_action(reason)
        if means == "nothing":
            return f"ignored (SessionEnd {reason}: hook.session_end_means says nothing)"
        if means == "heartbeat":
            client.heartbeat(todo_id, event="SessionEnd", **common)
            return "heartbeat"
        client.complete(
            todo_id,
            transcript_path=transcript,
            cwd=cwd,
            event="SessionEnd",
            only_if_open=means == "complete_if_open",
            reason=reason,
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
    if event == "PermissionRequest":
        tool = _str(payload.get("tool_name")) or "a tool"
        client.waiting(todo_id, reason=f"permission_request: {tool}", **common)
        return "waiting"
    if event == "StopFailure":
        client.heartbeat(todo_id, event="StopFailure", note=failure_note(payload), **common)
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


# ---------------------------------------------------------------- reading stdin

_SMALL_FIELD = (
    rb'"(session_id|transcript_path|cwd|hook_event_name|source|reason)"\s*:\s*'
    rb'"((?:[^"\\]|\\.){0,4096})"'
)
_BIG_FIELDS = (b'"last_assistant_message"',)


def read_payload(stream, limit: int = MAX_PAYLOAD) -> dict:
    """The hook's JSON object.  One over ``limit`` bytes is capped, not dropped: its small
    fields are taken from the head, the last assistant message is kept head-first up to the
    message cap, and the rest of stdin is read and discarded (Claude Code must not block)."""
    raw = stream.read(limit + 1)
    if len(raw) <= limit:
        try:
            payload = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ValueError(f"stdin is not a hook payload (not JSON: {exc})") from None
        if not isinstance(payload, dict):
            raise ValueError("stdin is not a hook payload (JSON, but not an object)")
        return payload
    total = len(raw)
    while chunk := stream.read(1 << 20):
        total += len(chunk)
    return _capped(raw, total)


def _capped(head: bytes, total: int) -> dict:
    import re  # only for a payload this large

    payload: dict[str, object] = {}
    for match in re.compile(_SMALL_FIELD).finditer(head[: 1 << 20]):
        key = match.group(1).decode()
        if key not in payload:
            payload[key] = _json_string(match.group(2)) or ""
    if "hook_event_name" not in payload:
        raise ValueError(f"stdin is not a hook payload (over {MAX_PAYLOAD >> 20} MiB, no event)")
    for field in _BIG_FIELDS:
        start = head.find(field)
        if start < 0:
            continue
        quote = head.find(b'"', start + len(field) + 1)
        if quote < 0:
            continue
        body = head[quote + 1 : quote + 1 + p.MAX_MESSAGE_BYTES]
        text = _json_string(body.rstrip(b"\\")) or ""
        note = (
            f"\n\n[... the hook payload was {total} bytes, over the {MAX_PAYLOAD >> 20} MiB "
            "the hook reads; the rest was omitted by completionctl ...]"
        )
        payload[field.strip(b'"').decode()] = cap_output(text) + note
    print(
        f"completionctl hook: the payload of {total} bytes is over {MAX_PAYLOAD >> 20} MiB; "
        "its large fields were capped",
        file=sys.stderr,
    )
    return payload


def _json_string(body: bytes) -> str | None:
    """The text of a JSON string body cut anywhere (a partial escape at the end is dropped)."""
    for cut in range(0, 12):
        candidate = body[: len(body) - cut] if cut else body
        try:
            value = msgspec.json.decode(b'"' + candidate + b'"')
        except msgspec.DecodeError:
            continue
        return value if isinstance(value, str) else None
    return None


# ---------------------------------------------------------------- telling the user


def _notice_dir(config: Config | None) -> Path:
    base = Path(config.state_dir) if config is not None else default_state_dir()
    return base / "hook-notices"


def tell_once(config: Config | None, session_id: str | None, problem: str, message: str) -> None:
    """Print ``{"systemMessage": message}`` unless this session was told about ``problem``."""
    import hashlib  # only when there is something to tell

    key = hashlib.sha256(f"{session_id or '-'}\0{problem}".encode()).hexdigest()[:32]
    where = _notice_dir(config)
    try:
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(where / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # told already
    except OSError:
        return  # cannot remember it: better silent than on every tool call
    os.close(fd)
    _forget_old(where)
    sys.stdout.write(msgspec.json.encode({"systemMessage": message}).decode() + "\n")
    sys.stdout.flush()


def _forget_old(where: Path) -> None:
    cutoff = time.time() - NOTICE_MAX_AGE
    try:
        with os.scandir(where) as entries:
            for entry in entries:
                try:
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                except OSError:
                    pass
    except OSError:
        pass


def _wants_help(argv: list[str]) -> bool:
    after = argv[argv.index("hook") + 1 :] if "hook" in argv else []
    return any(token in ("-h", "--help") for token in after)


def run_hook(argv: list[str]) -> int:
    if _wants_help(argv):
        sys.stdout.write(HELP)
        return 0
    if sys.stdin is None or sys.stdin.isatty():
        # Started by hand at a terminal: there is no event to read, and waiting would hang.
        print(
            "completionctl hook: reads a Claude Code hook's JSON on stdin; "
            "see `completionctl hook --help`",
            file=sys.stderr,
        )
        return 0
    config: Config | None = None
    session_id: str | None = None
    try:
        payload = read_payload(sys.stdin.buffer)
        session_id = _str(payload.get("session_id"))
        config = load_for_client(_config_path(argv))
        client = _HookClient(config=config, timeout=config.hook.timeout, one_shot=True)
        outcome = dispatch(client, payload, todo_id=env_todo_id(os.environ.get("TODO_ID")))
        if outcome.startswith("ignored"):
            print(f"completionctl hook: {outcome}", file=sys.stderr)
        elif client.last is not None and client.last.state == "queued":
            print(f"completionctl hook: {outcome} queued: {client.last.message}", file=sys.stderr)
    except NotQueued as exc:
        # Lost, not queued: the user must hear it, not only the hook's stderr.
        print(f"completionctl hook: {exc}", file=sys.stderr)
        tell_user(f"completiond did not record this session's event: {exc}")
    except ConfigError as exc:
        print(f"completionctl hook: configuration error: {exc}", file=sys.stderr)
        tell_once(
            None,
            session_id,
            "config",
            f"completiond: the hook cannot read its configuration, so this session's todo is "
            f"not tracked: {exc}",
        )
    except NoTodo as exc:
        print(f"completionctl hook: ignored ({exc}: no todo for this session)", file=sys.stderr)
        tell_once(
            config,
            session_id,
            "no-todo",
            "completiond: this session maps to no todo (start Claude Code with TODO_ID=<id> "
            "in its environment, or write the id to the CURRENT_TODO_ID file); its events "
            "are not recorded",
        )
    except CommandRefused as exc:
        print(f"completionctl hook: the agent refused: {exc}", file=sys.stderr)
        problem = "no-todo" if exc.code == p.ErrorCode.UNKNOWN_TODO else f"refused-{exc.code}"
        tell_once(config, session_id, problem, f"completiond refused this session's event: {exc}")
    except (AgentUnavailable, OSError, ValueError) as exc:
        print(f"completionctl hook: {exc}", file=sys.stderr)
    except Exception as exc:  # a hook must never break the session it reports on
        print(f"completionctl hook: unexpected error: {exc!r}", file=sys.stderr)
    return 0
