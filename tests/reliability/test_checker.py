"""The check itself must be able to fail: a lost, a doubled and a stray completion, and a todo
changed behind its back, are each caught."""

from __future__ import annotations

import time

import pytest

from agent.store import open_store
from tests.dbfixtures import raw_execute
from tests.reliability import ledger as ledger_module
from tests.reliability.conftest import add_todos
from tests.reliability.ledger import Ledger, Sent, check, snapshot

pytestmark = [pytest.mark.reliability, pytest.mark.mysql]


def _log(url: str, cid: str, todo: int, kind: str) -> None:
    raw_execute(
        url,
        "INSERT INTO stage_completion_log (completion_id, todo_id, kind, sources, attempts,"
        " created_at, logged_at) VALUES (?, ?, ?, 'message', 1, NOW(), NOW())",
        (cid, todo, kind),
    )


def _complete(url: str, todo: int, text: str) -> None:
    raw_execute(
        url,
        "UPDATE stage_project_todos SET status = 'completed', completed_at = NOW(),"
        " claude_text_output = ? WHERE id = ?",
        (text, todo),
    )


def test_the_check_catches_lost_doubled_stray_and_changed(
    mysql_url, wordpress_table, monkeypatch
) -> None:
    monkeypatch.setattr(ledger_module, "RESULTS", "")  # not a scenario of the report
    store = open_store(mysql_url, timeout=5)
    store.ensure_schema(create_todo_table=False)
    store.close()
    ids = add_todos(mysql_url, 6)
    before = snapshot(mysql_url)
    ledger = Ledger("self-test")
    now = time.monotonic()
    for n, todo in enumerate(ids[:4]):
        ledger.sent[f"c{n}"] = Sent(f"c{n}", todo, f"out {n}", now, "accepted", now)
    # c0: fine. c1: lost. c2: a second normal row under another id for the same todo.
    # c3: the todo holds another completion's text. A stray row for ids[4]; ids[5] changed.
    _log(mysql_url, "c0", ids[0], "normal")
    _complete(mysql_url, ids[0], "out 0")
    _log(mysql_url, "c2", ids[2], "normal")
    _log(mysql_url, "c2-again", ids[2], "normal")
    _complete(mysql_url, ids[2], "out 2")
    _log(mysql_url, "c3", ids[3], "normal")
    _complete(mysql_url, ids[3], "somebody else's text")
    _log(mysql_url, "stray", ids[4], "emergency")
    _complete(mysql_url, ids[4], "x")
    raw_execute(
        mysql_url, "UPDATE stage_project_todos SET title = 'edited' WHERE id = ?", (ids[5],)
    )

    verdict = check(ledger, mysql_url, before)
    assert verdict.acked == 4
    assert verdict.present_once == 3  # c0, c2, c3 (each id once; c2-again is extra)
    assert verdict.lost == 1  # c1
    # c2-again (never sent, and a second normal row) and the stray row
    assert verdict.duplicated == 3
    text = "\n".join(verdict.problems)
    assert f"todo {ids[3]}: text" in text
    assert f"todo {ids[5]} changed" in text
    with pytest.raises(AssertionError, match="lost 1, duplicated 3"):
        verdict.assert_clean()
