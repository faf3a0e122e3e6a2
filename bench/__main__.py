"""Run every bench, print one table, and write it into docs/PERFORMANCE.md.

    .venv/bin/python -m bench            # the full run (about 15 minutes; needs MariaDB)
    .venv/bin/python -m bench --size tiny --no-write   # a smoke run: do the benches still work

Each bench runs in a process of its own (``python -m bench.NAME``) and hands its rows back as
JSON. Only the part of docs/PERFORMANCE.md between the markers is rewritten; the prose around
it (what was changed and what it bought) is kept.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import PYTHON, REPO, Outcome, Row, load_outcome, machine, render_table

BENCHES = (
    "hook", "httphook", "peers", "endtoend", "abcpu", "throughput", "drain", "idle", "health",
    "report", "recovery", "cluster", "web",
)  # fmt: skip
DOC = REPO / "docs" / "PERFORMANCE.md"
BEGIN = "<!-- bench:results:begin (written by `python -m bench`; edits here are lost) -->"
END = "<!-- bench:results:end -->"
COMMAND = ".venv/bin/python -m bench"


def run_one(name: str, size: str, scratch: Path) -> tuple[Outcome, float]:
    out = scratch / f"{name}.json"
    started = time.monotonic()
    result = subprocess.run(
        [PYTHON, "-m", f"bench.{name}", "--size", size, "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0 or not out.exists():
        reason = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        return Outcome([Row(name, f"bench.{name} failed", reason[:200], met=False)]), elapsed
    return load_outcome(out), elapsed


def results_block(outcomes: dict[str, Outcome], size: str, took: float) -> str:
    facts = machine()
    lines = [
        BEGIN,
        "",
        f"Measured {facts.pop('date')} with `{COMMAND}`"
        + (" --size tiny (a smoke run: these numbers mean nothing)" if size == "tiny" else "")
        + f", in {took / 60:.0f} min.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in facts.items()),
        "",
        render_table([row for outcome in outcomes.values() for row in outcome.rows]),
    ]
    for outcome in outcomes.values():
        for heading, text in outcome.sections.items():
            lines += ["", heading, "", text]
    lines += ["", END]
    return "\n".join(lines)


def write_doc(block: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(head + block + tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated, of {','.join(BENCHES)}")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/PERFORMANCE.md")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        parser.error(f"unknown bench(es): {', '.join(sorted(unknown))}")
    outcomes: dict[str, Outcome] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        for name in names:
            print(f"bench.{name} ...", end=" ", flush=True, file=sys.stderr)
            outcomes[name], elapsed = run_one(name, args.size, Path(scratch))
            print(f"{elapsed:.0f} s", file=sys.stderr)
    block = results_block(outcomes, args.size, time.monotonic() - started)
    print(block.split("\n", 2)[2].rsplit("\n", 2)[0])
    if not args.no_write:
        write_doc(block)
        print(f"\nwritten into {DOC.relative_to(REPO)}", file=sys.stderr)
        if "recovery" in outcomes:
            from bench import recovery

            recovery.write_doc(outcomes["recovery"], args.size)
            print(f"written into {recovery.DOC.relative_to(REPO)}", file=sys.stderr)
    rows = [row for outcome in outcomes.values() for row in outcome.rows]
    return 1 if any(row.met is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
