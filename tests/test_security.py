"""What a second local user could do to the agent (issue 14; docs/SECURITY.md), one test per row.

D1: the agent as root on a shared socket (``socket_mode = "0660"``, ``socket_group``), the
attacker a throwaway user in that group.  D2: the attacker has nothing but a shared, sticky
directory (the tests' stand-in for /tmp).  Every attacker runs as a real other user (setpriv).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

import protocol as p
from tests.harness import REPO, Agent, render_toml, wait_for
from tests.users import User, group, open_path_for_others, user

SECRET = "s3cr3t-only-root-may-read-this"
FINISHED = ("verified", "cleaned")


def transcript_line(text: str) -> str:
    record = {
        "type": "assistant",
        "message": {
            "id": "msg_1",
            "role": "assistant",
            "stop_reason": "end_turn",
            "content": [{"type": "text", "text": text}],
        },
    }
    return json.dumps(record) + "\n"


def finished(agent: Agent, todo_id: int, timeout: float = 30.0) -> dict:
    def done() -> dict | None:
        status = agent.todo_status(todo_id)
        if status and status["entries"] and status["entries"][-1]["state"] in FINISHED:
            return status
        return None

    return wait_for(done, timeout, what=f"todo {todo_id}'s completion to be written")


def settled(agent: Agent, todo_id: int, timeout: float = 30.0) -> dict:
    """The last entry is done with (written and verified, or refused)."""

    def done() -> dict | None:
        status = agent.todo_status(todo_id)
        last = status["entries"][-1]["state"] if status and status["entries"] else None
        return status if last in (*FINISHED, "failed", "dead") else None

    return wait_for(done, timeout, what=f"todo {todo_id}'s completion to settle")


def todo_text(agent: Agent, todo_id: int) -> str:
    row = agent.todo_row(todo_id) or {}
    return " ".join(str(v) for v in row.values())


def archive_bytes(agent: Agent) -> bytes:
    out = b""
    for folder, _dirs, files in os.walk(agent.state / "archive"):
        for name in files:
            out += (Path(folder) / name).read_bytes()
    return out


@dataclass
class Shared:
    """D1: a root agent on a group socket, and an attacker in the group."""

    agent: Agent
    attacker: User
    client_config: Path

    def ctl(self, *args: str, person: User | None = None, stdin: bytes | None = None, **env):
        who = person or self.attacker
        run_env = {"PYTHONPATH": str(REPO), "HOME": "/nonexistent", **env}
        return who.run(
            sys.executable,
            "-m",
            "ctl",
            "--config",
            str(self.client_config),
            *args,
            env=run_env,
            input=stdin,
            timeout=60,
        )


@contextmanager
def shared_agent(make_agent, config: dict | None = None) -> Iterator[Shared]:
    with group() as team, user(groups=(team,)) as attacker:
        base = {"socket_mode": "0660", "socket_group": team}
        agent = make_agent({**base, **(config or {})})
        open_path_for_others(agent.root)
        agent.sessions.chmod(0o1777)  # the tests' /tmp
        agent.start()
        # What a member of the group gets: the endpoint and the state dir, no database URL.
        client_config = agent.root / "client.toml"
        client_config.write_text(
            render_toml({"state_dir": str(agent.state), "hook": {"timeout": 1.0}})
        )
        client_config.chmod(0o644)
        try:
            yield Shared(agent, attacker, client_config)
        finally:
            agent.cleanup()


# ---------------------------------------------------------------- H1


@pytest.mark.slow
def test_h1_root_agent_reads_nothing_the_requester_could_not(make_agent) -> None:
    with shared_agent(make_agent) as shared:
        agent = shared.agent
        vault = agent.root / "vault"
        vault.mkdir(mode=0o700)
        shadow = vault / "shadow"
        command = {
            "type": "assistant",
            "message": {
                "id": "msg_0",
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": SECRET}}
                ],
            },
        }
        shadow.write_text(json.dumps(command) + "\n" + transcript_line(SECRET))
        shadow.chmod(0o600)
        # Root's repository: git evidence would list its changed files' names.
        repo = vault / "repo"
        repo.mkdir()
        git = ["git", "-c", "user.name=r", "-c", "user.email=r@x", "-C", str(repo)]
        subprocess.run([*git, "init", "-q"], check=True)
        (repo / "a").write_text("a")
        subprocess.run([*git, "add", "a"], check=True)
        subprocess.run([*git, "commit", "-qm", "a"], check=True)
        (repo / f"{SECRET}.txt").write_text("x")
        tmux = str(agent.root / "tmux.sock")
        subprocess.run(
            ["tmux", "-S", tmux, "new-session", "-d", "-s", "roots", f"echo {SECRET}; sleep 60"],
            check=True,
        )
        wait_for(
            lambda: (
                SECRET
                in subprocess.run(
                    ["tmux", "-S", tmux, "capture-pane", "-p", "-t", "roots"],
                    capture_output=True,
                    text=True,
                ).stdout
            ),
            what="root's tmux pane to show the secret",
        )
        stolen, probed = agent.add("victim"), agent.add("probe")
        result = shared.ctl("complete", str(stolen), "--transcript", str(shadow))
        assert result.returncode == 0, result.stderr
        result = shared.ctl("complete", str(probed), "--transcript", str(vault / "no-such-file"))
        assert result.returncode == 0, result.stderr
        tmux_todo = agent.add("tmux")
        result = shared.ctl("complete", str(tmux_todo), "--tmux-target", "roots")
        assert result.returncode == 0, result.stderr
        # The same through the hook: a payload's transcript_path and cwd.
        hooked = agent.add("hook")
        payload = {
            "hook_event_name": "Stop",
            "session_id": "s-h1",
            "transcript_path": str(shadow),
            "cwd": str(repo),
        }
        result = shared.ctl("hook", stdin=json.dumps(payload).encode(), TODO_ID=str(hooked))
        assert result.returncode == 0 and not result.stdout, result.stderr
        for todo in (stolen, probed, tmux_todo, hooked):
            finished(agent, todo)
            assert SECRET not in todo_text(agent, todo)
        assert SECRET.encode() not in archive_bytes(agent)
        # The same sentence whether the root-only path exists or not.
        said = {}
        for todo, path in ((stolen, shadow), (probed, vault / "no-such-file")):
            text = todo_text(agent, todo).replace(str(path), "PATH")
            said[todo] = re.findall(r"cannot read PATH: [^.\n|<]*", text)
        assert said[stolen] and said[stolen] == said[probed], said
        assert "not readable by uid" in said[stolen][0]
        assert "not the requester's" in todo_text(agent, tmux_todo)


# ---------------------------------------------------------------- H2


@pytest.mark.slow
def test_h2_a_planted_sparse_orphan_is_not_archived_round_after_round(make_agent) -> None:
    with shared_agent(make_agent, {"behavior": {"hanging_after": 60}}) as shared:
        agent, attacker = shared.agent, shared.attacker
        plant = agent.sessions / "claude_session_424242"
        script = (
            "import os, sys, time\n"
            "d = sys.argv[1]\n"
            "os.mkdir(d, 0o755)\n"
            "for i in range(4):\n"
            "    with open(os.path.join(d, f'big{i}'), 'wb') as f:\n"
            "        f.truncate(10 * 1024**3)\n"
            "old = time.time() - 7200\n"
            "os.utime(d, (old, old))\n"
        )
        result = attacker.run(sys.executable, "-c", script, str(plant))
        assert result.returncode == 0, result.stderr
        rounds = agent.state / "logs" / "monitor.log"

        # The check sees the orphan every round; it never copies the other user's dir.
        def checked_three_times() -> bool:
            report = json.loads(agent.ctl("--json", "health").stdout)
            check = {c["name"]: c for c in report["checks"]}["orphaned_sessions"]
            return "424242" in json.dumps(check) and "s ago" in check["message"]

        wait_for(checked_three_times, 30, what="the orphan check to see the plant")
        time.sleep(3.5)  # three more health rounds (health_check_interval = 1)
        assert archive_bytes(agent) == b"" or b"big0" not in archive_bytes(agent)
        total = sum(
            (Path(f) / n).stat().st_blocks * 512
            for f, _d, names in os.walk(agent.state / "archive")
            for n in names
        )
        assert total < 1024 * 1024, f"{total} bytes archived"
        assert plant.is_dir()  # left for its owner; the log says so, once
        log = rounds.read_text(errors="replace")
        assert "archived and removed" not in log
        assert log.count("left alone") == 1, log


def test_h2_archive_bounds_cap_one_archive_and_the_whole_archive(tmp_path: Path) -> None:
    from agent.archive import archive_session, enforce_bounds
    from protocol.config import Archive, Config

    session = tmp_path / "session"
    session.mkdir()
    for i in range(6):
        with open(session / f"sparse{i}", "wb") as f:
            f.truncate(10 * 1024**3)  # 10 GB apparent, nothing on disk
    root = tmp_path / "archive"
    result = archive_session(
        root,
        1,
        1000.0,
        session_dir=session,
        transcript=None,
        report_html="<p>r</p>",
        max_bytes=3 * 1024 * 1024,
        max_files=4,
    )
    copied = sum(f.stat().st_size for f in result.path.rglob("*") if f.is_file())
    assert copied <= 3 * 1024 * 1024 + 64 * 1024
    assert result.files <= 4
    assert "reached its bound" in (result.path / "ARCHIVE_NOTES.txt").read_text()
    # Whole archive: the oldest go first, past the total or the retention.
    config = Config(
        state_dir=str(tmp_path),
        archive=Archive(max_total_bytes=4 * 1024 * 1024, retention_days=1),
    )
    second = archive_session(
        root,
        2,
        2000.0,
        session_dir=session,
        transcript=None,
        report_html="x",
        max_bytes=3 * 1024 * 1024,
        max_files=4,
    ).path
    os.utime(result.path, (1000.0, 1000.0))
    os.utime(second, (2000.0, 2000.0))
    removed = enforce_bounds(config, 2000.0)
    assert removed == [result.path.name]
    assert second.is_dir()
    removed = enforce_bounds(config, 2000.0 + 2 * 86400)
    assert removed == [second.name]


# ---------------------------------------------------------------- H3


def raw_request(endpoint: str, frame: bytes, timeout: float = 1.0) -> bytes:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(frame)
        assert sock.poll(int(timeout * 1000)), f"no answer within {timeout} s"
        return sock.recv()
    finally:
        sock.close(0)


def raw_stream(path: Path, frame: bytes, timeout: float = 1.0) -> bytes:
    """One request over the one-shot clients' stream socket (agent.streamdoor)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        assert reply, "closed without an answer"
        return reply


