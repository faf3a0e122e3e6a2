"""The session archive: a durable copy of a session's files, taken before anything is deleted.

An archive is a directory under the archive root, laid out as::

    todo_<id>_<unix time>/        (orphaned_<dirname>_<unix time>/ for the monitor's orphans)
        session/                  the session directory, recursively
        transcript.jsonl          the Claude Code transcript (its origin is in the notes)
        report.html               the completion report
        ARCHIVE_NOTES.txt         where each part came from, and every note

It is built under a hidden temporary name in the archive root, every file and directory is
fsynced, and only then is it renamed into place, so an archive either exists whole or not at all.
A name already taken gets a suffix (``_1``, ``_2``, ...); nothing is overwritten. Because the
notes file is always written, an archive is never empty, so rename(2) refuses to replace another.

The session directory is walked through directory file descriptors with O_NOFOLLOW: symlinks
inside it are recorded and skipped (never followed, never copied as links that could point out of
the archive), special files (FIFOs, sockets, devices) are skipped, and a session directory that
is itself a symlink is not archived. Files larger than ``max_file_bytes`` are copied capped (the
head). Missing sources are notes, not errors; failing to write the archive raises OSError after
removing the temporary directory. Deleting the originals is the caller's business.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from loguru import logger

from . import access

DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_BYTES = 200 * 1024 * 1024  # one archive, all files together (archive.max_bytes)
DEFAULT_MAX_FILES = 2000  # one archive (archive.max_files)
STAGING_MAX_AGE = 3600.0  # a half-built archive untouched this long was left by a killed builder
NOTES_FILE = "ARCHIVE_NOTES.txt"
_MAX_DEPTH = 64  # deeper than any real session directory; bounds a hostile one
_COPY_CHUNK = 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True)
class ArchiveResult:
    path: Path  # the archive directory, in its final place
    files: int  # files archived (session files, transcript, report; not the notes file)
    bytes: int  # bytes of those files as archived (after capping)
    notes: tuple[str, ...]  # what was missing, skipped or capped


def archive_session(
    archive_root: Path,
    todo_id: int,
    now: float,
    *,
    session_dir: Path | None,
    transcript: Path | None,
    report_html: str | None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    session_owners: frozenset[int] | None = None,
    transcript_opener: Callable[[Path], int] | None = None,
) -> ArchiveResult:
    """Archive a finished todo's session into ``archive_root/todo_<id>_<int(now)>/``.

    ``session_owners``: whose session dir is taken (agent.access; default the agent's user);
    ``transcript_opener`` opens the transcript with the requester's rights."""
    builder = _ArchiveBuilder(
        Path(archive_root), max_file_bytes, max_bytes, max_files, session_owners
    )
    builder.transcript_opener = transcript_opener
    return builder.build(
        f"todo_{todo_id}_{int(now)}",
        f"todo {todo_id}",
        now,
        session_dir=session_dir,
        transcript=transcript,
        report_html=report_html,
        note_missing=True,
    )


def archive_orphan(
    archive_root: Path,
    session_dir: Path,
    now: float,
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    session_owners: frozenset[int] | None = None,
) -> ArchiveResult:
    """Archive an orphaned session directory into ``orphaned_<dirname>_<int(now)>/``."""
    dirname = Path(session_dir).name or "session"
    builder = _ArchiveBuilder(
        Path(archive_root), max_file_bytes, max_bytes, max_files, session_owners
    )
    return builder.build(
        f"orphaned_{dirname}_{int(now)}",
        f"orphaned session {dirname}",
        now,
        session_dir=session_dir,
        transcript=None,
        report_html=None,
        note_missing=False,  # an orphan has neither transcript nor report by nature
    )


def identity(info: os.stat_result) -> str:
    """How an archive's notes name the session dir it copied: device, inode, change time."""
    return f"{info.st_dev}:{info.st_ino}:{info.st_mtime_ns}"


def archived_before(archive_root: Path, session_dir: Path, info: os.stat_result) -> Path | None:
    """The orphan archive already taken of this very dir (same identity), if any: an orphan
    that cannot be removed is archived once, across restarts too."""
    line = f"session directory identity: {identity(info)}"
    prefix = f"orphaned_{Path(session_dir).name or 'session'}_"
    try:
        with os.scandir(archive_root) as entries:
            for entry in entries:
                if not entry.name.startswith(prefix):
                    continue
                try:
                    notes = (Path(entry.path) / NOTES_FILE).read_text(errors="replace")
                except OSError:
                    continue
                if line in notes.splitlines():
                    return Path(entry.path)
    except OSError:
        return None
    return None


def remove_stale_staging(archive_root: Path, older_than: float) -> list[str]:
    """Remove half-built archives (the hidden ``.todo_*.tmp`` / ``.orphaned_*.tmp`` staging
    directories) last changed before ``older_than`` (a wall-clock time); their names.

    A builder killed mid-way leaves one behind.  Nothing is lost with it: the session files are
    deleted only after an archive is in place, so the next collection or orphan sweep takes the
    archive again.
    """
    removed: list[str] = []
    try:
        with os.scandir(archive_root) as entries:
            for entry in entries:
                name = entry.name
                if not (name.startswith((".todo_", ".orphaned_")) and name.endswith(".tmp")):
                    continue
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    if entry.stat(follow_symlinks=False).st_mtime >= older_than:
                        continue
                except OSError:
                    continue
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(name)
    except FileNotFoundError:
        pass
    return removed


class _ArchiveBuilder:
    def __init__(
        self,
        root: Path,
        max_file_bytes: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_files: int = DEFAULT_MAX_FILES,
        session_owners: frozenset[int] | None = None,
    ) -> None:
        self.root = root
        self.max_file_bytes = max_file_bytes
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.session_owners = session_owners or access.trusted_owners(None)
        self.transcript_opener: Callable[[Path], int] | None = None
        self.skipped_over_bounds = 0
        self.notes: list[str] = []
        self.origins: list[str] = []
        self.files = 0
        self.bytes = 0

    def build(
        self,
        name: str,
        what: str,
        now: float,
        *,
        session_dir: Path | None,
        transcript: Path | None,
        report_html: str | None,
        note_missing: bool,
    ) -> ArchiveResult:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.root))
        try:
            if session_dir is not None:
                self._copy_session_dir(Path(session_dir), staging / "session")
            elif note_missing:
                self.notes.append("no session directory was given")
            if transcript is not None:
                self._copy_transcript(Path(transcript), staging / "transcript.jsonl")
            elif note_missing:
                self.notes.append("no transcript was given")
            if report_html is not None:
                report = report_html.encode("utf-8", "replace")
                self._write(staging / "report.html", report)
                self.files += 1
                self.bytes += len(report)
                self.origins.append("report: report.html")
            elif note_missing:
                self.notes.append("no report was given")
            if self.skipped_over_bounds:
                self.notes.append(
                    f"{self.skipped_over_bounds} file(s) skipped: the archive reached its bound "
                    f"({self.max_files} files, {self.max_bytes} bytes; archive.max_files, "
                    "archive.max_bytes)"
                )
            self._write(staging / NOTES_FILE, self._notes_text(what, now).encode())
            _fsync_dir(staging)
            final = self._rename_into_place(staging, name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return ArchiveResult(final, self.files, self.bytes, tuple(self.notes))

    # --- sources ---

    def _copy_session_dir(self, source: Path, dest: Path) -> None:
        try:
            top = os.open(source, _DIR_FLAGS | os.O_NOFOLLOW)
        except FileNotFoundError:
            self.notes.append(f"session directory {source} not found")
            return
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.ENOTDIR):
                what = "a symlink" if source.is_symlink() else "not a directory"
                self.notes.append(f"session directory {source} is {what}; not archived")
            else:
                self.notes.append(f"session directory {source}: {error.strerror}; not archived")
            return
        try:
            info = os.fstat(top)
            access.check_owned(info, self.session_owners, "directory")
        except OSError as error:
            os.close(top)
            self.notes.append(f"session directory {source}: {error.strerror}; not archived")
            return
        try:
            self._copy_dir(top, dest, "session", depth=0)
        finally:
            os.close(top)
        self.origins.append(f"session directory: {source} -> session/")
        self.origins.append(f"session directory identity: {identity(info)}")

    def _copy_dir(self, dir_fd: int, dest: Path, label: str, depth: int) -> None:
        dest.mkdir(mode=0o700)
        for name in sorted(os.listdir(dir_fd)):
            entry = f"{label}/{name}"
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError as error:
                self.notes.append(f"{entry}: {error.strerror}; skipped")
                continue
            if stat.S_ISLNK(info.st_mode):
                target = _readlink(name, dir_fd)
                self.notes.append(f"{entry} is a symlink to {target}; not followed, skipped")
            elif stat.S_ISDIR(info.st_mode):
                if depth >= _MAX_DEPTH:
                    self.notes.append(f"{entry}: nested deeper than {_MAX_DEPTH}; skipped")
                    continue
                try:
                    child = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
                except OSError as error:
                    self.notes.append(f"{entry}: {error.strerror}; skipped")
                    continue
                try:
                    self._copy_dir(child, dest / name, entry, depth + 1)
                finally:
                    os.close(child)
            elif stat.S_ISREG(info.st_mode):
                self._copy_file(name, dir_fd, dest / name, entry, follow_symlinks=False)
            else:
                self.notes.append(f"{entry} is a FIFO, socket or device; skipped")
        _fsync_dir(dest)

    def _copy_transcript(self, source: Path, dest: Path) -> None:
        # Claude Code owns the transcript and may keep it behind a symlink: follow it (as far
        # as the requester could: the opener checks that).
        if self._copy_file(source, None, dest, "transcript", follow_symlinks=True):
            self.origins.append(f"transcript: {source} -> transcript.jsonl")

    def _copy_file(
        self, source: Path | str, dir_fd: int | None, dest: Path, label: str, *, follow_symlinks
    ) -> bool:
        if self.files >= self.max_files or self.bytes >= self.max_bytes:
            self.skipped_over_bounds += 1
            return False
        # O_NONBLOCK: a FIFO swapped in after the check must not block the copy.
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        if not follow_symlinks:
            flags |= os.O_NOFOLLOW
        try:
            if dir_fd is None and self.transcript_opener is not None:
                src = self.transcript_opener(Path(source))
            else:
                src = os.open(source, flags, dir_fd=dir_fd)
        except access.NotAllowed as error:
            self.notes.append(f"{label} {source}: {error.strerror}; skipped")
            return False
        except FileNotFoundError:
            self.notes.append(
                f"{label} {source} not found" if dir_fd is None else f"{label} vanished"
            )
            return False
        except OSError as error:
            self.notes.append(f"{label}: {error.strerror}; skipped")
            return False
        try:
            info = os.fstat(src)
            if not stat.S_ISREG(info.st_mode):
                self.notes.append(f"{label} is not a regular file; skipped")
                return False
            limit = min(self.max_file_bytes, self.max_bytes - self.bytes)
            copied = self._copy_fd(src, dest, limit)
        finally:
            os.close(src)
        os.utime(dest, ns=(info.st_atime_ns, info.st_mtime_ns))
        if info.st_size > limit:
            self.notes.append(f"{label}: {info.st_size} bytes, capped to its first {copied} bytes")
        self.files += 1
        self.bytes += copied
        return True

    # --- writing ---

    @staticmethod
    def _copy_fd(src: int, dest: Path, limit: int) -> int:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        copied = 0
        try:
            while copied < limit:
                chunk = os.read(src, min(_COPY_CHUNK, limit - copied))
                if not chunk:
                    break
                _write_all(out, chunk)
                copied += len(chunk)
            os.fsync(out)
        finally:
            os.close(out)
        return copied

    @staticmethod
    def _write(dest: Path, data: bytes) -> None:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(out, data)
            os.fsync(out)
        finally:
            os.close(out)

    def _notes_text(self, what: str, now: float) -> str:
        made = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S UTC")
        lines = [f"Archive of {what}, made {made} (unix time {int(now)}).", ""]
        lines += self.origins or ["Nothing was copied."]
        lines += ["", "Notes:"]
        lines += [f"- {note}" for note in self.notes] or ["- none"]
        return "\n".join(lines) + "\n"

    def _rename_into_place(self, staging: Path, name: str) -> Path:
        for attempt in range(1000):
            final = self.root / (name if attempt == 0 else f"{name}_{attempt}")
            if os.path.lexists(final):
                continue
            try:
                os.rename(staging, final)
            except OSError as error:
                # Taken between the check and the rename: a non-empty directory or a file.
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    continue
                raise
            _fsync_dir(self.root)
            return final
        raise FileExistsError(errno.EEXIST, f"no free archive name for {name}", str(self.root))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _readlink(name: str, dir_fd: int) -> str:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return "an unreadable target"


