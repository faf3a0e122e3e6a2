"""Graceful stop and parent death: SIGTERM mid-burst loses nothing; no child outlives SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import statistics
import threading
import time

import psutil

from ctl import Client, CommandRefused
from tests.harness import Agent, alive, wait_for


def add_todos(agent: Agent, count: int) -> list[int]:
    """Insert todos straight into the embedded database (faster than `completionctl add`)."""
    first = agent.add("the first")  # also makes sure the table is there
    with contextlib.closing(sqlite3.connect(agent.sqlite_path)) as db, db:
        db.executemany(
            "INSERT INTO stage_project_todos (id, title) VALUES (?, ?)",
            [(first + n, f"burst {n}") for n in range(1, count)],
        )
    return list(range(first, first + count))


def completed(agent: Agent) -> dict[int, int]:
    """todo id -> number of completion_log rows, for completed todos."""
    with contextlib.closing(sqlite3.connect(agent.sqlite_path)) as db:
        rows = db.execute(
            "SELECT t.id, COUNT(l.id) FROM stage_project_todos t"
            " JOIN stage_completion_log l ON l.todo_id = t.id"
            " WHERE t.status = 'completed' GROUP BY t.id"
        ).fetchall()
    return dict(rows)


def test_sigkill_of_the_parent_leaves_no_child(agent: Agent) -> None:
    family = agent.family()
    children = family[1:]
    assert len(children) == 3
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(10)
    wait_for(lambda: not alive(children), 5, what="every child gone after the parent's SIGKILL")


def test_sigkill_then_restart_finishes_accepted_work(make_agent) -> None:
    agent = make_agent()
    agent.start()
    [todo] = add_todos(agent, 1)
    # The collector is stopped, so the completion stays waiting in the journal.
    collector = psutil.Process(agent.children()["collector"])
    collector.suspend()
    try:
        assert agent.ctl("complete", str(todo), "--output", "before the crash").returncode == 0
        children = agent.family()[1:]
        os.kill(agent.proc.pid, signal.SIGKILL)
        agent.proc.wait(10)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            collector.resume()
    wait_for(lambda: not alive(children), 5, what="children gone")
    # A stale socket file and pid file are left; the next agent takes over.
    assert (agent.state / "completiond.sock").exists()
    agent._log.close()
    agent.start()
    agent.wait_states(todo, "cleaned")
    assert completed(agent) == {todo: 1}


def test_sigterm_during_a_burst_loses_nothing_acknowledged(make_agent) -> None:
    agent = make_agent()
    agent.start()
    todos = add_todos(agent, 80)
    results: dict[int, str] = {}
    errors: list[str] = []
    lock = threading.Lock()
    half = threading.Event()

    def worker(mine: list[int]) -> None:
        client = Client(str(agent.config_path), timeout=2.0)
        for todo in mine:
            try:
                ack = client.complete(todo, output=f"burst output {todo}")
            except CommandRefused as exc:  # a refusal here would be a lost completion
                with lock:
                    errors.append(f"{todo}: {exc}")
                continue
            with lock:
                results[todo] = ack.state
                if len(results) >= len(todos) // 3:
                    half.set()

    threads = [threading.Thread(target=worker, args=(todos[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    assert half.wait(30), "the burst did not get going"
    # Freeze the parent so that requests pile up in its socket, then stop it: what already
    # arrived must be journaled and acknowledged (or left unanswered, so the client queues it),
    # never refused.
    agent.proc.send_signal(signal.SIGSTOP)
    time.sleep(0.3)  # the eight clients' next requests arrive meanwhile (they wait up to 2 s)
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    agent.proc.send_signal(signal.SIGCONT)
    code = agent.proc.wait(15)
    took = time.monotonic() - started
    for thread in threads:
        thread.join(30)
    assert code == 0
    assert took < 10, took
    assert errors == []
    assert set(results) == set(todos)
    assert set(results.values()) <= {"accepted", "queued"}
    assert not (agent.state / "completiond.sock").exists()

    agent._log.close()
    agent.start()
    wait_for(lambda: len(completed(agent)) == len(todos), 60, what="every todo completed")
    # Delivered-and-queued requests share their id: each todo was written exactly once.
    assert set(completed(agent).values()) == {1}
    wait_for(lambda: not list((agent.state / "outbox").glob("*.req")), what="outbox drained")
    assert agent.stop() == 0


def test_sighup_while_children_start_kills_none_of_them(make_agent) -> None:
    # logrotate may send SIGHUP at any moment, also while the children import and set up.
    agent = make_agent()
    agent.start(wait=False)
    wait_for(lambda: (agent.state / "completiond.pid").exists(), what="the pid file")
    stop = threading.Event()

    def hup_storm() -> None:
        while not stop.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent.proc.pid, signal.SIGHUP)
            time.sleep(0.01)

    storm = threading.Thread(target=hup_storm)
    storm.start()
    try:
        agent.wait_ready()
        time.sleep(0.5)  # keep the storm going over the children's first loops too
    finally:
        stop.set()
        storm.join()
    status = agent.status_json()
    assert status["restarts"] == {"collector": 0, "writer": 0, "monitor": 0}
    assert "exited with signal SIGHUP" not in agent.output()


def test_a_child_stuck_inside_a_journal_transaction_does_not_stall_intake(agent: Agent) -> None:
    """A child stopped while it holds the journal's write lock (SIGSTOP, a starved process):
    requests are answered at once, not after the lock is free, and the outbox carries them."""
    todo = agent.add("stuck lock")
    holder = sqlite3.connect(agent.state / "journal.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # what a child does for each of its transactions
        with Client(str(agent.config_path), timeout=10.0) as client:
            started = time.monotonic()
            ack = client.complete(todo, output="written while the journal was locked")
            took = time.monotonic() - started
            # Read-only requests never need the lock.
            assert client.ping() is not None
            # Requests that follow do not each wait as long again: waits must not add up for
            # requests queued behind one another.
            later = []
            for _ in range(6):
                started = time.monotonic()
                assert client.heartbeat(todo).state == "queued"
                later.append(time.monotonic() - started)
        assert ack.state == "queued", ack
        assert "journal" in ack.message and "locked" in ack.message, ack.message
        assert took < 5, f"intake waited {took:.1f} s for the lock (the client's wait is 10 s)"
        assert statistics.median(later) < 0.3, later
        assert len(list((agent.state / "outbox").glob("*.req"))) == 1 + len(later)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_for(lambda: (agent.todo_row(todo) or {}).get("status") == "completed", 30)
    assert "written while the journal was locked" in agent.todo_row(todo)["claude_text_output"]
    wait_for(lambda: not list((agent.state / "outbox").glob("*.req")), what="outbox drained")


def test_a_slow_journal_transaction_that_commits_gets_the_full_lock_wait(agent: Agent) -> None:
    """The short wait is for a lock that stays stuck; a holder that commits in between is slow,
    not stuck, and the next request waits the full time for it again."""
    todo = agent.add("slow lock")
    holder = sqlite3.connect(agent.state / "journal.db", isolation_level=None)
    try:
        with Client(str(agent.config_path), timeout=10.0) as client:
            holder.execute("BEGIN IMMEDIATE")
            assert client.heartbeat(todo).state == "queued"  # the lock is found stuck
            holder.execute("CREATE TABLE IF NOT EXISTS test_touch (x)")  # a commit of its own
            holder.execute("COMMIT")
            holder.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            assert client.heartbeat(todo).state == "queued"
            waited = time.monotonic() - started
        assert waited >= 0.4, f"waited only {waited:.2f} s for a lock that moved meanwhile"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
