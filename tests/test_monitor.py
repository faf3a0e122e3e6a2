"""The monitor through the real processes (embedded SQLite): deadlines, heartbeats, emergency
completion, waiting for a person, kill -9 of the whole agent, auto-recovery, health."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any

from ctl import Client
from tests.harness import (
    Agent,
    check_of,
    emergency_log,
    entries,
    health,
    timers,
    wait_for,
    wait_health_round_after,
    wait_kinds,
)

FAST = {"behavior": {"completion_timeout": 2, "emergency_timeout": 60}}


def start(agent: Agent, todo_id: int, *args: str) -> None:
    result = agent.ctl("start", str(todo_id), *args)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: agent.todo_row(todo_id)["status"] == "in_progress", what="in_progress")


# ------------------------------------------------------------------ deadlines


def test_past_its_completion_deadline_a_todo_is_emergency_completed_once(make_agent) -> None:
    agent = make_agent(FAST).start()
    todo = agent.add("Hangs", description="never says it is done")
    session = agent.sessions / f"claude_session_{todo}"
    session.mkdir()
    (session / "output.md").write_text("half of the work")
    start(agent, todo)
    wait_kinds(agent, todo, [("start", "cleaned"), ("emergency", "cleaned")])
    [emergency] = entries(agent, todo, "emergency")
    assert "completion deadline passed" in emergency["reason"]
    row = agent.todo_row(todo)
    assert row["status"] == "completed"
    assert row["claude_summary"].startswith("⚠️ Notabschluss: ")
    assert "## Erzwungener Abschluss" in row["claude_html_output"]
    # The journal and the log keep the reason in English; the report says it in report.language.
    assert "kein Abschluss und kein Lebenszeichen seit 2 s" in row["claude_html_output"]
    assert "no completion" not in row["claude_html_output"] + row["claude_summary"]
    assert "half of the work" in row["claude_text_output"]
    assert [r["kind"] for r in agent.log_rows(todo)] == ["emergency"]
    log = emergency_log(agent)
    assert "emergency completion: no completion and no heartbeat" in log
    assert "memory" in log and "load" in log and "collector" in log  # the system status
    assert "memory" in row["claude_html_output"]
    # Archived, and kept: the session may still run and its real result may follow.
    assert list((agent.state / "archive").glob(f"todo_{todo}_*/session/output.md"))
    assert session.is_dir()
    wait_health_round_after(agent, time.time())
    assert len(entries(agent, todo, "emergency")) == 1
    assert [r["kind"] for r in agent.log_rows(todo)] == ["emergency"]
    status = agent.todo_status(todo)
    # The completion deadline fired; the emergency deadline (reset) is cancelled by the landing.
    assert [(d["name"], d["fired"]) for d in status["deadlines"]] == [("completion", True)]
    assert agent.status_json()["recoveries"] == {"deadline_emergencies": 1}


def test_heartbeats_keep_a_todo_alive_and_silence_lets_the_deadline_fire(make_agent) -> None:
    # A 4 s timeout with a heartbeat every 0.4 s: a loaded machine may stretch one gap, not ten.
    agent = make_agent({"behavior": {"completion_timeout": 4, "emergency_timeout": 60}}).start()
    todo = agent.add("Busy")
    client = Client(str(agent.config_path))
    # Heartbeats from the start's ack on: waiting for the database is not silence.
    assert client.start(todo, session_id="s-busy").state == "accepted"
    wait_for(
        lambda: (
            client.heartbeat(todo, session_id="s-busy").state == "accepted"
            and agent.todo_row(todo)["status"] == "in_progress"
        ),
        interval=0.4,
        what="in_progress",
    )
    beats = 0
    while beats < 25:  # 10 s: 2.5 completion timeouts of steady heartbeats
        assert client.heartbeat(todo, session_id="s-busy").state == "accepted"
        assert entries(agent, todo, "emergency") == []
        beats += 1
        time.sleep(0.4)
    last_heard = timers(agent, todo)["last_heard_at"]
    wait_for(lambda: entries(agent, todo, "emergency"), 20, what="the emergency completion")
    [emergency] = entries(agent, todo, "emergency")
    assert emergency["created_at"] - last_heard >= 4.0
    assert emergency["created_at"] - last_heard < 4.0 + 10.0  # generous: a loaded machine


def test_a_normal_completion_cancels_both_deadlines(make_agent) -> None:
    # Generous windows: on a loaded machine the start-complete round trip of `done` must never
    # outlast its own completion deadline.
    agent = make_agent({"behavior": {"completion_timeout": 5, "emergency_timeout": 8}}).start()
    done, control = agent.add("Completed in time"), agent.add("Control")
    # Started and completed back to back through the client: the completion arrives well
    # inside its deadline however loaded the machine (a CLI call may take seconds there).
    client = Client(str(agent.config_path))
    assert client.start(done).state == "accepted"
    assert client.complete(done, output="all good").state == "accepted"
    start(agent, control)
    control_due = timers(agent, control)["emergency_due"]
    wait_kinds(agent, done, [("start", "cleaned"), ("normal", "cleaned")])
    assert agent.todo_status(done)["deadlines"] == []
    # The control was started later with the same timeouts.  A health round that starts after
    # its emergency deadline means the monitor's loop looked at every deadline since then.
    wait_health_round_after(agent, control_due)
    assert [e["kind"] for e in entries(agent, control)] == ["start", "emergency"]
    assert [e["kind"] for e in entries(agent, done)] == ["start", "normal"]
    assert [r["kind"] for r in agent.log_rows(done)] == ["normal"]
    assert agent.todo_row(done)["claude_text_output"].startswith("all good")


def _kill_family(agent: Agent) -> None:
    """kill -9 of completiond and every child, all at once (no one gets to clean up)."""
    family = agent.family()
    assert len(family) >= 4
    for process in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    assert agent.proc is not None
    agent.proc.wait(10)
    for process in family:
        with contextlib.suppress(Exception):
            process.wait(10)


def test_a_deadline_armed_before_kill_9_of_the_whole_agent_fires_after_restart_once(
    make_agent,
) -> None:
    agent = make_agent().start()  # default timeouts: the per-todo --timeout arms this one
    todo = agent.add("Armed, then the machine lost the agent")
    start(agent, todo, "--timeout", "3")
    due = timers(agent, todo)["completion_due"]
    _kill_family(agent)
    wait_for(lambda: time.time() > due + 0.5, 10, what="the deadline to pass while down")
    agent.start()
    wait_kinds(agent, todo, [("start", "cleaned"), ("emergency", "cleaned")])
    assert [r["kind"] for r in agent.log_rows(todo)] == ["emergency"]
    # Another restart (clean this time) does not fire it again.
    assert agent.stop() == 0
    restarted = time.time()
    agent.start()
    wait_health_round_after(agent, restarted)
    assert len(entries(agent, todo, "emergency")) == 1
    assert [r["kind"] for r in agent.log_rows(todo)] == ["emergency"]


def test_completionctl_emergency_forces_a_completion_now(make_agent) -> None:
    agent = make_agent().start()
    todo = agent.add("Stuck")
    start(agent, todo)
    result = agent.ctl("emergency", str(todo), "--reason", "stuck on a prompt <b>")
    assert result.returncode == 0, result.stderr
    wait_kinds(agent, todo, [("start", "cleaned"), ("emergency", "cleaned")])
    row = agent.todo_row(todo)
    assert row["status"] == "completed"
    # Markdown: the "<" is followed by a zero-width space, so it opens no tag in any view.
    assert "stuck on a prompt <\u200bb>" in row["claude_html_output"]
    assert [r["kind"] for r in agent.log_rows(todo)] == ["emergency"]
    assert timers(agent, todo)["completion_fired"] == 1  # the deadline will not add another
    assert "emergency completion requested: stuck on a prompt" in emergency_log(agent)


# ------------------------------------------------------------------ waiting for a person


def _hook(agent: Agent, payload: dict[str, Any]) -> None:
    result = agent.ctl("hook", input=json.dumps(payload))
    assert result.returncode == 0 and result.stdout == b"", result.stderr


def test_a_todo_waiting_for_a_person_is_reported_not_completed(make_agent) -> None:
    # 3 s: the Notification must arrive before the deadline even on a loaded machine.
    agent = make_agent({"behavior": {"completion_timeout": 3, "emergency_timeout": 60}}).start()
    waiting, control = agent.add("Asks for permission"), agent.add("Control")
    start(agent, waiting, "--session", "s-wait")
    _hook(
        agent,
        {
            "hook_event_name": "Notification",
            "session_id": "s-wait",
            "notification_type": "permission_prompt",
            "message": "Claude needs your permission to use Bash",
        },
    )
    start(agent, control)
    code, report = health(agent)
    check = check_of(report, "waiting_for_person")
    assert (check["status"], check["todo_ids"]) == ("WARNING", [waiting])
    assert "permission_prompt" in check["message"]
    assert code == 1 and report["status"] == "WARNING"
    # The control, started after, passed its deadline: so did the waiting todo.
    wait_for(lambda: entries(agent, control, "emergency"), 15, what="control's emergency")
    wait_health_round_after(agent, time.time())
    assert entries(agent, waiting, "emergency") == []
    assert timers(agent, waiting)["completion_fired"] == 0
    assert waiting not in check_of(health(agent)[1], "hanging_todos")["todo_ids"]
    assert "waits for a person" in (agent.state / "logs" / "monitor.log").read_text()
    # The person answered: activity resumes, and silence counts from now.
    resumed = time.time()
    _hook(agent, {"hook_event_name": "PostToolUse", "session_id": "s-wait", "tool_name": "Bash"})
    assert check_of(health(agent)[1], "waiting_for_person")["status"] == "OK"
    wait_for(lambda: entries(agent, waiting, "emergency"), 15, what="the deadline after resuming")
    assert entries(agent, waiting, "emergency")[0]["created_at"] >= resumed + 1.5


def test_the_clients_waiting_marks_a_todo_too(make_agent) -> None:
    agent = make_agent().start()
    todo = agent.add("Idle")
    start(agent, todo)
    Client(str(agent.config_path)).waiting(todo, reason="idle_prompt: waiting for your input")
    assert check_of(health(agent)[1], "waiting_for_person")["todo_ids"] == [todo]
    assert agent.todo_status(todo)["waiting"].startswith("idle_prompt")


# ------------------------------------------------------------------ auto-recovery and health


def test_auto_recovery_acts_once_logged_and_counted(make_agent) -> None:
    agent = make_agent(
        {
            "behavior": {
                "enable_robust_completion": False,  # only the hanging check acts
                "hanging_after": 1,
                "health_check_interval": 0.3,
            },
            "marker": {"stale_after": 1},
        }
    )
    orphan = agent.sessions / "claude_session_999"
    orphan.mkdir()
    (orphan / "notes.txt").write_text("from a session long gone")
    marker = agent.root / "TASK_COMPLETED"
    marker.write_text("")
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    os.utime(marker, (old, old))
    agent.start()
    todo = agent.add("Goes silent")
    start(agent, todo)
    wait_kinds(agent, todo, [("start", "cleaned"), ("emergency", "cleaned")])
    [forced] = entries(agent, todo, "emergency")
    assert forced["completion_id"].startswith(f"hang-{todo}-")
    assert "auto-recovery" in forced["reason"]
    assert agent.todo_row(todo)["status"] == "completed"
    wait_for(lambda: not orphan.exists() and not marker.exists(), what="orphan and marker gone")
    assert list((agent.state / "archive").glob("orphaned_claude_session_999_*/session/notes.txt"))
    wait_health_round_after(agent, time.time())
    wait_health_round_after(agent, time.time())
    assert len(entries(agent, todo, "emergency")) == 1
    assert [r["kind"] for r in agent.log_rows(todo)] == ["emergency"]
    recoveries = agent.status_json()["recoveries"]
    assert recoveries == {"forced_completions": 1, "orphans_archived": 1, "markers_removed": 1}
    monitor_log = (agent.state / "logs" / "monitor.log").read_text()
    assert monitor_log.count("auto-recovery: forced completion of hanging todo") == 1
    assert "auto-recovery: archived orphaned session dir" in monitor_log
    assert "auto-recovery: removed stale marker" in monitor_log
    assert "auto-recovery: forced completion" in emergency_log(agent)
    text = agent.ctl("status").stdout.decode()
    assert "forced_completions 1" in text


def test_health_json_names_every_check_and_exits_0_when_all_is_well(agent: Agent) -> None:
    def settled():
        code, report = health(agent)
        unknown = [c for c in report["checks"] if c["status"] == "UNKNOWN"]
        return (code, report) if not unknown else None

    code, report = wait_for(settled, what="the monitor's first health round")
    assert [c["name"] for c in report["checks"]] == [
        "children",
        "journal",
        "database",
        "hanging_todos",
        "predicted_hangs",
        "waiting_for_person",
        "orphaned_sessions",
        "stale_markers",
        "db_consistency",
        "log_sizes",
        "refused",
    ]
    assert all(set(c) == {"name", "status", "message", "todo_ids"} for c in report["checks"])
    assert (code, report["status"]) == (0, "OK")
    text = agent.ctl("health")
    assert text.returncode == 0 and b"hanging_todos" in text.stdout


def test_health_exits_3_on_a_usage_error(agent: Agent) -> None:
    assert agent.ctl("health", "--bogus").returncode == 3


def test_the_monitor_removes_a_half_built_archive_left_by_a_killed_collector(make_agent) -> None:
    agent = make_agent()
    archive = agent.state / "archive"
    archive.mkdir(parents=True)
    stale = archive / ".todo_3_1700000000.k1ll3d.tmp"
    (stale / "session").mkdir(parents=True)
    (stale / "session" / "notes.md").write_text("half copied")
    an_hour_ago = time.time() - 3700
    os.utime(stale, (an_hour_ago, an_hour_ago))
    building = archive / ".todo_4_1700000000.now.tmp"  # recent: a builder may still be at it
    building.mkdir()
    agent.start()
    wait_for(lambda: not stale.exists(), what="the stale staging dir removed")
    assert building.is_dir()
    wait_for(
        lambda: (
            f"removed the half-built archive {stale.name}"
            in (agent.state / "logs" / "monitor.log").read_text()
        ),
        what="the removal logged",
    )
