"""The store against real SQLite and real MariaDB: compare-and-set rules, idempotency, schema
handling, output fitting, and failure behaviour (through the fault-injecting TCP proxy)."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pymysql
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.store import (
    MysqlTarget,
    PermanentError,
    SqliteTarget,
    Store,
    StoreError,
    TodoWrite,
    TransientError,
    WriteOutcome,
    open_store,
    parse_url,
    redact_url,
)
from agent.store.base import TRUNCATION_NOTE, fit_text
from agent.store.mysql import _Limits, _wire_size, _wire_size_bound, classify, escape_string
from agent.store.profile import SiteProfile, resolve
from tests.dbfixtures import (
    MysqlServer,
    backend_of,
    fetch_row,
    hold_row_lock,
    proxied_url,
    raw_connection,
    raw_execute,
    set_status,
    show_create_table,
)
from tests.tcpproxy import TcpProxy

T0 = datetime(2024, 5, 6, 7, 8, 9)
T1 = T0 + timedelta(minutes=5)
T2 = T0 + timedelta(minutes=10)
SOCKET = "/run/mysqld/mysqld.sock"


def W(cid: str, todo_id: int, kind: str, at: datetime = T1, **kw: object) -> TodoWrite:
    return TodoWrite(cid, todo_id, kind, at, **kw)  # type: ignore[arg-type]


def when(value: object) -> datetime | None:
    """A DATETIME column as either driver returns it."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url, timeout=5)
    s.ensure_schema(create_todo_table=True)
    yield s
    s.close()


def apply_one(store: Store, write: TodoWrite) -> WriteOutcome:
    (outcome,) = store.apply([write])
    assert store.verify(write, outcome), outcome
    return outcome


# --------------------------------------------------------------------------- CAS rules


def test_start_then_complete(store: Store, store_url: str) -> None:
    tid = store.add_todo("write the report", "all of it", "/srv/project")
    todo = store.get_todo(tid)
    assert todo is not None
    assert (todo.title, todo.description, todo.working_directory) == (
        "write the report",
        "all of it",
        "/srv/project",
    )
    assert (todo.status, todo.started_at, todo.completed_at) == ("offen", None, None)

    assert apply_one(store, W("s-1", tid, "start", T0)).outcome == "applied"
    todo = store.get_todo(tid)
    assert todo is not None and (todo.status, todo.started_at) == ("in_progress", T0)

    write = W("c-1", tid, "normal", html="<p>ok</p>", text="ok", summary="done", source="hook")
    outcome = apply_one(store, write)
    assert (outcome.outcome, outcome.log_kind) == ("applied", "normal")
    row = fetch_row(store_url, tid)
    assert row is not None
    assert row["status"] == "completed"
    assert (when(row["started_at"]), when(row["completed_at"]), when(row["updated_at"])) == (
        T0,
        T1,
        T1,
    )
    assert (row["claude_html_output"], row["claude_text_output"], row["claude_summary"]) == (
        "<p>ok</p>",
        "ok",
        "done",
    )
    assert store.logged_kinds(tid) == [("c-1", "normal")]
    (log,) = raw_execute(
        store_url,
        "SELECT todo_id, kind, sources, attempts, created_at FROM stage_completion_log "
        "WHERE completion_id = ?",
        ("c-1",),
    )
    assert log[:4] == (tid, "normal", "hook", 1)
    assert when(log[4]) == T1


def test_second_completion_is_a_recorded_duplicate(store: Store, store_url: str) -> None:
    tid = store.add_todo("t")
    apply_one(store, W("c-1", tid, "normal", html="first"))
    before = fetch_row(store_url, tid)
    for i, kind in enumerate(["normal", "emergency", "normal"]):
        outcome = apply_one(store, W(f"d-{i}", tid, kind, T2, html="second"))
        assert (outcome.outcome, outcome.log_kind) == ("duplicate", "duplicate")
        assert "already completed" in outcome.reason
    assert fetch_row(store_url, tid) == before
    assert [k for _, k in store.logged_kinds(tid)] == ["normal"] + ["duplicate"] * 3


def test_normal_after_emergency_replaces_the_outputs(store: Store, store_url: str) -> None:
    tid = store.add_todo("t")
    e = apply_one(store, W("e-1", tid, "emergency", T1, html="<p>timeout</p>", summary="E"))
    assert (e.outcome, e.log_kind) == ("applied", "emergency")
    assert apply_one(store, W("e-2", tid, "emergency", T2)).outcome == "duplicate"

    n = apply_one(store, W("n-1", tid, "normal", T2, html="<p>real</p>", text="real"))
    assert (n.outcome, n.log_kind) == ("applied", "normal")
    row = fetch_row(store_url, tid)
    assert row is not None
    assert (row["status"], row["claude_html_output"], row["claude_text_output"]) == (
        "completed",
        "<p>real</p>",
        "real",
    )
    assert row["claude_summary"] == "E"  # None leaves a column as it is
    assert when(row["completed_at"]) == T1  # completed when the emergency closed it
    assert when(row["updated_at"]) == T2

    # After a normal completion everything further is a duplicate.
    assert apply_one(store, W("n-2", tid, "normal", T2, html="again")).outcome == "duplicate"
    assert fetch_row(store_url, tid)["claude_html_output"] == "<p>real</p>"  # type: ignore[index]
    assert [k for _, k in store.logged_kinds(tid)] == [
        "emergency",
        "duplicate",
        "normal",
        "duplicate",
    ]


