"""database.ssh against a real OpenSSH server (Debian's sshd on 127.0.0.1, throwaway keys),
forwarding to the shared MariaDB: `completionctl check` walks the tunnel step by step, a
completion lands through it, an unknown host stops the agent with a hint, and a wrong host key
or client key names its cause in health while nothing is written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.config import ConfigError, load
from tests.dbfixtures import fetch_row, raw_execute
from tests.harness import Agent, render_toml, wait_for
from tests.sshd import Sshd, have_sshd

pytestmark = [
    pytest.mark.mysql,
    pytest.mark.slow,
    pytest.mark.skipif(not have_sshd(), reason="needs /usr/sbin/sshd, ssh and root"),
]


@pytest.fixture
def sshd(tmpdir_short: Path) -> Iterator[Sshd]:
    server = Sshd(tmpdir_short / "sshd").start()
    try:
        yield server
    finally:
        server.stop()


def ssh_database(sshd: Sshd, url: str, **over: str) -> dict[str, Any]:
    return {
        "database": {
            "url": url,
            "ssh": sshd.destination,
            "ssh_identity": str(sshd.identity),
            "ssh_known_hosts": str(sshd.known_hosts),
            **over,
        },
        "behavior": {"ssh_timeout": 6},
    }


def check_json(agent: Agent) -> dict[str, dict]:
    done = agent.ctl("--json", "--timeout", "0.5", "check", timeout=60)
    report = json.loads(done.stdout)
    return {c["name"]: c for c in report["checks"]}


def health_database(agent: Agent) -> str:
    done = agent.ctl("--json", "health")
    if not done.stdout:
        return ""
    checks = json.loads(done.stdout).get("checks", [])
    return next((c["message"] for c in checks if c["name"] == "database"), "")


def add_todo(url: str) -> int:
    raw_execute(
        url,
        "INSERT INTO stage_project_todos (title, status, working_directory) "
        "VALUES ('over ssh', 'in_progress', '/tmp')",
    )
    return int(raw_execute(url, "SELECT MAX(id) FROM stage_project_todos")[0][0])


def log_count(url: str) -> int:
    try:
        return int(raw_execute(url, "SELECT COUNT(*) FROM stage_completion_log")[0][0])
    except Exception:  # not created: nothing reached the database
        return 0


def test_check_walks_the_tunnel_and_a_completion_lands_through_it(
    sshd: Sshd,
    mysql_url: str,
    wordpress_table: str,
    make_agent: Callable[..., Agent],
) -> None:
    agent = make_agent(ssh_database(sshd, mysql_url))
    init = agent.ctl("db", "init", timeout=60)
    assert init.returncode == 0, init.stderr
    checks = check_json(agent)
    assert checks["ssh config"]["ok"], checks
    assert checks["ssh tunnel"]["ok"] and "forward up" in checks["ssh tunnel"]["message"]
    assert checks["database"]["ok"], checks["database"]
    assert "through ssh to" in checks["database"]["message"]
    # check's own tunnel is gone with the command.
    assert not list((agent.state / "tunnel").glob("ssh-ctl-*.sock"))

    agent.start()
    todo_id = add_todo(mysql_url)
    assert agent.ctl("complete", str(todo_id), "--output", "landed over ssh").returncode == 0
    wait_for(
        lambda: fetch_row(mysql_url, todo_id)["status"] == "completed",
        60,
        what="the completion through the tunnel",
    )
    wait_for(lambda: "through ssh to" in health_database(agent), 30, what="health via ssh")
    # Every process that opens the database has its own tunnel in the 0700 tunnel dir.
    tunnel_dir = agent.state / "tunnel"
    assert oct(tunnel_dir.stat().st_mode & 0o777) == "0o700"
    assert {"ssh-writer.sock", "ssh-health.sock"} <= {p.name for p in tunnel_dir.iterdir()}
    agent.stop()
    wait_for(lambda: not sshd.sessions(), 20, what="the agent's ssh sessions to end")


@pytest.mark.parametrize(
    ("mistake", "cause"),
    [("host key", "host key mismatch"), ("client key", "auth failed")],
)
def test_a_wrong_key_names_its_cause_and_nothing_is_written(
    mistake: str,
    cause: str,
    sshd: Sshd,
    mysql_url: str,
    wordpress_table: str,
    make_agent: Callable[..., Agent],
) -> None:
    wrong = (
        {"ssh_known_hosts": str(sshd.wrong_known_hosts())}
        if mistake == "host key"
        else {"ssh_identity": str(sshd.wrong_identity())}
    )
    todo_id = add_todo(mysql_url)
    before = fetch_row(mysql_url, todo_id)
    agent = make_agent(ssh_database(sshd, mysql_url, **wrong))

    checks = check_json(agent)
    assert not checks["ssh tunnel"]["ok"]
    assert cause in checks["ssh tunnel"]["message"], checks
    assert "not tried" in checks["database"]["message"]

    agent.start()
    assert agent.ctl("complete", str(todo_id), "--output", "must not land").returncode == 0
    message = wait_for(
        lambda: (m := health_database(agent)) and cause in m and m,
        60,
        what=f"health naming {cause}",
    )
    assert f"ssh to {sshd.destination}" in message and "wait in the journal" in message
    # The completion waits in the journal (not dead, not written) for the key to be fixed.
    agent.wait_states(todo_id, "collected")
    assert fetch_row(mysql_url, todo_id) == before
    assert log_count(mysql_url) == 0
    assert cause in (agent.state / "logs" / "agent.log").read_text() or cause in agent.output()


def test_an_unknown_host_is_a_configuration_error_that_says_how_to_add_it(
    sshd: Sshd, mysql_url: str, make_agent: Callable[..., Agent], tmpdir_short: Path
) -> None:
    empty = tmpdir_short / "empty_known_hosts"
    empty.write_text("")
    agent = make_agent(ssh_database(sshd, mysql_url, ssh_known_hosts=str(empty)))
    done = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(agent.config_path)],
        env=agent.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "configuration error" in done.stderr
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {empty}" in done.stderr
    checks = check_json(agent)
    assert not checks["ssh config"]["ok"] and "ssh-keyscan" in checks["ssh config"]["message"]
    assert not checks["ssh tunnel"]["ok"] if "ssh tunnel" in checks else True


@pytest.mark.parametrize(
    ("database", "wanted"),
    [
        ({"url": "mysql://u@h/db", "ssh": "host-without-user"}, "not a destination"),
        ({"url": "mysql://u@h/db", "ssh": "u@h:99999"}, "not a destination"),
        ({"url": "mysql://u@h/db", "ssh": "u@-oProxyCommand=x"}, "not a destination"),
        ({"ssh": "u@h"}, "needs a MySQL database"),
        ({"url": "mysql://u@h/db", "ssh_identity": "/k"}, "need database.ssh"),
        ({"url": "mysql://u@h/db", "ssh": "u@h", "ssh_identity": "k"}, "absolute path"),
    ],
)
def test_ssh_settings_are_checked(database: dict, wanted: str, tmpdir_short: Path) -> None:
    path = tmpdir_short / "config.toml"
    path.write_text(render_toml({"state_dir": str(tmpdir_short / "s"), "database": database}))
    with pytest.raises(ConfigError, match=wanted):
        load(str(path))


def test_the_standing_tunnel_recipe_works_and_passes_systemd_analyze(
    sshd: Sshd, mysql_url: str, tmpdir_short: Path
) -> None:
    """contrib/completion-db-tunnel.service with its placeholders filled: systemd-analyze accepts
    it, and its ExecStart (run here, as systemd would) forwards a local port to MySQL."""
    import getpass
    import shlex
    import shutil

    from tests.dbfixtures import mysql_connect
    from tests.sshd import free_port

    local = free_port()
    text = (Path(__file__).parent.parent / "contrib" / "completion-db-tunnel.service").read_text()
    for key, value in {
        "@USER@": getpass.getuser(),
        "@IDENTITY@": str(sshd.identity),
        "@KNOWN_HOSTS@": str(sshd.known_hosts),
        "@SSH_DEST@": f"{sshd.user}@127.0.0.1",
        "@SSH_PORT@": str(sshd.port),
        "@DB_HOSTPORT@": "127.0.0.1:3306",
        "@LOCAL_PORT@": str(local),
    }.items():
        text = text.replace(key, value)
    assert not re.search(r"@[A-Z_]+@", text), "a placeholder was not filled"
    unit = tmpdir_short / "completion-db-tunnel.service"
    unit.write_text(text)
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (apt-get install systemd)"
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    joined = text.replace("\\\n", " ")
    exec_start = next(line for line in joined.splitlines() if line.startswith("ExecStart="))
    proc = subprocess.Popen(shlex.split(exec_start.removeprefix("ExecStart=")))
    try:
        url = mysql_url.replace("127.0.0.1:3306", f"127.0.0.1:{local}")

        def answers() -> bool:
            try:
                mysql_connect(url).close()
            except Exception:
                assert proc.poll() is None, "the recipe's ssh exited"
                return False
            return True

        wait_for(answers, 30, what="MySQL through the standing tunnel")
    finally:
        proc.terminate()
        proc.wait(10)
