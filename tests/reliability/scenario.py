"""Running one scenario: an agent on MariaDB behind the proxy, a stream of completions, faults
injected by the test, then the exactly-once check."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

from ctl import AgentUnavailable, Client, CommandRefused
from tests.harness import Agent, wait_for
from tests.reliability.conftest import add_todos
from tests.reliability.ledger import Ledger, Observer, Stream, check, settle, snapshot

Inject = Callable[[Agent, Ledger, Observer, random.Random], None]


def client_for(agent: Agent, timeout: float = 2.0) -> Client:
    """One client per agent and timeout, reused: status is polled many times a second."""
    cache = agent.__dict__.setdefault("_clients", {})
    if timeout not in cache:
        cache[timeout] = Client(str(agent.config_path), timeout=timeout)
    return cache[timeout]


def children(agent: Agent) -> dict[str, int | None]:
    try:
        status = client_for(agent, 1.0).status()
    except (AgentUnavailable, CommandRefused):
        return {}
    return dict(status.agent.children) if status.agent else {}


def all_up(agent: Agent, not_pid: int | None = None) -> Callable[[], bool]:
    def ready() -> bool:
        up = children(agent)
        return len(up) == 3 and all(up.values()) and not_pid not in up.values()

    return ready


def restart(agent: Agent) -> None:
    """What supervisord does when completiond died: start it again."""
    assert agent.proc is not None
    agent.proc.wait(15)
    agent._log.close()
    agent.start(wait=False)


def run_scenario(
    name: str,
    mysql_agent,
    mysql_url: str,
    config: dict | None,
    todos: int,
    inject: Inject,
    *,
    rate: float = 40.0,
    note: str = "",
    note_after: Callable[[], str] | None = None,
) -> None:
    agent = mysql_agent(config).start()
    ids = add_todos(mysql_url, todos)
    before = snapshot(mysql_url)
    ledger = Ledger(name)
    rng = random.Random(os.environ.get("RELIABILITY_SEED"))
    with Observer(mysql_url) as observer:
        with Stream(ledger, str(agent.config_path), ids, rate=rate) as stream:
            wait_for(lambda: len(ledger.acked()) >= 10, 30, what="the stream to get going")
            inject(agent, ledger, observer, rng)
            stream.stop()
        wait_for(
            lambda: observer.has(s.completion_id for s in ledger.acked()),
            120,
            what="every acked completion in the database",
        )
        settle(lambda: client_for(agent))
    if note_after is not None:
        note = f"{note}; {note_after()}"
    verdict = check(ledger, mysql_url, before, note=note)
    agent.stop()
    verdict.assert_clean()
