"""Reading the small files that sessions leave in shared places (``CURRENT_TODO_ID``,
``TASK_COMPLETED``): never through a symlink, never blocking on a FIFO, and only a file that
belongs to a user we act for and that not everybody may write.

The hook imports this (its hot path imports only ``protocol`` and pyzmq), and so does the agent.
"""

from __future__ import annotations

import errno
import os
import stat

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


def check_owned(info: os.stat_result, owners: frozenset[int], what: str) -> None:
    """OSError unless the file belongs to one of ``owners`` and is not writable by everybody."""
    if info.st_uid not in owners:
        raise OSError(errno.EPERM, f"the {what} belongs to uid {info.st_uid}, not a user it serves")
    if info.st_mode & stat.S_IWOTH:
        raise OSError(errno.EPERM, f"the {what} is writable by everybody")


def trusted_stat(path: str | os.PathLike[str], owners: frozenset[int]) -> os.stat_result:
    """lstat of a marker file that may be used; OSError (FileNotFoundError when absent)."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    check_owned(info, owners, "file")
    return info


def read_marker(path: str | os.PathLike[str], owners: frozenset[int], limit: int = 64) -> str:
    """A marker or hint file's text; OSError when it is absent or may not be used."""
    fd = os.open(path, _FLAGS)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        check_owned(info, owners, "file")
        return os.read(fd, limit).decode("utf-8", "replace")
    finally:
        os.close(fd)