@pytest.mark.parametrize("status", ["blocked", "cancelled", "cron"])
def test_blocked_cancelled_cron_refuse_everything(
    store: Store, store_url: str, status: str
) -> None:
    tid = store.add_todo("t")
    set_status(store_url, tid, status)
    before = fetch_row(store_url, tid)
    for i, kind in enumerate(["normal", "emergency", "start", "reset"]):
        outcome = apply_one(store, W(f"x-{i}", tid, kind, html="nope"))
        assert outcome.outcome == "refused"
        assert status in outcome.reason and f"todo {tid}" in outcome.reason
        assert outcome.log_kind is None
    assert fetch_row(store_url, tid) == before
    assert store.logged_kinds(tid) == []


def test_missing_todo_is_refused(store: Store) -> None:
    outcomes = store.apply([W("m-1", 4242, "normal"), W("m-2", 4242, "start")])
    assert [o.outcome for o in outcomes] == ["refused", "refused"]
    assert outcomes[0].reason == "todo 4242 does not exist"
    assert store.logged_kinds(4242) == []


def test_a_scheduled_write_refuses_a_todo_created_after_it_was_scheduled(store: Store) -> None:
    """A schedule for an id that did not exist yet must not complete the todo that later got
    that id (issue 18): the row's created_at is compared with the schedule's time."""
    tid = store.add_todo("created just now")
    now = datetime.now(UTC)
    made_before = now - timedelta(hours=1)
    [refused] = store.apply([W("sched-a", tid, "normal", now, not_created_after=made_before)])
    assert refused.outcome == "refused" and refused.log_kind is None
    assert f"todo {tid} was created at" in refused.reason
    assert "after this completion was scheduled" in refused.reason
    assert store.get_todo(tid).status == "offen"  # type: ignore[union-attr]
    assert store.logged_kinds(tid) == []
    # Scheduled after the row existed (and a write without the field): applied as ever.
    [ok] = store.apply([W("sched-b", tid, "normal", now, not_created_after=now)])
    assert ok.outcome == "applied"
    assert store.get_todo(tid).status == "completed"  # type: ignore[union-attr]
    # Within one batch, only the write that names a younger row is refused.
    young, old = store.add_todo("young"), tid
    outcomes = store.apply(
        [
            W("sched-c", young, "normal", now, not_created_after=made_before),
            W("c-plain", old, "normal", now),
        ]
    )
    assert [o.outcome for o in outcomes] == ["refused", "duplicate"]


def test_start_is_compare_and_set(store: Store, store_url: str) -> None:
    tid = store.add_todo("t")
    assert apply_one(store, W("s-1", tid, "start", T0)).outcome == "applied"
    again = apply_one(store, W("s-2", tid, "start", T2))
    assert again.outcome == "applied"  # already in_progress: a no-op
    assert store.get_todo(tid).started_at == T0  # type: ignore[union-attr]
    apply_one(store, W("c-1", tid, "normal"))
    late = apply_one(store, W("s-3", tid, "start", T2))
    assert late.outcome == "refused" and "completed" in late.reason
    assert store.get_todo(tid).status == "completed"  # type: ignore[union-attr]
    assert [k for _, k in store.logged_kinds(tid)] == ["normal"]  # starts are not logged


def test_reset_is_compare_and_set(store: Store, store_url: str) -> None:
    tid = store.add_todo("t")
    offen = apply_one(store, W("r-0", tid, "reset"))
    assert (offen.outcome, offen.log_kind) == ("duplicate", None)

    apply_one(store, W("s-1", tid, "start", T0))
    reset = apply_one(store, W("r-1", tid, "reset", T2))
    assert (reset.outcome, reset.log_kind) == ("applied", "reset")
    row = fetch_row(store_url, tid)
    assert row is not None
    # Back in the queue as not started, as the plugin's own reset leaves it.
    assert (row["status"], row["started_at"], row["execution_started_at"]) == ("offen", None, None)
    assert when(row["updated_at"]) == T2

    apply_one(store, W("c-1", tid, "normal"))
    done = apply_one(store, W("r-2", tid, "reset"))
    assert done.outcome == "refused" and "already completed, nothing to reset" in done.reason
    assert store.get_todo(tid).status == "completed"  # type: ignore[union-attr]
    assert [k for _, k in store.logged_kinds(tid)] == ["reset", "normal"]


def test_replay_of_a_completion_id_is_already(store: Store, store_url: str) -> None:
    tid = store.add_todo("t")
    write = W("c-1", tid, "normal", T1, html="<p>one</p>")
    assert apply_one(store, write).outcome == "applied"
    before = fetch_row(store_url, tid)
    replay = apply_one(store, W("c-1", tid, "normal", T2, html="<p>two</p>"))
    assert (replay.outcome, replay.log_kind) == ("already", "normal")
    assert fetch_row(store_url, tid) == before
    assert store.logged_kinds(tid) == [("c-1", "normal")]

    # The same id twice in one batch: the second sees the first inside the transaction.
    other = store.add_todo("u")
    outs = store.apply([W("c-2", other, "emergency"), W("c-2", other, "emergency")])
    assert [o.outcome for o in outs] == ["applied", "already"]


def test_batch_of_200_in_one_transaction(store: Store, store_url: str) -> None:
    ids = [store.add_todo(f"todo {i}") for i in range(200)]
    writes = [W(f"b-{i}", tid, "normal", text=f"out {i}") for i, tid in enumerate(ids)]
    started = time.monotonic()
    outcomes = store.apply(writes)
    assert time.monotonic() - started < 10
    assert [o.completion_id for o in outcomes] == [w.completion_id for w in writes]
    assert {o.outcome for o in outcomes} == {"applied"}
    assert all(store.verify(w, o) for w, o in zip(writes, outcomes, strict=True))
    assert len(store.todos_with_status("completed")) == 200
    assert store.todos_with_status("offen") == []


