"""The collector's output fallback chain: where a finished session's output is found.

Sources are tried in a fixed order and the first that yields non-empty text wins:

1. ``message``     the output the message carried (``complete --output``, the hook's
                   ``last_assistant_message``);
2. ``transcript``  the last main-chain assistant message of the Claude Code transcript, polled
                   briefly because the transcript can lag the Stop hook;
3. ``session_dir`` the first non-empty of ``output.md``, ``output.html``, ``output.txt``,
                   ``summary.txt`` (markdown first: it survives our safe renderer intact, while
                   HTML must be flattened to text; the plain files are the seed's fallbacks);
4. ``tmux``        a capture of the session's pane, escape sequences stripped;
5. ``database``    the todo's own title, description and working directory;
6. ``none``        nothing at all: empty text.

A source the request does not name (no output, no transcript path, no tmux target) is not tried
and is not a problem; every source that was tried and failed adds one sentence to ``problems``.
No source failure raises. Files are read capped (head and tail kept, with a note), never through
a symlink inside the session directory, and never from anything but a regular file (a FIFO there
would block). ``output.html`` is reduced to its text here, so nothing downstream ever sees it as
markup; ``Collected.is_html`` records that it was.

This module also owns the byte-budget capping and escape-sequence stripping that the report
reuses, because both concern raw session output.
"""

from __future__ import annotations

import contextlib
import errno
import html
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import protocol as p
from agent import access
from agent import transcript as transcript_reader
from protocol.config import tmux_socket_args

DEFAULT_MAX_SOURCE_BYTES = 8 * 1024 * 1024
NOTE_RESERVE = 64  # bytes kept free in a budget for the omission note itself
SESSION_FILES = ("output.md", "output.html", "output.txt", "summary.txt")

# ECMA-48 escape sequences as terminals emit them: CSI, OSC (e.g. OSC 8 hyperlinks, window
# titles), the string controls DCS/SOS/PM/APC, their 8-bit C1 forms, and two-byte ESC sequences.
# A string control's body stops at any introducer or terminator, so that a run of unterminated
# introducers costs linear time instead of each one scanning to the end of the text.
_BODY = r"[^\x07\x1b\x90\x98\x9b\x9c\x9d\x9e\x9f]*"
_END = r"(?:\x07|\x1b\\|\x9c)"
ESCAPE_SEQUENCE_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x9b[0-?]*[ -/]*[@-~]"
    rf"|\x1b[\]P^_X]{_BODY}{_END}"
    rf"|[\x90\x98\x9d\x9e\x9f]{_BODY}{_END}"
    r"|\x1b[ -/]*[0-~]"
)


@dataclass(frozen=True)
class TodoFacts:
    """What the database knows about a todo (the caller loads it)."""

    title: str
    description: str
    working_directory: str
    status: str = ""


@dataclass(frozen=True)
class CollectRequest:
    todo_id: int
    output: str | None = None  # 1. carried by the message
    transcript_path: str | None = None  # 2.
    session_dir: str | None = None  # 3. already resolved from the template collect.session_dir
    tmux_target: str | None = None  # 4.
    emergency_reason: str | None = None  # set for emergency completions (forced)
    # Who named the transcript and tmux target (agent.access): they are read with no more
    # rights than this user has.  None: the agent's own user.
    requester_uid: int | None = None
    # Whose session dir counts (the session's user and the agent's); None: the agent's only.
    session_owners: frozenset[int] | None = None
    remote_paths: bool = False  # collect.remote_paths


@dataclass(frozen=True)
class Collected:
    text: str  # what the session produced (may be empty)
    source: str  # "message" | "transcript" | "session_dir:<file>" | "tmux" | "database" | "none"
    problems: tuple[str, ...]  # one sentence per source tried and failed, in order
    is_markdown: bool  # Claude's messages and output.md are markdown
    is_html: bool  # the text was extracted from output.html; it is plain text now
    # (source, seconds, found) for every source tried, in order: the stage timings' detail
    tried: tuple[tuple[str, float, bool], ...] = ()


