"""The monitor against MariaDB through a controllable TCP proxy: the reset at the emergency
deadline while writes keep failing, timers and health during an outage, and two agents sharing
one database acting once."""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ctl import Client
from tests.dbfixtures import fetch_row, proxied_url, raw_connection, raw_execute
from tests.harness import (
    Agent,
    check_of,
    emergency_log,
    entries,
    health,
    journal_rows,
    timers,
    wait_for,
)
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.mysql


def add_todo(url: str, title: str, status: str = "offen", started_at: datetime | None = None):
    with raw_connection(url) as conn, contextlib.closing(conn.cursor()) as cur:
        cur.execute(
            "INSERT INTO stage_project_todos (title, description, status, started_at)"
            " VALUES (%s, %s, %s, %s)",
            (title, f"{title}: description", status, started_at),
        )
        return int(cur.lastrowid)


def status_of(url: str, todo_id: int) -> str:
    row = fetch_row(url, todo_id)
    assert row is not None
    return str(row["status"])


def log_kinds(url: str, todo_id: int) -> list[str]:
    rows = raw_execute(
        url, "SELECT kind FROM stage_completion_log WHERE todo_id = ? ORDER BY id", (todo_id,)
    )
    return [str(r[0]) for r in rows]


def mysql_agent(make_agent, url: str, proxy: TcpProxy | None, **behavior: Any) -> Agent:
    config = {
        "database": {"url": proxied_url(url, proxy) if proxy else url},
        "behavior": {"database_timeout": 2, "max_retries": 1, "retry_max_delay": 1, **behavior},
    }
    return make_agent(config).start()


def start(agent: Agent, url: str, todo_id: int) -> None:
    assert agent.ctl("start", str(todo_id)).returncode == 0
    wait_for(lambda: status_of(url, todo_id) == "in_progress", what=f"todo {todo_id} in_progress")


def test_emergency_deadline_resets_a_todo_whose_writes_keep_failing(
    make_agent, mysql_url: str, wordpress_table: str, tcp_proxy: TcpProxy
) -> None:
    # The emergency deadline leaves the emergency completion time to be collected and tried
    # once before it is superseded: with 7 s a loaded machine sometimes collected it too late.
    agent = mysql_agent(
        make_agent, mysql_url, tcp_proxy, completion_timeout=2, emergency_timeout=20
    )
    lost, late = add_todo(mysql_url, "Never finishes"), add_todo(mysql_url, "Finishes late")
    start(agent, mysql_url, lost)
    start(agent, mysql_url, late)
    # The outage begins once both starts are settled: a start cut off before its read-back
    # would make the writer see the outage first and only probe, never attempting the write.
    # Heartbeats until then: a slow start's verification on a loaded machine is not silence.
    client = Client(str(agent.config_path))
    for todo in (lost, late):
        wait_for(
            lambda t=todo: (
                all(client.heartbeat(x).state == "accepted" for x in (lost, late))
                and [e["state"] for e in entries(agent, t, "start")] == ["cleaned"]
            ),
            interval=0.3,
            what=f"the start of {todo} verified",
        )
    tcp_proxy.mode = "refuse"
    tcp_proxy.cut()

    # The completion deadline fires; the emergency completion cannot land.
    # Either the writer tried it and failed, or it had already seen the outage and holds it
    # (probing once a second, trying nothing): on a loaded machine both orders happen.
    def held_back() -> bool:
        emg = entries(agent, lost, "emergency")
        if not emg or emg[0]["state"] != "collected":
            return False
        if emg[0]["attempts"] >= 1:
            return True
        report = health(agent)
        return bool(report) and check_of(report[1], "database")["status"] == "CRITICAL"

    wait_for(held_back, 30, what="the emergency completion held back by the outage")
    emg = entries(agent, lost, "emergency")[0]
    if emg["attempts"] >= 1:
        assert "will retry" in emg["last_error"]
    code, report = wait_for(
        lambda: (r := health(agent)) and check_of(r[1], "database")["status"] == "CRITICAL" and r,
        what="database CRITICAL",
    )
    assert (code, report["status"]) == (2, "CRITICAL")

    # The emergency deadline: the waiting emergency completions are superseded by resets.
    for todo in (lost, late):
        wait_for(lambda t=todo: entries(agent, t, "reset"), 40, what=f"reset of {todo}")
        [emg] = entries(agent, todo, "emergency")
        assert (emg["state"], emg["outcome"]) == ("failed", "superseded")
    alert = emergency_log(agent)
    assert f"ALERT: todo {lost} reached its emergency deadline" in alert
    assert "Manual intervention needed" in alert and "memory" in alert
    assert status_of(mysql_url, lost) == "in_progress"  # nothing reached the database yet

    # A real result that arrives after its reset was queued is written after it: never lost.
    result = agent.ctl("complete", str(late), "--output", "the real result")
    assert result.returncode == 0, result.stderr

    tcp_proxy.mode = "pass"
    wait_for(lambda: status_of(mysql_url, lost) == "offen", 20, what="the reset to land")
    wait_for(lambda: status_of(mysql_url, late) == "completed", 20, what="the late result")
    assert log_kinds(mysql_url, lost) == ["reset"]
    assert log_kinds(mysql_url, late) == ["reset", "normal"]
    assert "the real result" in str(fetch_row(mysql_url, late)["claude_text_output"])
    wait_for(
        lambda: (
            [(e["kind"], e["state"]) for e in entries(agent, lost)]
            == [("start", "cleaned"), ("emergency", "failed"), ("reset", "cleaned")]
        ),
        what="the journal to settle",
    )
    report = health(agent)[1]
    assert check_of(report, "refused")["status"] == "OK"
    assert agent.status_json()["recoveries"] == {"deadline_emergencies": 2, "deadline_resets": 2}