def test_a_failing_batch_changes_nothing(store: Store, store_url: str) -> None:
    ids = [store.add_todo(f"todo {i}") for i in range(5)]
    # A trigger that fails the update of the 4th todo: the first three must roll back too.
    if backend_of(store_url) == "sqlite":
        raw_execute(
            store_url,
            f"CREATE TRIGGER boom BEFORE UPDATE ON stage_project_todos WHEN NEW.id = {ids[3]} "
            "BEGIN SELECT RAISE(ABORT, 'boom'); END",
        )
    else:
        raw_execute(
            store_url,
            "CREATE TRIGGER boom BEFORE UPDATE ON stage_project_todos FOR EACH ROW "
            f"BEGIN IF NEW.id = {ids[3]} THEN SIGNAL SQLSTATE '45000' "
            "SET MESSAGE_TEXT = 'boom'; END IF; END",
        )
    writes = [W(f"f-{i}", tid, "normal") for i, tid in enumerate(ids)]
    with pytest.raises(StoreError, match="boom"):
        store.apply(writes)
    assert len(store.todos_with_status("offen")) == 5
    assert all(store.logged_kinds(t) == [] for t in ids)
    raw_execute(store_url, "DROP TRIGGER boom")
    assert {o.outcome for o in store.apply(writes)} == {"applied"}


def test_verify_reads_the_database_back(store: Store, store_url: str) -> None:
    tid = store.add_todo("t")
    write = W("c-1", tid, "normal")
    (outcome,) = store.apply([write])
    assert store.verify(write, outcome)
    set_status(store_url, tid, "offen")  # someone undid it behind our back
    assert not store.verify(write, outcome)
    raw_execute(store_url, "DELETE FROM stage_completion_log WHERE completion_id = ?", ("c-1",))
    assert not store.verify(write, WriteOutcome("c-1", "already", log_kind="normal"))


def test_todos_with_status_and_aware_times(store: Store) -> None:
    a, b, c = (store.add_todo(n) for n in "abc")
    plus2 = timezone(timedelta(hours=2))
    store.apply([W("s-a", a, "start", datetime(2024, 1, 1, 12, 0, 0, 999, tzinfo=plus2))])
    store.apply([W("s-c", c, "start", T0)])
    found = store.todos_with_status("in_progress")
    assert [t.id for t in found] == [a, c]
    assert found[0].started_at == datetime(2024, 1, 1, 10, 0, 0)  # naive UTC, whole seconds
    assert [t.id for t in store.todos_with_status("offen")] == [b]
    assert len(store.todos_with_status("in_progress", limit=1)) == 1
    assert store.get_todo(999_999) is None


def test_recent_todos_are_the_live_ones_most_recently_changed_first(store: Store) -> None:
    started, queued, parked, done, late = (
        store.add_todo(n, queued=n != "parked")
        for n in ("started", "queued", "parked", "done", "late")
    )
    store.apply([W("s-1", started, "start", T0), W("s-2", done, "start", T0)])
    store.apply([W("c-2", done, "normal", T1), W("s-3", late, "start", T2)])
    live = store.recent_todos(10)
    # `late` and `started` changed at T2 and T0 (the agent's event times); the queued todo at
    # its creation, now: after both.
    assert [t.id for t in live] == [queued, late, started]
    assert live[1].updated_at == T2 and live[2].started_at == T0
    assert [t.id for t in store.recent_todos(1)] == [queued]
    assert [t.id for t in store.recent_todos(10, status="offen")] == [parked, queued]
    assert [t.id for t in store.recent_todos(10, status="completed")] == [done]
    assert store.recent_todos(10, status="blocked") == []


def test_get_todos_reads_those_that_exist(store: Store) -> None:
    a, b = store.add_todo("first", "one"), store.add_todo("second", "two", "/srv")
    found = store.get_todos([b, 999_999, a, a])
    assert sorted(found) == [a, b]
    assert (found[b].title, found[b].description, found[b].working_directory) == (
        "second",
        "two",
        "/srv",
    )
    assert store.get_todos([]) == {}


def test_ping_and_protocol(store: Store) -> None:
    assert isinstance(store, Store)
    store.ping()
    assert store.apply([]) == []


# --------------------------------------------------------------------------- schema


def test_check_schema_names_what_is_missing(store_url: str) -> None:
    s = open_store(store_url, timeout=5)
    problems = s.check_schema()
    assert len(problems) == 2
    assert "stage_project_todos` does not exist" in problems[0]
    assert "completion_log` does not exist" in problems[1]
    s.ensure_schema(create_todo_table=False)
    assert len(s.check_schema()) == 1  # completion_log only; the todo table was not asked for
    s.ensure_schema(create_todo_table=True)
    assert s.check_schema() == []
    # A column of the profile the table lacks is skipped, and `check` says so...
    raw_execute(store_url, "ALTER TABLE stage_project_todos DROP COLUMN claude_summary")
    fresh = open_store(store_url, timeout=5)
    assert fresh.check_schema() == []
    assert any(
        line.startswith("summary") and "no claude_summary" in line and "not written" in line
        for line in fresh.describe_profile()
    )
    fresh.close()
    # ...a column the agent needs is a problem.
    raw_execute(store_url, "ALTER TABLE stage_project_todos DROP COLUMN title")
    (problem,) = s.check_schema()
    assert "`title` is missing" in problem and "ALTER TABLE" in problem
    s.close()


