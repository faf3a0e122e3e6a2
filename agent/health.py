"""Health checks, run by the monitor on a thread of its own.

Each round computes the checks (database, hanging_todos, orphaned_sessions, stale_markers,
db_consistency, log_sizes, fleet; the names and order are agent/checks.py's), saves them in the
journal for ``completionctl health``, and, when ``behavior.auto_recovery`` is on, has
agent/recovery.py act on what they found: force-complete hanging todos, reset inconsistent ones,
archive orphaned session dirs, remove stale markers.
"""

from __future__ import annotations

import glob
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

from loguru import logger

from protocol.config import Config

from . import access
from .dbroute import DbRoute, writer_node
from .fleet import agent_id, describe, stale_members
from .journal import PENDING_STATES, Journal, State, TodoTimers
from .logs import LOG_FILES
from .recovery import Recovery
from .store import Store, StoreError, Todo, TunnelError
from .store.fleet import fleet_of


@dataclass
class CheckResult:
    name: str
    status: str
    message: str
    todo_ids: list[int] = field(default_factory=list)

    def as_row(self) -> tuple[str, str, str, list[int]]:
        return (self.name, self.status, self.message, self.todo_ids)


class HealthChecker:
    def __init__(self, config: Config, *, clock=time.time) -> None:
        self.config = config
        self.clock = clock
        self._thread: threading.Thread | None = None
        self._store: Store | None = None
        self._route: DbRoute | None = None  # the health checks' own tunnel (see dbroute)
        self._fleet_ready: object = None  # the store the fleet tables were checked on
        self._journal: Journal | None = None
        self._stop = threading.Event()
        self.recovery = Recovery(config)  # what auto-recovery does about what the checks find

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start_round(self, now: float) -> None:
        self._thread = threading.Thread(
            target=self._round_safely, args=(now,), name="health", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._route is not None:
            self._route.close()

    def _round_safely(self, now: float) -> None:
        try:
            self.run_round(now)
        except Exception:
            logger.exception("health round failed")

    # ------------------------------------------------------------ one round

    def run_round(self, now: float) -> list[CheckResult]:
        if self._journal is None:
            self._journal = Journal(self.config.journal_path)
        journal = self._journal
        in_progress, db_check = self._database()
        timers = {t.todo_id: t for t in journal.timers()}
        live = self._live_todos(journal, timers)
        results = [db_check]
        if in_progress is None:
            unknown = "not checked: the database is unreachable"
            results.append(CheckResult("hanging_todos", "UNKNOWN", unknown))
            results.append(CheckResult("db_consistency", "UNKNOWN", unknown))
        else:
            hanging = self._hanging(journal, in_progress, timers, now)
            results.append(hanging)
            results.append(
                self._consistency(journal, in_progress, live, timers, set(hanging.todo_ids), now)
            )
        if in_progress is not None and self.config.database_url.startswith("mysql://"):
            results.append(self._fleet(journal, now))
        results.append(self._orphans(in_progress, live, now))
        results.append(self._stale_markers(now))
        results.append(self._log_sizes())
        journal.save_checks([r.as_row() for r in results], self.clock())
        for r in results:
            if r.status in ("WARNING", "CRITICAL"):
                logger.warning("health {}: {} — {}", r.name, r.status, r.message)
        return results

    def _database(self) -> tuple[list[Todo] | None, CheckResult]:
        started = time.monotonic()
        try:
            if self._store is None:
                if self._route is None:
                    self._route = DbRoute(self.config, "health")
                self._store = self._route.open()
                if self.config.database_url.startswith("sqlite:"):
                    # Don't report a missing table that the writer is about to create.
                    self._store.ensure_schema(create_todo_table=True)
            self._store.ping()
            todos = self._store.todos_with_status("in_progress")
            if self.config.predict.enabled and self._journal is not None and todos:
                # Predictive recovery learns per project: remember which todo is whose.
                projects = self._store.project_ids([t.id for t in todos])
                if projects:
                    self._journal.set_projects(projects)
        except StoreError as exc:
            if self._store is not None:
                self._store.close()
                self._store = None
            backlog = self._journal.count_by_state() if self._journal else {}
            waiting = sum(backlog.get(s, 0) for s in (State.COLLECTED, State.WRITTEN))
            # Through a tunnel the message already says which hop failed ("ssh to ...: ..."
            # or "MySQL through the tunnel: ...").
            what = str(exc) if isinstance(exc, TunnelError) else f"unreachable: {exc}"
            return None, CheckResult(
                "database",
                "CRITICAL",
                f"{what}; {waiting} write(s) wait in the journal",
            )
        finally:
            if self._route is not None:
                self._route.log_events(logger)
        ms = (time.monotonic() - started) * 1000
        via = f" {self._route.describe()}" if self._route and self._route.tunnel else ""
        if self._route is not None and len(self._route.nodes) > 1:
            via = f" on node {getattr(self._store, 'node', '?')}"
            if (node := writer_node(self.config)) is not None:
                via += f"; the writer uses node {node}"
        return todos, CheckResult("database", "OK", f"reachable{via} ({ms:.0f} ms)")

    def _fleet(self, journal: Journal, now: float) -> CheckResult:
        """The other agents on this database: silent ones are a WARNING; the in_progress todos
        of one silent past hanging_after are taken over by exactly one survivor (compare-and-set
        on the claim) and force-completed."""
        stale_after = self.config.fleet.stale_after
        me = agent_id(self.config)
        acted: list[int] = []
        try:
            fleet = fleet_of(self._store)
            if self._fleet_ready is not self._store:
                fleet.ensure()
                self._fleet_ready = self._store
            members = fleet.members()
            if self.config.behavior.auto_recovery:
                for todo_id, owner, silence in fleet.orphans(
                    me, self.config.behavior.hanging_after
                ):
                    if not fleet.take_over(todo_id, owner, me):
                        continue  # another survivor was first
                    logger.bind(todo_id=todo_id).warning(
                        "fleet: took over todo {} from agent {} (silent for {:.0f} s)",
                        todo_id,
                        owner,
                        silence,
                    )
                    if self.recovery.force_complete(journal, todo_id, now - silence, now):
                        acted.append(todo_id)
        except StoreError as exc:
            return CheckResult("fleet", "UNKNOWN", f"the fleet registry is unreadable: {exc}")
        stale = stale_members(members, me, stale_after)
        others = len([m for m in members if m.agent_id != me])
        if not stale:
            message = f"{others} other agent(s), none silent over {stale_after:.0f} s"
            status = "OK"
        else:
            status = "WARNING"
            message = f"{len(stale)} of {others} other agent(s) silent: " + "; ".join(
                describe(m, stale_after) for m in stale
            )
        if acted:
            message += f"; took over and force-completed {acted}"
        return CheckResult("fleet", status, message, acted)

    def _live_todos(self, journal: Journal, timers: dict[int, TodoTimers]) -> set[int]:
        """Todos this agent is working on: started and not finished, or with a completion that
        has not reached the database yet (a dead one waits for a person)."""
        live = {todo_id for todo_id, t in timers.items() if not t.done}
        return live | set(journal.todos_in(PENDING_STATES))

    def _in_scope(self, todo_id: int, timers: dict[int, TodoTimers]) -> bool:
        """Auto-recovery acts on todos this agent started, unless auto_recovery_scope = "all"."""
        return todo_id in timers or self.config.behavior.auto_recovery_scope == "all"

    def _hanging(
        self,
        journal: Journal,
        in_progress: list[Todo],
        timers: dict[int, TodoTimers],
        now: float,
    ) -> CheckResult:
        """in_progress and silent too long: for a todo this agent started and still follows,
        nothing (start or heartbeat) heard for hanging_after, or past its completion deadline
        without the deadline having acted; for one it never saw, a database started_at older than
        hanging_after.  A session waiting for a person is not hanging (waiting_for_person)."""
        after = self.config.behavior.hanging_after
        hanging: list[int] = []
        overdue: list[int] = []
        silent_since: dict[int, float] = {}
        # A todo whose scheduled completion comes before its emergency deadline is held, not
        # hanging (TodoTimers.held_by; README).
        held = {s.todo_id: s.due_at for s in journal.pending_schedules()}
        for todo in in_progress:
            timer = timers.get(todo.id)
            if timer is not None and timer.held_by(held.get(todo.id)):
                continue
            if timer is not None and timer.done:
                continue  # this agent saw it finish: db_consistency's business
            if timer is not None:
                if timer.waiting:
                    continue
                heard = timer.last_heard_at or timer.started_at or now
                if now - heard > after:
                    hanging.append(todo.id)
                    silent_since[todo.id] = heard
                elif (
                    timer.completion_due is not None
                    and now > timer.completion_due
                    and not timer.completion_fired
                    and not self.config.behavior.enable_robust_completion
                ):
                    overdue.append(todo.id)
            elif todo.started_at is not None:
                started = todo.started_at.replace(tzinfo=UTC).timestamp()
                if now - started > after:
                    hanging.append(todo.id)
                    silent_since[todo.id] = started
        if not hanging and not overdue:
            return CheckResult("hanging_todos", "OK", "no todo hangs")
        acted = []
        if self.config.behavior.auto_recovery:
            for todo_id in hanging:
                if self._in_scope(todo_id, timers) and self.recovery.force_complete(
                    journal, todo_id, silent_since[todo_id], now
                ):
                    acted.append(todo_id)
        parts = []
        if hanging:
            parts.append(
                f"{len(hanging)} todo(s) in_progress with nothing heard for over {after:.0f} s"
            )
        if overdue:
            parts.append(f"{len(overdue)} todo(s) past their heartbeat timeout")
        message = "; ".join(parts)
        if acted:
            message += f"; auto-recovery forced the completion of {acted}"
        return CheckResult("hanging_todos", "WARNING", message, sorted(hanging + overdue))

    def _consistency(
        self,
        journal: Journal,
        in_progress: list[Todo],
        live: set[int],
        timers: dict[int, TodoTimers],
        hanging: set[int],
        now: float,
    ) -> CheckResult:
        """in_progress in the database with no live session known to this agent.

        Auto-recovery resets such a todo to 'offen' only when this agent started it, its journal
        says it finished (nothing waits), and it has been silent for hanging_after: its
        completion never landed.  A todo this agent never saw is reported; when it is old enough
        the hanging check handles it (force completion, with auto_recovery_scope = "all").
        """
        orphaned = [t for t in in_progress if t.id not in live]
        if not orphaned:
            return CheckResult("db_consistency", "OK", "every in_progress todo has a live session")
        after = self.config.behavior.hanging_after
        acted = []
        if self.config.behavior.auto_recovery:
            for todo in orphaned:
                timer = timers.get(todo.id)
                if timer is None or todo.id in hanging:
                    continue
                heard = max(timer.last_heard_at or 0.0, timer.started_at or 0.0)
                if now - heard <= after:
                    continue
                if self.recovery.reset_inconsistent(journal, todo.id, heard, now):
                    acted.append(todo.id)
        message = f"{len(orphaned)} todo(s) in_progress with no live session known to this agent"
        if acted:
            message += f"; auto-recovery reset {acted} to offen"
        return CheckResult("db_consistency", "WARNING", message, [t.id for t in orphaned])

    def _orphans(self, in_progress: list[Todo] | None, live: set[int], now: float) -> CheckResult:
        """Session dirs whose todo is neither live here nor in_progress in the database, and
        untouched for hanging_after (a session may create its dir just before it starts)."""
        template = self.config.collect.session_dir
        if "{todo_id}" not in template:
            return CheckResult("orphaned_sessions", "OK", "session_dir has no {todo_id}: skipped")
        pattern = glob.escape(template).replace(glob.escape("{todo_id}"), "*")
        regex = re.compile(re.escape(template).replace(re.escape("{todo_id}"), r"(\d+)") + "$")
        active = live | {t.id for t in in_progress or []}
        min_age = self.config.behavior.hanging_after
        orphans: list[tuple[int, Path]] = []
        for name in glob.glob(pattern):
            match = regex.match(name)
            if not match or int(match.group(1)) in active:
                continue
            try:
                st = os.lstat(name)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and now - st.st_mtime > min_age:
                orphans.append((int(match.group(1)), Path(name)))
        if not orphans:
            return CheckResult("orphaned_sessions", "OK", "no orphaned session dir")
        ids = sorted(todo_id for todo_id, _ in orphans)
        acted = []
        kept = 0  # archived, but could not be removed
        behavior = self.config.behavior
        served = access.served_uids(self.config)
        # Without the database we cannot tell a live foreign session from an orphan.
        if behavior.auto_recovery and behavior.cleanup_orphaned and in_progress is not None:
            for todo_id, path in orphans:
                done = self.recovery.archive_orphan(todo_id, path, served, now)
                if done is not None:
                    acted.append(todo_id)
                    kept += not done
            if acted:
                self._bump("orphans_archived", len(acted))
        message = f"{len(orphans)} session dir(s) with no live todo"
        if acted:
            message += f"; auto-recovery archived and removed {len(acted) - kept}"
            if kept:
                message += f", archived but could not remove {kept}"
        return CheckResult("orphaned_sessions", "WARNING", message, ids)

    def _stale_markers(self, now: float) -> CheckResult:
        marker = self.config.marker
        stale = []
        for name in (marker.completed_file, marker.current_todo_file):
            try:
                age = now - os.stat(name).st_mtime
            except OSError:
                continue
            if age > marker.stale_after:
                stale.append(name)
        if not stale:
            return CheckResult("stale_markers", "OK", "no stale marker file")
        removed = []
        if self.config.behavior.auto_recovery:
            removed = self.recovery.remove_stale_markers(stale)
            if removed:
                self._bump("markers_removed", len(removed))
        message = f"marker file(s) older than {marker.stale_after:.0f} s: {', '.join(stale)}"
        if removed:
            message += "; removed"
        return CheckResult("stale_markers", "WARNING", message)

    def _log_sizes(self) -> CheckResult:
        limit = self.config.behavior.log_max_bytes
        big = []
        for name in LOG_FILES:
            try:
                size = (self.config.logs_dir / name).stat().st_size
            except OSError:
                continue
            if size > limit:
                big.append(f"{name} {size // 1024} KiB")
        if not big:
            return CheckResult("log_sizes", "OK", f"all logs under {limit // 1024} KiB")
        return CheckResult(
            "log_sizes",
            "WARNING",
            f"over {limit // 1024} KiB: {', '.join(big)}; is logrotate installed and configured?",
        )

    def _bump(self, name: str, by: int) -> None:
        assert self._journal is not None
        self._journal.bump_counter(name, by)
