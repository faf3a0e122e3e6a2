"""Fixtures of the reliability suite: agents on MariaDB behind a fault-injecting proxy."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.dbfixtures import MysqlServer, proxied_url
from tests.harness import Agent
from tests.reliability.ledger import mysql_connect
from tests.tcpproxy import TcpProxy


class TappedProxy(TcpProxy):
    """The test proxy, plus a tap on the writer's transactions.

    `arm(moment, action)` runs `action()` once, on the connection that inserted into
    completion_log (only the writer does), at `moment`:
    - "before-commit": the COMMIT is held back, `action` runs, the connection is cut (the
      transaction never commits);
    - "after-commit": the COMMIT reached the server and its OK comes back: `action` runs before
      the OK is passed on (the commit happened; the writer may never learn it);
    - "before-journal": at the next transaction's COMMIT on that connection (the read-back that
      comes before the journal update).
    With `lose_reply=True` the OK of that COMMIT is dropped and the connection cut after
    `action` (for "after-commit": the commit happened, its acknowledgement is lost).
    """

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self._tap: tuple[str, Callable[[], None], threading.Event, bool] | None = None
        self._tap_lock = threading.Lock()
        self._tap_state: dict[int, int] = {}  # id(pair) -> COMMITs seen since the insert

    def arm(
        self, moment: str, action: Callable[[], None] = lambda: None, *, lose_reply: bool = False
    ) -> threading.Event:
        assert moment in ("before-commit", "after-commit", "before-journal")
        fired = threading.Event()
        with self._tap_lock:
            self._tap = (moment, action, fired, lose_reply)
            self._tap_state.clear()
        return fired

    def disarm(self) -> None:
        with self._tap_lock:
            self._tap = None

    def _match(self, pair: Any, direction: str, data: bytes) -> str:
        with self._tap_lock:
            tap = self._tap
            key = id(pair)
            if tap is not None:
                moment, action, fired, lose_reply = tap
                if direction == "client":
                    if b"INSERT INTO `stage_completion_log`" in data:
                        self._tap_state[key] = 0
                    elif key in self._tap_state and b"COMMIT" in data:
                        self._tap_state[key] += 1
                        commits = self._tap_state[key]
                        if moment == "before-commit" and commits == 1:
                            self._tap = None
                            action()
                            fired.set()
                            return "drop_and_cut"
                        if (moment == "after-commit" and commits == 1) or (
                            moment == "before-journal" and commits == 2
                        ):
                            pair.tap_reply = True
                elif getattr(pair, "tap_reply", False):
                    pair.tap_reply = False
                    self._tap = None
                    action()
                    fired.set()
                    if lose_reply:
                        return "drop_and_cut"
        return super()._match(pair, direction, data)


@pytest.fixture
def proxy(mysql_server: MysqlServer) -> Iterator[TappedProxy]:
    p = TappedProxy(mysql_server.host, mysql_server.port)
    try:
        yield p
    finally:
        p.close()


def add_todos(url: str, n: int, table: str = "stage_project_todos") -> list[int]:
    conn = mysql_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT COALESCE(MAX(id), 0) FROM `{table}`")
            (start,) = cur.fetchone()
            cur.executemany(
                f"INSERT INTO `{table}` (title, description, working_directory, status)"
                " VALUES (%s, %s, %s, %s)",  # placeholders only: one multi-row INSERT
                [(f"todo {i}", f"reliability todo {i}", "/tmp", "offen") for i in range(n)],
            )
            cur.execute(f"SELECT id FROM `{table}` WHERE id > %s ORDER BY id", (start,))
            return [int(r[0]) for r in cur.fetchall()]
    finally:
        conn.close()


@pytest.fixture
def mysql_agent(
    make_agent: Callable[..., Agent],
    mysql_url: str,
    wordpress_table: str,
    proxy: TappedProxy,
) -> Callable[..., Agent]:
    """Build (not start) an agent whose database is the test's MariaDB database, reached only
    through `proxy`."""

    def make(config: dict[str, Any] | None = None, *, name: str = "a") -> Agent:
        base: dict[str, Any] = {"database": {"url": proxied_url(mysql_url, proxy)}}
        from tests.harness import merge

        agent = make_agent(merge(base, config or {}), name=name)
        agent.proxy = proxy  # type: ignore[attr-defined]
        return agent

    return make
