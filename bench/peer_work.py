"""The work each peer does for one completion, the same as the agent's: read the todo, render
its report from the 4 KB Markdown answer (the agent's own renderer), UPDATE the row, read it back.

This file is copied into the bench's scratch directory and imported as a top-level module by the
peers' processes (the original-system style's per-completion process, huey's hook process and
its consumer), which run in the production layout; so it imports only what a peer would, and
only when it needs it (huey's hook process, which only enqueues, imports none of it).
"""

from __future__ import annotations

import os
from typing import Any

TABLE = "stage_project_todos"


def connect() -> Any:
    import pymysql

    return pymysql.connect(
        host=os.environ["BENCH_DB_HOST"],
        port=int(os.environ["BENCH_DB_PORT"]),
        user=os.environ["BENCH_DB_USER"],
        password=os.environ.get("BENCH_DB_PASSWORD", ""),
        database=os.environ["BENCH_DB_NAME"],
        charset="utf8mb4",
        autocommit=False,
    )


def complete(conn: Any, todo_id: int, output: str) -> None:
    from datetime import UTC, datetime

    from agent.report import render_report
    from agent.sources import Collected, TodoFacts

    with conn.cursor() as cur:
        cur.execute(
            f"SELECT title, description, working_directory FROM {TABLE} WHERE id = %s",
            (todo_id,),
        )
        title, description, workdir = cur.fetchone()
        conn.commit()
        now = datetime.now(UTC)
        report = render_report(
            todo_id=todo_id,
            todo=TodoFacts(title or "", description or "", workdir or ""),
            collected=Collected(output, "message", (), is_markdown=True, is_html=False),
            kind="normal",
            started_at=None,
            completed_at=now,
        )
        stamp = now.strftime("%Y-%m-%d %H:%M:%S")
        cur.execute(
            f"UPDATE {TABLE} SET status = 'completed', completed_at = %s, updated_at = %s,"
            " claude_html_output = %s, claude_text_output = %s, claude_summary = %s"
            " WHERE id = %s",
            # What the agent stores (report.db_format, Markdown by default): the page only an
            # archive needs is not built, by the agent or here.
            (stamp, stamp, report.for_database, report.text, report.summary, todo_id),
        )
        conn.commit()
        cur.execute(f"SELECT status, claude_html_output FROM {TABLE} WHERE id = %s", (todo_id,))
        status, html = cur.fetchone()
        conn.commit()
    if status != "completed" or html != report.for_database:
        raise RuntimeError(f"todo {todo_id}: the row read back is not what was written")
