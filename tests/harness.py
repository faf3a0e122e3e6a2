"""Drive the real completiond and completionctl from tests.

Each Agent lives in a short private directory under /tmp (ipc paths are limited to ~107 bytes)
holding its state dir, config, session dirs, marker files and XDG homes.  Processes are real:
``python -m agent`` and ``python -m ctl``; nothing of theirs is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from protocol.config import Config, load

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what=""):
    """Poll until predicate() is truthy; return its value or fail with ``what``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate} ({last!r})")


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (zombies count as gone)."""
    out = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
    return out


def short_tmp(prefix: str = "ca-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def render_toml(config: dict[str, Any]) -> str:
    top = [
        f"{k} = {_toml_value(v)}"
        for k, v in config.items()
        if not isinstance(v, dict) and not _is_table_list(v)
    ]
    sections = []
    for key, value in config.items():
        if isinstance(value, dict):
            sections.append(f"[{key}]")
            sections.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
        elif _is_table_list(value):  # [[key]] for each table, e.g. [[notify]]
            for table in value:
                sections.append(f"[[{key}]]")
                sections.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(top + sections) + "\n"


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class Agent:
    """One completiond under test, with its own directory, config and environment."""

    def __init__(self, root: Path, config: dict[str, Any] | None = None) -> None:
        self.root = root
        self.state = root / "state"
        self.sessions = root / "sessions"
        self.sessions.mkdir(exist_ok=True)
        defaults: dict[str, Any] = {
            "state_dir": str(self.state),
            "behavior": {
                "sweep_interval": 0.5,
                "health_check_interval": 1,
                "database_timeout": 3,
                "retry_max_delay": 1,
            },
            "collect": {
                "session_dir": str(self.sessions / "claude_session_{todo_id}"),
                "transcript_wait": 0.2,
                "tmux_socket": str(root / "tmux.sock"),
            },
            # Off unless a test turns it on (on a port of its own): agents run in parallel.
            "hook": {"http_listen": ""},
            "marker": {
                "completed_file": str(root / "TASK_COMPLETED"),
                "current_todo_file": str(root / "CURRENT_TODO_ID"),
            },
        }
        self.config = merge(defaults, config or {})
        self.config_path = root / "config.toml"
        self.config_path.write_text(render_toml(self.config))
        self.env = dict(os.environ)
        for name in ("XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
            (root / name.lower()).mkdir(exist_ok=True)
            self.env[name] = str(root / name.lower())
        self.env["HOME"] = str(root)
        self.env.pop("TODO_ID", None)
        self.env.pop("COMPLETION_CONFIG", None)
        self.env["PYTHONPATH"] = str(REPO)
        self.proc: subprocess.Popen | None = None
        self.log_path = root / "completiond.out"

    # ------------------------------------------------------------ processes

    def start(
        self, *, wait: bool = True, extra_args: tuple[str, ...] = (), prefix: tuple[str, ...] = ()
    ) -> Agent:
        """``prefix``: a command that execs the agent (e.g. prlimit with its options and --)."""
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "agent",
                "--config",
                str(self.config_path),
                *extra_args,
            ],
            env=self.env,
            cwd=self.root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"completiond exited with {self.proc.returncode}:\n{self.output()}"
                )
            status = self.status_json()
            return bool(status) and all(status["children"].values())

        wait_for(ready, timeout, what="completiond and its children to be up")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def children(self) -> dict[str, int]:
        status = self.status_json()
        return {k: v for k, v in status["children"].items() if v}

    def family(self) -> list[psutil.Process]:
        """completiond and every process it started, still alive."""
        if self.proc is None:
            return []
        try:
            parent = psutil.Process(self.proc.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cleanup(self) -> None:
        pids = [p.pid for p in self.family()]
        self.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(
            ["tmux", "-S", str(self.root / "tmux.sock"), "kill-server"],
            capture_output=True,
            check=False,
        )

    # ------------------------------------------------------------ the client

    def ctl(
        self,
        *args: str,
        input: str | bytes | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
        python_options: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess:
        run_env = dict(self.env)
        if env:
            run_env.update(env)
        return subprocess.run(
            [
                sys.executable,
                *python_options,
                "-m",
                "ctl",
                "--config",
                str(self.config_path),
                *args,
            ],
            env=run_env,
            cwd=self.root,
            input=input.encode() if isinstance(input, str) else input,
            capture_output=True,
            timeout=timeout,
        )

    def ctl_json(self, *args: str) -> Any:
        result = self.ctl("--json", *args)
        assert result.returncode == 0, result.stderr.decode()
        return json.loads(result.stdout)

    def status_json(self) -> dict | None:
        result = self.ctl("--json", "--timeout", "1", "status")
        if result.returncode != 0:
            return None
        return json.loads(result.stdout)

    def todo_status(self, todo_id: int) -> dict | None:
        result = self.ctl("--json", "status", str(todo_id))
        return json.loads(result.stdout) if result.returncode == 0 else None

    def add(self, title: str = "A todo", **kw: str) -> int:
        args = ["add", title]
        if "description" in kw:
            args += ["--description", kw["description"]]
        if "dir" in kw:
            args += ["--dir", kw["dir"]]
        return int(self.ctl_json(*args)["id"])

    def entry_states(self, todo_id: int) -> list[str]:
        status = self.todo_status(todo_id)
        return [e["state"] for e in status["entries"]] if status else []

    def wait_states(self, todo_id: int, *states: str, timeout: float = 20.0) -> dict:
        def done() -> dict | None:
            status = self.todo_status(todo_id)
            if status and [e["state"] for e in status["entries"]] == list(states):
                return status
            return None

        return wait_for(done, timeout, what=f"todo {todo_id} entries in {states}")

    # ------------------------------------------------------------ the embedded database

    @property
    def sqlite_path(self) -> Path:
        return self.state / "todos.db"

    def todo_row(self, todo_id: int) -> dict | None:
        with contextlib.closing(sqlite3.connect(self.sqlite_path)) as db:
            db.row_factory = sqlite3.Row
            row = db.execute(
                "SELECT * FROM stage_project_todos WHERE id = ?", (todo_id,)
            ).fetchone()
            return dict(row) if row else None

    def log_rows(self, todo_id: int) -> list[dict]:
        with contextlib.closing(sqlite3.connect(self.sqlite_path)) as db:
            db.row_factory = sqlite3.Row
            return [
                dict(r)
                for r in db.execute(
                    "SELECT * FROM stage_completion_log WHERE todo_id = ? ORDER BY id", (todo_id,)
                )
            ]


# ------------------------------------------------------------------ reading the journal directly


def journal_rows(agent: Agent, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Read the agent's journal (WAL: a reader never blocks the agent)."""
    path = agent.state / "journal.db"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(sql, params)]