_SIZES: dict[str, int] = {}  # archive path -> bytes on disk


def enforce_bounds(config, now: float, log=logger) -> list[str]:
    """Remove whole archives, oldest first, past ``archive.retention_days`` or while all of
    them together are over ``archive.max_total_bytes``; the names removed."""
    root = Path(config.archive_dir)
    bounds = config.archive
    archives: list[tuple[float, str, int]] = []
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    made = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                size = _SIZES.get(entry.path)
                if size is None:  # an archive never changes once in place: measured once
                    size = _SIZES[entry.path] = _tree_bytes(Path(entry.path))
                archives.append((made, entry.name, size))
    except OSError:
        return []
    archives.sort()
    total = sum(size for _, _, size in archives)
    keep_after = now - bounds.retention_days * 86400 if bounds.retention_days else None
    removed: list[str] = []
    for made, name, size in archives:
        expired = keep_after is not None and made < keep_after
        if not expired and total <= bounds.max_total_bytes:
            break
        try:
            shutil.rmtree(root / name)
        except OSError as exc:
            log.error("could not remove archive {}: {}", name, exc)
            continue
        total -= size
        _SIZES.pop(str(root / name), None)
        removed.append(name)
        log.info(
            "removed archive {} ({})",
            name,
            "past archive.retention_days" if expired else "archive.max_total_bytes reached",
        )
    return removed


def _tree_bytes(path: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                continue
    return total


def remove_tree(path: Path) -> str | None:
    """Delete a directory tree; None when it is gone, else why not (the first failure)."""
    failures: list[str] = []

    def failed(_function, name, excinfo) -> None:
        exc = excinfo[1]
        failures.append(f"{name}: {exc.strerror if isinstance(exc, OSError) else exc}")

    shutil.rmtree(path, onerror=failed)
    if not os.path.lexists(path):
        return None
    return failures[0] if failures else "it is still there"
