"""The monitor: owns time.  Deadlines, cleanup after verified completions, health checks,
auto-recovery, and the legacy marker bridge.

Deadlines live in the journal, so a restart of any process forgets none; each fires once
(the ``*_fired`` flag is set in the same transaction that queues the action).  Actions go through
the same path as a user's command: an emergency completion is a journal entry for the collector,
a reset is a journal entry for the writer.  Checks that read the database run on a thread of their
own, so an outage never delays a timer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

import protocol as p

from . import access, reasons
from .archive import (
    STAGING_MAX_AGE,
    archive_session,
    enforce_bounds,
    remove_stale_staging,
    remove_tree,
)
from .health import CheckResult, HealthChecker
from .journal import (
    ANSWER_KINDS,
    PENDING_STATES,
    FinishedHead,
    Kind,
    ScheduledCompletion,
    State,
    TodoTimers,
    scheduled_completion_id,
)
from .loop import ChildBase
from .marker import MarkerBridge
from .predict import SilenceModel, predict, shortened_due
from .system_status import describe_system

PRUNE_EVERY = 3600.0
RECHECK = 0.25  # how soon a due-but-held deadline is looked at again
# Rings within this long of the last pass are taken up together (a burst of heartbeats and
# completions rings once each); a deadline that is due never waits for it.
COALESCE = 0.02
# A reset waits at most this long for a completion in flight to settle before superseding it.
RESET_SETTLE_MAX = 120.0
# A normal completion in these states is in hand: the emergency deadline never resets its todo.
NORMAL_HELD = PENDING_STATES
# Emergency completions in these states never landed; a reset replaces them.
EMERGENCY_SUPERSEDED = PENDING_STATES


@dataclass(frozen=True)
class Due:
    """A deadline that has passed: what to do about which todo."""

    todo_id: int
    action: str  # "emergency" | "reset" | "report-waiting"
    due_at: float


def due_deadlines(
    timers: list[TodoTimers],
    now: float,
    *,
    completion_enabled: bool = True,
    emergency_enabled: bool = True,
) -> list[Due]:
    """Pure: which armed deadlines have passed at ``now``, in the order they are acted on.

    A todo whose session waits for a person is reported, never force-completed.  When both
    deadlines of a todo have passed at once (the agent was down through both), the emergency
    completion comes first; the reset is judged on a later pass, once that completion had its
    chance to land.
    """
    due: list[Due] = []
    for t in timers:
        if t.done:
            continue
        completion = (
            completion_enabled
            and t.completion_due is not None
            and not t.completion_fired
            and now >= t.completion_due
        )
        if completion:
            assert t.completion_due is not None
            if not t.waiting:
                due.append(Due(t.todo_id, "emergency", t.completion_due))
                continue
            due.append(Due(t.todo_id, "report-waiting", t.completion_due))
        if (
            emergency_enabled
            and t.emergency_due is not None
            and not t.emergency_fired
            and now >= t.emergency_due
        ):
            due.append(Due(t.todo_id, "reset", t.emergency_due))
    return due


def next_deadline(
    timers: list[TodoTimers],
    *,
    completion_enabled: bool = True,
    emergency_enabled: bool = True,
) -> float | None:
    """Pure: the earliest deadline still to act on (a waiting todo's completion deadline is not
    one: it moves again with the next heartbeat)."""
    times = []
    for t in timers:
        if t.done:
            continue
        if (
            completion_enabled
            and t.completion_due is not None
            and not t.completion_fired
            and not t.waiting
        ):
            times.append(t.completion_due)
        if emergency_enabled and t.emergency_due is not None and not t.emergency_fired:
            times.append(t.emergency_due)
    return min(times) if times else None


class Monitor(ChildBase):
    name = "monitor"
    rings = ("collector", "writer")

    def open(self) -> None:
        self.checker = HealthChecker(self.config, clock=self.clock)
        self.next_check = 0.0
        self.next_prune = 0.0
        self.marker = MarkerBridge(self.config) if self.config.marker.enabled else None
        self._reported_waiting: set[tuple[int, float]] = set()
        self.model = SilenceModel()
        self._flagged: dict[int, float] = {}  # todo id -> the heard_at its flag is about
        self._saved_prediction: tuple[str, tuple[int, ...]] | None = None
        self._prediction_saved_at = 0.0
        # The agent's own monitor coalesces rings; one driven by a test's clock passes on each.
        self.coalesce = COALESCE if self.parent_pid is not None else 0.0
        self._last_pass: float | None = None
        self._planned = 0.0  # when the last pass asked to run again

    def close(self) -> None:
        self.checker.stop()

    def work(self, now: float) -> float:
        last = self._last_pass
        if last is not None and now < self._planned and last <= now < last + self.coalesce:
            # Woken by a ring right after a pass: the next pass, soon, takes this news too.
            return min(self._planned, last + self.coalesce)
        self._last_pass = now
        self._planned = self._pass(now)
        return self._planned

    def _pass(self, now: float) -> float:
        behavior = self.config.behavior
        flags = {
            "completion_enabled": behavior.enable_robust_completion,
            "emergency_enabled": behavior.enable_emergency_handlers,
        }
        wake = now + self.sweep
        # A scheduled completion still to come holds the todo's completion deadline (the user
        # said when it completes; it fires first and disarms them), up to the emergency
        # deadline, which it never holds (TodoTimers.held_by).
        held: dict[int, float] = {}
        for scheduled in self.journal.pending_schedules():
            if scheduled.due_at > now:
                wake = min(wake, scheduled.due_at)
                held[scheduled.todo_id] = scheduled.due_at
                continue
            self._fire_schedule(scheduled, now)
        armed = self._predict(now)
        if self.config.predict.enabled and not self.model.caught_up:
            wake = min(wake, now + RECHECK)  # more history to learn: go on soon
        timers = self._timers(held, armed)
        acted = False
        for due in due_deadlines(timers, now, **flags):
            self._act(due, now)
            acted = True
        # Read again only when this pass changed them (the timers are read once a pass, and a
        # heartbeat makes a pass).
        upcoming = next_deadline(self._timers(held) if acted else timers, **flags)
        if upcoming is not None:
            # A deadline that is due but held back (a reset waiting for a completion to settle)
            # is looked at again soon, not in a busy loop.
            wake = min(wake, upcoming if upcoming > now else now + RECHECK)
        self._clean_up(now)
        if self.marker is not None:
            self.marker.poll(now)
        if now >= self.next_check and not self.checker.running:
            self.checker.start_round(now)
            self.next_check = now + behavior.health_check_interval
        wake = min(wake, self.next_check if self.next_check > now else now + RECHECK)
        if now >= self.next_prune:
            retention = self.config.journal.retention_days * 86400
            pruned = self.journal.prune(now - retention)
            self.journal.prune_history(
                schedules_before=now - retention,
                silences_before=now - self.config.predict.history_days * 86400,
            )
            if pruned:
                logger.info("pruned {} finished journal entries", pruned)
            try:
                stale = remove_stale_staging(self.config.archive_dir, now - STAGING_MAX_AGE)
            except OSError as exc:
                logger.warning("could not look for half-built archives: {}", exc)
                stale = []
            for name in stale:
                logger.warning(
                    "removed the half-built archive {} (its builder was stopped mid-way; the "
                    "session files were kept, and the archive is taken again)",
                    name,
                )
            self.next_prune = now + PRUNE_EVERY
        return wake

    def _timers(
        self, held: dict[int, float], armed: list[TodoTimers] | None = None
    ) -> list[TodoTimers]:
        """The armed timers (``armed``: as just read, else read now), each without its
        completion deadline while a pending schedule holds it."""
        return [
            dataclasses.replace(t, completion_due=None) if t.held_by(held.get(t.todo_id)) else t
            for t in (self.journal.armed_timers() if armed is None else armed)
        ]

    # ------------------------------------------------------------ scheduled completions

    def _fire_schedule(self, scheduled: ScheduledCompletion, now: float) -> None:
        """A scheduled completion's time has come: journal it as the user's completion."""
        completion_id = scheduled_completion_id(scheduled.request_id)
        if not self.journal.fire_schedule(scheduled, completion_id, now):
            return  # cancelled, or fired by another pass, since it was read
        logger.bind(todo_id=scheduled.todo_id, completion_id=completion_id).info(
            "scheduled completion fired (due {:.0f}, {:.1f} s late)",
            scheduled.due_at,
            now - scheduled.due_at,
        )
        self.ring("collector")

    # ------------------------------------------------------------ predictive recovery

    def _predict(self, now: float) -> list[TodoTimers] | None:
        """Flag live todos silent past their learned quantile; with act = "shorten", bring
        their completion deadline forward (firing stays the deadline rule's, below).

        The armed timers it read, when it changed none of them (for the deadlines after it)."""
        settings = self.config.predict
        if not settings.enabled:
            self._save_prediction(
                CheckResult("predicted_hangs", "OK", "predictive recovery is off"), now
            )
            return None
        self.model.update(self.journal)
        if not self.model.caught_up:
            return None  # still learning a long history; the next pass goes on (no check saved)
        armed = self.journal.armed_timers()
        timers = {t.todo_id: t for t in armed}
        shortened = False
        predictions = predict(
            list(timers.values()),
            self.model,
            now,
            quantile=settings.quantile,
            min_samples=settings.min_samples,
        )
        for prediction in predictions:
            log = logger.bind(todo_id=prediction.todo_id)
            if self._flagged.get(prediction.todo_id) != prediction.heard_at:
                self._flagged[prediction.todo_id] = prediction.heard_at
                log.warning(
                    "predicted hang of todo {}: {}",
                    prediction.todo_id,
                    prediction.explain(settings.quantile),
                )
            if settings.act != "shorten":
                continue
            timer = timers[prediction.todo_id]
            due = shortened_due(prediction, timer, min_timeout=settings.min_timeout)
            if due is None or timer.completion_due is None or timer.last_heard_at is None:
                continue
            if self.journal.shorten_deadline(
                prediction.todo_id,
                expected_due=timer.completion_due,
                heard_at=timer.last_heard_at,
                new_due=due,
            ):
                shortened = True
                log.warning(
                    "predict.act = shorten: the completion deadline of todo {} moved from "
                    "{:.0f} to {:.0f}",
                    prediction.todo_id,
                    timer.completion_due,
                    due,
                )
        flagged = {p.todo_id for p in predictions}
        for todo_id in set(self._flagged) - flagged:
            del self._flagged[todo_id]
        if predictions:
            check = CheckResult(
                "predicted_hangs",
                "WARNING",
                " | ".join(
                    f"todo {p.todo_id}: {p.explain(settings.quantile)}" for p in predictions
                ),
                sorted(flagged),
            )
        else:
            gaps = self.model.count("gap")
            history = (
                f"learned from {gaps} gaps"
                if gaps >= settings.min_samples
                else f"no prediction yet: {gaps} of {settings.min_samples} gaps needed"
            )
            check = CheckResult("predicted_hangs", "OK", f"no session silent past p99; {history}")
        self._save_prediction(check, now)
        return None if shortened else armed

    def _save_prediction(self, check: CheckResult, now: float) -> None:
        # Saved when what it says changes, else with the health rounds: not a write per pass.
        key = (check.status, tuple(check.todo_ids))
        interval = self.config.behavior.health_check_interval
        if key == self._saved_prediction and now - self._prediction_saved_at < interval:
            return
        self.journal.save_checks([check.as_row()], now)
        self._saved_prediction = key
        self._prediction_saved_at = now

    # ------------------------------------------------------------ deadlines

    def _act(self, due: Due, now: float) -> None:
        log = logger.bind(todo_id=due.todo_id)
        if due.action == "report-waiting":
            # A person is needed; forcing a completion now would cut the session off.  Nothing
            # is marked fired: the next heartbeat arms the deadline again from then.
            key = (due.todo_id, due.due_at)
            if key not in self._reported_waiting:
                self._reported_waiting.add(key)
                log.warning(
                    "completion deadline passed while the session waits for a person; "
                    "not forcing a completion (reported in health: waiting_for_person)"
                )
            return
        if due.action == "emergency":
            self._emergency(due, now, log)
        else:
            self._reset(due, now, log)

    def _emergency(self, due: Due, now: float, log) -> None:
        completion_id = f"emg-{due.todo_id}-{int(due.due_at)}"
        timeout = self._timeout_of(due.todo_id)
        reason = reasons.english("deadline", timeout=f"{timeout:.0f}")
        timers = self.journal.timers(due.todo_id)
        timer = timers[0] if timers else None
        if timer is not None and timer.last_heard_at is not None:
            silent = due.due_at - timer.last_heard_at
            if silent < timeout - 0.5:
                # predict.act = "shorten" brought it forward: say so, and why.
                reason = reasons.english(
                    "predicted_hang", silent=f"{silent:.0f}", timeout=f"{timeout:.0f}"
                )
        # Compare-and-set on the timer: a heartbeat, a completion, a person's emergency or the
        # health round's auto-recovery that came first wins, and this stands down.
        added = self.journal.fire_deadline(due.todo_id, due.due_at, completion_id, reason, now)
        if not added:
            return
        log.bind(completion_id=completion_id, emergency=True).warning(
            "emergency completion: {}", reason
        )
        self.ring("collector")

    def _timeout_of(self, todo_id: int) -> float:
        timers = self.journal.timers(todo_id)
        if timers and timers[0].completion_timeout:
            return timers[0].completion_timeout
        return self.config.behavior.completion_timeout

    def _reset(self, due: Due, now: float, log) -> None:
        """The emergency deadline: reset the todo to 'offen' unless a completion is in hand.

        Ordering rules (all decided inside one journal transaction, so intake cannot slip a
        completion in between the look and the action):
        - a normal completion waiting in the journal (even a dead one) is never thrown away:
          no reset;
        - a completion already verified: nothing to do;
        - a completion still being collected or verified, or just collected and not tried by
          the writer yet: wait for it to settle (at most RESET_SETTLE_MAX);
        - otherwise every waiting emergency completion is superseded by the reset, which the
          writer applies compare-and-set (only an in_progress todo goes back to 'offen'); a
          completion that arrives later is written after it and wins.
        """
        completion_id = f"reset-{due.todo_id}-{int(due.due_at)}"
        journal = self.journal
        with journal.transaction() as db:
            timer = journal.timer_in(db, due.todo_id)
            if (
                timer is None
                or timer.done
                or timer.emergency_fired
                or timer.emergency_due != due.due_at
            ):
                return  # completed, restarted or already handled since we looked
            waiting_for = timer.waiting
            entries = journal.completions_since_start(db, due.todo_id)
            if any(e.kind == Kind.NORMAL and e.state in NORMAL_HELD for e in entries):
                journal.finish_timers(db, due.todo_id)
                log.warning(
                    "emergency deadline passed, but a completion is waiting in the journal; "
                    "no reset (a real result is never thrown away)"
                )
                return
            if any(e.state in (State.VERIFIED, State.CLEANED) for e in entries):
                journal.finish_timers(db, due.todo_id)
                log.info("emergency deadline passed; the todo is already completed")
                return
            # A collected completion the writer has not tried yet gets the time of one attempt;
            # a writer that knows the database is down does not try, and this does not wait.
            grace = self.config.behavior.database_timeout + 2 * self.sweep
            settling = [
                e
                for e in entries
                if e.state in (State.ACCEPTED, State.WRITTEN)
                or (e.state == State.COLLECTED and not e.attempts and now - e.updated_at < grace)
            ]
            since = max([due.due_at, *(e.created_at for e in settling)])
            if settling and now - since < RESET_SETTLE_MAX:
                return  # looked at again on the next pass
            superseded = [e.completion_id for e in entries if e.state in EMERGENCY_SUPERSEDED]
            journal.supersede_emergencies(db, superseded, now)
            journal.finish_timers(db, due.todo_id)
            added = journal.queue_reset(
                db,
                completion_id,
                due.todo_id,
                "emergency deadline passed without a completion in the database",
                now,
                counter="deadline_resets",
            )
        if not added:
            return
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
        details = []
        if superseded:
            details.append(f"superseded emergency completion(s) that never landed: {superseded}")
        if waiting_for:
            details.append(f"the session was waiting for a person: {waiting_for}")
        log.bind(completion_id=completion_id, emergency=True).error(
            "ALERT: todo {} reached its emergency deadline without a completion in the database; "
            "resetting it to 'offen'. Manual intervention needed. Archived: {}.{}\nsystem: {}",
            due.todo_id,
            archived or "nothing",
            "".join(f" {d}." for d in details),
            describe_system(),
        )
        self.ring("writer")

    # ------------------------------------------------------------ cleanup

    def _opener(self, uid: int | None) -> Callable[[Path], int]:
        """Open a client-named file only as ``uid`` could (agent.access)."""
        remote = self.config.collect.remote_paths
        return lambda path: access.open_as(path, uid, remote_paths=remote)

    def _starter(self, todo_id: int) -> int | None:
        """The user whose start request armed the todo (the session's user), if known."""
        for request in self.journal.start_requests(todo_id):
            if request:
                try:
                    return getattr(p.decode_request(request), "requester_uid", None)
                except p.ProtocolError:
                    return None
        return None

    def _archive_final(self, heads: list[FinishedHead], now: float) -> list[FinishedHead]:
        """Archive, once per todo, the final answer whose archive the collector deferred
        (a Stop's); every verified entry of that todo then points at that archive."""
        newest: dict[int, FinishedHead] = {}
        for head in heads:
            if head.kind in ANSWER_KINDS:
                newest[head.todo_id] = head
        paths: dict[int, str] = {}
        for todo_id, head in newest.items():
            if head.archive_path:
                continue
            entry = self.journal.entry(head.completion_id)
            if entry is None:
                continue
            timers = self.journal.timers(todo_id)
            request = None
            if entry.request:
                try:
                    request = p.decode_request(entry.request)
                except p.ProtocolError:
                    request = None
            if getattr(request, "event", None) != "Stop":
                continue  # not deferred: the collector archived it (or could not; kept then)
            # Read as the collector would (agent.access): the client-named transcript with the
            # rights of whoever named it, the session dir only if its starter's or ours.
            requester = getattr(request, "requester_uid", None)
            starter = self._starter(todo_id)
            transcript = getattr(request, "transcript_path", None)
            cwd = getattr(request, "cwd", None)
            reader = requester
            if not transcript and timers and timers[0].transcript_path:
                transcript, cwd, reader = timers[0].transcript_path, timers[0].cwd, starter
            if transcript and cwd and not os.path.isabs(transcript):
                transcript = os.path.join(cwd, transcript)
            session = Path(self.config.session_dir_for(todo_id))
            transcript_path = Path(transcript) if transcript else None
            if transcript_path is not None and not transcript_path.is_file():
                transcript_path = None
            if not session.is_dir() and transcript_path is None:
                continue
            log = logger.bind(todo_id=todo_id, completion_id=head.completion_id)
            bounds = self.config.archive

            from .report import page_of_stored  # the renderer, only when there is an archive

            try:
                result = archive_session(
                    self.config.archive_dir,
                    todo_id,
                    now,
                    session_dir=session if session.is_dir() else None,
                    transcript=transcript_path,
                    # The journal keeps the report as the database got it (Markdown by
                    # default): the archive gets it as a page.
                    report_html=page_of_stored(entry.html, todo_id, self.config.report.language)
                    if entry.html
                    else None,
                    session_owners=access.trusted_owners(
                        starter if starter is not None else requester
                    ),
                    transcript_opener=None if access.is_self(reader) else self._opener(reader),
                    max_bytes=bounds.max_bytes,
                    max_files=bounds.max_files,
                )
            except Exception as exc:
                log.error("archiving the final result failed: {}; the session files stay", exc)
                continue
            enforce_bounds(self.config, now, log)
            log.info("the result is final: archived {} file(s) into {}", result.files, result.path)
            paths[todo_id] = str(result.path)
        if not paths:
            return heads
        for todo_id, path in paths.items():
            self.journal.archived_final([h for h in heads if h.todo_id == todo_id], path, now)
        return [
            dataclasses.replace(h, archive_path=paths[h.todo_id]) if h.todo_id in paths else h
            for h in heads
        ]

    def _clean_up(self, now: float) -> None:
        """After a verified completion: delete the session dir that the collector archived.

        Only after a normal completion: a forced (emergency) one may have cut off a session that
        is still running, and its later real result may need the session's files; the orphan
        sweep archives and removes the dir once its todo is no longer live.
        """
        heads = self.journal.finished_heads(limit=500)
        if not heads:
            return
        # A Stop's answer may still be revised: its todo is archived and cleaned up once the
        # result is final (the session ended, or hook.final_after passed since its last Stop).
        answers = {h.todo_id for h in heads if h.kind in ANSWER_KINDS}
        final = self.journal.final_todos(answers, now, self.config.hook.final_after)
        entries = [h for h in heads if h.todo_id not in answers or h.todo_id in final]
        if not entries:
            return
        entries = self._archive_final(entries, now)
        deleted = 0
        for entry in entries:
            log = logger.bind(todo_id=entry.todo_id, completion_id=entry.completion_id)
            session = Path(self.config.session_dir_for(entry.todo_id))
            if self.config.collect.cleanup and session.is_dir():
                if entry.kind not in ANSWER_KINDS:
                    log.info("kept session dir {} after a forced completion", session)
                elif entry.archive_path and (Path(entry.archive_path) / "session").is_dir():
                    # Only a dir whose copy is in the archive may go.
                    failure = remove_tree(session)
                    if failure is None:
                        deleted += 1
                        log.info(
                            "deleted session dir {} (archived in {})", session, entry.archive_path
                        )
                    else:
                        log.warning("could not delete session dir {}: {}", session, failure)
                else:
                    log.warning("kept session dir {}: it was not archived", session)
        self.journal.cleaned(entries, now, deleted)
