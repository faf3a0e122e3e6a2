"""What every bench shares: the machine, private directories, timed runs, and the table.

Figures are ratios against a baseline measured in the same run, because these machines are
shared and noisy: the two sides alternate, and the ratio is the median of per-round ratios.
Each bench prints its own table and, with ``--json PATH``, writes its rows for ``python -m
bench``, which gathers them into one table in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(PYTHON).parent
COMPLETIONCTL = str(BIN / "completionctl") if (BIN / "completionctl").exists() else None
MIB = 1024 * 1024

if str(REPO) not in sys.path:  # tests.harness and tests.dbfixtures are the benches' tools too
    sys.path.insert(0, str(REPO))


@dataclass
class Row:
    """One line of the table: a measurement, its baseline from the same run, and the target."""

    bench: str
    measure: str
    result: str
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None  # None: stated, not judged


@dataclass
class Outcome:
    rows: list[Row]
    sections: dict[str, str] = field(default_factory=dict)  # extra markdown for the docs


# ------------------------------------------------------------------ the command line


def exit_on_sigterm() -> None:
    """SIGTERM ends this bench as SystemExit does, so its ``finally`` blocks still stop the
    agents it started (their own sessions: nothing else stops them) and drop its databases.
    A second SIGTERM during that cleanup is ignored."""

    def leave(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


def arguments(description: str) -> argparse.Namespace:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--size",
        choices=("tiny", "full"),
        default="full",
        help="tiny: a smoke run that only shows the bench still works (tests/test_bench.py)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    return parser.parse_args()


def finish(args: argparse.Namespace, title: str, outcome: Outcome) -> int:
    print(render_table(outcome.rows, title=title))
    for heading, text in outcome.sections.items():
        print(f"\n{heading}\n{text}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"rows": [asdict(r) for r in outcome.rows], "sections": outcome.sections},
                indent=1,
            )
        )
    return 0


def load_outcome(path: Path) -> Outcome:
    data = json.loads(path.read_text())
    return Outcome([Row(**r) for r in data["rows"]], data.get("sections", {}))


# ------------------------------------------------------------------ the table


def render_table(rows: list[Row], *, title: str | None = None) -> str:
    head = ["#", "measure", "result", "baseline (same run)", "ratio", "target", "met"]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * len(head)) + "|")
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        met = {True: "yes", False: "**NO**", None: "—"}[r.met]
        cells = [r.bench, r.measure, r.result, r.baseline, ratio, r.target, met]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "memory": memory,
        "cpu": model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": platform.release(),
        "load average at start": load,
    }


# ------------------------------------------------------------------ numbers


def median(values: list[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def verdict(value: float, *, at_most: float | None = None, at_least: float | None = None) -> bool:
    if at_most is not None and value > at_most:
        return False
    return not (at_least is not None and value < at_least)


# ------------------------------------------------------------------ processes and directories


@contextlib.contextmanager
def private_dir(prefix: str) -> Iterator[Path]:
    """A short directory under /tmp (ipc paths must stay under ~107 bytes), removed after."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_env(root: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which Python caches bytecode, in a private directory.

    A deployed completionctl has its bytecode compiled; this machine sets
    PYTHONDONTWRITEBYTECODE=1, which would make every run compile ctl/ and protocol/ from
    source. Baseline and client run with the same environment.
    """
    env = dict(os.environ if base is None else base)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    return env


def compiled_env(root: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``python_env`` with the project's bytecode compiled in advance, as a deployed agent has
    it: no process of the agent compiles its modules from source when it starts."""
    env = python_env(root, base)
    subprocess.run(
        [PYTHON, "-m", "compileall", "-q", *(str(REPO / d) for d in ("agent", "ctl", "protocol"))],
        env=env,
        check=True,
    )
    return env


@dataclass(frozen=True)
class Timed:
    wall: float
    cpu: float  # user + system of the process (and of children it waited for)
    returncode: int


