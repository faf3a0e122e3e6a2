"""The systemd unit (systemd-analyze), sd_notify against a real datagram socket, the example config.

systemd cannot run inside the test container (it is not PID 1), so the unit is checked with
``systemd-analyze verify`` and ``security --offline``, and the notify protocol is checked from the
other side: the test binds the $NOTIFY_SOCKET that systemd would, and reads what completiond sends.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import msgspec
import psutil

from protocol import config as cfg
from tests.harness import REPO, Agent

UNIT = REPO / "contrib" / "completiond.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def render_unit(root: Path, text: str | None = None) -> Path:
    """The unit with its placeholders replaced by real paths (verify checks ExecStart exists)."""
    venv = Path(os.environ.get("VIRTUAL_ENV") or REPO / ".venv")
    (root / "state").mkdir(exist_ok=True)
    (root / "config.toml").write_text(f'state_dir = "{root / "state"}"\n')
    text = UNIT.read_text() if text is None else text
    for key, value in {
        "@VENV@": str(venv),
        "@CONFIG@": str(root / "config.toml"),
        "@USER@": "root",
        "@GROUP@": "root",
        "@HOME@": str(root),
        "@STATE_DIR@": str(root / "state"),
    }.items():
        text = text.replace(key, value)
    assert not re.search(r"@[A-Z_]+@", text), "a placeholder is left"
    path = root / "completiond.service"
    path.write_text(text)
    return path


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_unit_passes_systemd_analyze_verify(tmpdir_short: Path) -> None:
    assert Path(SYSTEMD_ANALYZE).exists(), "systemd-analyze is missing (apt-get install systemd)"
    unit = render_unit(tmpdir_short)
    result = analyze("verify", "--man=no", str(unit))
    assert result.returncode == 0, result.stderr
    # verify only warns (exit 0) on unknown keys and bad values: any output is a finding.
    assert result.stderr.strip() == "", result.stderr
    text = unit.read_text()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=no",
        "ProtectHome=read-only",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(rf"^ReadWritePaths={tmpdir_short}/state /tmp$", text, re.M)
    # ReadWritePaths= of a missing dir fails with 226/NAMESPACE: it is made first, as the user,
    # outside the sandbox ("+"), with its parents (a fresh install has no ~/.local/state).
    pre = re.search(r"^ExecStartPre=\+(.*)$", text, re.M)
    assert pre, text
    assert pre.group(1).split()[-5:] == ["/bin/mkdir", "-p", "-m", "0700", f"{tmpdir_short}/state"]
    assert "--reuid=root" in pre.group(1) and "--init-groups" in pre.group(1)
    watchdog = int(re.search(r"^WatchdogSec=(\d+)$", text, re.M).group(1))
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M).group(1))
    assert stop > 10, "the agent's own stop bound is 10 s"
    # The loop pings every WatchdogSec/2 and wakes at least every sweep_interval.
    assert watchdog >= 4 * cfg.Behavior().sweep_interval


def test_verify_is_not_a_rubber_stamp_here(tmpdir_short: Path) -> None:
    """The same check finds a broken copy: the tool works in this environment."""
    broken = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilegs=yes")
    result = analyze("verify", "--man=no", str(render_unit(tmpdir_short, broken)))
    assert "NoNewPrivilegs" in result.stderr
    missing = UNIT.read_text().replace("@VENV@/bin/completiond", "/nonexistent/completiond")
    result = analyze("verify", "--man=no", str(render_unit(tmpdir_short, missing)))
    assert result.returncode != 0


def test_unit_hardening_exposure_is_low(tmpdir_short: Path) -> None:
    result = analyze("security", "--offline=true", "--no-pager", str(render_unit(tmpdir_short)))
    assert result.returncode == 0, result.stderr
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert level, result.stdout[-2000:]
    assert float(level.group(1)) <= 3.5, result.stdout[-3000:]


# ---------------------------------------------------------------- sd_notify


class NotifySocket:
    """What systemd binds for a Type=notify service: a unix datagram socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind_to)
        self.received: list[tuple[float, dict[str, str]]] = []

    def wait(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """Read datagrams until one carries ``key``; returns its fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.received.append((time.monotonic(), fields))
            if key in fields:
                return fields
        raise AssertionError(f"no {key} within {timeout} s; got {self.received}")

    def drain(self) -> None:
        """Read what is already queued, so the next wait times a datagram as it arrives."""
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(4096)
                fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
                self.received.append((time.monotonic(), fields))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_ready_watchdog_stopping(make_agent) -> None:
    agent = make_agent()
    notify = NotifySocket(str(agent.root / "notify.sock"))
    try:
        agent.env["NOTIFY_SOCKET"] = notify.address
        agent.env["WATCHDOG_USEC"] = "2000000"  # pings every 1 s
        agent.start(wait=False)
        ready = notify.wait("READY")
        assert ready["READY"] == "1"
        # Ready means ready: the socket is there and the agent answers, children started.
        assert ready["MAINPID"] == str(agent.proc.pid)
        assert (agent.state / "completiond.sock").exists()
        status = agent.status_json()
        assert status and status["pid"] == agent.proc.pid
        assert all(status["children"].values())
        assert not any(fields.get("WATCHDOG") for _, fields in notify.received[:-1])

        first = notify.wait("WATCHDOG")["WATCHDOG"]
        assert first == "1"
        # Pings that queued up while the test was busy would be read back to back: time only
        # those that arrive while the test waits for them.
        notify.drain()
        notify.wait("WATCHDOG")
        times = [notify.received[-1][0]]
        for _ in range(3):
            notify.wait("WATCHDOG")
            times.append(notify.received[-1][0])
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) < 2.0, gaps  # within WATCHDOG_USEC, or systemd would kill it
        assert min(gaps) > 0.5, gaps  # and not a flood

        # The children never see the notify socket (NotifyAccess=main would drop them anyway).
        for child in agent.family()[1:]:
            assert "NOTIFY_SOCKET" not in psutil.Process(child.pid).environ()

        agent.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait("STOPPING")
        assert stopping["STOPPING"] == "1"
        assert agent.proc.wait(15) == 0
    finally:
        notify.close()


def test_sd_notify_abstract_socket_and_watchdog_for_another_pid(make_agent) -> None:
    agent = make_agent()
    notify = NotifySocket(f"@completiond-test-{uuid.uuid4().hex}")
    try:
        agent.env["NOTIFY_SOCKET"] = notify.address
        agent.env["WATCHDOG_USEC"] = "200000"
        agent.env["WATCHDOG_PID"] = "1"  # meant for another process: stay quiet
        agent.start(wait=False)
        notify.wait("READY")
        agent.wait_ready()
        try:
            notify.wait("WATCHDOG", timeout=1.0)
        except AssertionError:
            pass
        else:
            raise AssertionError("a watchdog ping for another process's WATCHDOG_PID")
        assert agent.stop() == 0
    finally:
        notify.close()


def test_without_notify_socket_nothing_changes(agent: Agent) -> None:
    todo = agent.add("plain")
    assert agent.ctl("complete", str(todo), "--output", "ok").returncode == 0
    agent.wait_states(todo, "cleaned")
    assert agent.stop() == 0


# ---------------------------------------------------------------- the example config


def _fields(struct: type) -> set[str]:
    return {f.name for f in msgspec.structs.fields(struct)}


def test_example_config_has_every_key_commented_and_parses() -> None:
    path = REPO / "contrib" / "config.example.toml"
    data = path.read_bytes()
    loaded = cfg.load(str(path))
    assert loaded.source == str(path)
    # Every value in it is the default: the file documents, it does not configure.
    assert cfg.parse(data, path) == cfg.Config()

    raw = msgspec.toml.decode(data)
    sections = {
        f.name: f.type for f in msgspec.structs.fields(cfg.Config) if f.name not in ("source",)
    }
    top = {
        k for k, v in sections.items() if not (isinstance(v, type) and issubclass(v, cfg._Section))
    }
    assert set(raw) == set(sections), "top-level keys differ from protocol.config.Config"
    for name, kind in sections.items():
        if name in top:
            continue
        assert set(raw[name]) == _fields(kind), f"[{name}] differs from {kind.__name__}"

    # Each key is preceded by a comment line that explains it.
    lines = data.decode().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            assert lines[index - 1].startswith("#"), f"no comment above {line!r}"


def test_claude_settings_wire_every_event_to_the_hook() -> None:
    for name in ("claude-settings.json", "claude-settings.command-only.json"):
        settings = json.loads((REPO / "contrib" / name).read_text())
        events = {
            "SessionStart",
            "UserPromptSubmit",
            "PreToolUse",
            "PermissionRequest",
            "PostToolUse",
            "PostToolUseFailure",
            "Notification",
            "SubagentStart",
            "SubagentStop",
            "TaskCompleted",
            "PreCompact",
            "Stop",
            "StopFailure",
            "SessionEnd",
        }
        assert set(settings["hooks"]) == events, name
        for event, groups in settings["hooks"].items():
            handlers = [h for group in groups for h in group["hooks"]]
            assert handlers, event
            for handler in handlers:
                assert 0 < handler["timeout"] <= 10, event
                if handler["type"] == "command":
                    assert handler["command"].split()[-1] == "hook"
                else:
                    assert handler["type"] == "http" and handler["url"].endswith("/hook")
