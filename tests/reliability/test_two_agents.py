"""Two agents (two state dirs) on one MariaDB: the same hanging todo and the same duplicated
completions are acted on exactly once, whichever agent gets there first."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from ctl import Client
from tests.dbfixtures import raw_execute
from tests.harness import wait_for
from tests.reliability.conftest import add_todos
from tests.reliability.ledger import Ledger, budget, check, scaled, settle, snapshot
from tests.reliability.scenario import client_for

pytestmark = [pytest.mark.reliability, pytest.mark.mysql, pytest.mark.slow]


@pytest.mark.timeout(budget(240))
def test_two_agents_act_once_on_the_same_todos(mysql_agent, mysql_url) -> None:
    config = {
        "behavior": {
            "auto_recovery_scope": "all",  # both judge a todo neither of them started
            "hanging_after": 5,
            "health_check_interval": 0.5,
        }
    }
    a = mysql_agent(config, name="a").start()
    b = mysql_agent(config, name="b").start()
    pairs = scaled(40)
    ids = add_todos(mysql_url, pairs + 1)
    hanging, todos = ids[0], ids[1:]
    before = snapshot(mysql_url)
    ledger = Ledger("two agents, one database")
    clients = [Client(str(agent.config_path), timeout=5) for agent in (a, b)]

    # The same completions, sent to both agents at once: one request id delivered to both (a
    # retried hook), and each agent's own completion of the same todo (two hosts' hooks).
    barrier = threading.Barrier(2)

    def send(which: int) -> None:
        client = clients[which]
        for n, todo in enumerate(todos):
            barrier.wait()
            ledger.complete(client, todo, f"shared completion of {todo}", request_id=f"shared-{n}")
            ledger.complete(client, todo, f"agent {'ab'[which]}'s completion of {todo}")

    threads = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    # Meanwhile a todo hangs: in_progress since long before hanging_after, started by no one.
    since = (datetime.now(UTC) - timedelta(hours=2)).replace(tzinfo=None, microsecond=0)
    raw_execute(
        mysql_url,
        "UPDATE stage_project_todos SET status = 'in_progress', started_at = ? WHERE id = ?",
        (since, hanging),
    )
    for t in threads:
        t.join(120)

    def hang_rows() -> list[tuple]:
        return raw_execute(
            mysql_url,
            "SELECT completion_id, kind FROM stage_completion_log WHERE todo_id = ?",
            (hanging,),
        )

    wait_for(hang_rows, 60, what="the hanging todo to be force-completed")
    for agent in (a, b):
        settle(lambda agent=agent: client_for(agent))
    # Both agents saw the same hang; each queued a forced completion for it (the same id,
    # derived from the todo and its started_at), and only one of them acted.
    forced = [
        client_for(agent).status().agent.recoveries.get("forced_completions", 0)  # type: ignore[union-attr]
        for agent in (a, b)
    ]
    rows = hang_rows()
    assert [kind for _, kind in rows if kind != "duplicate"] == ["emergency"], rows
    status = raw_execute(
        mysql_url, "SELECT status FROM stage_project_todos WHERE id = ?", (hanging,)
    )[0][0]
    assert status == "completed"
    verdict = check(
        ledger,
        mysql_url,
        before,
        extra_ids=[cid for cid, _ in rows],
        faults=2 * pairs + 1,
        note=f"{pairs} todos completed through both agents at once (a shared request id and "
        f"one of each), one hanging todo both judged (forced {sum(forced)}x, acted on once)",
    )
    # The ledger does not know the forced completion; it is the one acting row of its todo.
    verdict.assert_clean()
    for agent in (a, b):
        assert agent.stop() == 0