def run_timed(
    argv: list[str], *, env: dict[str, str], stdin: Path | None = None, cwd: Path | None = None
) -> Timed:
    """Run a command to its end: wall time from spawn to reap, and its CPU time."""
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(stdin.open("rb")) if stdin else subprocess.DEVNULL
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=source,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Timed(wall, usage.ru_utime + usage.ru_stime, proc.returncode)


def alternate(
    runs: dict[str, Callable[[], Timed]], rounds: int, *, warmup: int = 2
) -> dict[str, list[Timed]]:
    """Run each command once per round, the order rotating each round; warm-ups are dropped."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples: dict[str, list[Timed]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(runs[name]())
    return samples


def paired_ratio(samples: list[Timed], baseline: list[Timed], attr: str = "wall") -> float:
    return median(
        [getattr(s, attr) / getattr(b, attr) for s, b in zip(samples, baseline, strict=True)]
    )


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class CpuMeter:
    """CPU seconds used by named processes between start() and stop() (those that may be read:
    another user's database server may not be)."""

    def __init__(self, processes: dict[str, Any]) -> None:
        import psutil

        self._processes = {}
        for name, proc in processes.items():
            try:
                proc.cpu_times()
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
            self._processes[name] = proc
        self._before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        import psutil

        seen = {}
        for name, proc in self._processes.items():
            # One that is gone (a shared database server restarted by someone) is left out.
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                seen[name] = sum(proc.cpu_times()[:2])
        return seen

    def start(self) -> None:
        self._before = self._now()

    def stop(self) -> dict[str, float]:
        now = self._now()
        return {name: now[name] - self._before[name] for name in now if name in self._before}


def database_server_process() -> Any | None:
    """The local MariaDB/MySQL server process, if there is one."""
    import psutil

    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in ("mariadbd", "mysqld"):
            return proc
    return None


# ------------------------------------------------------------------ the deployed layout

DIST = "completion-agent"


def runtime_closure(name: str) -> list[Any]:
    """The installed distributions ``name`` needs at run time (no extras), itself excluded."""
    from importlib import metadata

    from pip._vendor.packaging.requirements import Requirement  # pip is in every venv here

    seen: dict[str, Any] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        for text in metadata.requires(current) or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            key = requirement.name.lower().replace("_", "-")
            if key not in seen:
                seen[key] = metadata.distribution(requirement.name)
                todo.append(requirement.name)
    return list(seen.values())


def deployed_python(root: Path, extra: tuple[str, ...] = ()) -> Path:
    """A virtualenv laid out as ``pip install .`` makes it for production: the project installed
    from its wheel (no editable finder on every start), its runtime dependencies only (no test
    extra: nothing of mypy's, such as typing_extensions, for msgspec to find), bytecode compiled.

    Built offline from this venv: the dependencies' installed files are copied (their recorded
    ``.pyc`` with them), the project's wheel is built from a copy of the sources and installed by
    pip. ``extra`` names more installed distributions to copy (a peer's, for bench/peers.py).
    Returns the venv's python; ``completionctl`` is beside it.
    """
    venv = root / "deployed"
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    from importlib import metadata

    for dist in [*runtime_closure(DIST), *(metadata.distribution(name) for name in extra)]:
        for file in dist.files or ():
            if file.parts[0] == "..":
                continue  # scripts
            source = Path(str(dist.locate_file(file)))
            if source.is_file():
                target = Path(purelib) / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    source = root / "source"
    for part in ("agent", "ctl", "protocol"):
        shutil.copytree(REPO / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / part, source / part)
    wheels = root / "wheels"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPYCACHEPREFIX", None)
    build = ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)]
    _pip(build, env)
    _pip(["--python", str(python), "install", "--no-deps", *map(str, wheels.glob("*.whl"))], env)
    return python


def _pip(argv: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([PYTHON, "-m", "pip", *argv], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"building the deployed layout failed: {result.stderr[-2000:]}")


def deployed_env(base: dict[str, str]) -> dict[str, str]:
    """The environment a deployed hook runs in: bytecode from the install, nothing else cached."""
    env = dict(base)
    for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "PYTHONPATH"):
        env.pop(name, None)
    return env