@pytest.mark.mysql
def test_check_schema_names_wrong_types(mysql_url: str, wordpress_table: str) -> None:
    s = open_store(mysql_url, timeout=5)
    s.ensure_schema(create_todo_table=False)
    assert s.check_schema() == []
    raw_execute(mysql_url, "ALTER TABLE stage_project_todos MODIFY started_at VARCHAR(30)")
    raw_execute(
        mysql_url,
        "ALTER TABLE stage_project_todos MODIFY status ENUM('offen','done') DEFAULT 'offen'",
    )
    problems = s.check_schema()
    assert len(problems) == 2
    assert any("`started_at`" in p and "DATETIME or TIMESTAMP" in p for p in problems)
    assert any("`status`" in p and "in_progress, completed" in p for p in problems)
    s.close()


@pytest.mark.mysql
def test_wordpress_table_works_and_is_never_altered(mysql_url: str, wordpress_table: str) -> None:
    before = show_create_table(mysql_url)
    s = open_store(mysql_url, timeout=5)
    s.ensure_schema(create_todo_table=False)
    s.ensure_schema(create_todo_table=True)
    assert show_create_table(mysql_url) == before
    assert s.check_schema() == []

    tid = s.add_todo("from the agent", "desc", "/w")
    raw_execute(
        mysql_url, "UPDATE stage_project_todos SET claude_output = 'keep' WHERE id = ?", (tid,)
    )
    assert apply_one(s, W("s-1", tid, "start", T0)).outcome == "applied"
    assert apply_one(s, W("c-1", tid, "normal", T1, html="<b>x</b>")).outcome == "applied"
    row = fetch_row(mysql_url, tid)
    assert row is not None
    assert (row["priority"], row["created_by"], row["assigned_to"], row["claude_output"]) == (
        "mittel",
        1,
        "claude",
        "keep",
    )
    assert (row["status"], row["claude_html_output"], when(row["completed_at"])) == (
        "completed",
        "<b>x</b>",
        T1,
    )
    # A row the plugin made with WordPress' zero date still reads (as None).
    raw_execute(
        mysql_url,
        "INSERT INTO stage_project_todos (title, status, started_at) "
        "VALUES ('wp', 'in_progress', '0000-00-00 00:00:00')",
    )
    (wp,) = s.todos_with_status("in_progress")
    assert (wp.title, wp.started_at) == ("wp", None)
    # Only the AUTO_INCREMENT counter moved.
    assert re.sub(r" AUTO_INCREMENT=\d+", "", show_create_table(mysql_url)) == before
    s.close()


@pytest.mark.mysql
def test_db_init_creates_the_mysql_todo_table(mysql_url: str) -> None:
    s = open_store(mysql_url, timeout=5)
    s.ensure_schema(create_todo_table=True)
    ddl = show_create_table(mysql_url)
    assert "enum('offen','in_progress','completed','blocked','cancelled','cron')" in ddl
    assert "longtext" in ddl.lower()
    assert "InnoDB" in show_create_table(mysql_url, "stage_completion_log")
    assert s.check_schema() == []
    s.close()


# The audit table as completiond made it before `note` existed.
OLD_LOG_DDL = {
    "sqlite": (
        "CREATE TABLE stage_completion_log (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "completion_id TEXT NOT NULL UNIQUE, todo_id INTEGER NOT NULL, kind TEXT NOT NULL, "
        "sources TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 1, "
        "created_at TEXT NOT NULL, logged_at TEXT NOT NULL)"
    ),
    "mysql": (
        "CREATE TABLE stage_completion_log (`id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT, "
        "`completion_id` VARCHAR(64) COLLATE utf8mb4_bin NOT NULL, `todo_id` BIGINT NOT NULL, "
        "`kind` VARCHAR(16) NOT NULL, `sources` VARCHAR(255) NOT NULL DEFAULT '', "
        "`attempts` INT NOT NULL DEFAULT 1, `created_at` DATETIME NOT NULL, "
        "`logged_at` DATETIME NOT NULL, PRIMARY KEY (`id`), "
        "UNIQUE KEY `uq_completion_id` (`completion_id`), KEY `ix_todo_id` (`todo_id`)"
        ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
    ),
}


def log_columns(url: str) -> list[str]:
    if backend_of(url) == "sqlite":
        return [r[1] for r in raw_execute(url, "PRAGMA table_info(stage_completion_log)")]
    rows = raw_execute(
        url,
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()"
        " AND TABLE_NAME = 'stage_completion_log' ORDER BY ORDINAL_POSITION",
    )
    return [r[0] for r in rows]


def test_the_audit_row_keeps_the_reason(store: Store, store_url: str) -> None:
    failed, forced, done = (store.add_todo(t) for t in ("failed", "forced", "done"))
    for tid in (failed, forced, done):
        apply_one(store, W(f"s-{tid}", tid, "start", T0))
    error = "StopFailure: rate_limit: 429 Too Many Requests"
    assert apply_one(store, W("f-1", failed, "failure", note=error, text="half")).outcome == (
        "applied"
    )
    long_reason = "no sign of life for 2 h; " + "ü" * 5000
    apply_one(store, W("e-1", forced, "emergency", note=long_reason))
    apply_one(store, W("c-1", done, "normal", text="ok"))
    assert store.audit_rows(failed) == [("f-1", "failure", error)]
    ((cid, kind, note),) = store.audit_rows(forced)
    assert (cid, kind) == ("e-1", "emergency")
    assert note is not None and len(note) <= 1024 and note.startswith("no sign of life for 2 h; ü")
    assert note.endswith("bytes omitted to fit the column]")
    assert store.audit_rows(done) == [("c-1", "normal", None)]
    (row,) = raw_execute(
        store_url, "SELECT note FROM stage_completion_log WHERE completion_id = ?", ("f-1",)
    )
    assert row[0] == error
    assert fetch_row(store_url, failed)["status"] == "offen"  # type: ignore[index]


