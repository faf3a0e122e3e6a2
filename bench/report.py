"""Bench 6: rendering the report of a 100 MB output.

``agent.report.render_report`` caps the output before any other work, so a 100 MB output must
cost about what a 1 MB one (the cap) costs. Each size is rendered in a fresh process: the time is
the median over the runs, the peak memory is what tracemalloc saw during the rendering (in a
separate run, since tracing slows it down), and the process's peak RSS above what it held before.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench.common import (
    MIB,
    PYTHON,
    REPO,
    Outcome,
    Row,
    arguments,
    finish,
    median,
    ms,
    verdict,
)

TIME_LIMIT = 2.0  # seconds, for any output size
MEMORY_LIMIT = 64 * MIB  # traced peak during rendering, beyond the output itself

PROBE = r"""
import json, resource, sys, time, tracemalloc
from datetime import UTC, datetime
from agent.report import render_report
from agent.sources import Collected, TodoFacts

size, traced = int(sys.argv[1]), sys.argv[2] == "traced"
line = "- a line of **markdown** output with `code`, <tags> & \x1b[31mcolour\x1b[0m\n"
output = (line * (size // len(line) + 1))[:size]
facts = TodoFacts("a todo", "its description", "/tmp")
collected = Collected(output, "message", (), is_markdown=True, is_html=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if traced:
    tracemalloc.start()
started = time.perf_counter()
report = render_report(
    todo_id=1, todo=facts, collected=collected, kind="normal",
    started_at=None, completed_at=datetime.now(UTC),
)
page = report.html  # the page too (built on demand): the worst case, with an archive to make
elapsed = time.perf_counter() - started
peak = tracemalloc.get_traced_memory()[1] if traced else 0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": elapsed, "traced_peak": peak, "rss_growth": after - before,
                  "html": len(page.encode()), "text": len(report.text.encode())}))
"""


def probe(size: int, traced: bool) -> dict:
    result = subprocess.run(
        [PYTHON, "-c", PROBE, str(size), "traced" if traced else "plain"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def run(size: str) -> Outcome:
    big = 100 * 1000 * 1000 if size == "full" else 2 * 1000 * 1000
    cap = 1000 * 1000
    rounds = 5 if size == "full" else 1
    timings: dict[int, list[float]] = {big: [], cap: []}
    for _ in range(rounds):
        for n in (cap, big):
            timings[n].append(probe(n, traced=False)["seconds"])
    traced = {n: probe(n, traced=True) for n in (cap, big)}
    plain = probe(big, traced=False)
    big_time, cap_time = median(timings[big]), median(timings[cap])
    label = f"{big // 1000 // 1000} MB"
    return Outcome(
        [
            Row(
                "6",
                f"report of a {label} output: time (output capped to 1 MB, report"
                f" {plain['html'] // 1024} KiB)",
                ms(big_time),
                f"1 MB output {ms(cap_time)}",
                big_time / cap_time,
                f"≤ {TIME_LIMIT:g} s",
                verdict(big_time, at_most=TIME_LIMIT),
            ),
            Row(
                "6",
                f"report of a {label} output: peak memory while rendering (tracemalloc;"
                f" process RSS beyond the output itself +{plain['rss_growth'] / MIB:.0f} MiB)",
                f"{traced[big]['traced_peak'] / MIB:.1f} MiB",
                f"1 MB output {traced[cap]['traced_peak'] / MIB:.1f} MiB",
                traced[big]["traced_peak"] / traced[cap]["traced_peak"],
                f"≤ {MEMORY_LIMIT // MIB} MiB",
                verdict(traced[big]["traced_peak"], at_most=MEMORY_LIMIT),
            ),
        ]
    )


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    return finish(args, "6. Report rendering", run(args.size))


if __name__ == "__main__":
    sys.exit(main())
