"""Database faults through the TCP proxy, under a stream of completions: refused, cut in the
middle of a transaction, cut right after COMMIT (the acknowledgement lost), blackholed, slow,
a row lock held by another session, a long outage compressed by configuration, and a permanent
error (the todo table dropped) that makes completions dead until it is fixed and retried."""

from __future__ import annotations

import random
import time

import pytest

from tests.harness import Agent, wait_for
from tests.reliability.ledger import Ledger, Observer, budget, mysql_connect, scaled, wait_recovered
from tests.reliability.scenario import all_up, client_for, run_scenario

pytestmark = [pytest.mark.reliability, pytest.mark.mysql, pytest.mark.slow]

TODOS = scaled(2000)


def _hold(seconds: float) -> None:
    until = time.monotonic() + seconds
    wait_for(lambda: time.monotonic() >= until, seconds + 5, what="the fault's duration")


def _outage(mode: str, seconds: float, rounds: int, **proxy_settings: float):
    def inject(agent: Agent, ledger: Ledger, observer: Observer, rng: random.Random) -> None:
        proxy = agent.proxy  # type: ignore[attr-defined]
        for _ in range(rounds):
            time.sleep(rng.uniform(0.1, 0.5))
            fault = ledger.fault(f"{mode} {seconds:.0f} s")
            for key, value in proxy_settings.items():
                setattr(proxy, key, value)
            proxy.mode = mode
            if mode == "refuse":
                proxy.cut()  # and the open connections are gone too
            _hold(seconds)
            proxy.mode = "pass"
            fault.ended = time.monotonic()
            wait_recovered(ledger, observer, fault, ready=all_up(agent))

    return inject


@pytest.mark.timeout(budget(300))
def test_refused(mysql_agent, mysql_url) -> None:
    run_scenario(
        "DB refused (connections cut)",
        mysql_agent,
        mysql_url,
        None,
        TODOS,
        _outage("refuse", 2.0, scaled(1)),
        note="listening socket closed and open connections cut",
    )


@pytest.mark.timeout(budget(300))
def test_blackholed(mysql_agent, mysql_url) -> None:
    run_scenario(
        "DB blackholed",
        mysql_agent,
        mysql_url,
        None,
        TODOS,
        _outage("blackhole", 4.0, scaled(1)),
        note="accepts, never answers, for longer than database_timeout (3 s); held data "
        "delivered late when it ends",
    )


@pytest.mark.timeout(budget(300))
def test_slow(mysql_agent, mysql_url) -> None:
    run_scenario(
        "DB slow",
        mysql_agent,
        mysql_url,
        None,
        TODOS,
        _outage("delay", 3.0, scaled(1), delay=0.3),
        note="every chunk held 0.3 s both ways",
    )


def _tapped(moment: str, count: int, *, lose_reply: bool = False, cut_insert: bool = False):
    def inject(agent: Agent, ledger: Ledger, observer: Observer, rng: random.Random) -> None:
        proxy = agent.proxy  # type: ignore[attr-defined]
        for _ in range(count):
            time.sleep(rng.uniform(0.1, 0.4))
            fault = ledger.fault(moment)
            if cut_insert:
                fired = proxy.cut_on_client_data(b"INSERT INTO `stage_completion_log`")
            else:
                fired = proxy.arm(moment, lose_reply=lose_reply)
            wait_for(fired.is_set, 30, what=f"the writer to reach {moment}")
            fault.ended = time.monotonic()
            wait_recovered(ledger, observer, fault, ready=all_up(agent))

    return inject


@pytest.mark.timeout(budget(300))
def test_cut_mid_transaction(mysql_agent, mysql_url) -> None:
    run_scenario(
        "DB connection cut mid-transaction",
        mysql_agent,
        mysql_url,
        None,
        TODOS,
        _tapped("cut at INSERT completion_log", scaled(2), cut_insert=True),
        note="the writer's batch is cut before its completion_log insert reaches the server",
    )


@pytest.mark.timeout(budget(300))
def test_lost_commit_ack(mysql_agent, mysql_url) -> None:
    run_scenario(
        "DB COMMIT acknowledgement lost",
        mysql_agent,
        mysql_url,
        None,
        TODOS,
        _tapped("after-commit", scaled(2), lose_reply=True),
        note="the COMMIT is applied, its OK dropped and the connection cut; the replay must "
        "find the completion ids in completion_log",
    )