def test_an_older_audit_table_gains_its_note_column(store_url: str) -> None:
    s = open_store(store_url, timeout=5)
    s.ensure_schema(create_todo_table=True)
    tid = s.add_todo("before the note")
    s.close()
    raw_execute(store_url, "DROP TABLE stage_completion_log")
    raw_execute(store_url, OLD_LOG_DDL[backend_of(store_url)])
    raw_execute(
        store_url,
        "INSERT INTO stage_completion_log (completion_id, todo_id, kind, created_at, logged_at)"
        " VALUES ('old-1', ?, 'reset', '2024-05-06 07:08:09', '2024-05-06 07:08:09')",
        (tid,),
    )
    old = open_store(store_url, timeout=5)
    # An agent on the old table is not broken: no problem, a line saying how to add the column,
    # and writes without a note.
    assert old.check_schema() == []
    (line,) = [x for x in old.describe_profile() if "`note`" in x]
    assert "ALTER TABLE `stage_completion_log` ADD COLUMN `note`" in line
    apply_one(old, W("s-1", tid, "start", T0))
    assert apply_one(old, W("f-1", tid, "failure", note="StopFailure: boom")).outcome == "applied"
    assert old.audit_rows(tid) == [("old-1", "reset", None), ("f-1", "failure", None)]

    old.ensure_schema(create_todo_table=False)  # what completiond and `db init` do at start
    assert log_columns(store_url)[-1] == "note"
    assert old.check_schema() == []
    assert not [x for x in old.describe_profile() if "`note`" in x]
    apply_one(old, W("s-2", tid, "start", T1))
    apply_one(old, W("f-2", tid, "failure", T2, note="StopFailure: again"))
    assert old.audit_rows(tid)[-1] == ("f-2", "failure", "StopFailure: again")
    assert old.audit_rows(tid)[0] == ("old-1", "reset", None)  # the old rows stay as they were
    old.ensure_schema(create_todo_table=False)  # idempotent
    assert log_columns(store_url).count("note") == 1
    old.close()


@pytest.mark.mysql
def test_a_note_migration_held_up_by_an_open_transaction_does_not_stop_the_store(
    mysql_url: str,
) -> None:
    """A transaction left open on the audit table (another agent, a backup) holds the ALTER's
    metadata lock: the store waits lock_wait_timeout, then goes on without notes."""
    s = open_store(mysql_url, timeout=3)
    s.ensure_schema(create_todo_table=True)
    tid = s.add_todo("a backup is running")
    s.close()
    raw_execute(mysql_url, "DROP TABLE stage_completion_log")
    raw_execute(mysql_url, OLD_LOG_DDL["mysql"])
    with raw_connection(mysql_url) as backup, contextlib.closing(backup.cursor()) as cur:
        cur.execute("START TRANSACTION")
        cur.execute("SELECT COUNT(*) FROM stage_completion_log")  # holds a metadata lock
        store = open_store(mysql_url, timeout=3)
        started = time.monotonic()
        store.ensure_schema(create_todo_table=False)  # no error: the migration waits, gives up
        assert time.monotonic() - started < 30
        assert "note" not in log_columns(mysql_url)
        apply_one(store, W("s-1", tid, "start", T0))
        assert apply_one(store, W("f-1", tid, "failure", note="x")).outcome == "applied"
        backup.rollback()
    store.ensure_schema(create_todo_table=False)  # the next start adds it
    assert log_columns(mysql_url)[-1] == "note"
    store.close()


@pytest.mark.mysql
def test_a_user_who_may_not_alter_the_audit_table_runs_without_notes(
    mysql_server: MysqlServer, mysql_url: str
) -> None:
    s = open_store(mysql_url, timeout=5)
    s.ensure_schema(create_todo_table=True)
    tid = s.add_todo("no ALTER grant")
    s.close()
    raw_execute(mysql_url, "DROP TABLE stage_completion_log")
    raw_execute(mysql_url, OLD_LOG_DDL["mysql"])
    database = mysql_url.rsplit("/", 1)[1]
    grants = "SELECT, INSERT, UPDATE, DELETE, CREATE"
    with mysql_server.throwaway_user(database, grants) as (url, _password):
        limited = open_store(url, timeout=5)
        limited.ensure_schema(create_todo_table=False)  # the ALTER is refused: no failure
        assert "note" not in log_columns(mysql_url)
        assert limited.check_schema() == []
        assert any("may ALTER" in x for x in limited.describe_profile())
        apply_one(limited, W("s-1", tid, "start", T0))
        apply_one(limited, W("f-1", tid, "failure", note="StopFailure: boom"))
        assert limited.audit_rows(tid) == [("f-1", "failure", None)]
        limited.close()


# --------------------------------------------------------------------------- output fitting


@pytest.mark.mysql
def test_oversize_output_is_truncated_to_a_text_column(
    mysql_url: str, wordpress_table: str
) -> None:
    s = open_store(mysql_url, timeout=5)
    s.ensure_schema(create_todo_table=False)
    tid = s.add_todo("big")
    text = "ä€😀x" * 20_000  # 200 KB of 1- to 4-byte characters for a 64 KiB TEXT column
    html = "<p>" + "h" * 300_000 + "</p>"  # LONGTEXT: kept whole
    write = W("c-1", tid, "normal", html=html, text=text, summary="fits")
    assert apply_one(s, write).outcome == "applied"
    row = fetch_row(mysql_url, tid)
    assert row is not None
    stored = row["claude_text_output"]
    assert len(stored.encode("utf-8")) <= 65535
    head, _, note = stored.rpartition("\n")
    assert text.startswith(head) and len(head) > 10_000
    omitted = len(text.encode("utf-8")) - len(head.encode("utf-8"))
    assert note == f"[truncated: {omitted} bytes omitted to fit the column]"
    assert row["claude_html_output"] == html
    assert row["claude_summary"] == "fits"
    s.close()


