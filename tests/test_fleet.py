"""The fleet registry on a real MariaDB: three agents on one database upsert their rows, `health
--fleet` lists them, an agent killed with SIGKILL turns into a WARNING on the others, and its
hanging todo is taken over and force-completed by exactly one survivor."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable

import pytest

from agent.fleet import agent_id
from protocol.config import load
from tests.dbfixtures import fetch_row, raw_execute
from tests.harness import Agent, wait_for

pytestmark = [pytest.mark.mysql, pytest.mark.slow]


def fleet_json(agent: Agent) -> tuple[int, dict]:
    done = agent.ctl("--json", "health", "--fleet", timeout=30)
    return done.returncode, json.loads(done.stdout or "{}")


def check(agent: Agent, name: str) -> dict:
    done = agent.ctl("--json", "health", timeout=10)
    checks = json.loads(done.stdout or "{}").get("checks", [])
    return next((c for c in checks if c["name"] == name), {})


def test_fleet_lists_agents_warns_on_a_silent_one_and_one_survivor_recovers_its_todo(
    mysql_url: str, wordpress_table: str, make_agent: Callable[..., Agent]
) -> None:
    config = {
        "database": {"url": mysql_url},
        "behavior": {"hanging_after": 4, "health_check_interval": 0.5},
        "fleet": {"stale_after": 2},
    }
    agents = [make_agent(config, name=name).start() for name in ("a", "b", "c")]
    ids = [agent_id(load(str(a.config_path))) for a in agents]
    assert len(set(ids)) == 3

    def listed() -> dict | None:
        code, report = fleet_json(agents[1])
        seen = {m["agent_id"]: m for m in report.get("agents", [])}
        return report if code == 0 and set(ids) <= set(seen) else None

    report = wait_for(listed, 60, what="three agents in the fleet registry")
    for member in report["agents"]:
        assert member["pid"] > 0 and member["version"] and not member["stale"]
        assert member["host"] == os.uname().nodename
    wait_for(lambda: check(agents[0], "fleet").get("status") == "OK", 30, what="fleet OK")

    raw_execute(
        mysql_url,
        f"INSERT INTO {wordpress_table} (title, status, working_directory)"
        " VALUES ('started by a', 'offen', '/tmp')",
    )
    todo_id = int(raw_execute(mysql_url, f"SELECT MAX(id) FROM {wordpress_table}")[0][0])
    assert agents[0].ctl("start", str(todo_id)).returncode == 0
    wait_for(
        lambda: (
            raw_execute(
                mysql_url,
                "SELECT agent_id FROM stage_completion_claims WHERE todo_id = %s",
                (todo_id,),
            )
            == [(ids[0],)]
        ),
        30,
        what="agent a's claim on the todo",
    )
    assert fetch_row(mysql_url, todo_id)["status"] == "in_progress"

    # Agent a vanishes: its whole process family, at once.
    for proc in agents[0].family():
        os.kill(proc.pid, signal.SIGKILL)

    warning = wait_for(
        lambda: (c := check(agents[1], "fleet")).get("status") == "WARNING" and c,
        30,
        what="a WARNING about the silent agent",
    )
    assert ids[0] in warning["message"]
    code, report = fleet_json(agents[2])
    assert code == 1 and report["status"] == "WARNING"
    assert [m["agent_id"] for m in report["agents"] if m["stale"]] == [ids[0]]

    wait_for(
        lambda: fetch_row(mysql_url, todo_id)["status"] == "completed",
        60,
        what="a survivor to recover the vanished agent's todo",
    )
    owner = raw_execute(
        mysql_url, "SELECT agent_id FROM stage_completion_claims WHERE todo_id = %s", (todo_id,)
    )[0][0]
    assert owner in ids[1:]
    rows = raw_execute(
        mysql_url, "SELECT kind FROM stage_completion_log WHERE todo_id = %s", (todo_id,)
    )
    assert rows == [("emergency",)]
    took = ["took over todo" in (a.state / "logs" / "monitor.log").read_text() for a in agents[1:]]
    assert sorted(took) == [False, True], took
    for agent in agents[1:]:
        agent.stop()
