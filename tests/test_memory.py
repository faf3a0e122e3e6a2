"""Memory handed back after a burst: the trim runs once, after a quiet spell, never while idle."""

from __future__ import annotations

from agent.memory import QUIET, Trimmer, _load_malloc_trim


def test_a_trim_follows_work_once_the_process_is_quiet() -> None:
    calls: list[int] = []
    trimmer = Trimmer(trim=lambda pad: calls.append(pad) or 1)
    assert trimmer.due() is None and not trimmer.run(1000.0)  # idle from the start: nothing

    trimmer.worked(10.0)
    trimmer.worked(11.0)  # more work moves the quiet spell on
    assert trimmer.due() == 11.0 + QUIET
    assert not trimmer.run(11.0 + QUIET - 0.1)
    assert trimmer.run(11.0 + QUIET)
    assert calls == [0]
    # Once trimmed, an idle process is left alone until it works again.
    assert trimmer.due() is None and not trimmer.run(99.0)
    trimmer.worked(100.0)
    assert trimmer.run(100.0 + QUIET) and calls == [0, 0] and trimmer.trims == 2


def test_glibc_malloc_trim_is_found_and_callable() -> None:
    trim = _load_malloc_trim()
    assert trim is not None  # the agent's platform (Debian, glibc)
    assert trim(0) in (0, 1)