class _SourceFailed(Exception):
    """A source was tried and gave nothing; the message is the problem sentence."""


def collect(
    req: CollectRequest,
    *,
    load_todo: Callable[[int], TodoFacts | None],
    transcript_wait: float = 2.0,
    tmux_timeout: float = 3.0,
    tmux_history: int = 2000,
    max_source_bytes: int = DEFAULT_MAX_SOURCE_BYTES,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    tmux_socket: str | None = None,
    tmux_command: str = "tmux",
) -> Collected:
    """Walk the fallback chain for one completion (normal or emergency alike)."""
    problems: list[str] = []
    tried: list[tuple[str, float, bool]] = []

    def attempt(name: str, source: Callable[[], Collected | None]) -> Collected | None:
        began = time.monotonic()
        try:
            found = source()
        except _SourceFailed as failure:
            problems.append(f"{name}: {failure}")
        except Exception as error:  # a bug or surprise in one source must not stop the chain
            problems.append(f"{name}: unexpected {type(error).__name__}: {error}")
        else:
            if found is not None:
                tried.append((name, time.monotonic() - began, True))
            return found
        tried.append((name, time.monotonic() - began, False))
        return None

    chain: list[tuple[str, Callable[[], Collected | None]]] = [
        ("message", lambda: _from_message(req.output, max_source_bytes)),
        (
            "transcript",
            lambda: _from_transcript(
                req.transcript_path,
                transcript_wait,
                clock,
                sleep,
                max_source_bytes,
                _opener(req.requester_uid, req.remote_paths),
            ),
        ),
        (
            "session_dir",
            lambda: _from_session_dir(
                req.session_dir,
                max_source_bytes,
                req.session_owners or access.trusted_owners(None),
            ),
        ),
        (
            "tmux",
            lambda: _from_tmux(
                req.tmux_target,
                req.requester_uid,
                tmux_timeout,
                tmux_history,
                tmux_socket,
                tmux_command,
                max_source_bytes,
            ),
        ),
        ("database", lambda: _from_database(req.todo_id, load_todo)),
    ]
    for name, source in chain:
        found = attempt(name, source)
        if found is not None:
            return Collected(
                found.text,
                found.source,
                tuple(problems),
                found.is_markdown,
                found.is_html,
                tuple(tried),
            )
    return Collected(
        "", "none", tuple(problems), is_markdown=False, is_html=False, tried=tuple(tried)
    )


# --- the sources; each returns None when not asked for, raises _SourceFailed when it failed ---


def _from_message(output: str | None, max_bytes: int) -> Collected | None:
    if output is None:
        return None
    if not output.strip():
        raise _SourceFailed("the message carried only empty output")
    return Collected(cap_text(output, max_bytes), "message", (), is_markdown=True, is_html=False)


def _from_transcript(
    path: str | None,
    wait: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    max_bytes: int,
    opener: transcript_reader.Opener | None = None,
) -> Collected | None:
    if path is None:
        return None
    try:
        message = transcript_reader.await_final_message(
            Path(path), wait=wait, clock=clock, sleep=sleep, opener=opener
        )
    except access.NotAllowed as error:
        raise _SourceFailed(f"cannot read {path}: {error.strerror}") from None
    except FileNotFoundError:
        raise _SourceFailed(f"file {path} not found") from None
    except OSError as error:
        raise _SourceFailed(f"cannot read {path}: {_reason(error)}") from None
    if message is None:
        raise _SourceFailed(f"{path} has no main-chain assistant message")
    if not message.text.strip():
        raise _SourceFailed(f"the last assistant message in {path} has no text")
    return Collected(
        cap_text(message.text, max_bytes), "transcript", (), is_markdown=True, is_html=False
    )