@pytest.mark.mysql
def test_characters_a_column_cannot_hold_are_replaced(mysql_url: str, wordpress_table: str) -> None:
    raw_execute(
        mysql_url,
        "ALTER TABLE stage_project_todos MODIFY claude_summary TEXT CHARACTER SET utf8mb3",
    )
    s = open_store(mysql_url, timeout=5)
    s.ensure_schema(create_todo_table=False)
    tid = s.add_todo("emoji")
    assert apply_one(s, W("c-1", tid, "normal", summary="done 🚀 ✓")).outcome == "applied"
    assert fetch_row(mysql_url, tid)["claude_summary"] == "done \ufffd ✓"  # type: ignore[index]
    s.close()


def test_outputs_are_cut_to_fit_one_packet() -> None:
    store = open_store("mysql://u@h/db")  # never connects: the limits are given
    big = "'" * 300_000  # escapes to twice its size on the wire
    store._limits = _Limits(  # type: ignore[attr-defined]
        {c: (2**32 - 1, 2**32 - 1, "utf8mb4") for c in ("claude_html_output",)}, packet=1 << 20
    )
    store._resolved = resolve(  # type: ignore[attr-defined]
        SiteProfile(),
        {"claude_html_output": "longtext", "claude_text_output": "text", "claude_summary": "text"},
    )
    write = W("c", 1, "normal", html=big, text="t" * 600_000, summary="s")
    html, text, summary = store._fit_outputs(None, write)  # type: ignore[attr-defined]
    wire = 2 * len(html) + len(text.encode()) + len(summary)
    assert wire <= (1 << 20) - 64 * 1024
    assert html.endswith("bytes omitted to fit the column]") and text.startswith("tttt")
    assert summary == "s"


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.none(), st.text(max_size=300)))
def test_the_cheap_wire_size_bound_is_never_below_the_measured_size(value: str | None) -> None:
    # _fit_outputs skips measuring when the bounds fit; a bound below the size would let an
    # oversize statement through.
    assert _wire_size_bound(value) >= _wire_size(value)


_SQL_SPECIALS = "\\\0\n\r\032'\"%?`;-"


@settings(max_examples=500, deadline=None)
@given(
    value=st.text(
        alphabet=st.one_of(st.sampled_from(_SQL_SPECIALS), st.characters(codec="utf-8")),
        max_size=300,
    )
)
def test_the_fast_escape_is_pymysqls_exactly(value: str) -> None:
    # The writer quotes every string with it (agent.store.mysql._Connection.escape): a
    # difference would be a wrong value in the database, or an injection.
    assert escape_string(value) == pymysql.converters.escape_string(value)


def test_strings_with_every_special_character_round_trip_through_the_store(
    store: Store, store_url: str
) -> None:
    tricky = "it's \"quoted\" \\ back\\slash \\' \0 nul \032 sub\r\n%s ? `x`; -- ' OR 1=1 -- ü😀"
    tid = store.add_todo(tricky, tricky, "/srv/" + tricky)
    write = W("c-tricky", tid, "normal", html=tricky, text=tricky + "!", summary=tricky[:40])
    assert apply_one(store, write).outcome == "applied"
    row = fetch_row(store_url, tid)
    assert row is not None
    assert (row["claude_html_output"], row["claude_text_output"]) == (tricky, tricky + "!")
    assert row["claude_summary"] == tricky[:40]
    todo = store.get_todo(tid)
    assert todo is not None and (todo.title, todo.description) == (tricky, tricky)


@settings(max_examples=300, deadline=None)
@given(
    value=st.text(max_size=300),
    max_bytes=st.integers(min_value=0, max_value=400),
    charset=st.sampled_from(["utf8mb4", "utf8mb3", "latin1", "ascii", "ucs2"]),
)
def test_fit_text_never_exceeds_and_never_splits(value: str, max_bytes: int, charset: str) -> None:
    out = fit_text(value, max_bytes, None, charset)
    codec = {"latin1": "cp1252", "ascii": "ascii"}.get(charset, "utf-8")
    encoded = out.encode(codec)  # strict: every character is storable
    if charset == "ucs2":  # unknown charset: 4 bytes a character assumed
        assert len(out) * 4 <= max_bytes
    else:
        assert len(encoded) <= max_bytes
    whole = fit_text(value, None, None, charset)
    if out != whole and "\n[truncated" in out:
        assert whole.startswith(out[: out.rindex("\n[truncated")])
    elif out != whole:  # too small a column even for the note: a bare head
        assert whole.startswith(out)


def test_fit_text_respects_character_limits() -> None:
    out = fit_text("abcdefghij" * 20, 400, 100, "utf8mb4")
    assert len(out) <= 100 and out.startswith("abcdefghij")
    assert out.endswith(TRUNCATION_NOTE.format(200 - out.index("\n")))
    assert fit_text("\ud800lone", None, None, "utf8mb4") == "?lone"


# --------------------------------------------------------------------------- errors


def test_wrong_table_is_permanent(store_url: str) -> None:
    s = open_store(store_url, table="no_such_table", timeout=5)
    s.ensure_schema(create_todo_table=False)
    started = time.monotonic()
    with pytest.raises(PermanentError) as info:
        s.apply([W("c-1", 1, "normal")])
    assert not info.value.transient
    assert "no_such_table" in str(info.value)
    with pytest.raises(PermanentError):
        s.get_todo(1)
    assert time.monotonic() - started < 2  # failed at once, not retried
    s.close()


