"""Giving memory back after a burst of work.

A burst of completions leaves freed blocks in glibc's heaps (the main one and one arena per
thread that allocated, such as the collector's pool); the allocator keeps them for reuse, so a
resident agent would keep a burst's peak for good.  Once a process has been quiet for a little
while after work, ``malloc_trim(0)`` hands the free pages back to the system.  Elsewhere (musl,
macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

QUIET = 2.0  # seconds without work before a trim


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        # The process's own symbols, libc's among them (find_library would run ldconfig).
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class Trimmer:
    """``worked(now)`` after work; ``run(now)`` trims once the process has been quiet for
    ``quiet`` seconds since, and ``due()`` says when that will be (for the loop's sleep)."""

    def __init__(self, quiet: float = QUIET, trim: Callable[[int], int] | None = None) -> None:
        self.quiet = quiet
        self._trim = trim if trim is not None else _load_malloc_trim()
        self._worked_at: float | None = None
        self.trims = 0

    def worked(self, now: float) -> None:
        if self._trim is not None:
            self._worked_at = now

    def due(self) -> float | None:
        return None if self._worked_at is None else self._worked_at + self.quiet

    def run(self, now: float) -> bool:
        due = self.due()
        if due is None or now < due or self._trim is None:
            return False
        self._worked_at = None
        self._trim(0)
        self.trims += 1
        return True
