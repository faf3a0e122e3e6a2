"""Process faults under a stream of completions, on MariaDB: kill -9 of each child and of the
parent at random moments (and, for the writer, exactly around its COMMIT and its journal update),
SIGSTOP/SIGCONT of each child for longer than its timeouts, SIGTERM and restart mid-stream.
Every acknowledged completion must be in the database exactly once."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from tests.harness import Agent, wait_for
from tests.reliability.conftest import TappedProxy
from tests.reliability.ledger import Ledger, Observer, budget, scaled, wait_recovered
from tests.reliability.scenario import Inject, all_up, children, restart, run_scenario

pytestmark = [pytest.mark.reliability, pytest.mark.mysql, pytest.mark.slow]

WRITER_MOMENTS = ("random", "before-commit", "after-commit", "before-journal")


def _todos_for(kills: int, rate: float = 40.0) -> int:
    """Enough fresh todos that the stream outlasts the kills: the supervisor's restart backoff
    (0.5 s doubling to 10 s while a child keeps dying young) grows with every kill."""
    backoff = sum(min(0.5 * 2**k, 30.0) for k in range(kills))
    return scaled(2000) + int(rate * (backoff + 4.0 * kills))


def _kill_children(name: str, kills: int) -> Inject:
    def inject(agent: Agent, ledger: Ledger, observer: Observer, rng: random.Random) -> None:
        proxy: TappedProxy = agent.proxy  # type: ignore[attr-defined]
        for n in range(kills):
            time.sleep(rng.uniform(0.1, 0.6))  # a random moment in the stream
            # A status call may time out on a loaded machine ({} then): ask until it answers.
            pid = wait_for(lambda: children(agent).get(name), 30, what=f"{name} running")
            moment = WRITER_MOMENTS[n % len(WRITER_MOMENTS)] if name == "writer" else "random"
            fault = ledger.fault(f"kill -9 {name} ({moment})")
            if moment == "random":
                os.kill(pid, signal.SIGKILL)
            else:
                fired = proxy.arm(moment, lambda pid=pid: os.kill(pid, signal.SIGKILL))
                wait_for(fired.is_set, 60, what=f"the writer to reach {moment}")
            fault.ended = time.monotonic()
            wait_recovered(ledger, observer, fault, ready=all_up(agent, not_pid=pid))

    return inject


@pytest.mark.timeout(budget(300))
@pytest.mark.parametrize(
    ("child", "kills"),
    [("writer", scaled(4)), ("collector", scaled(2)), ("monitor", scaled(2))],
)
def test_kill9_child_under_load(mysql_agent, mysql_url, child: str, kills: int) -> None:
    # A slow transcript keeps completions mid-collection; starts and heartbeats are not sent.
    config = {"collect": {"transcript_wait": 1.0}}
    run_scenario(
        f"kill -9 {child}",
        mysql_agent,
        mysql_url,
        config,
        _todos_for(kills),
        _kill_children(child, kills),
        note="writer kills cycle: random, before COMMIT, after COMMIT, before journal update"
        if child == "writer"
        else "at random moments; collections in flight",
    )


@pytest.mark.timeout(budget(300))
def test_kill9_parent_under_load(mysql_agent, mysql_url) -> None:
    kills = scaled(2)

    def inject(agent: Agent, ledger: Ledger, observer: Observer, rng: random.Random) -> None:
        for _ in range(kills):
            time.sleep(rng.uniform(0.1, 0.8))
            assert agent.proc is not None
            fault = ledger.fault("kill -9 completiond")
            agent.proc.kill()
            fault.ended = time.monotonic()
            restart(agent)
            wait_recovered(ledger, observer, fault, ready=all_up(agent))

    run_scenario(
        "kill -9 parent (completiond)",
        mysql_agent,
        mysql_url,
        None,
        scaled(2000),
        inject,
        note="restarted at once, as supervisord would; unanswered requests go to the outbox",
    )


@pytest.mark.timeout(budget(300))
def test_sigterm_and_restart_mid_stream(mysql_agent, mysql_url) -> None:
    restarts = scaled(2)

    def inject(agent: Agent, ledger: Ledger, observer: Observer, rng: random.Random) -> None:
        for _ in range(restarts):
            time.sleep(rng.uniform(0.1, 0.8))
            fault = ledger.fault("SIGTERM + restart")
            assert agent.stop() == 0, agent.output()[-2000:]
            fault.ended = time.monotonic()
            agent.start(wait=False)
            wait_recovered(ledger, observer, fault, ready=all_up(agent))

    run_scenario(
        "SIGTERM + restart mid-stream",
        mysql_agent,
        mysql_url,
        None,
        scaled(2000),
        inject,
        note="requests that arrive while it stops are queued in the outbox",
    )


@pytest.mark.timeout(budget(300))
def test_sigstop_sigcont_each_child(mysql_agent, mysql_url) -> None:
    rounds = scaled(1)
    hold = 3.5  # longer than database_timeout (3 s) and the sweep interval

    def inject(agent: Agent, ledger: Ledger, observer: Observer, rng: random.Random) -> None:
        for _ in range(rounds):
            for name in ("writer", "collector", "monitor"):
                time.sleep(rng.uniform(0.1, 0.5))
                pid = wait_for(lambda n=name: children(agent).get(n), 30, what=f"{name} running")
                fault = ledger.fault(f"SIGSTOP {name} {hold:.0f} s")
                os.kill(pid, signal.SIGSTOP)
                try:
                    stopped_at = time.monotonic()
                    # Intake never waits on a child: acks keep coming while it is stopped.
                    wait_for(
                        lambda at=stopped_at: time.monotonic() - at >= hold,
                        hold + 5,
                        what="the hold",
                    )
                    during = [
                        s.acked_at - s.sent_at
                        for s in ledger.acked()
                        if s.sent_at >= stopped_at and s.acked_at is not None
                    ]
                    assert during, f"no completion was acked while {name} was stopped"
                    assert max(during) < 1.0, f"acks slowed to {max(during):.2f} s"
                finally:
                    os.kill(pid, signal.SIGCONT)
                fault.ended = time.monotonic()
                wait_recovered(ledger, observer, fault, ready=all_up(agent))
                # It was paused, not replaced (asked until the status call answers).
                assert wait_for(lambda n=name: children(agent).get(n), 30) == pid

    run_scenario(
        "SIGSTOP/SIGCONT writer, collector, monitor",
        mysql_agent,
        mysql_url,
        None,
        scaled(2000),
        inject,
        note=f"each stopped {hold:.1f} s; acks during the stop stayed under 1 s",
    )
