"""The requests that only read: answered from the journal at once, outside any transaction
(``agent.intake``), one method each, registered by message type with ``@reads``."""

from __future__ import annotations

import os
from collections.abc import Callable

import protocol as p
from protocol.config import Config
from protocol.dburl import mask_url

from .checks import (
    ChildInfo,
    children_check,
    journal_check,
    predicted_hang,
    refused_check,
    render_health,
    scheduled,
    todo_status,
    waiting_check,
)
from .journal import Journal, State
from .replies import Refusal, Registry

reads = Registry()  # @reads(p.X) on the method that answers requests of type X
READERS = reads.by_type


class Reads:
    def __init__(
        self,
        config: Config,
        journal: Journal,
        children: Callable[[], dict[str, ChildInfo]],
        started_at: float,
    ) -> None:
        self.config = config
        self.journal = journal
        self.children = children
        self.started_at = started_at

    def read(self, request: p.Request, now: float) -> p.Reply:
        return READERS[type(request)](self, request, now)

    @reads(p.Ping)
    def ping(self, request: p.Ping, now: float) -> p.Pong:
        return p.Pong(version=p.VERSION, pid=os.getpid())

    @reads(p.Outcomes)
    def outcomes(self, request: p.Outcomes, now: float) -> p.OutcomeReport:
        found = self.journal.outcomes(list(request.completion_ids))
        items = []
        for completion_id in request.completion_ids:
            row = found.get(completion_id)
            if row is None:
                items.append(
                    p.ItemOutcome(
                        todo_id=0,
                        outcome="unknown",
                        completion_id=completion_id,
                        reason="not in the journal (never taken, or pruned)",
                    )
                )
                continue
            todo_id, state, outcome, last_error = row
            items.append(
                p.ItemOutcome(
                    todo_id=todo_id,
                    outcome=outcome or "pending",
                    completion_id=completion_id,
                    reason=last_error or "",
                    state=state,
                )
            )
        return p.OutcomeReport(items=items)

    @reads(p.Health)
    def health(self, request: p.Health, now: float) -> p.HealthReport:
        journal = self.journal
        counts = journal.count_by_state()
        parent = {
            "children": children_check(self.children()),
            "journal": journal_check(
                counts,
                journal.oldest_unfinished_at(),
                journal.todos_in((State.DEAD,)) if counts.get(State.DEAD) else [],
                now,
            ),
            "refused": refused_check(
                journal.refused(
                    limit=50,
                    since=max(
                        now - self.config.health.refused_window,
                        journal.acknowledged_at("refused") or 0.0,
                    ),
                ),
                self.config.health.refused_window,
            ),
            "waiting_for_person": waiting_check(journal.waiting_for_person()),
        }
        return render_health(parent, journal.checks(), now)

    @reads(p.Metrics)
    def metrics(self, request: p.Metrics, now: float) -> p.MetricsReport:
        from .metrics import report

        return report(self.journal, now, request.since)

    @reads(p.ListTodos)
    def list_todos(self, request: p.ListTodos, now: float) -> p.TodoList:
        since = now - request.since if request.since else None
        hanging_after = self.config.behavior.hanging_after
        pending = {s.todo_id: s.due_at for s in self.journal.pending_schedules()}
        checks = self.journal.checks()
        todos = []
        for row in self.journal.todo_summaries(since, request.limit):
            (todo_id, session, started, heard, due, emergency, waiting, note, done) = row[:9]
            kind, state, completed, revisions, archive = row[9:]
            todos.append(
                p.TodoSummary(
                    todo_id=todo_id,
                    session_id=session,
                    started_at=started,
                    last_heard_at=heard,
                    completion_due=due,
                    emergency_due=emergency,
                    waiting=waiting,
                    note=note,
                    done=bool(done),
                    hanging=not done and heard is not None and now - heard > hanging_after,
                    latest_kind=kind,
                    latest_state=state,
                    completed_at=completed,
                    revisions=revisions,
                    archive_path=archive,
                    scheduled_at=pending.get(todo_id),
                    predicted_hang=predicted_hang(checks, todo_id),
                )
            )
        # A todo known only by its scheduled completion (never started here) is listed too.
        listed = {t.todo_id for t in todos}
        for todo_id, due_at in pending.items():
            if todo_id not in listed and len(todos) < request.limit:
                todos.append(p.TodoSummary(todo_id=todo_id, scheduled_at=due_at))
        return p.TodoList(todos=todos)

    @reads(p.Status)
    def status(self, request: p.Status, now: float) -> p.StatusReport:
        if request.todo_id is None:
            children = self.children()
            return p.StatusReport(
                agent=p.AgentStatus(
                    pid=os.getpid(),
                    version=p.VERSION,
                    endpoint=self.config.endpoint,
                    state_dir=self.config.state_dir,
                    database=mask_url(self.config.database_url),
                    started_at=self.started_at,
                    children={name: info.pid for name, info in children.items()},
                    restarts={name: info.restarts for name, info in children.items()},
                    journal=self.journal.count_by_state(),
                    recoveries=self.journal.counters(),
                    scheduled=[scheduled(s) for s in self.journal.pending_schedules()],
                )
            )
        entries = self.journal.entries_for_todo(request.todo_id)
        timers = self.journal.timers(request.todo_id)
        schedules = self.journal.schedules_for_todo(request.todo_id)
        if not entries and not timers and not schedules:
            raise Refusal(
                p.ErrorCode.NOT_FOUND,
                f"the agent knows nothing about todo {request.todo_id} "
                "(never started or completed here, or pruned)",
            )
        from .metrics import timings_by_completion

        timings = timings_by_completion(self.journal, [e.completion_id for e in entries])
        return p.StatusReport(
            todo=todo_status(
                request.todo_id,
                entries,
                timers[0] if timers else None,
                schedules,
                predicted_hang(self.journal.checks(), request.todo_id),
                timings,
            )
        )
