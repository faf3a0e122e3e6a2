"""Access: the socket refuses a client running as another user, the state dir and the journal are
not readable by others, and the database password shows nowhere: not in logs, status, health,
check, reports, the journal, the archive, or any process's command line or environment."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from urllib.parse import quote

import pymysql
import pytest

from ctl import Client
from tests.dbfixtures import MysqlServer, raw_execute
from tests.harness import Agent, render_toml, wait_for
from tests.reliability.conftest import add_todos
from tests.reliability.ledger import budget
from tests.reliability.nobody import run_as_nobody

pytestmark = [pytest.mark.reliability]

CONNECT = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "try:\n    s.connect(sys.argv[1])\n"
    "except OSError as e:\n    print(type(e).__name__, e.errno); sys.exit(7)\n"
    "print('connected')\n"
)
READ = (
    "import sys\n"
    "try:\n    open(sys.argv[1], 'rb').read(16)\n"
    "except OSError as e:\n    print(type(e).__name__, e.errno); sys.exit(7)\n"
    "print('read')\n"
)


def _open_path_to(agent: Agent) -> None:
    """Let anyone walk down to the state dir, so only its own modes protect it."""
    path = agent.state.parent
    while str(path) != "/":
        path.chmod(path.stat().st_mode | 0o711)
        path = path.parent


@pytest.mark.slow
def test_the_socket_refuses_another_user(agent: Agent) -> None:
    _open_path_to(agent)
    sock = agent.state / "completiond.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(agent.state.stat().st_mode) == 0o700
    todo = agent.add("not for nobody")
    public_config = agent.root / "public.toml"
    public_config.write_text(render_toml(agent.config))
    public_config.chmod(0o644)

    # The kernel refuses the connection: first the 0700 state dir, then (were the dir
    # searchable, as in a shared setup's 0710) the 0600 socket file itself.
    result = run_as_nobody(["-c", CONNECT, str(sock)])
    assert result.returncode == 7 and b"PermissionError" in result.stdout, result
    agent.state.chmod(0o711)
    try:
        result = run_as_nobody(["-c", CONNECT, str(sock)])
        assert result.returncode == 7 and b"PermissionError" in result.stdout, result
    finally:
        agent.state.chmod(0o700)

    # The real client, as nobody: no ack, nothing journaled, nothing queued.
    result = run_as_nobody(
        ["-m", "ctl", "--config", str(public_config), "--timeout", "1", "complete", str(todo)]
    )
    assert result.returncode != 0, result
    assert b"queued" not in result.stdout + result.stderr
    assert agent.todo_status(todo) is None  # the agent knows nothing about it
    assert list((agent.state / "outbox").glob("*.req")) == []
    assert agent.todo_row(todo)["status"] == "offen"
    # The agent itself is untouched and still serves its own user.
    assert Client(str(agent.config_path)).ping().pid == agent.proc.pid  # type: ignore[union-attr]


@pytest.mark.slow
def test_state_dir_and_journal_are_private(agent: Agent) -> None:
    # The agent made todos.db (embedded default); see the test below for `completionctl add`.
    wait_for((agent.state / "todos.db").exists, 10, what="the writer to create todos.db")
    todo = agent.add("private")
    session = agent.sessions / f"claude_session_{todo}"
    session.mkdir()
    (session / "output.md").write_text("secret output")
    assert agent.ctl("complete", str(todo)).returncode == 0
    agent.wait_states(todo, "cleaned")
    _open_path_to(agent)
    loose = []
    for path in [agent.state, *agent.state.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            loose.append(f"{path.relative_to(agent.state)} {oct(mode)}")
    assert not loose, f"readable or writable by others: {loose}"
    for name in ("journal.db", "journal.db-wal", "logs/completion.log", "todos.db"):
        path = agent.state / name
        if path.exists():
            result = run_as_nobody(["-c", READ, str(path)])
            assert result.returncode == 7, (name, result)
    archives = list((agent.state / "archive").iterdir())
    assert archives, "nothing was archived"
    result = run_as_nobody(["-c", READ, str(next(archives[0].rglob("output.md")))])
    assert result.returncode == 7, result


def test_todo_db_made_by_completionctl_before_the_agent_is_private(make_agent) -> None:
    agent: Agent = make_agent()
    agent.add("made before completiond ever ran")
    agent.start()
    mode = stat.S_IMODE((agent.state / "todos.db").stat().st_mode)
    assert not mode & 0o077, f"todos.db is {oct(mode)}"


def _everything_said(agent: Agent, todo: int) -> dict[str, bytes]:
    said: dict[str, bytes] = {}
    for args in (
        ("status",),
        ("--json", "status"),
        ("--json", "status", str(todo)),
        ("health",),
        ("--json", "health"),
        ("check",),
    ):
        result = agent.ctl(*args)
        said["ctl " + " ".join(args)] = result.stdout + result.stderr
    for proc in agent.family():
        with contextlib.suppress(Exception):
            said[f"pid {proc.pid} cmdline"] = "\0".join(proc.cmdline()).encode()
            said[f"pid {proc.pid} environ"] = repr(proc.environ()).encode()
    assert agent.stop() == 0  # every log line is written when it has stopped
    said["completiond output"] = agent.log_path.read_bytes()
    for path in agent.state.rglob("*"):
        if path.is_file() and not path.is_socket():
            said[str(path.relative_to(agent.state))] = path.read_bytes()
    return said


@pytest.mark.mysql
@pytest.mark.slow
@pytest.mark.timeout(budget(180))
def test_no_secret_in_logs_status_health_or_reports(
    make_agent, mysql_server: MysqlServer, mysql_url: str, wordpress_table: str, proxy
) -> None:
    database = mysql_url.rsplit("/", 1)[1]
    user = f"ct_{secrets.token_hex(4)}"
    password = f"Pw-{secrets.token_hex(8)}"
    admin = mysql_server.connect(autocommit=True)
    try:
        with admin.cursor() as cur:
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (user, password))
            cur.execute(f"GRANT ALL ON `{database}`.* TO %s@'%%'", (user,))
        url = f"mysql://{user}:{quote(password)}@{proxy.host}:{proxy.port}/{database}"
        agent = make_agent({"database": {"url": url}, "behavior": {"database_timeout": 2}})
        agent.start()
        ids = add_todos(mysql_url, 6)
        client = Client(str(agent.config_path))
        client.complete(ids[0], output="fine")
        client.emergency(ids[1], reason="forced, with a system status in the report")
        # Errors that name the connection: an outage, then a permanent one (table gone).
        proxy.mode = "refuse"
        proxy.cut()
        client.complete(ids[2], output="during an outage")
        wait_for(
            lambda: {c.name: c.status for c in client.health().checks}["database"] == "CRITICAL",
            20,
            what="health to see the outage",
        )
        proxy.mode = "pass"
        raw_execute(mysql_url, "RENAME TABLE stage_project_todos TO gone_todos")
        client.complete(ids[3], output="into a missing table")
        wait_for(
            lambda: client.status().agent.journal.get("dead", 0) >= 1,  # type: ignore[union-attr]
            30,
            what="a dead completion",
        )
        raw_execute(mysql_url, "RENAME TABLE gone_todos TO stage_project_todos")
        client.retry(all_dead=True)
        wait_for(
            lambda: all(
                (
                    r := raw_execute(
                        mysql_url, "SELECT status FROM stage_project_todos WHERE id = ?", (t,)
                    )
                )
                and r[0][0] == "completed"
                for t in ids[:4]
            ),
            30,
            what="the completions to land",
        )
        said = _everything_said(agent, ids[2])
        reports = raw_execute(
            mysql_url,
            "SELECT claude_html_output, claude_text_output, claude_summary"
            " FROM stage_project_todos",
        )
        said["reports"] = repr(reports).encode()
        assert b"completion.log" in b" ".join(k.encode() for k in said) or any(
            k.startswith("logs/") for k in said
        )
        leaks = [
            where
            for where, text in said.items()
            if password.encode() in text or quote(password).encode() in text
        ]
        assert not leaks, f"the database password shows in: {leaks}"
        assert b"***" in said["ctl --json status"]  # the URL is shown, masked
    finally:
        with admin.cursor() as cur, contextlib.suppress(pymysql.MySQLError):
            cur.execute("DROP USER %s@'%%'", (user,))
        admin.close()


def test_nobody_helper_runs_code_as_nobody() -> None:
    result = run_as_nobody(["-c", "import os; print(os.geteuid(), os.getegid())"])
    assert result.stdout.split() == [b"65534", b"65534"], result
    assert Path("/proc/self").exists() and os.geteuid() == 0