def ask(agent: Agent, door: str, frame: bytes, timeout: float = 1.0) -> p.AnyReply:
    """A raw frame through one of the agent's two sockets: "zmq" or "stream"."""
    path = agent.state / "completiond.sock"
    if door == "stream":
        return p.decode_reply(raw_stream(Path(f"{path}.stream"), frame, timeout))
    return p.decode_reply(raw_request(f"ipc://{path}", frame, timeout))


@pytest.mark.slow
@pytest.mark.parametrize("door", ["zmq", "stream"])
def test_h3_a_deeply_nested_frame_is_answered_and_the_agent_lives(agent: Agent, door: str) -> None:
    nested = b"\x92\x01" + b"\x91" * 1000 + b"\xc0"
    reply = ask(agent, door, nested)
    assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.BAD_FRAME
    assert "nested" in reply.message
    deep = b"\x92\x01\x81\xa4type" + b"\x91" * 5000 + b"\xc0"  # the nesting inside a field
    reply = ask(agent, door, deep)
    assert isinstance(reply, p.Error)
    for garbage in (b"", b"\xff" * 100, b"not msgpack at all"):
        reply = ask(agent, door, garbage)
        assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.BAD_FRAME, garbage
    assert agent.proc is not None and agent.proc.poll() is None
    assert isinstance(ask(agent, door, p.encode(p.Ping())), p.Pong)


