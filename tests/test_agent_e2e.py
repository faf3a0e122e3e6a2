"""The whole path through the real processes on the embedded default (SQLite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import zmq

import protocol as p
from tests.harness import Agent, wait_for


def test_add_start_complete_lands_escaped_report_and_one_log_row(agent: Agent) -> None:
    todo = agent.add("Fix <login>", description="validate & check")
    assert agent.ctl("start", str(todo), "--session", "s-1").returncode == 0
    wait_for(lambda: agent.todo_row(todo)["status"] == "in_progress", what="in_progress")
    result = agent.ctl("complete", str(todo), "--output", '<script>alert("x")</script> all done')
    assert result.returncode == 0, result.stderr
    agent.wait_states(todo, "cleaned", "cleaned")
    row = agent.todo_row(todo)
    assert row["status"] == "completed"
    assert row["completed_at"] and row["started_at"]
    report = row["claude_html_output"]  # Markdown, the form the todo plugin renders
    assert report.startswith(f"✅ Todo #{todo} erledigt: Fix <\u200blogin>\n")
    # The output is an indented code block: escaped by every renderer, readable in <pre>.
    assert '\n    <script>alert("x")</script> all done\n' in report
    assert "all done" in row["claude_text_output"]
    logs = agent.log_rows(todo)
    assert [(r["kind"], r["sources"]) for r in logs] == [("normal", "message")]


def test_duplicate_completion_is_recorded_and_changes_nothing(agent: Agent) -> None:
    todo = agent.add("Twice")
    agent.ctl("complete", str(todo), "--output", "first")
    agent.wait_states(todo, "cleaned")
    before = agent.todo_row(todo)
    agent.ctl("complete", str(todo), "--output", "second")
    status = agent.wait_states(todo, "cleaned", "cleaned")
    assert status["entries"][1]["outcome"] == "duplicate"
    after = agent.todo_row(todo)
    assert after == before
    assert [r["kind"] for r in agent.log_rows(todo)] == ["normal", "duplicate"]


def test_same_request_id_delivered_twice_applies_once(agent: Agent) -> None:
    from ctl import Client

    todo = agent.add("Once")
    client = Client(str(agent.config_path))
    first = client.complete(todo, output="x", request_id="fixed-id-1")
    second = client.complete(todo, output="x", request_id="fixed-id-1")
    assert first.completion_id == second.completion_id == "fixed-id-1"
    agent.wait_states(todo, "cleaned")
    assert [r["kind"] for r in agent.log_rows(todo)] == ["normal"]


def test_sigterm_stops_everything_within_ten_seconds(agent: Agent) -> None:
    family = agent.family()
    assert len(family) >= 4
    started = time.monotonic()
    code = agent.stop(timeout=15)
    assert code == 0
    assert time.monotonic() - started < 10
    wait_for(
        lambda: (
            not any(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE for proc in family)
        ),
        5,
        what="no process left",
    )
    assert not (agent.state / "completiond.sock").exists()
    assert not (agent.state / "completiond.pid").exists()
    assert not list(agent.state.glob("bell-*.sock"))  # every child removed its doorbell


def test_killed_child_is_restarted_and_its_waiting_work_is_done(agent: Agent) -> None:
    todo = agent.add("Survives a writer kill")
    writer = agent.children()["writer"]
    os.kill(writer, signal.SIGKILL)
    # Accepted while the writer is dead: the journal holds it until the new writer starts.
    assert agent.ctl("complete", str(todo), "--output", "done").returncode == 0
    wait_for(lambda: agent.children().get("writer") not in (None, writer), what="a new writer")
    agent.wait_states(todo, "cleaned")
    assert agent.todo_row(todo)["status"] == "completed"
    status = agent.status_json()
    assert status["restarts"]["writer"] == 1


def test_request_while_agent_is_down_is_queued_and_delivered_after_start(make_agent) -> None:
    agent = make_agent()
    agent.start()
    todo = agent.add("Queued")
    assert agent.stop() == 0
    result = agent.ctl("complete", str(todo), "--output", "made while down")
    assert result.returncode == 3
    assert b"queued" in result.stderr
    assert len(list((agent.state / "outbox").glob("*.req"))) == 1
    status = agent.ctl("status")  # says what waits, though nobody answers
    assert status.returncode == 3
    assert b"1 queued request(s) in" in status.stderr, status.stderr
    agent.start()
    agent.wait_states(todo, "cleaned")
    assert "made while down" in agent.todo_row(todo)["claude_text_output"]
    assert list((agent.state / "outbox").glob("*.req")) == []


def test_second_agent_on_same_state_dir_is_refused(agent: Agent) -> None:
    before = agent.status_json()
    second = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(agent.config_path)],
        env=agent.env,
        capture_output=True,
        timeout=30,
    )
    assert second.returncode == 3
    assert b"another completiond" in second.stderr
    assert agent.status_json()["pid"] == before["pid"]
    assert (agent.state / "completiond.sock").exists()


def test_bad_config_key_exits_2_naming_the_key(tmpdir_short) -> None:
    config = tmpdir_short / "bad.toml"
    config.write_text(f'state_dir = "{tmpdir_short}/s"\n[behavior]\ncompletion_timout = 5\n')
    result = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config)], capture_output=True, timeout=30
    )
    assert result.returncode == 2
    assert b"completion_timout" in result.stderr
    assert b"behavior" in result.stderr
    assert not (tmpdir_short / "s").exists()


def test_wrong_type_in_json_config_exits_2_naming_the_key(tmpdir_short) -> None:
    config = tmpdir_short / "bad.json"
    config.write_text('{"behavior": {"max_retries": "three"}}')
    result = subprocess.run(
        [sys.executable, "-m", "ctl", "--config", str(config), "status"],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert b"behavior.max_retries" in result.stderr


def test_garbage_frames_leave_the_agent_serving(agent: Agent) -> None:
    ctx = zmq.Context.instance()
    endpoint = f"ipc://{agent.state / 'completiond.sock'}"
    garbage = [
        b"",
        b"\x00\xff\xfe",
        p.encode(p.Ping()).replace(b"ping", b"pong"),
        b"\x92\x63\xc0",  # [99, nil]: a future protocol version
        b"\x92\x01\x81\xa4type\xa8complete",  # a complete with no todo
        b"\x92\x01\x82\xa4type\xa8complete\xa7todo_id\xd3\x80\x00\x00\x00\x00\x00\x00\x00",
    ]
    for frame in garbage:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(endpoint)
        req.send(frame)
        assert req.poll(5000), f"no reply to {frame!r}"
        reply = p.decode_reply(req.recv())
        assert isinstance(reply, p.Error), frame
        req.close()
    # Raw multipart garbage from a DEALER (no REQ envelope) and an oversize frame.
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    dealer.send_multipart([b"a", b"b", b"c", b"d"])
    dealer.send_multipart([b"", b"x" * (p.MAX_FRAME_BYTES + 10)])
    assert dealer.poll(5000)
    replies = []
    while dealer.poll(2000):
        replies.append(p.decode_reply(dealer.recv_multipart()[-1]))
    assert any(isinstance(r, p.Error) and r.code == p.ErrorCode.TOO_LARGE for r in replies)
    dealer.close()
    todo = agent.add("Still served")
    assert agent.ctl("complete", str(todo), "--output", "ok").returncode == 0
    agent.wait_states(todo, "cleaned")


@pytest.mark.parametrize("todo_id", ["0", "-3", "x", str(2**63)])
def test_a_bad_todo_id_is_a_usage_error_and_queues_nothing(make_agent, todo_id: str) -> None:
    agent = make_agent()
    result = agent.ctl("complete", "--output", "x", "--", todo_id)
    assert result.returncode == 2
    assert b"not a todo id" in result.stderr
    assert not list((agent.state / "outbox").glob("*.req"))


@pytest.mark.parametrize("command", [["status", "999"], ["retry", "nope"]])
def test_refusals_exit_1_with_a_sentence(agent: Agent, command: list[str]) -> None:
    result = agent.ctl(*command)
    assert result.returncode == 1
    assert b"refused" in result.stderr


def test_missing_todo_is_acked_then_refused_and_reported(agent: Agent) -> None:
    result = agent.ctl("complete", "4242", "--output", "for nobody")
    assert result.returncode == 0
    status = wait_for(
        lambda: (s := agent.todo_status(4242)) and s["entries"][0]["state"] == "failed" and s,
        what="refusal",
    )
    assert "does not exist" in status["entries"][0]["last_error"]
    health = agent.ctl("--json", "health")
    assert health.returncode == 1
    assert b"refused" in health.stdout


def test_refused_start_leaves_no_deadline_behind(agent: Agent) -> None:
    assert agent.ctl("start", "998", "--timeout", "600").returncode == 0
    status = wait_for(
        lambda: (s := agent.todo_status(998)) and s["entries"][0]["state"] == "failed" and s,
        what="the start to be refused",
    )
    status = wait_for(
        lambda: (s := agent.todo_status(998)) and not s["deadlines"] and s,
        what="the refused start's deadlines to be disarmed",
    )
    assert "start refused" in status["note"]
    assert "does not exist" in status["note"]


def test_health_reports_children_and_journal(agent: Agent) -> None:
    result = agent.ctl("--json", "health")
    report = json.loads(result.stdout)
    # The full list of check names is pinned by test_monitor's health test.
    assert [c["name"] for c in report["checks"]][:2] == ["children", "journal"]
    assert report["checks"][0]["status"] == "OK"
    assert result.returncode == {"OK": 0, "WARNING": 1, "CRITICAL": 2}[report["status"]]


def test_health_exits_3_when_agent_is_unreachable(make_agent) -> None:
    agent = make_agent()
    result = agent.ctl("health")
    assert result.returncode == 3
    assert b"no agent socket" in result.stderr
