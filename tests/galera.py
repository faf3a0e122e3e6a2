"""A three-node MariaDB Galera cluster on one machine, for the cluster tests.

Each node is a `Mariadbd` (tests/mariadbd.py) with its own datadir, client port, group port
(`gmcast.listen_addr`), IST port (`ist.recv_addr`) and SST port, running as user `mysql` with
its dirs owned by `mysql` (rsync state transfer fails as root in /tmp).  Node 1 bootstraps the
cluster; the others join by state transfer.  Small: 32 MB buffer pool, no performance_schema.
`kill9(i)` and `start(i)` take a node down and back (it rejoins by IST or SST).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from tests.harness import short_tmp, wait_for
from tests.mariadbd import Mariadbd
from tests.sshd import free_port

PROVIDER = "/usr/lib/galera/libgalera_smm.so"
USER, PASSWORD = "ctest", "galera-test"


def have_galera() -> bool:
    from tests.mariadbd import have_mariadbd

    return os.path.exists(PROVIDER) and shutil.which("rsync") is not None and have_mariadbd()


class GaleraCluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.size = size
        self.ports = [
            {"mysql": free_port(), "group": free_port(), "ist": free_port(), "sst": free_port()}
            for _ in range(size)
        ]
        address = ",".join(f"127.0.0.1:{p['group']}" for p in self.ports)
        self.nodes: list[Mariadbd] = []
        for i, ports in enumerate(self.ports):
            options = ";".join(
                [
                    f"gmcast.listen_addr=tcp://127.0.0.1:{ports['group']}",
                    f"ist.recv_addr=127.0.0.1:{ports['ist']}",
                    "gcache.size=16M",
                    "evs.suspect_timeout=PT3S",
                    "evs.inactive_timeout=PT6S",
                    "evs.keepalive_period=PT1S",
                    "pc.wait_prim_timeout=PT10S",
                ]
            )
            extra = [
                "--wsrep-on=ON",
                f"--wsrep-provider={PROVIDER}",
                f"--wsrep-cluster-address=gcomm://{address}",
                "--wsrep-cluster-name=ctest",
                f"--wsrep-node-name=node{i + 1}",
                "--wsrep-node-address=127.0.0.1",
                f"--wsrep-node-incoming-address=127.0.0.1:{ports['mysql']}",
                f"--wsrep-provider-options={options}",
                "--wsrep-sst-method=rsync",
                f"--wsrep-sst-receive-address=127.0.0.1:{ports['sst']}",
                "--wsrep-slave-threads=1",
                "--binlog-format=ROW",
                "--default-storage-engine=InnoDB",
                "--innodb-autoinc-lock-mode=2",
                "--innodb-flush-log-at-trx-commit=2",
            ]
            self.nodes.append(Mariadbd(root / f"node{i + 1}", ports["mysql"], extra))

    # ------------------------------------------------------------ lifecycle

    def start_all(self) -> GaleraCluster:
        for node in self.nodes:
            node.install()
        first = self.nodes[0]
        first.extra.append("--wsrep-new-cluster")
        first.start(timeout=120)
        first.extra.remove("--wsrep-new-cluster")
        self.wait_synced(0)
        first.execute(
            f"CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'",
            f"GRANT ALL ON *.* TO '{USER}'@'127.0.0.1'",
        )
        for i in range(1, self.size):
            self.start(i)
        self.wait_size(self.size)
        return self

    def start(self, i: int) -> None:
        self.nodes[i].start(wait=False)
        self.nodes[i].wait_ready(180)
        self.wait_synced(i)

    def kill9(self, i: int) -> None:
        self.nodes[i].kill9()

    def stop_all(self) -> None:
        for node in reversed(self.nodes):
            node.stop(timeout=30)

    # ------------------------------------------------------------ state

    def status(self, i: int, name: str) -> str | None:
        try:
            rows = self.nodes[i].execute(f"SHOW STATUS LIKE '{name}'")
        except pymysql.err.MySQLError:
            return None
        return str(rows[0][1]) if rows else None

    def wait_synced(self, i: int, timeout: float = 180) -> None:
        wait_for(
            lambda: (
                self.status(i, "wsrep_local_state_comment") == "Synced"
                and self.status(i, "wsrep_ready") == "ON"
            ),
            timeout,
            interval=0.25,
            what=f"galera node{i + 1} synced",
        )

    def wait_size(self, size: int, timeout: float = 120) -> None:
        alive = next(i for i, n in enumerate(self.nodes) if n.alive())
        wait_for(
            lambda: self.status(alive, "wsrep_cluster_size") == str(size),
            timeout,
            interval=0.25,
            what=f"a cluster of {size}",
        )

    def url(self, database: str, order: list[int] | None = None, ports: list[int] | None = None):
        """mysql://... naming the nodes in `order` (node indexes), or the given `ports`."""
        chosen = ports or [self.ports[i]["mysql"] for i in (order or range(self.size))]
        hosts = ",".join(f"127.0.0.1:{p}" for p in chosen)
        return f"mysql://{USER}:{PASSWORD}@{hosts}/{database}"

    def node_url(self, i: int, database: str) -> str:
        return self.url(database, [i])


@pytest.fixture(scope="session")
def galera_cluster() -> Iterator[GaleraCluster]:
    """Three Galera nodes for the session (tests using it carry xdist_group("galera") so that
    one worker runs them all); skipped only where Galera is not installed, never on CI."""
    if not have_galera():
        pytest.skip("needs galera-4 (/usr/lib/galera/libgalera_smm.so), rsync, mariadbd and root")
    root = short_tmp("gal-")
    cluster = GaleraCluster(root)
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)