@pytest.mark.slow
def test_h3_the_stream_socket_refuses_a_frame_over_the_limit_and_outlives_a_stalled_client(
    agent: Agent,
) -> None:
    import socket

    todo = agent.add("a todo")
    huge = p.encode(p.Complete(todo_id=todo, output="x" * (p.MAX_FRAME_BYTES + 1024)))
    reply = ask(agent, "stream", huge, timeout=30.0)
    assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.TOO_LARGE
    # A client that connects, writes half a frame and stalls holds up no one else.
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(str(agent.state / "completiond.sock.stream"))
    stalled.sendall(p.encode(p.Ping())[:2])
    try:
        started = time.monotonic()
        assert isinstance(ask(agent, "stream", p.encode(p.Ping())), p.Pong)
        assert time.monotonic() - started < 1.0
        # ...and is closed, unanswered, when its time is up (agent.streamdoor.CONNECTION_TIMEOUT).
        stalled.settimeout(30)
        assert stalled.recv(64) == b""
    finally:
        stalled.close()
    assert agent.todo_status(todo) is None or not agent.todo_status(todo)["entries"]


FLOOD = """
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
conns = []
for _ in range(int(sys.argv[2])):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(sys.argv[1])
    conns.append(c)
print("flooding", flush=True)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    ended = 0
    for c in conns:
        c.setblocking(False)
        try:
            ended += c.recv(64) == b""
        except BlockingIOError:
            pass
        except OSError:
            ended += 1
    print(ended, flush=True)
    if ended >= len(conns) - int(sys.argv[3]):
        break
    time.sleep(0.2)
"""