def _opener(uid: int | None, remote_paths: bool) -> transcript_reader.Opener | None:
    if access.is_self(uid):
        return None
    return lambda path: access.open_as(path, uid, remote_paths=remote_paths)


def _from_session_dir(
    session_dir: str | None, max_bytes: int, owners: frozenset[int]
) -> Collected | None:
    if session_dir is None:
        return None
    try:
        dir_fd = access.open_session_dir(session_dir, owners)
    except FileNotFoundError:
        raise _SourceFailed(f"directory {session_dir} not found") from None
    except OSError as error:
        # A symlink, another user's plant, a world-writable dir: its files are nobody's output.
        raise _SourceFailed(f"directory {session_dir} not used: {_reason(error)}") from None
    try:
        return _read_session_files(session_dir, dir_fd, max_bytes)
    finally:
        os.close(dir_fd)


def _read_session_files(session_dir: str, dir_fd: int, max_bytes: int) -> Collected:
    notes: list[str] = []
    for name in SESSION_FILES:
        try:
            raw = read_capped(Path(name), max_bytes, follow_symlinks=False, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        except OSError as error:
            notes.append(f"{name}: {_reason(error)}")
            continue
        text = raw.decode("utf-8", "replace")
        is_html = name.endswith(".html")
        if is_html:
            text = html_to_text(text)
        if text.strip():
            return Collected(
                text,
                f"session_dir:{name}",
                (),
                is_markdown=name.endswith(".md"),
                is_html=is_html,
            )
        notes.append(f"{name} is empty")
    if notes:
        raise _SourceFailed(f"nothing usable in {session_dir} ({'; '.join(notes)})")
    raise _SourceFailed(f"none of {', '.join(SESSION_FILES)} in {session_dir}")


def _from_tmux(
    target: str | None,
    requester_uid: int | None,
    timeout: float,
    history: int,
    socket: str | None,
    command: str,
    max_bytes: int,
) -> Collected | None:
    if target is None:
        return None
    if not socket and not access.is_self(requester_uid) and requester_uid != p.REMOTE:
        socket = access.tmux_socket_path(None, requester_uid)  # their own default server
    refused = access.tmux_server_allowed(socket, requester_uid)
    if refused is not None:
        raise _SourceFailed(f"capture of {target} not tried: {refused}")
    argv = [command, *tmux_socket_args(socket)]
    argv += ["capture-pane", "-p", "-J", "-S", f"-{int(history)}", "-t", target]
    try:
        stdout, stderr, returncode = _run_bounded(argv, timeout)
    except FileNotFoundError:
        raise _SourceFailed(f"{command} not found") from None
    except subprocess.TimeoutExpired:
        raise _SourceFailed(f"timed out after {timeout:g} s capturing {target}") from None
    if returncode != 0:
        said = stderr.decode("utf-8", "replace").strip().splitlines()
        reason = said[0] if said else f"exit status {returncode}"
        raise _SourceFailed(f"capture of {target} failed: {reason}")
    text = strip_escape_sequences(cap_text(stdout.decode("utf-8", "replace"), max_bytes))
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise _SourceFailed(f"pane {target} is empty")
    return Collected("\n".join(lines), "tmux", (), is_markdown=False, is_html=False)


def _from_database(todo_id: int, load_todo: Callable[[int], TodoFacts | None]) -> Collected:
    try:
        todo = load_todo(todo_id)
    except Exception as error:  # the caller's loader may time out or fail in any way
        raise _SourceFailed(f"loading todo {todo_id} failed: {_reason(error)}") from None
    if todo is None:
        raise _SourceFailed(f"todo {todo_id} not found")
    parts = []
    if todo.title.strip():
        parts.append(f"Title: {todo.title.strip()}")
    if todo.working_directory.strip():
        parts.append(f"Working directory: {todo.working_directory.strip()}")
    if todo.description.strip():
        parts.append(f"\n{todo.description.strip()}")
    if not parts:
        raise _SourceFailed(f"todo {todo_id} has no title, description or working directory")
    return Collected("\n".join(parts), "database", (), is_markdown=False, is_html=False)


# --- reading and shaping raw output ---


def _run_bounded(argv: list[str], timeout: float) -> tuple[bytes, bytes, int]:
    """Run a command with a hard time limit, killing its whole process group on timeout.

    ``subprocess.run(timeout=...)`` kills only the direct child; a grandchild holding the pipe
    would then keep us waiting, so the child gets its own session and we kill that group.
    """
    with subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # the group may be gone already
                os.killpg(process.pid, signal.SIGKILL)
            # Reap it; a process that left the group could hold the pipe, so bound this too.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=1.0)
            raise
        return stdout, stderr, process.returncode


def read_capped(
    path: Path, max_bytes: int, *, follow_symlinks: bool = True, dir_fd: int | None = None
) -> bytes:
    """Read a regular file, keeping head and tail with a note when it exceeds ``max_bytes``."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_symlinks:
            raise OSError(errno.ELOOP, "is a symlink, not followed") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        size = info.st_size
        if size <= max_bytes:
            return _read_exactly(fd, 0, size)
        budget = max(0, max_bytes - NOTE_RESERVE)
        head_size = budget // 2
        tail_size = budget - head_size
        head = _read_exactly(fd, 0, head_size)
        tail = _read_exactly(fd, size - tail_size, tail_size)
    finally:
        os.close(fd)
    head, tail = head[: _utf8_cut(head, len(head))], tail[_utf8_start(tail) :]
    omitted = size - len(head) - len(tail)
    return head + omission_note(omitted).encode() + tail


def cap_text(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes plus an omission note, head and tail kept.

    Only the kept ends and the omitted middle are encoded, so a huge string is never copied whole.
    """
    head, omitted, tail = split_for_cap(text, max_bytes)
    if not omitted:
        return text
    head, omitted, tail = split_for_cap(text, max(0, max_bytes - NOTE_RESERVE))
    return head + omission_note(omitted) + tail


@overload
def split_for_cap(data: str, max_bytes: int) -> tuple[str, int, str]: ...
@overload
def split_for_cap(data: bytes, max_bytes: int) -> tuple[bytes, int, bytes]: ...
@overload
def split_for_cap(
    data: str | bytes, max_bytes: int
) -> tuple[str, int, str] | tuple[bytes, int, bytes]: ...
def split_for_cap(data, max_bytes):
    """Split into (head, omitted byte count, tail) so that head and tail fit ``max_bytes``.

    Works on bytes (cut at UTF-8 character boundaries) and on str (counted as UTF-8; lone
    surrogates count as three bytes, as they would be written with surrogatepass).
    """
    if isinstance(data, bytes):
        return _split_bytes(data, max_bytes)
    return _split_str(data, max_bytes)


def _split_bytes(data: bytes, max_bytes: int) -> tuple[bytes, int, bytes]:
    if len(data) <= max_bytes:
        return data, 0, b""
    head = data[: _utf8_cut(data, max_bytes // 2)]
    tail_from = len(data) - (max_bytes - len(head))
    tail = data[tail_from + _utf8_start(data[tail_from : tail_from + 4]) :]
    return head, len(data) - len(head) - len(tail), tail


def _split_str(data: str, max_bytes: int) -> tuple[str, int, str]:
    if len(data) <= max_bytes // 4 or (data.isascii() and len(data) <= max_bytes):
        return data, 0, ""
    total = _utf8_len(data)
    if total <= max_bytes:
        return data, 0, ""
    # At most max_bytes // 2 characters can fit, so slicing that many first bounds the work.
    head = _fit_head(data[: max_bytes // 2], max_bytes // 2)
    room = max_bytes - _utf8_len(head)
    tail = _fit_tail(data[-room:], room) if room > 0 else ""
    return head, total - _utf8_len(head) - _utf8_len(tail), tail


def omission_note(omitted: int) -> str:
    """The visible marker where the middle of an over-long output was cut (< NOTE_RESERVE)."""
    return f"\n\n[… {omitted} bytes omitted …]\n\n"


def strip_escape_sequences(text: str) -> str:
    """Remove terminal escape sequences (colours, OSC 8 hyperlinks, titles) from text."""
    return ESCAPE_SEQUENCE_RE.sub("", text)


def html_to_text(markup: str) -> str:
    """The readable text of an HTML document: tags, comments, script and style bodies dropped.

    A single forward scan rather than html.parser, which takes quadratic time on hostile input
    such as a long run of unclosed ``<a `` tags.
    """
    parts: list[str] = []
    skipping: str | None = None  # inside <script>, <style>, ...: until its end tag
    position = 0
    while (tag := _TAG_RE.search(markup, position)) is not None:
        if skipping is None:
            parts.append(markup[position : tag.start()])
        position = tag.end()
        if tag.group() == "<!--":
            close = markup.find("-->", position)
            position = len(markup) if close < 0 else close + 3
            continue
        name = (tag.group(2) or "").lower()
        if skipping is not None:
            if tag.group(1) and name == skipping:
                skipping = None
        elif name in _SKIPPED_ELEMENTS and not tag.group(1):
            skipping = name
        elif name in _BLOCK_ELEMENTS:
            parts.append("\n")
    if skipping is None:
        parts.append(markup[position:])
    text = html.unescape("".join(parts))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# A comment opening, a tag, or a declaration (<!DOCTYPE>, <?xml?>); a tag's body stops at "<", so
# a failed match is cheap and a lone "<" stays text.
_TAG_RE = re.compile(r"<!--|<(?:(/?)([A-Za-z][A-Za-z0-9:-]*)|[!?])[^<>]*>")
_SKIPPED_ELEMENTS = frozenset({"script", "style", "template", "noscript", "title", "textarea"})
_BLOCK_ELEMENTS = frozenset(
    {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table"}
    | {"section", "article", "header", "footer", "ul", "ol", "blockquote", "hr", "dt", "dd"}
)


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _read_exactly(fd: int, offset: int, size: int) -> bytes:
    parts, done = [], 0
    while done < size:
        piece = os.pread(fd, size - done, offset + done)
        if not piece:
            break  # the file shrank; keep what there was
        parts.append(piece)
        done += len(piece)
    return b"".join(parts)


def _utf8_cut(data: bytes, limit: int) -> int:
    """The largest cut position <= limit that does not split a UTF-8 character."""
    cut = min(limit, len(data))
    for _ in range(3):  # a character has at most three continuation bytes
        if cut == 0 or cut >= len(data) or (data[cut] & 0xC0) != 0x80:
            break
        cut -= 1
    return cut


def _utf8_start(data: bytes) -> int:
    """How many continuation bytes to skip so that ``data`` starts on a character."""
    skip = 0
    while skip < min(3, len(data)) and (data[skip] & 0xC0) == 0x80:
        skip += 1
    return skip


def _utf8_len(text: str, chunk: int = 1 << 20) -> int:
    if text.isascii():
        return len(text)
    return sum(
        len(text[i : i + chunk].encode("utf-8", "surrogatepass"))
        for i in range(0, len(text), chunk)
    )


def _fit_head(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= max_bytes:
        return text
    return encoded[: _utf8_cut(encoded, max_bytes)].decode("utf-8", "surrogatepass")


def _fit_tail(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= max_bytes:
        return text
    rest = encoded[len(encoded) - max_bytes :]
    return rest[_utf8_start(rest) :].decode("utf-8", "surrogatepass")


__all__ = [
    "SESSION_FILES",
    "CollectRequest",
    "Collected",
    "TodoFacts",
    "cap_text",
    "collect",
    "html_to_text",
    "omission_note",
    "read_capped",
    "split_for_cap",
    "strip_escape_sequences",
    "tmux_socket_args",
]
