"""What a session did, read from its Claude Code transcript: files, commands, errors, time,
model and tokens.

The transcript is JSONL (one object per line; see tests/fixtures/claude-code/README.md): `user`,
`assistant`, `system`, `summary`, `file-history-snapshot` and other types. A tool call is a
`tool_use` block of an assistant message (`Write`/`Edit`/`MultiEdit`/`NotebookEdit` with
`file_path` or `notebook_path`, `Bash` with `command`); its result is a `tool_result` block of a
later user line (`tool_use_id`, `is_error`), often with a `toolUseResult` beside it. Lines of
subagents carry `isSidechain: true` and are counted apart. An API message split into several
content blocks comes as several lines sharing `message.id`: its usage is counted once.

The file is streamed line by line with a cap on one line's length, so memory stays bounded
whatever its size; a line that is not JSON, too long, or of a type this module does not know is
counted and skipped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

MAX_LINE_BYTES = 8 * 1024 * 1024  # a longer line (a huge pasted file) is skipped, not read whole
MAX_ITEMS = 2000  # files and commands kept per chain; beyond that only counted
WRITE_TOOLS = {"Write": "file_path", "Edit": "file_path", "MultiEdit": "file_path"}
NOTEBOOK_TOOLS = {"NotebookEdit": "notebook_path"}
COMMAND_TOOLS = {"Bash"}
KNOWN_TYPES = {"user", "assistant", "system", "summary", "file-history-snapshot"}
_EXIT_RE = re.compile(r"(?:exit code|exit status|exited with code)\s*:?\s*(-?\d+)", re.IGNORECASE)


class _Input(msgspec.Struct):
    file_path: str | None = None
    notebook_path: str | None = None
    command: str | None = None


class _Block(msgspec.Struct):
    type: str = ""
    id: str | None = None
    name: str | None = None
    input: _Input | None = None
    tool_use_id: str | None = None
    is_error: bool | None = None
    text: str | None = None
    content: msgspec.Raw = msgspec.Raw()


class _Usage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class _Message(msgspec.Struct):
    id: str | None = None
    role: str | None = None
    model: str | None = None
    content: list[_Block] | str | None = None
    usage: _Usage | None = None


class _Line(msgspec.Struct):
    type: str = ""
    isSidechain: bool = False
    isApiErrorMessage: bool = False
    timestamp: str | None = None
    message: _Message | None = None
    toolUseResult: msgspec.Raw = msgspec.Raw()


_decode_line = msgspec.json.Decoder(_Line).decode
_decode_any = msgspec.json.Decoder().decode


@dataclass
class Command:
    command: str
    ok: bool | None = None  # None: no result seen (the session ended first)
    exit_code: int | None = None
    at: str | None = None  # the call's timestamp (ISO, as written)


@dataclass
class ChainFacts:
    """What one chain (the main one, or all sidechains together) did."""

    created: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    commands_total: int = 0
    tool_calls: int = 0

    @property
    def failed_commands(self) -> int:
        return sum(1 for c in self.commands if c.ok is False)


@dataclass
class SessionFacts:
    main: ChainFacts = field(default_factory=ChainFacts)
    side: ChainFacts = field(default_factory=ChainFacts)
    first_at: datetime | None = None
    last_at: datetime | None = None
    model: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    api_errors: int = 0
    lines: int = 0
    skipped_lines: int = 0  # not JSON, too long, or not an object
    unknown_lines: int = 0  # JSON of a type this reader does not know

    @property
    def duration_s(self) -> float | None:
        if self.first_at is None or self.last_at is None:
            return None
        return max(0.0, (self.last_at - self.first_at).total_seconds())


def _when(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _result_text(raw: msgspec.Raw, limit: int = 400) -> str:
    """The start of a tool_result's content (a string or a list of text blocks)."""
    if not raw:
        return ""
    try:
        value = _decode_any(raw)
    except msgspec.DecodeError:
        return ""
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, list):
        texts = [b.get("text", "") for b in value if isinstance(b, dict)]
        return " ".join(t for t in texts if isinstance(t, str))[:limit]
    return ""


def _exit_code(result: msgspec.Raw, text: str) -> int | None:
    if result:
        try:
            value = _decode_any(result)
        except msgspec.DecodeError:
            value = None
        if isinstance(value, dict):
            for key in ("exitCode", "exit_code", "returnCode", "code"):
                code = value.get(key)
                if isinstance(code, int) and not isinstance(code, bool):
                    return code
    found = _EXIT_RE.search(text)
    return int(found.group(1)) if found else None


def _write_kind(result: msgspec.Raw) -> str | None:
    """Claude Code's Write result says "create" or "update" in toolUseResult.type."""
    if not result:
        return None
    try:
        value = _decode_any(result)
    except msgspec.DecodeError:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    return kind if kind in ("create", "update") else None


