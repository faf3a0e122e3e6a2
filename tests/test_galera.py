"""Agents on a real three-node MariaDB Galera cluster (tests/galera.py): what a single server
never does.  A node that refuses queries (1047) is failed over and used again once it is back;
a certification failure at COMMIT comes back as the transient 1213; a read on another node sees
the write (wsrep_sync_wait); and three agents, each on its own node, under streams of
completions while nodes and agents are killed and one node is cut off through the TCP proxy,
land every acked completion exactly once, and a vanished agent's hanging todo is recovered by
exactly one survivor."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import Iterator

import pymysql
import pytest

from agent.store import TransientError, open_store
from agent.store.mysql import classify
from ctl import Client
from tests.dbfixtures import WORDPRESS_DDL
from tests.galera import PASSWORD, USER, GaleraCluster
from tests.harness import Agent, wait_for
from tests.reliability.ledger import Ledger, Stream, check, settle, snapshot
from tests.tcpproxy import TcpProxy

pytestmark = [pytest.mark.mysql, pytest.mark.slow, pytest.mark.xdist_group("galera")]


@pytest.fixture
def cluster_db(galera_cluster: GaleraCluster) -> Iterator[str]:
    """A fresh database on the cluster (made through node 1, replicated), with the plugin's
    table; yields its name."""
    name = f"gtest_{secrets.token_hex(4)}"
    node = galera_cluster.nodes[0]
    node.execute(
        f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
        f"USE `{name}`",
        WORDPRESS_DDL.format(table="stage_project_todos"),
    )
    try:
        yield name
    finally:
        for n in galera_cluster.nodes:
            if n.alive():
                try:
                    n.execute(f"DROP DATABASE IF EXISTS `{name}`")
                    break
                except pymysql.err.MySQLError:
                    continue


def connect(cluster: GaleraCluster, i: int, database: str) -> pymysql.Connection:
    return pymysql.connect(
        host="127.0.0.1",
        port=cluster.ports[i]["mysql"],
        user=USER,
        password=PASSWORD,
        database=database,
        autocommit=True,
    )


def add_todos(cluster: GaleraCluster, database: str, n: int, status: str = "offen") -> list[int]:
    conn = connect(cluster, 0, database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COALESCE(MAX(id), 0) FROM stage_project_todos")
            (start,) = cur.fetchone()
            cur.executemany(
                "INSERT INTO stage_project_todos (title, description, working_directory, status)"
                " VALUES (%s, %s, %s, %s)",
                [(f"todo {i}", f"galera todo {i}", "/tmp", status) for i in range(n)],
            )
            cur.execute("SELECT id FROM stage_project_todos WHERE id > %s ORDER BY id", (start,))
            return [int(r[0]) for r in cur.fetchall()]
    finally:
        conn.close()


def test_failover_on_1047_certification_conflict_and_read_your_write(
    galera_cluster: GaleraCluster, cluster_db: str
) -> None:
    c = galera_cluster
    store = open_store(c.url(cluster_db, [0, 1, 2]), timeout=5, failback_after=2.0)
    reader = open_store(c.url(cluster_db, [2]), timeout=5)
    node = [f"127.0.0.1:{p['mysql']}" for p in c.ports]
    try:
        store.ensure_schema(create_todo_table=False)
        assert store.node == node[0] and store.galera  # type: ignore[attr-defined]
        # A write through node 1, read at once through node 3: wsrep_sync_wait makes it wait.
        for n in range(20):
            todo_id = store.add_todo(f"read your write {n}", "", "/tmp")
            assert todo_id in reader.get_todos([todo_id])

        # Node 1 stops serving (what a node outside the primary component answers): 1047.
        c.nodes[0].execute("SET GLOBAL wsrep_reject_queries = ALL_KILL")
        try:
            errors = []
            for _ in range(3):
                try:
                    store.todos_with_status("offen")
                    break
                except TransientError as exc:
                    errors.append(str(exc))
            assert store.node == node[1], errors  # type: ignore[attr-defined]
            assert store.failovers >= 1  # type: ignore[attr-defined]
        finally:
            c.nodes[0].execute("SET GLOBAL wsrep_reject_queries = NONE")
        # Node 1 serves again: used again after failback_after.
        time.sleep(2.1)
        store.todos_with_status("offen")
        assert store.node == node[0]  # type: ignore[attr-defined]

        # Two sessions on two nodes change one row; the one committing second loses
        # certification: 1213 at COMMIT, classified transient (retried like a deadlock).
        a, b = connect(c, 0, cluster_db), connect(c, 1, cluster_db)
        try:
            with a.cursor() as ca, b.cursor() as cb:
                ca.execute("BEGIN")
                ca.execute(
                    "UPDATE stage_project_todos SET title = 'from node 1' WHERE id = %s",
                    (todo_id,),
                )
                cb.execute(
                    "UPDATE stage_project_todos SET title = 'from node 2' WHERE id = %s",
                    (todo_id,),
                )
                with pytest.raises(pymysql.err.OperationalError) as info:
                    ca.execute("COMMIT")
            err = classify(info.value)
            assert isinstance(err, TransientError) and err.errno == 1213, err
        finally:
            a.close()
            b.close()
    finally:
        store.close()
        reader.close()


def _database_check(agent: Agent) -> str:
    done = agent.ctl("--json", "health", timeout=15)
    try:
        checks = json.loads(done.stdout)["checks"]
    except (ValueError, KeyError):
        return ""
    return next((ch["message"] for ch in checks if ch["name"] == "database"), "")


def _missing(cluster: GaleraCluster, database: str, ledger: Ledger) -> set[str]:
    """Acked completion ids not (yet) in the audit table, read whole on node 1."""
    conn = connect(cluster, 0, database)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT completion_id FROM stage_completion_log")
            present = {str(r[0]) for r in cur.fetchall()}
    except pymysql.err.MySQLError:
        present = set()
    finally:
        conn.close()
    return {s.completion_id for s in ledger.acked()} - present


def _logs(agents: list[Agent], lines: int = 15) -> str:
    """The tail of each agent's writer log and its journal counts, for a failure message."""
    parts = []
    for a in agents:
        log = a.state / "logs" / "completion.log"
        tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
        status = a.status_json() or {}
        parts.append(f"--- {a.root.name}: {status.get('journal')}\n" + "\n".join(tail))
    return "\n".join(parts)