@pytest.mark.timeout(budget(300))
def test_lock_held_by_another_session(mysql_agent, mysql_url) -> None:
    hold = 4.0

    def inject(agent: Agent, ledger: Ledger, observer: Observer, rng: random.Random) -> None:
        for _ in range(scaled(1)):
            time.sleep(rng.uniform(0.1, 0.5))
            # The todos the stream is about to complete: the next few dozen fresh ones.
            done = max((s.todo_id for s in ledger.sent.values()), default=0)
            fault = ledger.fault(f"row locks held {hold:.0f} s")
            conn = mysql_connect(mysql_url)
            try:
                with conn.cursor() as cur:
                    cur.execute("BEGIN")
                    cur.execute(
                        "SELECT id FROM stage_project_todos WHERE id BETWEEN %s AND %s FOR UPDATE",
                        (done + 1, done + 60),
                    )
                    _hold(hold)
                conn.rollback()
            finally:
                conn.close()
            fault.ended = time.monotonic()
            wait_recovered(ledger, observer, fault, ready=all_up(agent))

    run_scenario(
        "row lock held by another session",
        mysql_agent,
        mysql_url,
        None,
        TODOS,
        inject,
        note=f"60 upcoming todo rows locked FOR UPDATE for {hold:.0f} s "
        "(lock wait timeout 2 s: retried)",
    )


@pytest.mark.timeout(budget(600))
def test_long_outage_compressed(mysql_agent, mysql_url) -> None:
    # retry_max_delay 60 s and a one-hour outage: about 60 retries at the cap for each waiting
    # completion. Compressed: the cap is 0.1 s, so an outage of `seconds` is seconds*10 retries.
    seconds = float(scaled(4))
    config = {
        "behavior": {"database_timeout": 1, "retry_max_delay": 0.1, "max_retries": 3},
    }
    seen: dict[str, object] = {}

    def inject(agent: Agent, ledger: Ledger, observer: Observer, rng: random.Random) -> None:
        proxy = agent.proxy  # type: ignore[attr-defined]
        fault = ledger.fault(f"outage {seconds:.0f} s at retry cap 0.1 s")
        proxy.mode = "refuse"
        proxy.cut()
        client = client_for(agent)

        def reported() -> bool:
            checks = {c.name: c for c in client.health().checks}
            seen["database"] = checks["database"].status
            return checks["database"].status == "CRITICAL"

        wait_for(reported, 15, what="health to report the database CRITICAL")
        _hold(seconds)
        status = client.status().agent
        assert status is not None
        seen["dead"] = status.journal.get("dead", 0)
        seen["waiting"] = sum(status.journal.get(s, 0) for s in ("collected", "written"))
        proxy.mode = "pass"
        fault.ended = time.monotonic()
        wait_recovered(ledger, observer, fault, ready=all_up(agent))

    run_scenario(
        "long DB outage (compressed)",
        mysql_agent,
        mysql_url,
        config,
        TODOS,
        inject,
        note=f"{seconds:.0f} s refused at retry cap 0.1 s (~{seconds * 10:.0f} retry periods, "
        "like 1 h at the 60 s default); none dead",
    )
    assert seen["database"] == "CRITICAL"
    assert seen["dead"] == 0, "a transient outage made completions dead"
    assert seen["waiting"], "nothing waited in the journal during the outage"


@pytest.mark.timeout(budget(300))
def test_dropped_table_dead_fixed_retried(mysql_agent, mysql_url) -> None:
    seen: dict[str, object] = {}

    def inject(agent: Agent, ledger: Ledger, observer: Observer, rng: random.Random) -> None:
        client = client_for(agent)
        time.sleep(rng.uniform(0.1, 0.5))
        fault = ledger.fault("todo table dropped")
        conn = mysql_connect(mysql_url)
        try:
            with conn.cursor() as cur:
                # Dropped as far as the agent can tell (1146 unknown table); kept to restore.
                cur.execute("RENAME TABLE stage_project_todos TO stage_project_todos_gone")

            def dead() -> int:
                status = client.status().agent
                return status.journal.get("dead", 0) if status else 0

            wait_for(lambda: dead() >= 5, 30, what="completions to go dead")
            health = {c.name: c for c in client.health().checks}
            seen["journal"] = health["journal"].status
            seen["dead"] = dead()
            with conn.cursor() as cur:
                cur.execute("RENAME TABLE stage_project_todos_gone TO stage_project_todos")
        finally:
            conn.close()
        ack = client.retry(all_dead=True)
        seen["retry"] = ack.message
        fault.ended = time.monotonic()

        def none_dead() -> bool:
            # A batch that failed just before the table came back goes dead after the retry
            # above; the operator's retry --dead is repeated until none is left.
            status = client.status().agent
            if status is not None and status.journal.get("dead", 0):
                client.retry(all_dead=True)
                return False
            return status is not None

        wait_recovered(ledger, observer, fault, ready=none_dead)

    run_scenario(
        "todo table dropped -> dead -> restored -> retry --dead",
        mysql_agent,
        mysql_url,
        None,
        TODOS,
        inject,
        note="permanent error (1146): not retried until `completionctl retry --dead`",
    )
    assert seen["journal"] == "CRITICAL"
    assert seen["dead"]
