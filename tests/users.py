"""Throwaway users and groups for permission tests (CI runs as root).

Names are unique per process and call, so parallel xdist workers never collide; every user and
group made here is deleted again by its context manager.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_counter = itertools.count()


def _run_locked(argv: list[str]) -> None:
    """useradd and friends fail while another one holds /etc/passwd's lock: try again."""
    for _ in range(100):
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return
        if "lock" not in result.stderr and "try again" not in result.stderr:
            raise AssertionError(f"{' '.join(argv)} failed: {result.stderr}")
        time.sleep(0.1)
    raise AssertionError(f"{' '.join(argv)} kept failing: /etc/passwd stayed locked")


def _name(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}x{next(_counter)}"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def argv(self, *command: str) -> list[str]:
        """``command`` run as this user, with their groups."""
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--",
            *command,
        ]

    def run(
        self, *command: str, env: dict[str, str] | None = None, **kw
    ) -> subprocess.CompletedProcess:
        """Run ``command`` as this user, with only ``env`` (and a PATH) as its environment."""
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
        return subprocess.run(self.argv(*command), capture_output=True, env=environment, **kw)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make throwaway users (CI runs as root)")


@contextlib.contextmanager
def group(prefix: str = "cag") -> Iterator[str]:
    require_root()
    name = _name(prefix)
    _run_locked(["groupadd", name])
    try:
        yield name
    finally:
        _run_locked(["groupdel", name])


@contextlib.contextmanager
def user(prefix: str = "cau", groups: tuple[str, ...] = ()) -> Iterator[User]:
    require_root()
    name = _name(prefix)
    argv = ["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin"]
    if groups:
        argv += ["--groups", ",".join(groups)]
    _run_locked([*argv, name])
    try:
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:
        _run_locked(["userdel", "--force", name])


def open_path_for_others(path: Path) -> None:
    """Let other users traverse from / down to ``path`` (a test's private dir is 0700)."""
    for folder in [path, *path.parents]:
        if folder == Path("/"):
            break
        mode = folder.stat().st_mode & 0o7777
        if not mode & 0o001:
            folder.chmod(mode | 0o011)


def python_argv(*args: str) -> list[str]:
    """This interpreter, runnable by other users (a venv under a 0700 home is not)."""
    return [sys.executable, *args]
