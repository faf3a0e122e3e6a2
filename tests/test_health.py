"""HealthChecker.run_round(now) with an injected clock: each check goes WARNING/CRITICAL on a
fixture made for it and back to OK, and auto-recovery acts once, logged and counted."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

import protocol as p
from agent.health import CheckResult, HealthChecker
from agent.intake import MONITOR_CHECKS, Intake
from agent.journal import Journal
from agent.store import open_store
from agent.store.base import db_time
from tests.harness import T0, merge, unit_config

HANG = 100.0  # hanging_after in these tests


class HealthRig:
    def __init__(self, root: Path, extra: dict[str, Any] | None = None) -> None:
        base = {"behavior": {"hanging_after": HANG, "log_max_bytes": 1000}}
        self.config = unit_config(root, merge(base, extra or {}))
        self.journal = Journal.create(self.config.journal_path)
        self.intake = Intake(self.config, self.journal, lambda: {}, T0)
        self.store = open_store(self.config.database_url, table="stage_project_todos")
        self.store.ensure_schema(create_todo_table=True)
        self.checker = HealthChecker(self.config, clock=lambda: T0)
        self.lines: list[str] = []
        self._sink = logger.add(lambda m: self.lines.append(str(m)), level="INFO")

    def round(self, now: float) -> dict[str, CheckResult]:
        return {r.name: r for r in self.checker.run_round(now)}

    def add(self, status: str = "offen", started_at: float | None = None) -> int:
        todo_id = self.store.add_todo("a todo")
        self.set(todo_id, status, started_at)
        return todo_id

    def set(self, todo_id: int, status: str, started_at: float | None = None) -> None:
        started = db_time(datetime.fromtimestamp(started_at, UTC)) if started_at else None
        with contextlib.closing(
            sqlite3.connect(self.config.database_url[len("sqlite://") :])
        ) as db:
            db.execute(
                "UPDATE stage_project_todos SET status = ?, started_at = ? WHERE id = ?",
                (status, started, todo_id),
            )
            db.commit()

    def start(self, todo_id: int, at: float) -> None:
        self.intake.apply(p.Start(request_id=f"s-{todo_id}-{at}", todo_id=todo_id), at)

    def send(self, request: p.Request, at: float) -> None:
        self.intake.apply(request, at)

    def kinds(self, todo_id: int) -> list[tuple[str, str]]:
        return [(e.kind, e.completion_id) for e in self.journal.entries_for_todo(todo_id)]

    def close(self) -> None:
        logger.remove(self._sink)
        self.store.close()
        self.journal.close()


@pytest.fixture
def make_rig(tmpdir_short: Path) -> Iterator[Any]:
    rigs: list[HealthRig] = []

    def make(extra: dict[str, Any] | None = None, name: str = "h") -> HealthRig:
        root = tmpdir_short / name
        root.mkdir()
        rig = HealthRig(root, extra)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def test_a_clean_round_is_all_ok_and_saved_for_the_parent(make_rig) -> None:
    rig = make_rig()
    results = rig.round(T0)
    assert set(results) == set(MONITOR_CHECKS)
    assert {r.status for r in results.values()} == {"OK"}
    saved = {name: status for name, status, _, _, _ in rig.journal.checks()}
    assert saved == dict.fromkeys(MONITOR_CHECKS, "OK")


def test_database_unreachable_is_critical_and_comes_back(make_rig, tmpdir_short: Path) -> None:
    blocker = tmpdir_short / "blocker"
    rig = make_rig({"database": {"url": f"sqlite:///{blocker}/todos.db"}})
    rig.store.close()
    shutil.rmtree(blocker)
    blocker.write_text("a file where the database's directory should be")
    results = rig.round(T0)
    assert results["database"].status == "CRITICAL"
    assert "unreachable" in results["database"].message
    assert results["hanging_todos"].status == "UNKNOWN"
    assert results["db_consistency"].status == "UNKNOWN"
    blocker.unlink()
    results = rig.round(T0 + 1)
    assert results["database"].status == "OK"
    assert results["hanging_todos"].status == "OK"


def test_own_todo_silent_too_long_is_hanging_until_a_heartbeat(make_rig) -> None:
    rig = make_rig({"behavior": {"auto_recovery": False}})
    todo = rig.add("in_progress", started_at=T0)
    rig.start(todo, T0)
    assert rig.round(T0 + HANG)["hanging_todos"].status == "OK"
    hanging = rig.round(T0 + HANG + 1)["hanging_todos"]
    assert (hanging.status, hanging.todo_ids) == ("WARNING", [todo])
    assert rig.kinds(todo) == [("start", f"start-s-{todo}-{T0}")]  # reported, not touched
    rig.send(p.Heartbeat(request_id="hb", todo_id=todo), T0 + HANG + 2)
    assert rig.round(T0 + HANG + 3)["hanging_todos"].status == "OK"


def test_a_session_waiting_for_a_person_is_not_hanging(make_rig) -> None:
    rig = make_rig()
    todo = rig.add("in_progress", started_at=T0)
    rig.start(todo, T0)
    rig.send(p.Waiting(request_id="w", todo_id=todo, reason="permission_prompt"), T0 + 1)
    results = rig.round(T0 + 10 * HANG)
    assert results["hanging_todos"].status == "OK"
    assert [k for k, _ in rig.kinds(todo)] == ["start"]


def test_a_todo_held_by_a_pending_schedule_is_not_hanging(make_rig) -> None:
    rig = make_rig({"behavior": {"emergency_timeout": 1000 * HANG}})
    todo = rig.add("in_progress", started_at=T0)
    rig.start(todo, T0)
    due = T0 + 100 * HANG  # before the emergency deadline: it holds
    rig.send(p.Schedule(request_id="sch", todo_id=todo, due_at=due, output="later"), T0 + 1)
    results = rig.round(T0 + 10 * HANG)
    assert results["hanging_todos"].status == "OK"
    assert [k for k, _ in rig.kinds(todo)] == ["start"]  # auto-recovery left it alone
    rig.send(p.Cancel(request_id="c", todo_id=todo), T0 + 10 * HANG + 1)
    assert rig.round(T0 + 10 * HANG + 2)["hanging_todos"].status == "WARNING"


def test_a_schedule_past_the_emergency_deadline_holds_nothing(make_rig) -> None:
    """A far-off schedule (anyone on the socket may make one) must not hide a silent session."""
    rig = make_rig({"behavior": {"auto_recovery": False, "emergency_timeout": 1000 * HANG}})
    todo = rig.add("in_progress", started_at=T0)
    rig.start(todo, T0)
    far = T0 + 10**6 * HANG
    rig.send(p.Schedule(request_id="far", todo_id=todo, due_at=far, output="x"), T0 + 1)
    hanging = rig.round(T0 + 10 * HANG)["hanging_todos"]
    assert (hanging.status, hanging.todo_ids) == ("WARNING", [todo])


def test_auto_recovery_force_completes_a_hanging_todo_once(make_rig) -> None:
    rig = make_rig()
    todo = rig.add("in_progress", started_at=T0)
    rig.start(todo, T0)
    first = rig.round(T0 + HANG + 1)["hanging_todos"]
    assert first.status == "WARNING"
    assert "auto-recovery forced the completion" in first.message
    [emergency] = [e for e in rig.journal.entries_for_todo(todo) if e.kind == "emergency"]
    assert emergency.completion_id == f"hang-{todo}-{int(T0)}"
    assert "hanging" in emergency.reason
    assert rig.journal.timers(todo)[0].completion_fired == 1  # the deadline stands down
    again = rig.round(T0 + 3 * HANG)["hanging_todos"]
    assert "forced" not in again.message
    assert len([k for k, _ in rig.kinds(todo) if k == "emergency"]) == 1
    assert rig.journal.counters() == {"forced_completions": 1}
    assert any("auto-recovery: forced completion of hanging todo" in line for line in rig.lines)
    rig.set(todo, "completed")  # the writer landed it
    assert rig.round(T0 + 4 * HANG)["hanging_todos"].status == "OK"


def test_a_todo_never_seen_is_reported_and_left_alone_unless_scope_is_all(make_rig) -> None:
    own = make_rig(name="own")
    todo = own.add("in_progress", started_at=T0 - 2 * HANG)
    results = own.round(T0)
    assert (results["hanging_todos"].status, results["hanging_todos"].todo_ids) == (
        "WARNING",
        [todo],
    )
    assert results["db_consistency"].todo_ids == [todo]
    assert own.kinds(todo) == []
    assert own.journal.counters() == {}

    everyone = make_rig({"behavior": {"auto_recovery_scope": "all"}}, name="all")
    todo = everyone.add("in_progress", started_at=T0 - 2 * HANG)
    everyone.round(T0)
    everyone.round(T0 + 1)
    assert everyone.kinds(todo) == [("emergency", f"hang-{todo}-{int(T0 - 2 * HANG)}")]
    assert everyone.journal.counters() == {"forced_completions": 1}


def test_in_progress_with_no_live_session_is_inconsistent_until_started(make_rig) -> None:
    rig = make_rig()
    todo = rig.add("in_progress", started_at=T0)  # set in_progress behind the agent's back
    check = rig.round(T0 + 1)["db_consistency"]
    assert (check.status, check.todo_ids) == ("WARNING", [todo])
    assert rig.kinds(todo) == []  # never seen: reported, not touched
    rig.start(todo, T0 + 2)
    assert rig.round(T0 + 3)["db_consistency"].status == "OK"


def test_own_todo_whose_completion_never_landed_is_reset_once(make_rig) -> None:
    rig = make_rig()
    todo = rig.add("in_progress", started_at=T0)
    rig.start(todo, T0)
    rig.send(p.Complete(request_id="c", todo_id=todo, output="x"), T0 + 5)
    # The journal says it finished; the database still says in_progress (someone changed the
    # row back after the write, say).
    rig.journal.update_entry("c", T0 + 6, state="cleaned", outcome="applied")
    rig.journal.update_entry(f"start-s-{todo}-{T0}", T0 + 6, state="cleaned")
    check = rig.round(T0 + 10)["db_consistency"]
    assert check.status == "WARNING"
    assert "reset" not in check.message  # not silent long enough yet
    check = rig.round(T0 + HANG + 10)["db_consistency"]
    assert "auto-recovery reset" in check.message
    rig.round(T0 + HANG + 20)
    resets = [e for e in rig.journal.entries_for_todo(todo) if e.kind == "reset"]
    assert [(e.completion_id, e.state) for e in resets] == [(f"fix-{todo}-{int(T0)}", "collected")]
    assert rig.journal.counters() == {"status_resets": 1}
    rig.set(todo, "offen")
    assert rig.round(T0 + HANG + 30)["db_consistency"].status == "OK"


def _age(path: Path, at: float) -> None:
    os.utime(path, (at, at))


def test_orphaned_session_dir_is_archived_once_and_removed(make_rig) -> None:
    rig = make_rig()
    orphan = Path(rig.config.session_dir_for(7))
    orphan.mkdir()
    (orphan / "output.md").write_text("left behind")
    young = Path(rig.config.session_dir_for(8))
    young.mkdir()
    _age(orphan, T0 - 2 * HANG)
    _age(young, T0 - 1)
    check = rig.round(T0)["orphaned_sessions"]
    assert (check.status, check.todo_ids) == ("WARNING", [7])
    assert "archived and removed 1" in check.message
    assert not orphan.exists() and young.is_dir()
    [archived] = (Path(rig.config.archive_dir)).glob("orphaned_claude_session_7_*")
    assert (archived / "session" / "output.md").read_text() == "left behind"
    assert rig.round(T0 + 1)["orphaned_sessions"].status == "OK"
    assert rig.journal.counters() == {"orphans_archived": 1}


def test_session_dir_of_a_live_todo_is_no_orphan(make_rig) -> None:
    rig = make_rig({"behavior": {"auto_recovery": False}})
    session = Path(rig.config.session_dir_for(3))
    session.mkdir()
    _age(session, T0 - 2 * HANG)
    check = rig.round(T0)["orphaned_sessions"]
    assert (check.status, check.todo_ids) == ("WARNING", [3])
    assert session.is_dir()  # auto-recovery off: reported only
    rig.start(3, T0)
    assert rig.round(T0 + 1)["orphaned_sessions"].status == "OK"


def test_stale_marker_is_removed_once_and_a_fresh_one_kept(make_rig) -> None:
    rig = make_rig()
    stale = Path(rig.config.marker.completed_file)
    fresh = Path(rig.config.marker.current_todo_file)
    stale.write_text("")
    fresh.write_text("5")
    _age(stale, T0 - rig.config.marker.stale_after - 1)
    _age(fresh, T0 - 10)
    check = rig.round(T0)["stale_markers"]
    assert check.status == "WARNING"
    assert str(stale) in check.message and str(fresh) not in check.message
    assert not stale.exists() and fresh.exists()
    assert rig.round(T0 + 1)["stale_markers"].status == "OK"
    assert rig.journal.counters() == {"markers_removed": 1}


def test_stale_marker_is_only_reported_without_auto_recovery(make_rig) -> None:
    rig = make_rig({"behavior": {"auto_recovery": False}})
    stale = Path(rig.config.marker.completed_file)
    stale.write_text("")
    _age(stale, T0 - rig.config.marker.stale_after - 1)
    assert rig.round(T0)["stale_markers"].status == "WARNING"
    assert stale.exists()
    stale.unlink()
    assert rig.round(T0 + 1)["stale_markers"].status == "OK"


def test_log_over_the_limit_warns_until_rotated(make_rig) -> None:
    rig = make_rig()
    log = rig.config.logs_dir / "monitor.log"
    log.write_bytes(b"x" * 2000)
    check = rig.round(T0)["log_sizes"]
    assert check.status == "WARNING"
    assert "monitor.log" in check.message and "logrotate" in check.message
    log.write_bytes(b"")
    assert rig.round(T0 + 1)["log_sizes"].status == "OK"