def entries(agent: Agent, todo_id: int, kind: str | None = None) -> list[dict[str, Any]]:
    rows = journal_rows(agent, "SELECT * FROM entries WHERE todo_id = ? ORDER BY seq", (todo_id,))
    return [r for r in rows if kind is None or r["kind"] == kind]


def timers(agent: Agent, todo_id: int) -> dict[str, Any]:
    [row] = journal_rows(agent, "SELECT * FROM todos WHERE todo_id = ?", (todo_id,))
    return row


def checks(agent: Agent) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in journal_rows(agent, "SELECT * FROM health")}


def wait_kinds(agent: Agent, todo_id: int, expected: list[tuple[str, str]], timeout=20.0):
    def done():
        got = [(e["kind"], e["state"]) for e in entries(agent, todo_id)]
        return got if got == expected else None

    return wait_for(done, timeout, what=f"todo {todo_id} entries {expected}")


def wait_health_round_after(agent: Agent, at: float, timeout: float = 20.0) -> None:
    """A health round that started after ``at`` finished: the monitor's loop ran since then."""
    wait_for(
        lambda: (c := checks(agent)) and min(r["checked_at"] for r in c.values()) > at,
        timeout,
        what="a health round",
    )


def emergency_log(agent: Agent) -> str:
    path = agent.state / "logs" / "emergency.log"
    return path.read_text() if path.exists() else ""


def health(agent: Agent) -> tuple[int, dict[str, Any]]:
    result = agent.ctl("--json", "health")
    return result.returncode, json.loads(result.stdout)


def check_of(report: dict[str, Any], name: str) -> dict[str, Any]:
    [check] = [c for c in report["checks"] if c["name"] == name]
    return check


# ------------------------------------------------------------------ unit rigs (no processes)

T0 = 1_700_000_000.0


def unit_config(root: Path, extra: dict[str, Any] | None = None) -> Config:
    """A config whose every path lies inside ``root``; the state dir and logs dir exist."""
    base: dict[str, Any] = {
        "state_dir": str(root / "state"),
        "behavior": {"completion_timeout": 10, "emergency_timeout": 60, "sweep_interval": 0.5},
        "collect": {"session_dir": str(root / "sessions" / "claude_session_{todo_id}")},
        "marker": {
            "completed_file": str(root / "TASK_COMPLETED"),
            "current_todo_file": str(root / "CURRENT_TODO_ID"),
        },
    }
    path = root / "config.toml"
    path.write_text(render_toml(merge(base, extra or {})))
    config = load(str(path))
    for directory in (config.state_path, config.logs_dir, root / "sessions"):
        directory.mkdir(parents=True, exist_ok=True)
    return config
