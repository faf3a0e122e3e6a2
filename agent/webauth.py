"""Who may look at the dashboard: a bearer token kept 0600 in the state dir, and one-time login
tokens that ``completionctl dashboard`` leaves there for the web process to take (Jupyter's way).

Light on purpose: the CLI imports it without the web stack.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

TOKEN_FILE = "dashboard.token"
LOGIN_DIR = "dashboard-login"
LOGIN_TTL = 600.0  # a login URL works once, within ten minutes


def _write_private(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)


def bearer_token(state_dir: Path, *, create: bool = True) -> str | None:
    """The dashboard's bearer token (``Authorization: Bearer ...``), made on first use."""
    path = state_dir / TOKEN_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        if not create:
            return None
    with contextlib.suppress(FileExistsError):  # another process made it meanwhile
        _write_private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def bearer_ok(state_dir: Path, presented: str) -> bool:
    token = bearer_token(state_dir, create=False)
    return bool(token) and hmac.compare_digest(token.encode(), presented.encode())  # type: ignore[union-attr]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_login_token(state_dir: Path, now: float | None = None) -> str:
    """A one-time login token; only its hash is kept, with its expiry."""
    directory = state_dir / LOGIN_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    token = secrets.token_urlsafe(24)
    expires = (now if now is not None else time.time()) + LOGIN_TTL
    _write_private(directory / _digest(token), f"{expires}\n")
    # Old, unused tokens go.
    for stale in directory.iterdir():
        try:
            if float(stale.read_text() or 0) < time.time():
                stale.unlink()
        except (OSError, ValueError):
            continue
    return token


def take_login_token(state_dir: Path, token: str) -> bool:
    """True once for a valid, unexpired token (it is removed: a second use fails)."""
    if not token or len(token) > 128:
        return False
    path = state_dir / LOGIN_DIR / _digest(token)
    try:
        expires = float(path.read_text() or 0)
        path.unlink()
    except (OSError, ValueError):
        return False
    return expires >= time.time()
