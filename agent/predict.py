"""Predictive recovery: how long sessions stay silent, learned from the journal's history.

The journal keeps a sample for every silence a heartbeat ends (a *gap*) and for every session's
length from its start to its completion (a *duration*).  The monitor feeds them, as they come,
into DDSketch quantile sketches — one per project (``project_id``, learned from the database by
the health round) and one overall — and flags a live session silent past the learned quantile
(``predict.quantile``, p99) of its project's gaps, or of all gaps when its project has fewer than
``predict.min_samples``.  Too little history means no prediction at all.

With ``predict.act = "shorten"`` the flagged todo's completion deadline is brought forward to
the prediction, never closer than ``predict.min_timeout`` after the last heartbeat and never later
than it was; the monitor's deadline rule then fires it, once, like any deadline.  A heartbeat
moves the deadline back to its full timeout and clears the flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddsketch import DDSketch

from .journal import Journal, SilenceKind, TodoTimers

RELATIVE_ACCURACY = 0.01  # a quantile is within 1 % of the true value
FEED_PER_PASS = 5_000  # samples fed into the sketches per monitor pass (~0.1 s of work)


@dataclass(frozen=True)
class Prediction:
    """A live todo silent (or running) past what its history says is normal."""

    todo_id: int
    kind: str  # SilenceKind.GAP (silent too long) or SilenceKind.DURATION (running too long)
    seconds: float  # how long it has been silent (or running)
    threshold: float  # the learned quantile it went past
    samples: int
    scope: str  # "project 3" or "overall"
    heard_at: float  # when the todo was last heard (a gap's start)

    def explain(self, quantile: float) -> str:
        share = f"{quantile * 100:g} %"
        if self.kind == SilenceKind.GAP:
            return (
                f"silent {span(self.seconds)}; {share} of {self.samples} past gaps "
                f"{_where(self.scope)} were under {span(self.threshold, up=True)}"
            )
        return (
            f"running {span(self.seconds)}; {share} of {self.samples} past sessions "
            f"{_where(self.scope)} finished within {span(self.threshold, up=True)}"
        )


def _where(scope: str) -> str:
    return "overall" if scope == "overall" else f"in {scope}"


def span(seconds: float, *, up: bool = False) -> str:
    """7 min 12 s, 3 min, 2 h 5 min, 40 s; ``up`` rounds up (a bound said as "under")."""
    whole = int(-(-seconds // 1)) if up else int(seconds)
    if up and whole >= 120:
        whole = -(-whole // 60) * 60  # a bound of minutes needs no seconds
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    shown = [f"{n} {unit}" for n, unit in parts if n]
    return " ".join(shown[:2]) if shown else "0 s"


class SilenceModel:
    """The sketches, fed incrementally from the journal's silence samples."""

    def __init__(self) -> None:
        self._forget()

    def _forget(self) -> None:
        self.last_seq = 0
        self.projects: dict[int, int] = {}
        self.sketches: dict[tuple[str, int | None], DDSketch] = {}
        # Todos whose samples went in before their project was known: a mapping that turns up
        # for one of them means the per-project sketches are rebuilt.
        self._unplaced: set[int] = set()
        self.caught_up = False

    def update(self, journal: Journal) -> None:
        projects = journal.projects()
        if any(todo_id in self._unplaced for todo_id in projects.keys() - self.projects.keys()):
            self._forget()  # rebuilt from the journal's samples just below
        self.projects = projects
        # A bounded share per monitor pass: a long history (at start, or after a rebuild) must
        # not hold up the deadlines; nothing is predicted until the sketches have caught up.
        samples = journal.silences_after(self.last_seq, limit=FEED_PER_PASS)
        for sample in samples:
            self.add(sample.todo_id, sample.kind, sample.seconds)
            self.last_seq = sample.seq
        self.caught_up = len(samples) < FEED_PER_PASS

    def add(self, todo_id: int, kind: str, seconds: float) -> None:
        project = self.projects.get(todo_id)
        keys: list[tuple[str, int | None]] = [(kind, None)]
        if project is not None:
            keys.append((kind, project))
        else:
            self._unplaced.add(todo_id)
        for key in keys:
            sketch = self.sketches.get(key)
            if sketch is None:
                sketch = self.sketches[key] = DDSketch(RELATIVE_ACCURACY)
            sketch.add(max(seconds, 0.0))

    def threshold(
        self, kind: str, project: int | None, quantile: float, min_samples: int
    ) -> tuple[float, int, str] | None:
        """(quantile value, samples, scope) from the project's sketch when it has enough
        samples, else from all of them; None when neither has ``min_samples``."""
        candidates: list[tuple[tuple[str, int | None], str]] = [((kind, None), "overall")]
        if project is not None:
            candidates.insert(0, ((kind, project), f"project {project}"))
        for key, scope in candidates:
            sketch = self.sketches.get(key)
            if sketch is not None and sketch.count >= min_samples:
                value = sketch.get_quantile_value(quantile)
                if value is not None:
                    return value, int(sketch.count), scope
        return None

    def count(self, kind: str) -> int:
        sketch = self.sketches.get((kind, None))
        return int(sketch.count) if sketch is not None else 0


def predict(
    timers: list[TodoTimers],
    model: SilenceModel,
    now: float,
    *,
    quantile: float,
    min_samples: int,
) -> list[Prediction]:
    """Pure: the live todos silent (or running) past their learned quantile at ``now``.

    Live means armed and not fired, not waiting for a person (that is waiting_for_person's
    business), and heard from at least once.
    """
    found: list[Prediction] = []
    for t in timers:
        if t.done or t.completion_fired or t.waiting or t.completion_due is None:
            continue
        project = model.projects.get(t.todo_id)
        if t.last_heard_at is not None:
            learned = model.threshold(SilenceKind.GAP, project, quantile, min_samples)
            silent = now - t.last_heard_at
            if learned is not None and silent > learned[0]:
                value, samples, scope = learned
                found.append(
                    Prediction(
                        t.todo_id, SilenceKind.GAP, silent, value, samples, scope, t.last_heard_at
                    )
                )
                continue
        if t.started_at is not None:
            learned = model.threshold(SilenceKind.DURATION, project, quantile, min_samples)
            running = now - t.started_at
            if learned is not None and running > learned[0]:
                value, samples, scope = learned
                found.append(
                    Prediction(
                        t.todo_id,
                        SilenceKind.DURATION,
                        running,
                        value,
                        samples,
                        scope,
                        t.last_heard_at or t.started_at,
                    )
                )
    return found


def shortened_due(prediction: Prediction, timer: TodoTimers, *, min_timeout: float) -> float | None:
    """Pure: where ``predict.act = "shorten"`` puts the completion deadline, or None to leave
    it: at the prediction, never closer than ``min_timeout`` after the last heartbeat, and only
    ever earlier than it stands (so never past the configured timeout)."""
    if prediction.kind != SilenceKind.GAP or timer.completion_due is None:
        return None
    due = prediction.heard_at + max(prediction.threshold, min_timeout)
    return due if due < timer.completion_due else None
