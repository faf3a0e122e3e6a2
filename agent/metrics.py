"""Stage timings turned into numbers: ``completionctl metrics``, ``Client.metrics()`` and the
Prometheus endpoint all read them from here.

The journal records every state change of an entry (a trigger, in the transaction that makes it),
the hook's send time and each source the collector tried.  A completion's stages:

- ``intake``: the hook sent it -> the agent journaled it (accepted);
- ``collect``: accepted -> collected (the fallback chain, the report, the archive);
- ``write``: collected -> first written (or verified, when both happened in one pass): includes
  every retry and database outage;
- ``verify``: written -> verified, when the read-back was a later pass;
- ``clean``: verified -> cleaned;
- ``end_to_end``: the hook sent it (or, without a send time, accepted) -> verified row;
- ``source:NAME``: how long that source took, each time it was tried.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import protocol as p

from .journal import COMPLETION_KINDS, UNFINISHED_STATES, EntryHead, Journal, Kind, StageRow, State

# The kinds counted as completions made (a revision replaces an answer: not one more made).
COUNTED_KINDS = (Kind.NORMAL, Kind.EMERGENCY)
WAITING = UNFINISHED_STATES
STAGES = ("intake", "collect", "write", "verify", "clean", "end_to_end")


@dataclass
class _Hour:
    made: int = 0
    done: int = 0
    failed: int = 0
    dead: int = 0
    e2e: list[float] = field(default_factory=list)


def durations(rows: Iterable[StageRow]) -> list[tuple[str, float, float]]:
    """(stage, seconds, at) of one completion's stage rows (in rowid order): each stage whose
    end is known, timed at the moment it ended."""
    first: dict[str, float] = {}
    out: list[tuple[str, float, float]] = []
    for row in rows:
        if row.stage.startswith("source:"):
            if row.seconds is not None:
                out.append((row.stage, row.seconds, row.at))
            continue
        first.setdefault(row.stage, row.at)
    sent, accepted = first.get("sent"), first.get(State.ACCEPTED)
    collected, written = first.get(State.COLLECTED), first.get(State.WRITTEN)
    verified, cleaned = first.get(State.VERIFIED), first.get(State.CLEANED)
    landed = min((t for t in (written, verified) if t is not None), default=None)

    def span(name: str, start: float | None, end: float | None) -> None:
        if start is not None and end is not None:
            out.append((name, max(end - start, 0.0), end))

    span("intake", sent, accepted)
    span("collect", accepted, collected)
    span("write", collected, landed)
    span("verify", written, verified)
    span("clean", verified, cleaned)
    span("end_to_end", sent if sent is not None else accepted, verified)
    return out


def timings_by_completion(
    journal: Journal, completion_ids: list[str]
) -> dict[str, dict[str, float]]:
    """Each completion's stage durations (a source tried twice: the sum of its tries)."""
    rows: dict[str, list[StageRow]] = defaultdict(list)
    for row in journal.stages_of(completion_ids):
        rows[row.completion_id].append(row)
    out: dict[str, dict[str, float]] = {}
    for cid, stages in rows.items():
        timed: dict[str, float] = {}
        for name, seconds, _ in durations(stages):
            timed[name] = timed.get(name, 0.0) + seconds
        out[cid] = timed
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); values sorted."""
    if not values:
        return None
    position = (len(values) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return values[low] + (values[high] - values[low]) * (position - low)


def summarize(values: list[float]) -> p.Percentiles:
    ordered = sorted(values)
    return p.Percentiles(
        count=len(ordered),
        p50=percentile(ordered, 0.50),
        p95=percentile(ordered, 0.95),
        p99=percentile(ordered, 0.99),
    )


def label(head: EntryHead) -> str:
    """The outcome a count is filed under: what the database did, or where the entry waits."""
    if head.state in WAITING:
        return "pending"
    if head.state in (State.DEAD, State.FAILED):
        return head.outcome if head.state == State.FAILED and head.outcome else head.state
    return head.outcome or head.state


def report(journal: Journal, now: float, since: float) -> p.MetricsReport:
    """The metrics of the entries made in the last ``since`` seconds (per hour: 24 h)."""
    window_start = now - since
    day_start = now - 86400
    heads = journal.entry_heads_since(min(window_start, day_start))
    stages = journal.stages_of([h.completion_id for h in heads])
    by_completion: dict[str, list[StageRow]] = defaultdict(list)
    for row in stages:
        by_completion[row.completion_id].append(row)

    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    per_stage: dict[str, list[float]] = defaultdict(list)
    retries = dead = fires = recoveries = revisions = 0
    first_hour = int(day_start // 3600) * 3600
    hours = {start: _Hour() for start in range(first_hour, int(now // 3600) * 3600 + 1, 3600)}
    for head in heads:
        timed = durations(by_completion.get(head.completion_id, ()))
        if head.created_at >= day_start and head.kind in COUNTED_KINDS:
            bucket = hours.get(int(head.created_at // 3600) * 3600)
            if bucket is not None:
                bucket.made += 1
                bucket.done += head.state in (State.VERIFIED, State.CLEANED)
                bucket.failed += head.state == State.FAILED
                bucket.dead += head.state == State.DEAD
                bucket.e2e.extend(s for stage, s, _ in timed if stage == "end_to_end")
        if head.created_at < window_start:
            continue
        counts[head.kind][label(head)] += 1
        retries += max(head.attempts - 1, 0)
        dead += head.state == State.DEAD
        cid = head.completion_id
        fires += cid.startswith(("emg-", "reset-"))
        recoveries += cid.startswith(("hang-", "fix-"))
        revisions += head.kind == Kind.REVISION
        if head.kind in COMPLETION_KINDS:
            for stage, seconds, _ in timed:
                per_stage[stage].append(seconds)
    state_counts = journal.count_by_state()
    oldest = journal.oldest_unfinished_at()
    hourly = []
    for start, bucket in sorted(hours.items()):
        e2e = sorted(bucket.e2e)
        hourly.append(
            p.HourBucket(
                start=float(start),
                completions=bucket.made,
                verified=bucket.done,
                failed=bucket.failed,
                dead=bucket.dead,
                p50_end_to_end=percentile(e2e, 0.5),
                p95_end_to_end=percentile(e2e, 0.95),
            )
        )
    return p.MetricsReport(
        since=since,
        now=now,
        counts={kind: dict(outcomes) for kind, outcomes in counts.items()},
        stages={name: summarize(values) for name, values in sorted(per_stage.items())},
        backlog=sum(state_counts.get(s, 0) for s in WAITING),
        dead_now=state_counts.get(State.DEAD, 0),
        retries=retries,
        dead=dead,
        deadline_fires=fires,
        recoveries=recoveries,
        revisions=revisions,
        oldest_waiting_age=None if oldest is None else max(now - oldest, 0.0),
        hourly=hourly,
    )