def _kill_family(agent: Agent) -> None:
    for proc in agent.family():
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    assert agent.proc is not None
    agent.proc.wait(15)


@pytest.mark.timeout(900)
def test_three_agents_on_three_nodes_exactly_once(
    galera_cluster: GaleraCluster, cluster_db: str, make_agent
) -> None:
    c = galera_cluster
    proxy = TcpProxy("127.0.0.1", c.ports[2]["mysql"])  # agent 3 reaches its node through it
    ports = [c.ports[i]["mysql"] for i in range(3)]
    orders = [[ports[0], ports[1], ports[2]], [ports[1], ports[2], ports[0]]]
    orders.append([proxy.port, ports[0], ports[1]])
    base = {
        "behavior": {"hanging_after": 8, "health_check_interval": 0.5, "database_timeout": 5},
        "fleet": {"stale_after": 3},
    }
    agents: list[Agent] = []
    for i, order in enumerate(orders):
        config = {**base, "database": {"url": c.url(cluster_db, ports=order), "failback_after": 3}}
        agents.append(make_agent(config, name=f"g{i}").start())
    todos = add_todos(c, cluster_db, 450)
    direct = c.url(cluster_db, [0])
    before = snapshot(direct)
    ledger = Ledger("galera: 3 agents, 3 nodes")
    per_agent = [todos[i::3] for i in range(3)]
    try:
        # Not the ledger's Observer: it polls by id, and Galera's ids interleave across nodes.
        streams = [
            Stream(ledger, str(a.config_path), ids, threads=1, rate=8.0)
            for a, ids in zip(agents, per_agent, strict=True)
        ]
        for s in streams:
            s.__enter__()
        try:
            wait_for(lambda: len(ledger.acked()) >= 30, 90, what="the streams to get going")

            # A node dies: agent 2 (whose first node it is) fails over, health names a node.
            ledger.fault("kill -9 galera node 2")
            c.kill9(1)
            c.wait_size(2)
            wait_for(
                lambda: (
                    f"writer uses node 127.0.0.1:{ports[2]}" in _database_check(agents[1])
                    or f"writer uses node 127.0.0.1:{ports[0]}" in _database_check(agents[1])
                ),
                60,
                what="agent 2's writer on another node",
            )
            c.start(1)  # rejoins (IST/SST)
            c.wait_size(3)

            # Agent 3's node cut off through the proxy for a while.
            ledger.fault("node 3 cut off from agent 3")
            proxy.mode = "refuse"
            proxy.cut()
            time.sleep(4)
            proxy.mode = "pass"

            # Agent 2 killed with SIGKILL and started again (what supervisord does).
            ledger.fault("kill -9 agent 2")
            _kill_family(agents[1])
            agents[1]._log.close()
            agents[1].start()
            time.sleep(2)
        finally:
            for s in streams:
                s.stop()
        # Everything acked lands, and the rejoined node is agent 2's again.
        try:
            wait_for(
                lambda: not _missing(c, cluster_db, ledger),
                240,
                what="every acked completion in the database",
            )
        except AssertionError as exc:
            missing = _missing(c, cluster_db, ledger)
            raise AssertionError(f"{exc}: {len(missing)} missing\n{_logs(agents)}") from None
        for a in agents:
            settle(lambda a=a: Client(str(a.config_path), timeout=2))
        wait_for(
            lambda: f"writer uses node 127.0.0.1:{ports[1]}" in _database_check(agents[1]),
            60,
            what="agent 2 back on its own (rejoined) node",
        )

        # Agent 1 starts a todo and vanishes for good: one survivor recovers it.
        (orphan,) = add_todos(c, cluster_db, 1)
        assert agents[0].ctl("start", str(orphan)).returncode == 0
        claims = connect(c, 1, cluster_db)
        try:

            def claimed_by_first() -> bool:
                with claims.cursor() as cur:
                    cur.execute(
                        "SELECT COUNT(*) FROM stage_completion_claims WHERE todo_id = %s",
                        (orphan,),
                    )
                    return cur.fetchone()[0] == 1

            wait_for(claimed_by_first, 60, what="agent 1's claim")
            _kill_family(agents[0])

            def recovered() -> list:
                with claims.cursor() as cur:
                    cur.execute(
                        "SELECT completion_id, kind FROM stage_completion_log WHERE todo_id = %s",
                        (orphan,),
                    )
                    return list(cur.fetchall())

            rows = wait_for(recovered, 120, what="the vanished agent's todo recovered")
            time.sleep(3)  # a second survivor would act within a few rounds
            rows = recovered()
            assert [kind for _, kind in rows] == ["emergency"], rows
        finally:
            claims.close()
        took = ["took over todo" in (a.state / "logs" / "monitor.log").read_text() for a in agents]
        assert sorted(took[1:]) == [False, True], took

        verdict = check(
            ledger,
            direct,
            before,
            extra_ids=[cid for cid, _ in rows],
            note="3 agents on 3 Galera nodes; node kill + rejoin, proxy cut, agent kill + restart",
        )
        verdict.assert_clean()
    finally:
        proxy.close()


