"""Logs: the real logrotate with the repo's config, SIGHUP reopening in every process, no password.

logrotate runs with a private state file and ``-f`` on the repo's config with its placeholders
replaced by the test agent's paths.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from tests.harness import REPO, Agent, wait_for

LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"
CONFIG = REPO / "logrotate.d" / "completiond"


def render(agent: Agent) -> Path:
    """The file `completionctl logrotate` writes for this agent's state dir."""
    result = agent.ctl("logrotate")
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    assert f"{agent.state / 'logs'}/agent.log" in text
    assert f"su {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name}" in text
    assert "@" not in text.split("}")[0].split("{")[1], "a placeholder is left"
    path = agent.root / "logrotate.conf"
    path.write_text(text)
    return path


def test_shipped_file_parses_as_it_is(tmpdir_short: Path) -> None:
    """Copied into /etc/logrotate.d/ unchanged it must not break the system's rotation."""
    result = subprocess.run(
        [LOGROTATE, "-d", "-s", str(tmpdir_short / "status"), str(CONFIG)],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert b"error" not in result.stderr.lower(), result.stderr.decode()
    assert b"@" not in CONFIG.read_bytes().split(b"{")[0].splitlines()[-1]


def rotate(agent: Agent, config: Path) -> None:
    result = subprocess.run(
        [LOGROTATE, "-v", "-s", str(agent.root / "logrotate.status"), "-f", str(config)],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert b"error:" not in result.stderr, result.stderr.decode()


def lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def complete(agent: Agent, title: str) -> int:
    todo = agent.add(title)
    assert agent.ctl("complete", str(todo), "--output", f"done {title}").returncode == 0
    agent.wait_states(todo, "cleaned")
    return todo


def test_logrotate_rotates_and_every_process_writes_to_the_new_files(agent: Agent) -> None:
    logs = agent.state / "logs"
    complete(agent, "before rotation")
    # The monitor may have had nothing to say yet; notifempty would skip an empty file.
    with (logs / "monitor.log").open("a") as f:
        f.write("a line so that monitor.log is rotated\n")
    before = {p.pid for p in agent.family()}
    config = render(agent)

    rotate(agent, config)
    for name in ("agent.log", "completion.log", "monitor.log"):
        assert (logs / f"{name}.1").exists(), name  # delaycompress: the newest stays plain
    # SIGHUP went to the parent, which relayed it: each process opened a fresh file.
    wait_for(
        lambda: any("agent " in x and "log files reopened" in x for x in lines(logs / "agent.log")),
        what="the parent reopened agent.log",
    )
    for process in ("collector", "writer"):
        wait_for(
            lambda p=process: any(
                f"| {p}" in x and "log files reopened" in x for x in lines(logs / "completion.log")
            ),
            what=f"{process} reopened completion.log",
        )
    wait_for(
        lambda: any("log files reopened" in x for x in lines(logs / "monitor.log")),
        what="monitor reopened monitor.log",
    )
    assert not any("log files reopened" in x for x in lines(logs / "monitor.log.1"))
    rotated_size = (logs / "completion.log.1").stat().st_size

    todo = complete(agent, "after rotation")
    fresh = "\n".join(lines(logs / "completion.log"))
    assert f"todo={todo}" in fresh
    assert f"todo={todo}" in "\n".join(lines(logs / "agent.log"))
    assert (logs / "completion.log.1").stat().st_size == rotated_size
    assert {p.pid for p in agent.family()} == before, "a process died of the SIGHUP"
    for name in ("agent.log", "completion.log", "monitor.log"):
        assert (logs / name).stat().st_mode & 0o077 == 0, name

    # A second rotation compresses the first (compress + delaycompress).
    rotate(agent, config)
    assert (logs / "agent.log.2.gz").exists()
    assert (logs / "agent.log.1").exists()
    wait_for(lambda: (logs / "agent.log").exists(), what="a third agent.log")
    assert agent.stop() == 0


def test_postrotate_leaves_a_stale_pid_file_alone(make_agent) -> None:
    agent = make_agent()
    logs = agent.state / "logs"
    logs.mkdir(parents=True)
    agent.state.chmod(0o700)
    logs.chmod(0o700)
    (logs / "agent.log").write_text("an old line\n")
    # A pid file nobody holds the lock on, naming a live process that is not the agent.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (agent.state / "completiond.pid").write_text(f"{bystander.pid}\n")
        rotate(agent, render(agent))
        assert (logs / "agent.log.1").exists()
        assert bystander.poll() is None, "postrotate signalled a process that is not the agent"
    finally:
        bystander.kill()
        bystander.wait()


def test_sighup_reopens_a_log_removed_under_every_process(agent: Agent) -> None:
    logs = agent.state / "logs"
    names = ("agent.log", "completion.log", "monitor.log")
    wait_for(lambda: all((logs / n).exists() for n in names), what="every process's log open")
    for name in names:
        (logs / name).unlink()
    os.kill(agent.proc.pid, signal.SIGHUP)
    for name in ("agent.log", "completion.log", "monitor.log"):
        try:
            wait_for(
                lambda n=name: any("log files reopened" in x for x in lines(logs / n)),
                what=f"{name} recreated",
            )
        except AssertionError as exc:
            # What each process was doing, for a failure seen once on a loaded machine.
            seen = {n: lines(logs / n)[-5:] for n in os.listdir(logs)}
            family = {p.pid: (p.cmdline()[-2:], p.status()) for p in agent.family()}
            raise AssertionError(
                f"{exc}\nlogs: {seen}\nprocesses: {family}\nstderr: {agent.output()[-3000:]}"
            ) from None
    assert len(agent.family()) == 4
    complete(agent, "still served")


def test_the_database_password_reaches_no_log_and_no_command_line(make_agent) -> None:
    secret = "s3cret-Pa55word"
    agent = make_agent(
        {"database": {"url": f"mysql://completion:{secret}@127.0.0.1:1/todos"}},
    )
    agent.start()
    assert agent.ctl("complete", "7", "--output", "for an unreachable database").returncode == 0
    logs = agent.state / "logs"
    # The collector and the writer meet the outage and log it while they retry.
    wait_for(
        lambda: (
            any("todo=7" in x for x in lines(logs / "completion.log"))
            and any("Can't connect" in x for x in lines(logs / "completion.log"))
            and any("Can't connect" in x for x in lines(logs / "monitor.log"))
        ),
        what="the outage in the logs",
    )
    status = agent.ctl("--json", "status")
    assert status.returncode == 0
    assert secret not in status.stdout.decode()
    assert "***" in status.stdout.decode()
    for proc in agent.family():
        with_args = " ".join(proc.cmdline())
        assert secret not in with_args, with_args
        assert secret not in " ".join(psutil.Process(proc.pid).environ().values())
    assert agent.stop() == 0
    for path in [*logs.iterdir(), agent.log_path]:
        assert secret not in path.read_text(errors="replace"), path.name
