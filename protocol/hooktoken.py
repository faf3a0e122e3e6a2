"""The bearer token of the agent's HTTP hook endpoint: ``STATE_DIR/hook-token``, mode 0600.

Made on first use by whichever comes first, ``completiond`` or ``completionctl hook-token``;
Claude Code's settings pass it in the ``Authorization`` header (``allowedEnvVars``).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def ensure_token(path: Path) -> str:
    """The token in ``path``, made (0600, written atomically) when there is none."""
    try:
        token = path.read_text(encoding="ascii").strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (token + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(staging, path)  # first one wins: a token made meanwhile is kept
    except FileExistsError:
        pass
    finally:
        os.unlink(staging)
    return path.read_text(encoding="ascii").strip()