@pytest.mark.mysql
def test_wrong_password_is_permanent_and_never_shown(mysql_url: str) -> None:
    url = mysql_url.replace("root@", "root:s3cret%2Fpw@")
    s = open_store(url, timeout=5)
    assert "s3cret" not in repr(s)
    with pytest.raises(PermanentError) as info:
        s.apply([W("c-1", 1, "normal")])
    assert info.value.errno == 1045 and "password" in str(info.value)
    for text in (str(info.value), repr(info.value)):
        assert "s3cret" not in text
    with pytest.raises(PermanentError):
        s.ping()


@pytest.mark.mysql
def test_unknown_database_is_permanent(mysql_url: str) -> None:
    s = open_store(mysql_url.rsplit("/", 1)[0] + "/no_such_db_here", timeout=5)
    with pytest.raises(PermanentError) as info:
        s.check_schema()
    assert info.value.errno == 1049


@pytest.mark.mysql
@pytest.mark.skipif(not os.path.exists(SOCKET), reason=f"no MySQL socket at {SOCKET}")
def test_unix_socket_url(mysql_url: str) -> None:
    db = mysql_url.rsplit("/", 1)[1]
    s = open_store(f"mysql://root@localhost/{db}?unix_socket={SOCKET}", timeout=5)
    try:
        s.ping()
    except PermanentError as exc:  # root may not be allowed in over the socket here
        pytest.skip(f"root cannot log in over {SOCKET}: {exc}")
    s.ensure_schema(create_todo_table=True)
    tid = s.add_todo("via socket")
    assert apply_one(s, W("c-1", tid, "normal")).outcome == "applied"
    s.close()


def test_held_row_lock_is_transient_then_succeeds(store_url: str) -> None:
    s = open_store(store_url, timeout=2)
    s.ensure_schema(create_todo_table=True)
    tid = s.add_todo("locked")
    write = W("c-1", tid, "normal")
    with hold_row_lock(store_url, tid):
        started = time.monotonic()
        with pytest.raises(TransientError) as info:
            s.apply([write])
        assert time.monotonic() - started < 2 + 1.5
        assert info.value.errno == (1205 if backend_of(store_url) == "mysql" else 5)
    assert apply_one(s, write).outcome == "applied"
    s.close()


# --------------------------------------------------------------------------- through the proxy


@pytest.fixture
def proxied(mysql_url: str, tcp_proxy: TcpProxy) -> Iterator[Store]:
    """A store (timeout 2 s) that reaches MariaDB only through `tcp_proxy`."""
    s = open_store(proxied_url(mysql_url, tcp_proxy), timeout=2)
    yield s
    s.close()


@pytest.mark.mysql
def test_refused_connection_is_transient_and_fast(proxied: Store, tcp_proxy: TcpProxy) -> None:
    tcp_proxy.mode = "refuse"
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        proxied.apply([W("c-1", 1, "normal")])
    assert info.value.errno == 2003
    with pytest.raises(TransientError):
        proxied.ping()
    assert time.monotonic() - started < 1
    tcp_proxy.mode = "pass"
    proxied.ensure_schema(create_todo_table=True)  # reconnects by itself
    proxied.ping()


@pytest.mark.mysql
def test_blackhole_is_transient_within_the_timeout(proxied: Store, tcp_proxy: TcpProxy) -> None:
    # A server that never answers a new connection...
    tcp_proxy.mode = "blackhole"
    started = time.monotonic()
    with pytest.raises(TransientError):
        proxied.ping()
    assert time.monotonic() - started < 2 + 1.5
    # ...and one that stops answering in the middle of a session.
    tcp_proxy.mode = "pass"
    proxied.ensure_schema(create_todo_table=True)
    tid = proxied.add_todo("t")
    tcp_proxy.mode = "blackhole"
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        proxied.apply([W("c-1", tid, "normal")])
    assert time.monotonic() - started < 2 + 1.5
    assert info.value.errno == 2013
    tcp_proxy.mode = "pass"
    assert proxied.apply([W("c-1", tid, "normal")])[0].outcome == "applied"


@pytest.mark.mysql
def test_cut_mid_transaction_rolls_back_and_a_fresh_connection_succeeds(
    proxied: Store, tcp_proxy: TcpProxy, mysql_url: str
) -> None:
    proxied.ensure_schema(create_todo_table=True)
    ids = [proxied.add_todo(f"t{i}") for i in range(3)]
    writes = [W(f"c-{i}", tid, "normal", html="x") for i, tid in enumerate(ids)]
    fired = tcp_proxy.cut_on_client_data(b"INSERT INTO `stage_completion_log`")
    with pytest.raises(TransientError) as info:
        proxied.apply(writes)
    assert fired.is_set() and info.value.errno in (2013, 2006)
    direct = open_store(mysql_url, timeout=5)
    assert len(direct.todos_with_status("offen")) == 3  # the first UPDATE was rolled back
    assert all(direct.logged_kinds(t) == [] for t in ids)
    assert [o.outcome for o in proxied.apply(writes)] == ["applied"] * 3
    direct.close()