def test_timers_fire_on_time_and_health_answers_while_the_database_hangs(
    make_agent, mysql_url: str, wordpress_table: str, tcp_proxy: TcpProxy
) -> None:
    agent = mysql_agent(
        make_agent, mysql_url, tcp_proxy, completion_timeout=2, emergency_timeout=60
    )
    todo = add_todo(mysql_url, "Outage")
    start(agent, mysql_url, todo)
    tcp_proxy.mode = "blackhole"  # connections accepted, nothing answers: the worst outage
    tcp_proxy.cut()
    due = timers(agent, todo)["completion_due"]
    wait_for(lambda: entries(agent, todo, "emergency"), 10, what="the emergency completion")
    [emergency] = entries(agent, todo, "emergency")
    assert emergency["created_at"] - due < 1.5  # on time, though nothing can be written

    # `health` never waits on the database: the parent answers from the journal at once.
    for _ in range(3):
        started = time.monotonic()
        result = agent.ctl("--timeout", "1", "--json", "health")
        assert result.returncode in (0, 1, 2), result.stderr  # 3 would be "no answer"
        assert time.monotonic() - started < 3
    wait_for(
        lambda: check_of(health(agent)[1], "database")["status"] == "CRITICAL",
        what="database CRITICAL",
    )
    assert status_of(mysql_url, todo) == "in_progress"

    tcp_proxy.mode = "pass"
    wait_for(lambda: status_of(mysql_url, todo) == "completed", 30, what="the emergency to land")
    assert log_kinds(mysql_url, todo) == ["emergency"]


def test_two_agents_sharing_one_database_act_on_a_hanging_todo_once(
    make_agent, mysql_url: str, wordpress_table: str
) -> None:
    behavior = {
        "enable_robust_completion": False,
        "hanging_after": 1,
        "health_check_interval": 0.3,
        "auto_recovery_scope": "all",  # both may act on a todo neither of them started
    }
    config = {"database": {"url": mysql_url}, "behavior": {"database_timeout": 2, **behavior}}
    long_ago = datetime.now(UTC).replace(tzinfo=None, microsecond=0) - timedelta(hours=2)
    todo = add_todo(mysql_url, "Abandoned", status="in_progress", started_at=long_ago)
    agents = [make_agent(config, name="one"), make_agent(config, name="two")]
    for agent in agents:
        agent.start(wait=False)
    for agent in agents:
        agent.wait_ready()
    wait_for(lambda: status_of(mysql_url, todo) == "completed", 20, what="the forced completion")

    def settled() -> bool:
        pending = [
            r
            for agent in agents
            for r in journal_rows(
                agent, "SELECT state FROM entries WHERE state IN ('accepted','collected','written')"
            )
        ]
        return not pending

    wait_for(settled, 20, what="both journals to settle")
    kinds = log_kinds(mysql_url, todo)
    assert kinds.count("emergency") == 1, kinds
    assert set(kinds) <= {"emergency", "duplicate"}
    outcomes = sorted(e["outcome"] for agent in agents for e in entries(agent, todo))
    assert outcomes.count("applied") == 1, outcomes
    assert set(outcomes) <= {"applied", "already", "duplicate"}