@pytest.mark.timeout(600)
def test_cluster_bench_runs_at_tiny_size(galera_cluster: GaleraCluster) -> None:
    """bench/cluster.py on the session's cluster, tiny: 1, 2, 3 agents, each row a rate and the
    same on one server (not timed here: only that the bench works)."""
    from bench.cluster import run

    outcome = run("tiny", cluster=galera_cluster)
    assert [r.measure.split(" (")[0] for r in outcome.rows] == [
        "cluster: 1 agent on 1 Galera node",
        "cluster: 2 agents on 2 Galera nodes",
        "cluster: 3 agents on 3 Galera nodes",
    ]
    for row in outcome.rows:
        assert row.result.endswith("/s") and float(row.result[:-2]) > 0
        assert row.baseline.startswith("one server ") and row.ratio is not None


@pytest.mark.timeout(600)
def test_a_node_outside_the_primary_component_is_passed_over(
    galera_cluster: GaleraCluster, cluster_db: str
) -> None:
    """Node 1 isolated from the others (gmcast.isolate): not primary, wsrep_ready OFF.  A store
    listing it first connects to node 2 instead; once it is back in the cluster it is used."""
    c = galera_cluster
    node = [f"127.0.0.1:{p['mysql']}" for p in c.ports]
    c.nodes[0].execute("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=1'")
    try:
        wait_for(lambda: c.status(0, "wsrep_ready") == "OFF", 60, what="node 1 not ready")
        store = open_store(c.url(cluster_db, [0, 1, 2]), timeout=5, failback_after=1.0)
        try:
            store.ping()
            assert store.node == node[1]  # type: ignore[attr-defined]
            c.nodes[0].execute("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=0'")
            c.wait_synced(0)
            c.wait_size(3)
            time.sleep(1.1)
            store.todos_with_status("offen")
            assert store.node == node[0]  # type: ignore[attr-defined]
        finally:
            store.close()
    finally:
        c.nodes[0].execute("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=0'")
        c.wait_synced(0)
