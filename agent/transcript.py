"""Reading a Claude Code transcript: the final answer of the session's last turn.

A transcript is JSONL; an API message split into several content blocks is written as several
lines sharing ``message.id``; subagent lines carry ``isSidechain: true``. The final answer is the
text blocks of the last main-chain assistant message, joined in file order with a blank line
("\\n\\n") between blocks, which keeps blocks separate paragraphs when rendered as markdown.

Transcripts grow to hundreds of MB, so the file is read backwards in chunks and only as far as the
last main-chain message group reaches. The Stop hook can fire before the last line is written;
``await_final_message`` polls for a short while with an injected clock and sleep.

This module reads files only; it raises ``OSError`` for a file it cannot open and leaves the
wording of problems to its caller.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# How far back from the end of the file a search may read; the last message group is normally
# within the last few KB, but tool results written after it can be large.
DEFAULT_SCAN_BYTES = 32 * 1024 * 1024
_CHUNK_BYTES = 1024 * 1024
BLOCK_SEPARATOR = "\n\n"

# Stop reasons that end a turn; "tool_use" and "pause_turn" mean more lines will follow.
_TURN_ENDED = frozenset({"end_turn", "max_tokens", "stop_sequence", "refusal"})


@dataclass(frozen=True)
class FinalMessage:
    """The last main-chain assistant message group of a transcript."""

    message_id: str | None
    text: str  # the text blocks joined with BLOCK_SEPARATOR; "" when it had none
    turn_ended: bool  # a stop reason that ends the turn was seen, or Claude Code's stop-hook line


def final_text(path: Path, *, max_bytes: int = DEFAULT_SCAN_BYTES) -> str | None:
    """The final answer text, or None when the transcript has no main-chain assistant message.

    Raises OSError when the file cannot be opened or is not a regular file.
    """
    message = last_main_message(path, max_bytes=max_bytes)
    return None if message is None else message.text


Opener = Callable[[Path], int]  # returns a read-only descriptor of the path (see agent.access)


def last_main_message(
    path: Path, *, max_bytes: int = DEFAULT_SCAN_BYTES, opener: Opener | None = None
) -> FinalMessage | None:
    """Scan backwards from the end for the last main-chain assistant message group.

    Reads at most ``max_bytes`` from the end; a group (or a single line) reaching further back is
    returned with what lies inside that window. Raises OSError as ``final_text`` does.
    """
    group_id: str | None = None
    group_lines: list[dict] = []  # newest first while scanning
    stop_hook_seen = False
    found = False
    for line in _lines_backwards(path, max_bytes, opener):
        if b'"assistant"' not in line and b"stop_hook_summary" not in line:
            continue  # cheap filter: most lines are tool results and user turns
        record = _decode(line)
        if record is None or record.get("isSidechain") is True:
            continue
        kind = record.get("type")
        if kind == "system" and not found and record.get("subtype") == "stop_hook_summary":
            stop_hook_seen = True
            continue
        if kind != "assistant":
            continue
        message = record.get("message")
        if not isinstance(message, dict):
            continue
        message_id = message.get("id") if isinstance(message.get("id"), str) else None
        if not found:
            found, group_id = True, message_id
            group_lines.append(message)
            if message_id is None:
                break  # without an id a line cannot share a group
        elif message_id is not None and message_id == group_id:
            group_lines.append(message)
        else:
            break  # a different main-chain message: the group is complete
    if not found:
        return None
    group_lines.reverse()
    blocks = [text for message in group_lines for text in _text_blocks(message)]
    last_stop = group_lines[-1].get("stop_reason")
    return FinalMessage(
        message_id=group_id,
        text=BLOCK_SEPARATOR.join(blocks),
        turn_ended=stop_hook_seen or last_stop in _TURN_ENDED,
    )


def await_final_message(
    path: Path,
    *,
    wait: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    poll_interval: float = 0.1,
    max_bytes: int = DEFAULT_SCAN_BYTES,
    opener: Opener | None = None,
) -> FinalMessage | None:
    """Poll the transcript for up to ``wait`` seconds until the last turn has visibly ended.

    Returns as soon as the last message group has text and a turn-ending stop reason (or the
    stop-hook line follows it); otherwise returns what is there when the time is up. Without such
    a signal (older Claude Code versions) this waits the whole ``wait``: the collector is off the
    hot path, and a truncated answer is worse than two seconds. Raises OSError at once when the
    file cannot be opened: a transcript Claude Code never created will not appear now.
    """
    deadline = clock() + wait
    while True:
        message = last_main_message(path, max_bytes=max_bytes, opener=opener)
        if message is not None and message.text.strip() and message.turn_ended:
            return message
        remaining = deadline - clock()
        if remaining <= 0:
            return message
        sleep(min(poll_interval, remaining))


def _lines_backwards(path: Path, max_bytes: int, opener: Opener | None = None):
    """Yield complete lines (bytes, without newline) from the end, reading at most max_bytes."""
    # O_NONBLOCK: a FIFO planted at the path must not hang the collector; regular files ignore it.
    fd = opener(path) if opener else os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        position = os.fstat(fd).st_size
        floor = max(0, position - max_bytes)
        carry = b""
        while position > floor:
            size = min(_CHUNK_BYTES, position - floor)
            position -= size
            chunk = os.pread(fd, size, position)
            if len(chunk) < size:  # the file shrank under us; what we read is all there is
                return
            pieces = (chunk + carry).split(b"\n")
            carry = pieces[0]  # may continue in the previous chunk
            for line in reversed(pieces[1:]):
                if line:
                    yield line
        if position == 0 and carry:
            yield carry  # the first line of the file is complete
        # else: carry is cut by the scan window and is no whole line
    finally:
        os.close(fd)


def _decode(line: bytes) -> dict | None:
    try:
        record = json.loads(line.decode("utf-8", "replace"))
    except ValueError:
        return None  # a malformed or half-written line
    return record if isinstance(record, dict) else None


def _text_blocks(message: dict) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content] if content else []
    if not isinstance(content, list):
        return []
    return [
        block["text"]
        for block in content
        if isinstance(block, dict)
        and block.get("type") == "text"
        and isinstance(block.get("text"), str)
        and block["text"]
    ]