class _Reader:
    def __init__(self) -> None:
        self.facts = SessionFacts()
        self.usage_id: str | None = None  # the API message whose usage is being summed
        self.usage: tuple[int, int] = (0, 0)
        # tool_use id -> (chain, kind, path or Command)
        self.pending: dict[str, tuple[ChainFacts, str, Any]] = {}
        self.files: dict[int, dict[str, str]] = {0: {}, 1: {}}  # chain -> path -> created/modified

    def line(self, data: bytes) -> None:
        f = self.facts
        f.lines += 1
        try:
            line = _decode_line(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            f.skipped_lines += 1
            return
        if line.type not in KNOWN_TYPES:
            f.unknown_lines += 1
            return
        at = _when(line.timestamp)
        if at is not None:
            if f.first_at is None or at < f.first_at:
                f.first_at = at
            if f.last_at is None or at > f.last_at:
                f.last_at = at
        chain = f.side if line.isSidechain else f.main
        files = self.files[1 if line.isSidechain else 0]
        message = line.message
        if message is None:
            return
        if line.type == "assistant":
            if line.isApiErrorMessage:
                f.api_errors += 1
                chain.errors.append(_first_text(message) or "API error")
            if message.model and not line.isSidechain and message.model != "<synthetic>":
                f.model = message.model
            if message.usage is not None:
                u = message.usage
                used = (
                    u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens,
                    u.output_tokens,
                )
                # The lines of one API message follow each other and repeat its (growing)
                # usage: count each message once, with the largest figures its lines gave.
                if message.id is not None and message.id == self.usage_id:
                    self.usage = (max(self.usage[0], used[0]), max(self.usage[1], used[1]))
                else:
                    self.flush_usage()
                    self.usage_id, self.usage = message.id, used
            for block in message.content if isinstance(message.content, list) else ():
                if block.type == "tool_use":
                    self.tool_use(chain, files, block, line.timestamp)
        elif line.type == "user":
            for block in message.content if isinstance(message.content, list) else ():
                if block.type == "tool_result" and block.tool_use_id:
                    self.tool_result(block, line.toolUseResult)

    def flush_usage(self) -> None:
        self.facts.tokens_in += self.usage[0]
        self.facts.tokens_out += self.usage[1]
        self.usage_id, self.usage = None, (0, 0)

    def tool_use(
        self, chain: ChainFacts, files: dict[str, str], block: _Block, at: str | None
    ) -> None:
        chain.tool_calls += 1
        name = block.name or ""
        params = block.input or _Input()
        if name in WRITE_TOOLS or name in NOTEBOOK_TOOLS:
            path = params.file_path if name in WRITE_TOOLS else params.notebook_path
            if path:
                kind = "created" if name == "Write" else "modified"
                if path not in files:
                    files[path] = kind
                    target = chain.created if kind == "created" else chain.modified
                    if len(target) < MAX_ITEMS:
                        target.append(path)
                if block.id:
                    self.pending[block.id] = (chain, "file", path)
        elif name in COMMAND_TOOLS and params.command is not None:
            chain.commands_total += 1
            command = Command(params.command, at=at)
            if len(chain.commands) >= MAX_ITEMS:
                chain.commands.pop(0)  # the last ones are what the report shows
            chain.commands.append(command)
            if block.id:
                self.pending[block.id] = (chain, "command", command)
        elif block.id:
            self.pending[block.id] = (chain, "other", name)

    def tool_result(self, block: _Block, result: msgspec.Raw) -> None:
        entry = self.pending.pop(block.tool_use_id or "", None)
        if entry is None:
            return
        chain, kind, what = entry
        failed = bool(block.is_error)
        text = _result_text(block.content) if failed or kind == "command" else ""
        if kind == "command":
            what.ok = not failed
            what.exit_code = _exit_code(result, text)
        elif kind == "file" and not failed and _write_kind(result) == "update":
            # A Write that replaced an existing file is a modification, as Claude Code says.
            self._reclassify(chain, what)
        if failed:
            label = what.command if kind == "command" else str(what)
            chain.errors.append(f"{label}: {text}".strip() if text else label)

    def _reclassify(self, chain: ChainFacts, path: str) -> None:
        files = self.files[0 if chain is self.facts.main else 1]
        if files.get(path) == "created" and path in chain.created:
            chain.created.remove(path)
            chain.modified.append(path)
            files[path] = "modified"


def _first_text(message: _Message) -> str:
    if isinstance(message.content, str):
        return message.content[:300]
    for block in message.content or ():
        if block.type == "text" and block.text:
            return block.text[:300]
    return ""


def read_facts(
    path: Path,
    *,
    max_line_bytes: int = MAX_LINE_BYTES,
    opener: Callable[[Path], int] | None = None,
) -> SessionFacts:
    """Stream `path` and return what the session did. OSError if it cannot be read.

    `opener` returns a descriptor of the path opened with the requester's rights
    (agent.access); without it the file is opened as the agent."""
    reader = _Reader()
    with os.fdopen(opener(path), "rb") if opener else open(path, "rb") as handle:
        while True:
            data = handle.readline(max_line_bytes + 1)
            if not data:
                break
            if len(data) > max_line_bytes and not data.endswith(b"\n"):
                reader.facts.lines += 1
                reader.facts.skipped_lines += 1
                # Skip the rest of the over-long line in bounded chunks.
                while data and not data.endswith(b"\n"):
                    data = handle.readline(max_line_bytes)
                continue
            if data.strip():
                reader.line(data)
    reader.flush_usage()
    return reader.facts
