"""The writer: the only process that writes the todo database.

It takes collected journal entries in order (per todo), writes them in batched transactions,
reads each back (verification) and records the result in the journal.  Transient errors back off
and retry for as long as it takes; permanent errors make an entry ``dead`` (``completionctl retry``
queues it again).  While the database is down it probes it, and drains the backlog at once when
it answers again.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

from loguru import logger

from .journal import Entry
from .loop import ChildBase
from .store import PermanentError, StoreError, TodoWrite, TransientError, open_store

BATCH = 200
PROBE_INTERVAL = 1.0
VERIFY_TRIES = 3


class Writer(ChildBase):
    name = "writer"
    rings = ("monitor",)

    def open(self) -> None:
        self.store = None
        self.schema_ready = False
        self.down_since: float | None = None
        self.next_probe = 0.0
        self._rng = random.Random()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def _store(self):
        if self.store is None:
            self.store = open_store(
                self.config.database_url,
                table=self.config.database.table,
                timeout=self.config.behavior.database_timeout,
            )
        return self.store

    # ------------------------------------------------------------ the loop's work

    def work(self, now: float) -> float:
        if self.down_since is not None:
            if now < self.next_probe:
                return self._next_wake(now)
            if not self._probe(now):
                return self.next_probe
        if not self.schema_ready:
            try:
                self._store().ensure_schema(
                    create_todo_table=self.config.database_url.startswith("sqlite:")
                )
                self.schema_ready = True
            except TransientError as exc:
                self._went_down(now, exc)
                return self.next_probe
            except PermanentError as exc:
                logger.error("cannot prepare the database schema: {}", exc)
                self._went_down(now, exc)
                return self.next_probe
        while True:
            batch, verify = self._pick(now)
            if not batch and not verify:
                break
            if verify:
                self._verify_written(verify, now)
            if batch:
                self._write(batch, now)
            if self.down_since is not None or len(batch) < BATCH:
                break
            now = self.clock()
        return self._next_wake(now)

    def _pick(self, now: float) -> tuple[list[Entry], list[Entry]]:
        """Entries ready to write, in order; a todo with an earlier unfinished entry waits."""
        batch: list[Entry] = []
        verify: list[Entry] = []
        blocked: set[int] = set()
        for entry in self.journal.entries_in(("accepted", "collected", "written"), limit=5000):
            if entry.todo_id in blocked:
                continue
            if entry.state == "accepted" or entry.next_attempt_at > now:
                blocked.add(entry.todo_id)
                continue
            (verify if entry.state == "written" else batch).append(entry)
            if len(batch) >= BATCH:
                break
        return batch, verify

    def _next_wake(self, now: float) -> float:
        rows = self.journal._db.execute(
            "SELECT MIN(next_attempt_at) FROM entries WHERE state IN ('collected', 'written')"
        ).fetchone()
        wake = now + self.sweep
        if rows and rows[0] is not None:
            wake = min(wake, max(rows[0], now))
        if self.down_since is not None:
            wake = min(wake, self.next_probe)
        return wake

    # ------------------------------------------------------------ writing

    def _write(self, batch: list[Entry], now: float) -> None:
        writes = [_to_write(entry) for entry in batch]
        try:
            outcomes = self._store().apply(writes)
        except TransientError as exc:
            self._retry_later(batch, now, exc)
            self._went_down(now, exc)
            return
        except PermanentError as exc:
            if len(batch) > 1:
                # One bad entry must not hold up the rest: find it by writing one at a time.
                for entry in batch:
                    self._write([entry], now)
                return
            self._dead(batch[0], now, exc)
            return
        self._came_back(now)
        updates = []
        verified_any = False
        for entry, write, outcome in zip(batch, writes, outcomes, strict=True):
            log = logger.bind(todo_id=entry.todo_id, completion_id=entry.completion_id)
            if outcome.outcome == "refused":
                log.warning("database refused the {}: {}", entry.kind, outcome.reason)
                updates.append(
                    (
                        entry.completion_id,
                        {
                            "state": "failed",
                            "outcome": "refused",
                            "last_error": outcome.reason,
                            "attempts": entry.attempts + 1,
                        },
                    )
                )
                continue
            ok = self._verified(write, outcome)
            state = _after_verify(entry.kind) if ok else "written"
            verified_any |= ok
            if outcome.outcome == "duplicate":
                log.info("recorded as a duplicate: {}", outcome.reason)
            else:
                log.info("{} {} ({})", entry.kind, outcome.outcome, state)
            updates.append(
                (
                    entry.completion_id,
                    {
                        "state": state,
                        "outcome": outcome.outcome,
                        "attempts": entry.attempts + 1,
                        "last_error": None if ok else "verification did not read the write back",
                        "next_attempt_at": 0 if ok else now + PROBE_INTERVAL,
                    },
                )
            )
        self.journal.update_entries(updates, now)
        if verified_any:
            self.ring("monitor")

    def _verified(self, write: TodoWrite, outcome) -> bool:
        try:
            return self._store().verify(write, outcome)
        except StoreError as exc:
            logger.bind(completion_id=write.completion_id).warning("verification failed: {}", exc)
            return False

    def _verify_written(self, entries: list[Entry], now: float) -> None:
        from .store import WriteOutcome

        updates = []
        for entry in entries:
            write = _to_write(entry)
            outcome = WriteOutcome(entry.completion_id, entry.outcome or "applied")
            if self._verified(write, outcome):
                updates.append((entry.completion_id, {"state": _after_verify(entry.kind)}))
            elif entry.attempts >= VERIFY_TRIES + 1:
                updates.append(
                    (
                        entry.completion_id,
                        {
                            "state": "failed",
                            "last_error": "written, but the row never read back as expected "
                            "(changed by someone else?)",
                        },
                    )
                )
            else:
                updates.append(
                    (
                        entry.completion_id,
                        {"attempts": entry.attempts + 1, "next_attempt_at": now + PROBE_INTERVAL},
                    )
                )
        self.journal.update_entries(updates, now)
        self.ring("monitor")

    def _retry_later(self, batch: list[Entry], now: float, exc: StoreError) -> None:
        behavior = self.config.behavior
        updates = []
        for entry in batch:
            attempts = entry.attempts + 1
            if attempts <= behavior.max_retries:
                delay = min(2.0**attempts, behavior.retry_max_delay)
            else:
                delay = behavior.retry_max_delay
                if attempts == behavior.max_retries + 1:
                    logger.bind(todo_id=entry.todo_id, completion_id=entry.completion_id).warning(
                        "{} attempts failed; it stays in the journal and is retried every {:.0f} s",
                        attempts,
                        delay,
                    )
            delay *= self._rng.uniform(0.8, 1.2)
            updates.append(
                (
                    entry.completion_id,
                    {
                        "attempts": attempts,
                        "next_attempt_at": now + delay,
                        "last_error": str(exc),
                    },
                )
            )
        self.journal.update_entries(updates, now)

    def _dead(self, entry: Entry, now: float, exc: StoreError) -> None:
        logger.bind(todo_id=entry.todo_id, completion_id=entry.completion_id).error(
            "permanent database error, not retried: {}; fix it, then `completionctl retry {}`",
            exc,
            entry.completion_id,
        )
        self.journal.update_entry(
            entry.completion_id,
            now,
            state="dead",
            last_error=str(exc),
            attempts=entry.attempts + 1,
        )

    # ------------------------------------------------------------ outages

    def _went_down(self, now: float, exc: StoreError) -> None:
        if self.down_since is None:
            self.down_since = now
            logger.warning("database unreachable: {}; completions wait in the journal", exc)
        if self.store is not None:
            self.store.close()
            self.store = None
        self.next_probe = now + PROBE_INTERVAL

    def _probe(self, now: float) -> bool:
        try:
            self._store().ping()
        except StoreError:
            self.next_probe = now + PROBE_INTERVAL
            return False
        self._came_back(now)
        return True

    def _came_back(self, now: float) -> None:
        if self.down_since is None:
            return
        logger.info("database reachable again after {:.0f} s; draining", now - self.down_since)
        self.down_since = None
        # Everything that waited for the database may go now, not at its backoff time.
        with self.journal.transaction() as db:
            db.execute(
                "UPDATE entries SET next_attempt_at = 0 WHERE state IN ('collected', 'written')"
            )


def _after_verify(kind: str) -> str:
    # Starts and resets leave no session files behind: they are finished once verified.
    return "verified" if kind in ("normal", "emergency") else "cleaned"


def _to_write(entry: Entry) -> TodoWrite:
    return TodoWrite(
        completion_id=entry.completion_id,
        todo_id=entry.todo_id,
        kind=entry.kind,
        at=datetime.fromtimestamp(entry.created_at, UTC),
        html=entry.html,
        text=entry.text,
        summary=entry.summary,
        source=entry.source or "",
        attempts=entry.attempts + 1,
    )
