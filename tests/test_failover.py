"""Several hosts in database.url, against the real MariaDB behind two TCP proxies (two "nodes"
that lead to the same server): the store uses the first, fails over to the next when it refuses
or drops, names the node in its errors, and goes back to the first once it answers again and
failback_after has passed.  The Galera specifics (1047, wsrep_sync_wait) are in test_galera.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from agent.store import TransientError, open_store
from agent.store.url import parse_url
from protocol.config import ConfigError, load
from tests.dbfixtures import MysqlServer, create_wordpress_table
from tests.harness import wait_for
from tests.tcpproxy import TcpProxy

pytestmark = [pytest.mark.mysql]


@pytest.fixture
def two_nodes(mysql_server: MysqlServer) -> Iterator[tuple[TcpProxy, TcpProxy]]:
    a = TcpProxy(mysql_server.host, mysql_server.port)
    b = TcpProxy(mysql_server.host, mysql_server.port)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_url_with_several_hosts_parses_and_redacts() -> None:
    target = parse_url("mysql://u:secret@h1:3306,h2:3307,[::1]/db")
    assert target.all_nodes == (("h1", 3306), ("h2", 3307), ("::1", 3306))
    assert target.redacted() == "mysql://u:***@h1:3306,h2:3307,[::1]:3306/db"
    with pytest.raises(ValueError, match="port"):
        parse_url("mysql://u@h1:3306,h2:0/db")
    with pytest.raises(ValueError, match="names no host"):
        parse_url("mysql://u@h1,/db")


@pytest.mark.parametrize(
    ("database", "wanted"),
    [
        ({"url": "mysql://u@h1,h2:99999/db"}, "invalid port"),
        ({"url": "mysql://u@h/db", "hosts": ["h1:3306", "bad host"]}, "not host or host:port"),
        ({"url": "mysql://u@h1,h2/db", "ssh": "me@jump"}, "cannot go with several hosts"),
        ({"hosts": ["h1"]}, "needs a MySQL database"),
    ],
)
def test_several_hosts_settings_are_checked(database: dict, wanted: str, tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"state_dir": str(tmp_path / "s"), "database": database}))
    with pytest.raises(ConfigError, match=wanted):
        load(str(path))


def test_fails_over_to_the_next_node_and_back_to_the_first(
    mysql_url: str, two_nodes: tuple[TcpProxy, TcpProxy]
) -> None:
    a, b = two_nodes
    create_wordpress_table(mysql_url)
    auth, _, rest = mysql_url.partition("@")
    database = rest.partition("/")[2]
    url = f"{auth}@{a.host}:{a.port},{b.host}:{b.port}/{database}"
    store = open_store(url, timeout=3, failback_after=1.0)
    try:
        store.ensure_schema(create_todo_table=False)
        assert store.node == f"127.0.0.1:{a.port}"  # type: ignore[attr-defined]

        a.mode = "refuse"
        a.cut()
        # The connection in use breaks once (that error names the node), the next call is on b.
        with pytest.raises(TransientError, match=rf"node 127\.0\.0\.1:{a.port}"):
            store.todos_with_status("in_progress")
        store.todos_with_status("in_progress")
        assert store.node == f"127.0.0.1:{b.port}"  # type: ignore[attr-defined]
        assert store.failovers == 1  # type: ignore[attr-defined]

        b.mode = "refuse"
        b.cut()
        with pytest.raises(TransientError):
            store.ping()
        with pytest.raises(TransientError, match="no node answered") as info:
            store.ping()
        assert str(a.port) in str(info.value) and str(b.port) in str(info.value)

        # a comes back ("rejoins"), b too: after failback_after the store returns to a.
        a.mode = "pass"
        b.mode = "pass"
        store.ping()
        time.sleep(1.1)
        wait_for(
            lambda: (
                store.todos_with_status("offen") is not None and store.node == f"127.0.0.1:{a.port}"
            ),  # type: ignore[attr-defined]
            10,
            what="the store back on the first node",
        )
    finally:
        store.close()
