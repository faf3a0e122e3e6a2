"""The monitor: owns time.  Deadlines, cleanup after verified completions, health checks,
auto-recovery, and the legacy marker bridge.

Deadlines live in the journal, so a restart of any process forgets none; each fires once
(the ``*_fired`` flag is set in the same transaction that queues the action).  Actions go through
the same path as a user's command: an emergency completion is a journal entry for the collector,
a reset is a journal entry for the writer.  Checks that read the database run on a thread of their
own, so an outage never delays a timer.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from .archive import archive_session
from .health import HealthChecker
from .journal import NewEntry, TodoTimers
from .loop import ChildBase
from .marker import MarkerBridge

PRUNE_EVERY = 3600.0


@dataclass(frozen=True)
class Due:
    """A deadline that has passed: what to do about which todo."""

    todo_id: int
    action: str  # "emergency" | "reset" | "report-waiting"
    due_at: float


def due_deadlines(
    timers: list[TodoTimers], now: float, *, completion_enabled: bool, emergency_enabled: bool
) -> list[Due]:
    """Pure: which armed deadlines have passed at ``now``."""
    due: list[Due] = []
    for t in timers:
        if t.done:
            continue
        if (
            emergency_enabled
            and t.emergency_due is not None
            and not t.emergency_fired
            and now >= t.emergency_due
        ):
            due.append(Due(t.todo_id, "reset", t.emergency_due))
        elif (
            completion_enabled
            and t.completion_due is not None
            and not t.completion_fired
            and now >= t.completion_due
        ):
            due.append(
                Due(t.todo_id, "report-waiting" if t.waiting else "emergency", t.completion_due)
            )
    return due


def next_deadline(timers: list[TodoTimers]) -> float | None:
    times = []
    for t in timers:
        if t.done:
            continue
        if t.completion_due is not None and not t.completion_fired and not t.waiting:
            times.append(t.completion_due)
        if t.emergency_due is not None and not t.emergency_fired:
            times.append(t.emergency_due)
    return min(times) if times else None


class Monitor(ChildBase):
    name = "monitor"
    rings = ("collector", "writer")

    def open(self) -> None:
        self.checker = HealthChecker(self.config, clock=self.clock)
        self.next_check = 0.0
        self.next_prune = 0.0
        self._check_thread: threading.Thread | None = None
        self.marker = MarkerBridge(self.config) if self.config.marker.enabled else None

    def close(self) -> None:
        self.checker.stop()

    def work(self, now: float) -> float:
        behavior = self.config.behavior
        wake = now + self.sweep
        timers = self.journal.armed_timers()
        for due in due_deadlines(
            timers,
            now,
            completion_enabled=behavior.enable_robust_completion,
            emergency_enabled=behavior.enable_emergency_handlers,
        ):
            self._act(due, now)
        upcoming = next_deadline(self.journal.armed_timers())
        if upcoming is not None:
            wake = min(wake, upcoming)
        self._clean_up(now)
        if self.marker is not None:
            self.marker.poll(now)
        if now >= self.next_check and not self.checker.running:
            self.checker.start_round(now)
            self.next_check = now + behavior.health_check_interval
        wake = min(wake, self.next_check)
        if now >= self.next_prune:
            retention = self.config.journal.retention_days * 86400
            pruned = self.journal.prune(now - retention)
            if pruned:
                logger.info("pruned {} finished journal entries", pruned)
            self.next_prune = now + PRUNE_EVERY
        return wake

    # ------------------------------------------------------------ deadlines

    def _act(self, due: Due, now: float) -> None:
        log = logger.bind(todo_id=due.todo_id)
        if due.action == "report-waiting":
            # A person is needed; forcing a completion now would cut the session off.
            with self.journal.transaction() as db:
                self.journal.set_timer_fields(db, due.todo_id, completion_fired=1)
            log.warning("completion deadline passed while the session waits for a person")
            return
        if due.action == "emergency":
            completion_id = f"emg-{due.todo_id}-{int(due.due_at)}"
            reason = (
                f"no completion and no heartbeat for {self._timeout_of(due.todo_id):.0f} s "
                "(completion deadline passed)"
            )
            with self.journal.transaction() as db:
                self.journal.add_entry(
                    db, NewEntry(completion_id, due.todo_id, "emergency", reason=reason), now
                )
                self.journal.set_timer_fields(db, due.todo_id, completion_fired=1)
                self.journal.bump(db, "forced_completions")
            log.bind(completion_id=completion_id, emergency=True).warning(
                "emergency completion: {}", reason
            )
            self.ring("collector")
            return
        self._reset(due, now, log)

    def _timeout_of(self, todo_id: int) -> float:
        timers = self.journal.timers(todo_id)
        if timers and timers[0].completion_timeout:
            return timers[0].completion_timeout
        return self.config.behavior.completion_timeout

    def _reset(self, due: Due, now: float, log) -> None:
        entries = self.journal.entries_for_todo(due.todo_id)
        completed = any(
            e.kind in ("normal", "emergency") and e.state in ("verified", "cleaned")
            for e in entries
        )
        normal_waiting = any(
            e.kind == "normal" and e.state in ("accepted", "collected", "written", "dead")
            for e in entries
        )
        with self.journal.transaction() as db:
            self.journal.set_timer_fields(db, due.todo_id, emergency_fired=1, done=1)
            if completed:
                log.info("emergency deadline passed; the todo is already completed")
                return
            if normal_waiting:
                # A real result is on its way; a reset would throw it away.
                log.warning("emergency deadline passed, but a completion is still being written")
                return
            for e in entries:
                if e.kind == "emergency" and e.state in (
                    "accepted",
                    "collected",
                    "written",
                    "dead",
                ):
                    db.execute(
                        "UPDATE entries SET state = 'failed', outcome = 'superseded',"
                        " last_error = 'superseded by the reset at the emergency deadline',"
                        " updated_at = ? WHERE completion_id = ?",
                        (now, e.completion_id),
                    )
            completion_id = f"reset-{due.todo_id}-{int(due.due_at)}"
            self.journal.add_entry(
                db,
                NewEntry(
                    completion_id,
                    due.todo_id,
                    "reset",
                    state="collected",
                    reason="emergency deadline passed without a completion in the database",
                ),
                now,
            )
            self.journal.bump(db, "status_resets")
        session = Path(self.config.session_dir_for(due.todo_id))
        archived = None
        if session.is_dir():
            try:
                archived = archive_session(
                    self.config.archive_dir,
                    due.todo_id,
                    now,
                    session_dir=session,
                    transcript=None,
                    report_html=None,
                ).path
            except OSError as exc:
                log.error("could not archive {}: {}", session, exc)
        log.bind(completion_id=completion_id, emergency=True).error(
            "ALERT: todo {} reached its emergency deadline without a completion; resetting it to "
            "'offen'. Manual intervention needed. Archived: {}",
            due.todo_id,
            archived or "nothing",
        )
        self.ring("writer")

    # ------------------------------------------------------------ cleanup

    def _clean_up(self, now: float) -> None:
        """After a verified completion: delete the session dir that the collector archived."""
        entries = self.journal.entries_in(("verified",), limit=500)
        if not entries:
            return
        updates = []
        for entry in entries:
            log = logger.bind(todo_id=entry.todo_id, completion_id=entry.completion_id)
            session = Path(self.config.session_dir_for(entry.todo_id))
            if self.config.collect.cleanup and session.is_dir():
                if entry.archive_path and Path(entry.archive_path).is_dir():
                    shutil.rmtree(session, ignore_errors=True)
                    log.info("deleted session dir {} (archived in {})", session, entry.archive_path)
                else:
                    log.warning("kept session dir {}: it was not archived", session)
            updates.append((entry.completion_id, {"state": "cleaned"}))
        self.journal.update_entries(updates, now)
