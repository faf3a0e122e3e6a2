"""huey as the task queue a user would pick: ``SqliteHuey``; the hook process enqueues, the
consumer (``huey_consumer peer_huey.huey -w 2``) does the same work as the agent.

    python -c "import sys, peer_huey; peer_huey.complete(int(sys.argv[1]), sys.stdin.read())" ID
                                                  # the hook: enqueue and exit
"""

from __future__ import annotations

import os
import threading

from huey import SqliteHuey

huey = SqliteHuey("bench", filename=os.environ["BENCH_HUEY_DB"])
_local = threading.local()


@huey.task()
def complete(todo_id: int, output: str) -> None:
    import peer_work  # type: ignore[import-not-found]

    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = peer_work.connect()
    peer_work.complete(conn, todo_id, output)
