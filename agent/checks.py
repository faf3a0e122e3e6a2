"""The health checks' one registry, and the rendering of ``completionctl health`` and ``status``.

Every check has a name, a place in the report and one process that computes it:

- ``parent``: intake computes it for each request, from its children and the journal;
- ``health round``: the monitor's health thread (agent/health.py) computes it every
  ``behavior.health_check_interval`` and saves it in the journal's health table;
- ``monitor loop``: the monitor's own loop saves it between rounds (agent/predict.py).

Intake renders them all from here; agent/health.py, the tests and docs/ARCHITECTURE.md's table
(a test compares it) read the names from here too.  A new check is one row in ``CHECKS``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import protocol as p

from .journal import UNFINISHED_STATES, Entry, ScheduledCompletion, State, TodoTimers

STUCK_AFTER = 300.0  # a waiting journal entry older than this is worth a WARNING
WORST = {"OK": 0, "UNKNOWN": 0, "WARNING": 1, "CRITICAL": 2}


class Source(StrEnum):
    PARENT = "parent"
    HEALTH_ROUND = "health round"
    MONITOR_LOOP = "monitor loop"


@dataclass(frozen=True)
class CheckSpec:
    name: str
    source: Source
    what: str
    optional: bool = False  # shown only once computed (fleet: several agents on one database)


# In the order `completionctl health` shows them.
CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("children", Source.PARENT, "the child processes are running"),
    CheckSpec("journal", Source.PARENT, "backlog, dead completions, the oldest waiting entry"),
    CheckSpec("database", Source.HEALTH_ROUND, "the todo database answers (through its route)"),
    CheckSpec("hanging_todos", Source.HEALTH_ROUND, "in_progress todos silent too long"),
    CheckSpec("predicted_hangs", Source.MONITOR_LOOP, "sessions silent past their history"),
    CheckSpec("waiting_for_person", Source.PARENT, "sessions waiting for a person"),
    CheckSpec("orphaned_sessions", Source.HEALTH_ROUND, "session dirs with no live todo"),
    CheckSpec("stale_markers", Source.HEALTH_ROUND, "legacy marker files left behind"),
    CheckSpec("db_consistency", Source.HEALTH_ROUND, "in_progress with no live session here"),
    CheckSpec("log_sizes", Source.HEALTH_ROUND, "logs over behavior.log_max_bytes"),
    CheckSpec("refused", Source.PARENT, "requests the database refused"),
    CheckSpec("fleet", Source.HEALTH_ROUND, "agents sharing the database", optional=True),
)
BY_NAME = {spec.name: spec for spec in CHECKS}
# What the monitor's health round always computes and saves.
MONITOR_CHECKS = tuple(c.name for c in CHECKS if c.source is Source.HEALTH_ROUND and not c.optional)
# What the monitor's loop saves between rounds.
LOOP_CHECKS = tuple(c.name for c in CHECKS if c.source is Source.MONITOR_LOOP)
SAVED_CHECKS = tuple(c.name for c in CHECKS if c.source is not Source.PARENT)


@dataclass(frozen=True)
class ChildInfo:
    pid: int | None
    alive: bool
    restarts: int


# ------------------------------------------------------------------ the parent's own checks


def children_check(children: Mapping[str, ChildInfo]) -> p.Check:
    dead = [name for name, info in children.items() if not info.alive]
    restarts = {name: info.restarts for name, info in children.items() if info.restarts}
    if dead:
        return p.Check(
            name="children",
            status="CRITICAL",
            message=f"not running: {', '.join(dead)} (being restarted); restarts {restarts}",
        )
    return p.Check(
        name="children",
        status="WARNING" if restarts else "OK",
        message=f"{', '.join(children)} are running"
        + (f"; restarts so far: {restarts}" if restarts else ""),
    )


def journal_check(
    counts: Mapping[str, int], oldest: float | None, dead_todos: list[int], now: float
) -> p.Check:
    waiting = sum(counts.get(state, 0) for state in UNFINISHED_STATES)
    dead = counts.get(State.DEAD, 0)
    if dead:
        return p.Check(
            name="journal",
            status="CRITICAL",
            message=f"{dead} completion(s) dead after a permanent error; fix the cause, then "
            "`completionctl retry --dead`; backlog {waiting}",
            todo_ids=dead_todos,
        )
    if oldest is not None and now - oldest > STUCK_AFTER:
        return p.Check(
            name="journal",
            status="WARNING",
            message=f"backlog {waiting}; the oldest has waited {int(now - oldest)} s",
        )
    return p.Check(name="journal", status="OK", message=f"backlog {waiting}, none dead")


def refused_check(rows: list[tuple[int, str | None]], window: float | None = None) -> p.Check:
    """``rows``: (todo id, reason) of the latest refused requests, newest first — those of the
    last ``window`` seconds (``health.refused_window``) since the last `ack refused`."""
    within = f" in the last {window:g} s" if window else ""
    if not rows:
        return p.Check(
            name="refused",
            status="OK",
            message=f"no request was refused{within}"
            + (" (or since `completionctl ack refused`)" if window else ""),
        )
    ids = sorted({row[0] for row in rows})
    return p.Check(
        name="refused",
        status="WARNING",
        message=f"{len(rows)} request(s) refused by the database{within}; latest: "
        f"{rows[0][1]}" + (" (`completionctl ack refused` clears this)" if window else ""),
        todo_ids=ids,
    )


def waiting_check(rows: list[tuple[int, str]]) -> p.Check:
    if not rows:
        return p.Check(
            name="waiting_for_person", status="OK", message="no session waits for a person"
        )
    return p.Check(
        name="waiting_for_person",
        status="WARNING",
        message="; ".join(f"todo {t}: {w}" for t, w in rows[:10]),
        todo_ids=[row[0] for row in rows],
    )


# ------------------------------------------------------------------ the report


def render_health(
    parent: Mapping[str, p.Check],
    saved: Iterable[tuple[str, str, str, list[int], float]],
    now: float,
) -> p.HealthReport:
    """The whole report: the parent's checks and those saved in the journal, in registry order;
    a saved check not computed yet is UNKNOWN (an optional one is left out)."""
    stored = {name: (status, message, ids, at) for name, status, message, ids, at in saved}
    ordered: list[p.Check] = []
    for spec in CHECKS:
        if spec.source is Source.PARENT:
            ordered.append(parent[spec.name])
        elif spec.name in stored:
            status, message, ids, at = stored[spec.name]
            age = int(max(now - at, 0))
            ordered.append(
                p.Check(
                    name=spec.name,
                    status=status,
                    message=f"{message} ({age} s ago)",
                    todo_ids=ids,
                )
            )
        elif not spec.optional:
            ordered.append(
                p.Check(
                    name=spec.name,
                    status="UNKNOWN",
                    message="not checked yet (the monitor is starting)",
                )
            )
    worst = max((WORST[c.status] for c in ordered), default=0)
    status = {0: "OK", 1: "WARNING", 2: "CRITICAL"}[worst]
    return p.HealthReport(status=status, checks=ordered, checked_at=now)


def scheduled(s: ScheduledCompletion) -> p.Scheduled:
    return p.Scheduled(
        todo_id=s.todo_id,
        due_at=s.due_at,
        state=s.state,
        reason=s.reason,
        request_id=s.request_id,
    )


def todo_status(
    todo_id: int,
    entries: list[Entry],
    timer: TodoTimers | None,
    schedules: list[ScheduledCompletion],
    predicted_hang: str | None,
    timings: Mapping[str, dict[str, float]] | None = None,
) -> p.TodoStatus:
    deadlines: list[p.Deadline] = []
    if timer is not None:
        if timer.completion_due is not None:
            deadlines.append(
                p.Deadline(
                    name="completion",
                    due_at=timer.completion_due,
                    fired=bool(timer.completion_fired),
                )
            )
        if timer.emergency_due is not None:
            deadlines.append(
                p.Deadline(
                    name="emergency",
                    due_at=timer.emergency_due,
                    fired=bool(timer.emergency_fired),
                )
            )
    return p.TodoStatus(
        todo_id=todo_id,
        entries=[
            p.Entry(
                completion_id=e.completion_id,
                kind=e.kind,
                state=e.state,
                source=e.source,
                attempts=e.attempts,
                last_error=e.last_error,
                outcome=e.outcome,
                created_at=e.created_at,
                updated_at=e.updated_at,
                timings=(timings or {}).get(e.completion_id, {}),
                archive_path=e.archive_path,
            )
            for e in entries
        ],
        deadlines=deadlines,
        waiting=timer.waiting if timer else None,
        session_id=timer.session_id if timer else None,
        last_heard_at=timer.last_heard_at if timer else None,
        note=timer.note if timer else None,
        scheduled=[scheduled(s) for s in schedules],
        predicted_hang=predicted_hang,
    )


def predicted_hang(
    saved: Iterable[tuple[str, str, str, list[int], float]], todo_id: int
) -> str | None:
    """What the predicted_hangs check says about ``todo_id``, if it flags it."""
    for name, status, message, ids, _at in saved:
        if name == "predicted_hangs" and status != "OK" and todo_id in ids:
            prefix = f"todo {todo_id}: "
            for part in message.split(" | "):
                if part.startswith(prefix):
                    return part[len(prefix) :]
    return None
