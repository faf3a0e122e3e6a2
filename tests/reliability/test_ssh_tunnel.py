"""The database reached through the agent's own ssh tunnel (a real sshd on 127.0.0.1, throwaway
keys, forwarding to the MariaDB behind the proxy), under a stream of completions, while the ssh
server is killed with SIGKILL (listener and sessions) and started again: acks stay fast, health
names the tunnel, the tunnel comes back by itself, and every acked completion lands once."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Agent, wait_for
from tests.reliability.conftest import add_todos
from tests.reliability.ledger import (
    Ledger,
    Observer,
    Stream,
    budget,
    check,
    scaled,
    settle,
    snapshot,
    wait_recovered,
)
from tests.reliability.scenario import all_up, client_for
from tests.sshd import Sshd, have_sshd

pytestmark = [
    pytest.mark.reliability,
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


def _database_check(agent: Agent) -> str:
    done = agent.ctl("--json", "health", timeout=10)
    try:
        checks = json.loads(done.stdout)["checks"]
    except (ValueError, KeyError):
        return ""
    return next((c["message"] for c in checks if c["name"] == "database"), "")


@pytest.mark.timeout(budget(300))
def test_sshd_killed_mid_stream(sshd: Sshd, mysql_agent, mysql_url: str) -> None:
    kills = scaled(2)
    agent: Agent = mysql_agent(
        {
            "database": {
                "ssh": sshd.destination,
                "ssh_identity": str(sshd.identity),
                "ssh_known_hosts": str(sshd.known_hosts),
            },
            "behavior": {"ssh_timeout": 6},
        }
    )
    agent.start()
    ids = add_todos(mysql_url, scaled(1500))
    before = snapshot(mysql_url)
    ledger = Ledger("sshd kill -9")
    rng = random.Random()
    named: list[str] = []
    with Observer(mysql_url) as observer:
        with Stream(ledger, str(agent.config_path), ids, rate=40.0) as stream:
            wait_for(lambda: len(ledger.acked()) >= 10, 60, what="the stream to get going")
            for _ in range(kills):
                time.sleep(rng.uniform(0.2, 1.0))
                fault = ledger.fault("sshd kill -9")
                sshd.kill9()
                named.append(
                    wait_for(
                        lambda: (m := _database_check(agent)) and m.startswith("ssh to") and m,
                        30,
                        what="health to name the tunnel",
                    )
                )
                time.sleep(rng.uniform(0.5, 2.0))  # the outage goes on a little
                sshd.start()
                fault.ended = time.monotonic()
                wait_recovered(ledger, observer, fault, ready=all_up(agent), timeout=90)
            stream.stop()
        wait_for(
            lambda: observer.has(s.completion_id for s in ledger.acked()),
            120,
            what="every acked completion in the database",
        )
        settle(lambda: client_for(agent))
    wait_for(lambda: "through ssh to" in _database_check(agent), 30, what="health OK again")
    verdict = check(
        ledger,
        mysql_url,
        before,
        note="sshd and its sessions SIGKILLed, restarted after 0.5-2 s",
    )
    agent.stop()
    acked = ledger.acked()
    slowest = max((s.acked_at or 0) - s.sent_at for s in acked)
    queued = sum(1 for s in acked if s.state == "queued")
    verdict.note += f"; slowest ack {slowest * 1000:.0f} ms, {queued} queued"
    verdict.assert_clean()
    for message in named:
        assert "connection refused" in message or "connection lost" in message, message
        assert "wait in the journal" in message
    # The agent never waits on the tunnel: intake acked everything itself.
    assert queued == 0 and slowest < 1.0, (slowest, queued)
    log = (agent.state / "logs" / "completion.log").read_text()  # the writer's log
    assert "tunnel down" in log and "tunnel up" in log
