"""completiond under the real supervisord (from PyPI) with the contrib program file.

supervisord runs in the foreground as the test's child, with a private config: its socket, log
and pid file in the test's directory, and the contrib program file included with its
placeholders replaced.  It is shut down at the end of the test, always.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.harness import REPO, Agent, alive, wait_for

PROGRAM = REPO / "contrib" / "completiond.supervisord.conf"
BIN = Path(sys.executable).parent


class Supervisord:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        root = agent.root
        self.conf = root / "supervisord.conf"
        self.log = root / "supervisord.log"
        program = PROGRAM.read_text()
        for key, value in {
            "@VENV@": str(BIN.parent),
            "@CONFIG@": str(agent.config_path),
            "@USER@": pwd.getpwuid(os.getuid()).pw_name,
            "@HOME@": str(root),
            "@LOG_DIR@": str(root),
        }.items():
            program = program.replace(key, value)
        assert "@" not in "".join(
            line for line in program.splitlines() if not line.startswith(";")
        ), "a placeholder is left"
        (root / "completiond.conf").write_text(program)
        self.conf.write_text(
            f"""[unix_http_server]
file={root}/supervisor.sock
chmod=0700

[supervisord]
nodaemon=true
logfile={self.log}
pidfile={root}/supervisord.pid
childlogdir={root}
loglevel=info

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{root}/supervisor.sock

[include]
files = {root}/completiond.conf
"""
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "supervisord"), "-c", str(self.conf)],
            env=self.agent.env,
            cwd=self.agent.root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.conf), *args],
            env=self.agent.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def state(self) -> str:
        out = self.ctl("status", "completiond").stdout.split()
        return out[1] if len(out) > 1 else ""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def shutdown(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.ctl("shutdown")
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # Whatever supervisord left behind in its session (nothing, if all went well).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def supervised(make_agent) -> Iterator[tuple[Agent, Supervisord]]:
    agent = make_agent()
    supervisor = Supervisord(agent)
    supervisor.start()
    try:
        yield agent, supervisor
    finally:
        supervisor.shutdown()


def agent_family(agent: Agent) -> list[psutil.Process]:
    status = agent.status_json()
    parent = psutil.Process(status["pid"])
    return [parent, *parent.children(recursive=True)]


def wait_running(agent: Agent, supervisor: Supervisord) -> None:
    def up() -> bool:
        assert supervisor.proc is not None and supervisor.proc.poll() is None, supervisor.log_text()
        status = agent.status_json()
        return bool(status) and all(status["children"].values())

    wait_for(up, 30, what="completiond under supervisord")
    wait_for(lambda: supervisor.state() == "RUNNING", 30, what="supervisord says RUNNING")


def test_supervisorctl_stop_is_clean_and_start_delivers_queued_work(supervised) -> None:
    agent, supervisor = supervised
    wait_running(agent, supervisor)
    family = agent_family(agent)
    assert len(family) == 4
    assert family[0].cmdline()[1:] == [str(BIN / "completiond"), "--config", str(agent.config_path)]
    todo = agent.add("Under supervisord")
    assert agent.ctl("complete", str(todo), "--output", "first").returncode == 0
    agent.wait_states(todo, "cleaned")

    result = supervisor.ctl("stop", "completiond")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped" in result.stdout
    log = supervisor.log_text()
    assert "stopped: completiond (exit status 0)" in log, log
    assert "SIGKILL" not in log and "killing" not in log, log
    wait_for(lambda: not alive(family), 5, what="no agent process left")
    assert not (agent.state / "completiond.sock").exists()
    assert not (agent.state / "completiond.pid").exists()

    # Work while it is stopped: queued in the outbox, exit 3.
    queued = agent.add("While stopped")
    result = agent.ctl("complete", str(queued), "--output", "made while stopped")
    assert result.returncode == 3, result.stderr
    assert len(list((agent.state / "outbox").glob("*.req"))) == 1

    result = supervisor.ctl("start", "completiond")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_running(agent, supervisor)
    agent.wait_states(queued, "cleaned")
    assert "made while stopped" in agent.todo_row(queued)["claude_text_output"]
    assert not list((agent.state / "outbox").glob("*.req"))


def test_supervisord_restarts_a_killed_agent_and_no_child_is_left(supervised) -> None:
    agent, supervisor = supervised
    wait_running(agent, supervisor)
    family = agent_family(agent)
    os.kill(family[0].pid, signal.SIGKILL)
    wait_for(lambda: not alive(family), 10, what="the old children gone with their parent")

    def restarted() -> bool:
        status = agent.status_json()
        return bool(status) and status["pid"] != family[0].pid and all(status["children"].values())

    wait_for(restarted, 30, what="supervisord restarted completiond")
    todo = agent.add("After the restart")
    assert agent.ctl("complete", str(todo), "--output", "ok").returncode == 0
    agent.wait_states(todo, "cleaned")

    # Shutting supervisord down stops the agent cleanly too.
    new_family = agent_family(agent)
    supervisor.shutdown()
    assert supervisor.proc.returncode == 0
    wait_for(lambda: not alive(new_family), 5, what="no agent process after shutdown")
    assert "stopped: completiond (exit status 0)" in supervisor.log_text()
