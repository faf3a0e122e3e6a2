"""Run the project's own code as `nobody` (the tests run as root, as CI does).

The venv's interpreter may sit under /root, where nobody cannot reach it; Debian's python3 of
the same version runs the same code with the venv's site-packages on its path.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def interpreter() -> str:
    for candidate in (f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}",):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no system python of this version to run as nobody")


def run_as_nobody(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 30, input=None
) -> subprocess.CompletedProcess:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is missing")
    paths = [str(REPO), *site.getsitepackages()]
    run_env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/nonexistent",
        "PYTHONPATH": os.pathsep.join(paths),
        **(env or {}),
    }
    return subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in run_env.items()),
            interpreter(),
            *args,
        ],
        capture_output=True,
        timeout=timeout,
        input=input,
    )