@pytest.mark.slow
@pytest.mark.parametrize("door", ["zmq", "stream"])
def test_h3_a_connection_flood_is_refused_and_the_agent_answers_within_a_second(
    make_agent, door: str
) -> None:
    with group() as team, user(groups=(team,)) as attacker:
        agent = make_agent(
            {"socket_mode": "0660", "socket_group": team, "limits": {"max_peers": 64}}
        )
        open_path_for_others(agent.root)
        # The usual soft limit of 1,024 descriptors; the agent raises it to the hard limit.
        agent.start(prefix=("prlimit", "--nofile=1024:8192", "--"))
        path = str(agent.state / "completiond.sock") + (".stream" if door == "stream" else "")
        # What the attacker keeps: max_peers on the stream socket; on the ZeroMQ one at most
        # ZMQ_PEERS_PER_LOCAL_USER (libzmq buffers a message per connection, uncounted).
        held = 64 if door == "stream" else 16
        flood = subprocess.Popen(
            [
                "prlimit",
                "--nofile=4096:4096",
                "--",
                *attacker.argv(sys.executable, "-c", FLOOD, path, "1500", str(held)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert flood.stdout is not None
            assert flood.stdout.readline().strip() == "flooding"
            started = time.monotonic()
            if door == "stream":  # what the agent's user's completionctl does
                from ctl import Client

                one_shot = Client(str(agent.config_path), timeout=1.0, one_shot=True)
                assert isinstance(one_shot.ping(), p.Pong)
            else:
                assert isinstance(ask(agent, door, p.encode(p.Ping()), timeout=1.0), p.Pong)
            assert time.monotonic() - started < 1.0
            # The flood's connections over the cap were shut by the agent.
            flood.wait(40)
            counts = [int(line) for line in flood.stdout.read().split()]
            assert counts and counts[-1] >= 1500 - held, counts[-3:]
            assert agent.proc is not None and agent.proc.poll() is None
            assert "limits.max_peers" in (agent.state / "logs" / "agent.log").read_text()
        finally:
            if flood.poll() is None:
                flood.kill()
            flood.wait(10)


HOLD = """
import socket, sys
conns = []
for _ in range(int(sys.argv[2])):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(20)
    c.connect(sys.argv[1])
    c.sendall(b"\\x92\\x01" + b"x" * (4 << 20))  # returns once the agent has read nearly all
    conns.append(c)
print("holding", flush=True)
sys.stdin.readline()
replies = []
for c in conns:
    c.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := c.recv(65536):
        reply += chunk
    replies.append(reply.hex())
print(" ".join(replies), flush=True)
"""


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_h3_unfinished_stream_frames_of_other_users_keep_bounded_memory(make_agent) -> None:
    """16 connections x 4 MB of unfinished frames each, by a member and by a user not in
    socket_allowed_uids: 128 MB kept in the agent before; now the member's bytes_per_minute
    at most, nothing for the other, and each frame is refused when it ends."""
    with group() as team, user(groups=(team,)) as member, user(groups=(team,)) as other:
        agent = make_agent(
            {
                "socket_mode": "0660",
                "socket_group": team,
                "socket_allowed_uids": [member.uid],
                "limits": {"bytes_per_minute": 8 * 1024 * 1024},
            }
        )
        open_path_for_others(agent.root)
        agent.start()
        assert agent.proc is not None
        assert isinstance(ask(agent, "stream", p.encode(p.Ping())), p.Pong)
        before = _rss(agent.proc.pid)
        path = str(agent.state / "completiond.sock.stream")
        holders = [
            subprocess.Popen(
                person.argv(sys.executable, "-c", HOLD, path, "16"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for person in (member, other)
        ]
        try:
            for holder in holders:
                assert holder.stdout is not None
                assert holder.stdout.readline().strip() == "holding"
            grown = _rss(agent.proc.pid) - before
            assert grown < 40 * 1024 * 1024, f"{grown >> 20} MB kept for unfinished frames"
            started = time.monotonic()
            assert isinstance(ask(agent, "stream", p.encode(p.Ping())), p.Pong)
            assert time.monotonic() - started < 1.0
            codes = []
            for holder in holders:
                out, _ = holder.communicate("\n", timeout=60)
                codes.append(
                    sorted(p.decode_reply(bytes.fromhex(h)).code.name for h in out.split())
                )
            mine, others = codes
            assert len(mine) == 16 and "OVER_QUOTA" in mine, mine
            assert others == ["FORBIDDEN"] * 16
        finally:
            for holder in holders:
                if holder.poll() is None:
                    holder.kill()
                holder.wait(10)
        assert agent.proc.poll() is None


HOLD_OPEN = """
import socket, sys
conns = []
for _ in range(int(sys.argv[2])):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(sys.argv[1])
    c.send(b"\\x92")
    conns.append(c)
print("holding", flush=True)
sys.stdin.readline()
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_h3_out_of_descriptors_the_stream_socket_neither_spins_nor_ends_the_agent(
    make_agent,
) -> None:
    """An agent whose open file limit is 100: a member's 150 connections get half of it (not
    their max_peers of 512), so the agent's user is answered; when the agent's own user uses
    up the rest, accept() pauses (no busy loop, no log flood) and the outbox sweep's EMFILE
    does not end the agent."""
    import socket

    with group() as team, user(groups=(team,)) as member:
        agent = make_agent({"socket_mode": "0660", "socket_group": team})
        open_path_for_others(agent.root)
        agent.start(prefix=("prlimit", "--nofile=100:100", "--"))
        path = str(agent.state / "completiond.sock.stream")
        holder = subprocess.Popen(
            member.argv(sys.executable, "-c", HOLD_OPEN, path, "150"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        mine: list[socket.socket] = []
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "holding"
            started = time.monotonic()
            assert isinstance(ask(agent, "stream", p.encode(p.Ping())), p.Pong)
            assert time.monotonic() - started < 1.0
            log = agent.state / "logs" / "agent.log"
            assert "half the open file limit" in log.read_text()
            for _ in range(60):  # the agent's own user: no cap; descriptors run out
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                mine.append(sock)
            wait_for(lambda: "cannot accept connections" in log.read_text(), 10, what="EMFILE")
            paused = time.monotonic()
            wait_for(lambda: "outbox: cannot list" in log.read_text(), 10, what="a sweep")
            time.sleep(max(0.0, paused + 1.0 - time.monotonic()))  # a second of being out
            assert log.read_text().count("cannot accept connections") <= 10
            assert agent.proc is not None and agent.proc.poll() is None
            for sock in mine:
                sock.close()
            mine.clear()

            def answered() -> bool:
                try:
                    return isinstance(ask(agent, "stream", p.encode(p.Ping())), p.Pong)
                except (OSError, AssertionError):
                    return False

            wait_for(answered, 10, what="an answer once descriptors are free")
        finally:
            for sock in mine:
                sock.close()
            holder.kill()
            holder.wait(10)
        assert agent.proc.poll() is None


@pytest.mark.slow
def test_h3_a_client_that_cannot_queue_says_so_and_tells_the_user(make_agent) -> None:
    with shared_agent(make_agent) as shared:
        shared.agent.stop()  # down: the group member's request has nowhere to go
        payload = {
            "hook_event_name": "Stop",
            "session_id": "s-lost",
            "last_assistant_message": "done",
        }
        result = shared.ctl("hook", stdin=json.dumps(payload).encode(), TODO_ID="7")
        assert result.returncode == 0
        stderr = result.stderr.decode()
        assert "could NOT be kept in the outbox" in stderr, stderr
        message = json.loads(result.stdout)
        assert list(message) == ["systemMessage"]
        assert "could NOT be kept in the outbox" in message["systemMessage"]


# ---------------------------------------------------------------- M1, M2


@pytest.mark.slow
def test_m1_a_session_dir_planted_by_another_user_is_not_the_output(make_agent) -> None:
    with shared_agent(make_agent) as shared:
        agent = shared.agent
        todo = agent.add("victim's todo")
        plant = agent.sessions / f"claude_session_{todo}"
        script = (
            "import os, sys\n"
            "os.mkdir(sys.argv[1], 0o755)\n"
            "open(os.path.join(sys.argv[1], 'output.md'), 'w').write('PLANTED by the attacker')\n"
        )
        result = shared.attacker.run(sys.executable, "-c", script, str(plant))
        assert result.returncode == 0, result.stderr
        agent.ctl("start", str(todo))
        assert agent.ctl("complete", str(todo)).returncode == 0  # the victim: no output given
        finished(agent, todo)
        assert "PLANTED" not in todo_text(agent, todo)
        assert "not used" in todo_text(agent, todo)
        assert b"PLANTED" not in archive_bytes(agent)


@pytest.mark.slow
def test_m2_a_session_dir_that_is_a_symlink_is_not_read(make_agent) -> None:
    with shared_agent(make_agent) as shared:
        agent = shared.agent
        vault = agent.root / "vault"
        vault.mkdir(mode=0o700)
        (vault / "summary.txt").write_text(SECRET)
        (vault / "summary.txt").chmod(0o600)
        todo = agent.add("victim")
        link = agent.sessions / f"claude_session_{todo}"
        result = shared.attacker.run("ln", "-s", str(vault), str(link))
        assert result.returncode == 0, result.stderr
        assert agent.ctl("complete", str(todo)).returncode == 0
        finished(agent, todo)
        assert SECRET not in todo_text(agent, todo)
        assert SECRET.encode() not in archive_bytes(agent)


# ---------------------------------------------------------------- M3, M4, M5


@pytest.mark.slow
def test_m3_another_users_markers_complete_nothing_and_the_monitor_lives(make_agent) -> None:
    with shared_agent(make_agent, {"marker": {"enabled": True}}) as shared:
        agent = shared.agent
        agent.root.chmod(0o1777)  # the marker files live in the agent's root: the tests' /tmp
        todo = agent.add("victim")
        agent.ctl("start", str(todo))
        for name, text in (("CURRENT_TODO_ID", str(todo)), ("TASK_COMPLETED", "done")):
            result = shared.attacker.run("sh", "-c", f"printf %s '{text}' > {agent.root / name}")
            assert result.returncode == 0, result.stderr
        log = agent.state / "logs" / "monitor.log"
        wait_for(
            lambda: log.exists() and "ignored" in log.read_text(errors="replace"),
            20,
            what="the refusal",
        )
        monitor = agent.children()["monitor"]
        time.sleep(2)  # several sweeps and health rounds
        assert [e["kind"] for e in agent.todo_status(todo)["entries"]] == ["start"]
        assert agent.children()["monitor"] == monitor  # no crash loop
        assert (agent.root / "TASK_COMPLETED").exists()


@pytest.mark.slow
def test_m4_a_fifo_hint_neither_hangs_the_hook_nor_stops_deadlines(make_agent) -> None:
    agent = make_agent({"marker": {"enabled": True}})
    agent.start()
    os.mkfifo(agent.root / "CURRENT_TODO_ID")
    (agent.root / "TASK_COMPLETED").write_text("done")
    todo = agent.add("deadline")
    payload = json.dumps({"hook_event_name": "PostToolUse", "session_id": "s-fifo"})
    started = time.monotonic()
    result = agent.ctl("hook", input=payload, env={"TODO_ID": str(todo)}, timeout=20)
    assert result.returncode == 0
    assert time.monotonic() - started < 10
    result = agent.ctl("hook", input=payload, timeout=20)  # without $TODO_ID, the hint is tried
    assert result.returncode == 0
    assert agent.ctl("start", str(todo), "--timeout", "1").returncode == 0
    wait_for(
        lambda: "emergency" in [e["kind"] for e in agent.todo_status(todo)["entries"]],
        20,
        what="the completion deadline to fire",
    )


@pytest.mark.slow
def test_m5_a_hint_file_others_may_write_redirects_nothing(make_agent) -> None:
    with shared_agent(make_agent) as shared:
        agent = shared.agent
        agent.root.chmod(0o1777)
        mine, theirs = agent.add("victim's"), agent.add("attacker's")
        hint = agent.root / "CURRENT_TODO_ID"
        result = shared.attacker.run(
            "sh", "-c", f"umask 0; printf %s {theirs} > {hint}; chmod 666 {hint}"
        )
        assert result.returncode == 0, result.stderr
        payload = json.dumps(
            {"hook_event_name": "Stop", "session_id": "s-m5", "last_assistant_message": "mine"}
        )
        result = agent.ctl("hook", input=payload)
        assert result.returncode == 0
        time.sleep(1.5)
        assert agent.todo_status(theirs) is None  # nothing went to the attacker's todo
        assert agent.todo_status(mine) is None
        # The victim's own hint file is used.
        hint.unlink()
        hint.write_text(str(mine))
        hint.chmod(0o644)
        assert agent.ctl("hook", input=payload).returncode == 0
        finished(agent, mine)


# ---------------------------------------------------------------- M6


def postrotate_script(pid_file: Path, user_name: str) -> str:
    # The per-configuration file `completionctl logrotate` writes (logrotate.d/completiond is
    # that script for every user's default paths, with the same checks).
    from ctl.logrotate import TEMPLATE

    text = TEMPLATE
    body = text[text.index("postrotate") + len("postrotate") : text.index("endscript")]
    return body.replace("@PID_FILE@", str(pid_file)).replace("@USER@", user_name)


@pytest.mark.slow
def test_m6_postrotate_signals_only_a_live_completiond_of_its_user(tmpdir_short: Path) -> None:
    with user() as owner:
        tmpdir_short.chmod(0o755)
        pid_file = tmpdir_short / "completiond.pid"
        pid_file.write_text("-1\n")
        # The agent's lock is held (a running agent), by a process of the agent's user.
        holder = subprocess.Popen(
            owner.argv("flock", str(pid_file), "sleep", "60"), stdin=subprocess.DEVNULL
        )
        bystander = subprocess.Popen(owner.argv("sleep", "60"))
        try:
            wait_for(
                lambda: subprocess.run(["flock", "-n", str(pid_file), "true"]).returncode != 0,
                what="the lock to be held",
            )
            # Root runs postrotate; to keep the test harmless even if it misbehaves, the
            # script runs as the agent's user, which is what `kill -HUP -1` hits either way.
            result = owner.run("sh", "-c", postrotate_script(pid_file, owner.name), timeout=20)
            time.sleep(0.5)
            assert bystander.poll() is None, "postrotate signalled every process (-1)"
            assert holder.poll() is None
            assert result.returncode == 0, result.stderr
            # A pid that is not completiond is left alone too.
            pid_file.write_text(f"{bystander.pid}\n")
            owner.run("sh", "-c", postrotate_script(pid_file, owner.name), timeout=20)
            time.sleep(0.5)
            assert bystander.poll() is None
        finally:
            for proc in (holder, bystander):
                proc.kill()
                proc.wait(10)


# ---------------------------------------------------------------- M7, L4


@pytest.mark.slow
def test_m7_quotas_refuse_a_flood_and_unknown_todos_are_not_archived(make_agent) -> None:
    limits = {"limits": {"requests_per_second": 5, "bytes_per_minute": 8 * 1024 * 1024}}
    with shared_agent(make_agent, limits) as shared:
        agent = shared.agent
        output = agent.root / "big.txt"
        output.write_text("x" * (3 * 1024 * 1024))
        output.chmod(0o644)
        codes = []
        for todo in range(900001, 900006):
            result = shared.ctl("complete", str(todo), "--output-file", str(output))
            codes.append((result.returncode, result.stderr.decode()))
        refused = [err for code, err in codes if code != 0]
        assert refused and all("limits.bytes_per_minute" in err for err in refused), codes
        assert len(refused) >= 2
        # The accepted ones are refused by the writer (no such todo) and not archived.
        for todo in range(900001, 900003):
            settled(agent, todo)
        assert not any((agent.state / "archive").iterdir())
        journal = agent.state / "journal.db"
        with closing(sqlite3.connect(journal)) as db:
            biggest = db.execute(
                "SELECT MAX(LENGTH(request)) FROM entries WHERE state != 'accepted'"
            ).fetchone()[0]
        assert biggest < 64 * 1024  # the output is not kept twice per row


@pytest.mark.slow
def test_l4_a_burst_of_slow_completions_does_not_hold_up_the_owners(make_agent) -> None:
    config = {"collect": {"transcript_wait": 2.0}, "limits": {"requests_per_second": 40}}
    with shared_agent(make_agent, config) as shared:
        agent = shared.agent
        empty = agent.root / "empty.jsonl"
        empty.write_text("")
        empty.chmod(0o644)
        script = (
            "import sys\n"
            "from ctl import Client\n"
            "c = Client(sys.argv[1])\n"
            "for todo in range(800001, 800081):\n"
            "    try:\n"
            "        c.complete(todo, transcript_path=sys.argv[2], queue_when_unreachable=False)\n"
            "    except Exception as exc:\n"
            "        print(exc)\n"
        )
        result = shared.attacker.run(
            sys.executable,
            "-c",
            script,
            str(shared.client_config),
            str(empty),
            env={"PYTHONPATH": str(REPO), "HOME": "/nonexistent"},
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        mine = agent.add("mine")
        started = time.monotonic()
        assert agent.ctl("complete", str(mine), "--output", "my result").returncode == 0
        finished(agent, mine, timeout=60)
        assert time.monotonic() - started < 8.0  # it was 40 s: 80 x 2 s on 4 workers


# ---------------------------------------------------------------- L2


@pytest.mark.slow
def test_l2_control_characters_forge_no_log_line(agent: Agent) -> None:
    forged = "\n2026-01-01 00:00:00.000Z | ERROR   | agent     | todo=1 completion=- | FORGED"
    todo = agent.add("logs")
    assert agent.ctl("start", str(todo), "--session", f"s{forged}\x1b[31m").returncode == 0
    assert agent.ctl("emergency", str(todo), "--reason", f"why{forged}").returncode == 0
    logs = agent.state / "logs"

    def logged(name: str, text: str) -> bool:
        path = logs / name
        return path.exists() and text in path.read_text(errors="replace")

    wait_for(lambda: logged("emergency.log", "why"), 30, what="the emergency")
    wait_for(lambda: logged("completion.log", "FORGED"), 30, what="the collection")
    for name in ("agent.log", "completion.log", "emergency.log"):
        text = (logs / name).read_text(errors="replace")
        assert "FORGED" in text, name
        assert not any(line.startswith("2026-01-01") for line in text.splitlines()), name
        assert "\x1b" not in text, name


# ---------------------------------------------------------------- L3, L5


@pytest.mark.slow
def test_l3_socket_allowed_uids_and_a_client_only_config(make_agent) -> None:
    with group() as team, user(groups=(team,)) as member, user(groups=(team,)) as other:
        agent = make_agent(
            {"socket_mode": "0660", "socket_group": team, "socket_allowed_uids": [member.uid]}
        )
        open_path_for_others(agent.root)
        agent.start()
        client_config = agent.root / "client.toml"
        client_config.write_text(render_toml({"state_dir": str(agent.state)}))
        client_config.chmod(0o644)
        shared = Shared(agent, member, client_config)
        todo = agent.add("a todo")
        allowed = shared.ctl("complete", str(todo), "--output", "ok")
        assert allowed.returncode == 0, allowed.stderr
        refused = shared.ctl("emergency", str(todo), person=other)
        assert refused.returncode != 0
        assert "socket_allowed_uids" in refused.stderr.decode()
        assert agent.todo_status(todo)["entries"][0]["kind"] == "normal"
        assert len(agent.todo_status(todo)["entries"]) == 1


@pytest.mark.slow
def test_l5_socket_group_makes_the_state_dir_reachable_for_the_group(make_agent) -> None:
    with shared_agent(make_agent) as shared:
        state = shared.agent.state.stat()
        assert state.st_mode & 0o777 == 0o710
        import grp

        assert grp.getgrgid(state.st_gid).gr_name == shared.agent.config["socket_group"]
        result = shared.ctl("--json", "status")
        assert result.returncode == 0, result.stderr
        listing = shared.attacker.run("ls", str(shared.agent.state))
        assert listing.returncode != 0  # traversable, not readable


@pytest.mark.slow
def test_l5_cleanup_says_deleted_only_when_it_deleted(agent: Agent) -> None:
    todo = agent.add("cleanup")
    session = agent.sessions / f"claude_session_{todo}"
    session.mkdir()
    (session / "output.md").write_text("the result")
    stuck = session / "immutable"
    stuck.write_text("x")
    subprocess.run(["chattr", "+i", str(stuck)], check=True)  # even root cannot delete it
    try:
        assert agent.ctl("complete", str(todo)).returncode == 0
        finished(agent, todo)
        log = agent.state / "logs" / "monitor.log"
        wait_for(lambda: "could not delete" in log.read_text(), 20, what="the cleanup")
        assert "deleted session dir" not in log.read_text()
        assert agent.status_json()["recoveries"].get("sessions_cleaned", 0) == 0
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=False)


# ---------------------------------------------------------------- reading as the requester


def test_another_user_reads_only_what_their_modes_allow(tmpdir_short: Path) -> None:
    from agent import access

    stranger = 54321  # no passwd entry: no groups, "other" bits only
    tmp_path = tmpdir_short
    tmp_path.chmod(0o755)
    open_dir, closed_dir = tmp_path / "open", tmp_path / "closed"
    open_dir.mkdir(mode=0o755)
    closed_dir.mkdir(mode=0o700)
    for folder in (open_dir, closed_dir):
        (folder / "public").write_text("public")
        (folder / "public").chmod(0o644)
        (folder / "private").write_text("private")
        (folder / "private").chmod(0o600)
    (open_dir / "link").symlink_to(closed_dir / "public")
    fd = access.open_as(open_dir / "public", stranger)
    try:
        assert os.read(fd, 10) == b"public"
    finally:
        os.close(fd)
    refusals = []
    for path in (
        open_dir / "private",
        closed_dir / "public",
        open_dir / "link",  # resolved: the target's directory is not searchable
        open_dir / "missing",
    ):
        with pytest.raises(access.NotAllowed) as refused:
            access.open_as(path, stranger)
        refusals.append(refused.value.strerror)
    assert len(set(refusals)) == 1  # missing and unreadable look the same
    # The agent's own user reads as itself; a tcp:// peer only with collect.remote_paths.
    os.close(access.open_as(open_dir / "private", None))
    with pytest.raises(access.NotAllowed):
        access.open_as(open_dir / "public", p.REMOTE)
    os.close(access.open_as(open_dir / "public", p.REMOTE, remote_paths=True))


def test_a_fifo_or_foreign_marker_is_no_hint(tmp_path: Path) -> None:
    from protocol.markers import read_marker

    me = frozenset({os.geteuid()})
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError):
        read_marker(fifo, me)  # returns at once: no writer needed
    hint = tmp_path / "hint"
    hint.write_text("42")
    hint.chmod(0o644)
    assert read_marker(hint, me) == "42"
    hint.chmod(0o666)
    with pytest.raises(OSError, match="writable by everybody"):
        read_marker(hint, me)
    hint.chmod(0o644)
    with pytest.raises(OSError, match="belongs to uid"):
        read_marker(hint, frozenset({54321}))
    (tmp_path / "link").symlink_to(hint)
    with pytest.raises(OSError):
        read_marker(tmp_path / "link", me)


# ---------------------------------------------------------------- L1


@pytest.mark.slow
@pytest.mark.mysql
def test_l1_a_password_with_url_characters_is_shown_in_no_message(make_agent, mysql_server) -> None:
    secret = "Pw#?/S3cr"
    host = f"{mysql_server.host}:{mysql_server.port}"
    # A config error (an invalid port): completiond's and completionctl's own words.
    broken = make_agent({"database": {"url": f"mysql://wp:{secret}@{host}0000/site"}}, name="b")
    started = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(broken.config_path)],
        env=broken.env,
        capture_output=True,
        timeout=60,
    )
    assert started.returncode == 2
    said = [started.stdout + started.stderr]
    for args in (("check",), ("--json", "check"), ("status",)):
        said.append(broken.ctl(*args).stdout + broken.ctl(*args).stderr)
    # A URL that parses, with a password the server refuses: health, status, check, logs.
    agent = make_agent({"database": {"url": f"mysql://wp:{secret}@{host}/site"}})
    agent.start()
    wait_for(
        lambda: "database" in agent.ctl("--json", "health").stdout.decode(),
        30,
        what="a health round",
    )
    for args in (("--json", "health"), ("health",), ("--json", "status"), ("check",)):
        result = agent.ctl(*args)
        said.append(result.stdout + result.stderr)
    assert b"***" in b"".join(said)  # the URL is shown, masked
    agent.stop()
    for path in (agent.state / "logs").iterdir():
        said.append(path.read_bytes())
    said.append(agent.log_path.read_bytes())  # what supervisord would keep
    for text in said:
        for piece in ("Pw#", "S3cr", secret):
            assert piece.encode() not in text, text[:2000]


def test_h2_an_orphan_is_archived_once_even_across_monitor_restarts(tmp_path: Path) -> None:
    from agent.archive import archive_orphan, archived_before

    orphan = tmp_path / "claude_session_9"
    orphan.mkdir()
    (orphan / "output.md").write_text("x")
    root = tmp_path / "archive"
    assert archived_before(root, orphan, orphan.stat()) is None
    taken = archive_orphan(root, orphan, 1000.0).path
    # A new monitor (nothing in memory) finds the archive of this very dir by its identity.
    assert archived_before(root, orphan, orphan.stat()) == taken
    (orphan / "later.md").write_text("y")  # changed since: a different dir to the sweep
    os.utime(orphan, ns=(orphan.stat().st_atime_ns, orphan.stat().st_mtime_ns + 10**9))
    assert archived_before(root, orphan, orphan.stat()) is None