@pytest.mark.mysql
def test_lost_commit_ack_then_replay_applies_exactly_once(
    proxied: Store, tcp_proxy: TcpProxy, mysql_url: str
) -> None:
    proxied.ensure_schema(create_todo_table=True)
    tid = proxied.add_todo("t")
    write = W("c-1", tid, "normal", html="<p>once</p>")
    fired = tcp_proxy.cut_on_server_reply_after(b"COMMIT")
    with pytest.raises(TransientError):
        proxied.apply([write])
    assert fired.is_set()
    (replay,) = proxied.apply([write])
    assert (replay.outcome, replay.log_kind) == ("already", "normal")
    assert proxied.verify(write, replay)
    assert proxied.logged_kinds(tid) == [("c-1", "normal")]
    assert proxied.get_todo(tid).status == "completed"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- classify, URLs


@pytest.mark.parametrize(
    ("exc", "transient", "errno"),
    [
        (pymysql.err.OperationalError(2003, "Can't connect"), True, 2003),
        (pymysql.err.OperationalError(2006, "gone away"), True, 2006),
        (pymysql.err.OperationalError(2013, "Lost connection"), True, 2013),
        (pymysql.err.OperationalError(1205, "Lock wait timeout"), True, 1205),
        (pymysql.err.OperationalError(1213, "Deadlock"), True, 1213),
        (pymysql.err.OperationalError(1040, "Too many connections"), True, 1040),
        (pymysql.err.InternalError(1290, "read-only"), True, 1290),
        (pymysql.err.OperationalError(1927, "killed"), True, 1927),
        (pymysql.err.OperationalError(9999, "something new"), True, 9999),
        (pymysql.err.InterfaceError(0, ""), True, None),
        (pymysql.err.Error("Already closed"), True, None),
        (TimeoutError("timed out"), True, None),
        (ConnectionResetError(104, "reset"), True, None),
        (TimeoutError("timed out"), True, None),
        (pymysql.err.OperationalError(1045, "Access denied"), False, 1045),
        (pymysql.err.OperationalError(1044, "Access denied to db"), False, 1044),
        (pymysql.err.OperationalError(1049, "Unknown database"), False, 1049),
        (pymysql.err.OperationalError(1054, "Unknown column"), False, 1054),
        (pymysql.err.ProgrammingError(1146, "Table doesn't exist"), False, 1146),
        (pymysql.err.ProgrammingError(1064, "syntax"), False, 1064),
        (pymysql.err.DataError(1406, "Data too long"), False, 1406),
        (pymysql.err.OperationalError(1142, "command denied"), False, 1142),
        (pymysql.err.IntegrityError(1062, "Duplicate entry"), False, 1062),
        (pymysql.err.NotSupportedError(1235, "not supported"), False, 1235),
        (ValueError("a bug"), False, None),
    ],
)
def test_classify(exc: BaseException, transient: bool, errno: int | None) -> None:
    err = classify(exc)
    assert isinstance(err, TransientError if transient else PermanentError)
    assert err.transient is transient and err.errno == errno
    assert ("will retry" in str(err)) is transient
    assert classify(err) is err


def test_urls() -> None:
    assert parse_url("sqlite:///var/lib/c/todos.db") == SqliteTarget(Path("/var/lib/c/todos.db"))
    assert parse_url("sqlite:////var/x.db") == parse_url("sqlite:///var/x.db")
    m = parse_url("mysql://wp%40user:p%40ss%3Aw%2Fd@db.example:3307/wp%5Fsite")
    assert m == MysqlTarget("wp@user", "p@ss:w/d", "db.example", 3307, "wp_site")
    assert "p@ss" not in repr(m) and "p@ss" not in m.redacted()  # type: ignore[union-attr]
    s = parse_url("mysql://root@localhost/db?unix_socket=/run/mysqld/mysqld.sock")
    assert s == MysqlTarget("root", "", "localhost", 3306, "db", "/run/mysqld/mysqld.sock")
    assert parse_url("mysql://u@[::1]:3306/db") == MysqlTarget("u", "", "::1", 3306, "db")
    assert redact_url("mysql://u:top/secret@h/db") == "mysql://u:***@h/db"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "todos.db",
        "postgres://u:topsecret@h/db",
        "sqlite://relative/x.db",
        "sqlite:///",
        "mysql://h/db",
        "mysql://:topsecret@h/db",
        "mysql://u:topsecret@/db",
        "mysql://u:topsecret@h:99999/db",
        "mysql://u:topsecret@h:port/db",
        "mysql://u:topsecret@h",
        "mysql://u:topsecret@h/",
        "mysql://u:topsecret@h/a/b",
        "mysql://u:topsecret@h/db?charset=latin1",
        "mysql://u:topsecret@h/db?unix_socket=relative.sock",
    ],
)
def test_bad_urls_say_why_without_the_password(url: str) -> None:
    with pytest.raises(ValueError) as info:
        open_store(url)
    assert "topsecret" not in str(info.value)
    assert len(str(info.value)) > 20


@pytest.mark.parametrize("table", ["", "a-b", "x; DROP TABLE y", "`t`", "completion_log", "t" * 65])
def test_bad_table_names_are_refused(table: str) -> None:
    with pytest.raises(ValueError):
        open_store("sqlite:///tmp/never-created.db", table=table)


def test_malformed_writes_are_refused_early() -> None:
    with pytest.raises(ValueError):
        TodoWrite("x" * 65, 1, "normal", T0)
    with pytest.raises(ValueError):
        TodoWrite("x", 1, "finish", T0)
    with pytest.raises(ValueError):
        open_store("sqlite:///tmp/never-created.db", timeout=0)


def test_sqlite_creates_the_parent_directory(tmp_path: Path) -> None:
    path = f"{tmp_path}/deep/er/todos.db"
    s = open_store(f"sqlite://{path}")
    s.ensure_schema(create_todo_table=True)
    assert s.add_todo("x") == 1
    assert os.path.exists(path)
    s.close()
