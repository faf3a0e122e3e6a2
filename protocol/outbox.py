"""The outbox: requests the client could not deliver, one file each, written atomically.

The client writes ``<time_ns>-<request_id>.req`` (write, fsync, rename, fsync the directory);
the agent ingests the files in name order at start and on every sweep, and deletes each only
after its journal commit.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path

SUFFIX = ".req"
REJECTED = "rejected"


def put(outbox: Path, request_id: str, frame: bytes) -> Path:
    outbox.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The name sorts in queueing order (file times are too coarse): a SessionStart queued just
    # before a Stop must be ingested first.
    final = outbox / f"{time.time_ns():020d}-{request_id}{SUFFIX}"
    temporary = outbox / f".{request_id}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            view = memoryview(frame)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, final)
    except OSError:
        # Disk full, say: no half-written file may stay behind to take the space.
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    dir_fd = os.open(outbox, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def pending(outbox: Path, limit: int = 1000) -> list[Path]:
    """Queued requests, oldest first."""
    try:
        entries = [e for e in os.scandir(outbox) if e.name.endswith(SUFFIX) and e.is_file()]
    except FileNotFoundError:
        return []
    entries.sort(key=lambda e: e.name)
    return [Path(e.path) for e in entries[:limit]]


def read(path: Path) -> tuple[int, bytes]:
    """A queued request: its file's owner (who queued it) and its frame."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path.name} is not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return info.st_uid, b"".join(chunks)
    finally:
        os.close(fd)


def reject(path: Path) -> Path:
    """Keep a file the agent could not use, beside the outbox, for a person to look at."""
    target_dir = path.parent / REJECTED
    target_dir.mkdir(exist_ok=True, mode=0o700)
    target = target_dir / path.name
    os.replace(path, target)
    return target


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
