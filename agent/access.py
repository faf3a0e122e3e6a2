"""Reading on a requester's behalf: never with more rights than the requester has.

The agent may run as root for a shared socket (docs/SECURITY.md); the paths a client names (a
transcript, a cwd-relative path, a tmux server) are then opened only as far as that client's
user could open them: every directory on the way must be searchable by the user and the file
readable by them (owner, group and other bits; no ACLs, so a doubt means no), walked through
descriptors with ``O_NOFOLLOW`` so that nothing is swapped in between a check and the open.  A
path the user cannot read and a path that does not exist give the same sentence, so the answer
never tells whether something the requester cannot see exists.

Session directories and marker files are not named by the client but by the config; they are
used only when they belong to the session's user or the agent's, are no symlink, and are not
writable by everybody.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import pwd
import stat
from pathlib import Path

import protocol as p
from protocol.markers import check_owned

_READ, _SEARCH = 4, 1
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


class NotAllowed(OSError):
    """The requester may not read this path, or it does not exist: the same to them."""


def is_self(uid: int | None) -> bool:
    """A request by the agent's own user (or from before requesters were recorded)."""
    return uid is None or uid == os.geteuid()


def not_readable(path: str | os.PathLike[str], uid: int | None) -> NotAllowed:
    who = "a remote client" if uid == p.REMOTE else f"uid {uid}"
    return NotAllowed(errno.EACCES, f"not found, or not readable by {who}", str(path))


@functools.lru_cache(maxsize=256)
def groups_of(uid: int) -> frozenset[int]:
    """The user's groups (primary and supplementary); none for a uid without a passwd entry."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    try:
        return frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        return frozenset({entry.pw_gid})


def permits(info: os.stat_result, uid: int, bit: int) -> bool:
    """Whether ``uid`` has ``bit`` (4 read, 1 search) on a file with ``info``, by its mode."""
    if uid == 0:
        return True
    if info.st_uid == uid:
        return bool(info.st_mode & (bit << 6))
    if info.st_gid in groups_of(uid):
        return bool(info.st_mode & (bit << 3))
    return bool(info.st_mode & bit)


def open_as(path: str | os.PathLike[str], uid: int | None, *, remote_paths: bool = False) -> int:
    """A read-only descriptor of the regular file at ``path``, opened as ``uid`` could.

    The agent's own user opens it directly (symlinks followed: Claude Code may keep its
    transcripts behind one).  Anyone else: the path is resolved, every directory on the way
    must be searchable by them, and the file readable by them.  Raises OSError; a NotAllowed
    one whenever another user could not read it, whatever the reason.
    """
    if uid == p.REMOTE and not remote_paths:
        raise NotAllowed(
            errno.EACCES,
            "paths named by a tcp:// client are not read (set collect.remote_paths to allow)",
            str(path),
        )
    if is_self(uid) or uid == p.REMOTE:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(path))
        except BaseException:
            os.close(fd)
            raise
        return fd
    assert uid is not None
    try:
        return _walk_open(Path(os.path.realpath(path)), uid)
    except OSError:
        raise not_readable(path, uid) from None


def _walk_open(real: Path, uid: int) -> int:
    parts = real.parts
    if len(parts) < 2 or parts[0] != "/":
        raise OSError(errno.EINVAL, "not an absolute path")
    directory = os.open("/", _PATH_FLAGS)
    try:
        for name in parts[1:-1]:
            if not permits(os.fstat(directory), uid, _SEARCH):
                raise OSError(errno.EACCES, "not searchable")
            child = os.open(name, _PATH_FLAGS, dir_fd=directory)
            os.close(directory)
            directory = child
        if not permits(os.fstat(directory), uid, _SEARCH):
            raise OSError(errno.EACCES, "not searchable")
        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=directory)
    finally:
        os.close(directory)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or not permits(info, uid, _READ):
            raise OSError(errno.EACCES, "not a regular file readable by the requester")
    except BaseException:
        os.close(fd)
        raise
    return fd


def trusted_owners(uid: int | None) -> frozenset[int]:
    """Whose session dirs and marker files count: the agent's user and the requester's."""
    owners = {os.geteuid()}
    if uid is not None and uid >= 0:
        owners.add(uid)
    return frozenset(owners)


def open_session_dir(path: str | os.PathLike[str], owners: frozenset[int]) -> int:
    """A descriptor of the session directory, if it is a real directory (not a symlink), owned
    by one of ``owners`` and not writable by everybody; OSError with the reason otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        check_owned(os.fstat(fd), owners, "directory")
    except BaseException:
        os.close(fd)
        raise
    return fd


def served_uids(config) -> frozenset[int]:
    """The users the agent acts for on its own (orphans, markers): its own and
    ``socket_allowed_uids``."""
    return frozenset({os.geteuid(), *config.socket_allowed_uids})


def tmux_server_allowed(socket: str | None, uid: int | None) -> str | None:
    """Why the requester may not capture from this tmux server, or None when they may.

    ``socket`` is the configured ``-S`` path or ``-L`` name ("" / None: the agent's default).
    A requester other than the agent's user may capture only from a server whose socket they
    own; the agent's own server is never theirs.
    """
    if is_self(uid):
        return None
    if uid == p.REMOTE:
        return "tmux targets named by a tcp:// client are not captured"
    path = tmux_socket_path(socket)
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        if stat.S_ISSOCK(info.st_mode) and info.st_uid == uid:
            return None
    return "the tmux server is not the requester's"


def tmux_socket_path(socket: str | None, uid: int | None = None) -> str:
    """The socket path tmux uses for ``-S path``, ``-L name`` or the default server of ``uid``
    (the agent's user by default)."""
    if socket and "/" in socket:
        return socket
    base = os.environ.get("TMUX_TMPDIR") or "/tmp"
    owner = os.geteuid() if uid is None else uid
    return os.path.join(base, f"tmux-{owner}", socket or "default")
