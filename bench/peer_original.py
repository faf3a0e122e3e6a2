"""The original system's style: one process per completion, synchronously in the hook.

    python peer_original.py TODO_ID < answer.md

It connects, reads the todo, renders, UPDATEs, reads the row back and exits; the hook returns
when the row is in the database.
"""

from __future__ import annotations

import sys

import peer_work  # type: ignore[import-not-found]

if __name__ == "__main__":
    conn = peer_work.connect()
    try:
        peer_work.complete(conn, int(sys.argv[1]), sys.stdin.read())
    finally:
        conn.close()
