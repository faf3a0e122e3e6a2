"""The reliability suite's bookkeeping: a history of every acknowledged completion, a stream of
completions from client threads, an observer of the database, and the exactly-once check.

A scenario sends completions through `ctl.Client` (the library the hook and the CLI use) while
it injects faults. `Ledger` records every completion the client got an ack for (`accepted`, or
`queued` in the outbox). At the end `check()` reads the database directly (not through the proxy)
and counts, for the acked completions: present exactly once, lost, duplicated; and it checks that
nothing else changed (todos nobody completed are as they were, each completed todo holds the
output of the completion recorded as its `normal` one).

Sizes scale with RELIABILITY_SCALE (default 1: the bounded default run; scripts/reliability runs
larger). With RELIABILITY_RESULTS=PATH each scenario appends its figures to PATH as a JSON line;
scripts/reliability turns them into docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pymysql

import protocol as p
from ctl import AgentUnavailable, Client, CommandRefused
from tests.dbfixtures import mysql_connect

SCALE = float(os.environ.get("RELIABILITY_SCALE", "1") or 1)
RESULTS = os.environ.get("RELIABILITY_RESULTS", "")


def scaled(n: float, minimum: int = 1) -> int:
    return max(minimum, round(n * SCALE))


def budget(seconds: float) -> float:
    """A test's timeout, grown with the scale (pytest-timeout's marker wins over the CLI)."""
    return seconds * max(1.0, SCALE)


# --------------------------------------------------------------------------- the history


@dataclass
class Sent:
    completion_id: str
    todo_id: int
    output: str | None
    sent_at: float
    state: str | None = None  # "accepted" | "queued" once acked; None: no ack (error below)
    acked_at: float | None = None
    error: str | None = None


@dataclass
class Fault:
    what: str
    started: float
    ended: float | None = None
    recovered_after: float | None = None


class Ledger:
    """Every completion a scenario sent, and which were acknowledged."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.sent: dict[str, Sent] = {}
        self.faults: list[Fault] = []
        self.injected = 0  # faults counted without a Fault of their own (hostile messages)
        self._lock = threading.Lock()

    # ---- sending
    def complete(
        self,
        client: Client,
        todo_id: int,
        output: str | None,
        *,
        request_id: str | None = None,
        **kw: Any,
    ) -> Sent:
        rid = request_id or p.new_request_id()
        with self._lock:
            sent = self.sent.get(rid)
            if sent is None:
                sent = self.sent[rid] = Sent(rid, todo_id, output, time.monotonic())
        try:
            ack = client.complete(todo_id, output=output, request_id=rid, **kw)
        except (AgentUnavailable, CommandRefused, OSError) as exc:
            with self._lock:
                if sent.state is None:
                    sent.error = f"{type(exc).__name__}: {exc}"
            return sent
        with self._lock:
            if ack.state in ("accepted", "queued") and sent.state is None:
                sent.state = ack.state
                sent.acked_at = time.monotonic()
                sent.error = None
        return sent

    def note_ack(self, completion_id: str, todo_id: int) -> None:
        """A completion acked outside `complete` (a fuzzed frame that was a valid request)."""
        now = time.monotonic()
        with self._lock:
            self.sent.setdefault(
                completion_id, Sent(completion_id, todo_id, None, now, "accepted", now)
            )

    def acked(self, before: float | None = None) -> list[Sent]:
        with self._lock:
            return [
                s
                for s in self.sent.values()
                if s.state is not None and (before is None or (s.acked_at or 0) <= before)
            ]

    # ---- faults
    def fault(self, what: str) -> Fault:
        f = Fault(what, time.monotonic())
        self.faults.append(f)
        return f


# --------------------------------------------------------------------------- the database side


class Observer:
    """Polls completion_log (directly, not through the proxy) and notes when each id appeared."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        self.url = url
        self.interval = interval
        self.seen: dict[str, float] = {}
        self._last = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)

    def __enter__(self) -> Observer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = mysql_connect(self.url)
                self.poll(conn)
            except pymysql.MySQLError:
                # completion_log does not exist until the writer made it; or a test dropped it.
                with contextlib.suppress(Exception):
                    if conn is not None:
                        conn.close()
                conn = None
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def poll(self, conn: pymysql.Connection) -> None:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT id, completion_id FROM stage_completion_log WHERE id > %s ORDER BY id",
                (self._last,),
            )
            rows = cur.fetchall()
        now = time.monotonic()
        with self._lock:
            for row_id, cid in rows:
                self.seen.setdefault(cid, now)
                self._last = max(self._last, int(row_id))

    def has(self, completion_ids: Iterable[str]) -> bool:
        with self._lock:
            return all(cid in self.seen for cid in completion_ids)

    def missing(self, completion_ids: Iterable[str]) -> list[str]:
        with self._lock:
            return [cid for cid in completion_ids if cid not in self.seen]


def wait_recovered(
    ledger: Ledger,
    observer: Observer,
    fault: Fault,
    *,
    ready: Callable[[], bool] = lambda: True,
    timeout: float = 90.0,
) -> float:
    """Wait until every completion acked before the fault ended is in the database and `ready()`
    holds; note and return the time that took from the fault's end."""
    if fault.ended is None:
        fault.ended = time.monotonic()
    ids = [s.completion_id for s in ledger.acked(before=fault.ended)]
    deadline = time.monotonic() + timeout
    while True:
        missing = observer.missing(ids)
        if not missing and ready():
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{ledger.scenario}: not recovered {timeout:.0f} s after {fault.what}: "
                f"{len(missing)} acked completion(s) not in the database, e.g. {missing[:3]}"
            )
        time.sleep(0.05)
    fault.recovered_after = time.monotonic() - fault.ended
    return fault.recovered_after


# --------------------------------------------------------------------------- the stream


class Stream:
    """Client threads sending completions, one fresh todo each, with some repeats mixed in:
    every `duplicate_every`-th is a second completion (a new request id) for a todo already
    completed, every `resend_every`-th resends an earlier request with the same request id (a
    client retry), every `slow_every`-th carries no output and names a transcript that never
    appears (collection then waits; a kill lands mid-collection), and an output holds hostile
    bytes now and then."""

    def __init__(
        self,
        ledger: Ledger,
        config_path: str,
        todo_ids: list[int],
        *,
        threads: int = 2,
        rate: float = 40.0,
        timeout: float = 1.0,
        duplicate_every: int = 10,
        resend_every: int = 15,
        slow_every: int = 12,
        seed: int | None = None,
    ) -> None:
        self.ledger = ledger
        self.config_path = config_path
        self.todos = iter(todo_ids)
        self.threads = threads
        self.interval = threads / rate if rate > 0 else 0.0
        self.timeout = timeout
        self.duplicate_every = duplicate_every
        self.resend_every = resend_every
        self.slow_every = slow_every
        self.rng = random.Random(seed)
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done: list[Sent] = []
        self._workers: list[threading.Thread] = []
        self.exhausted = threading.Event()

    def __enter__(self) -> Stream:
        for n in range(self.threads):
            t = threading.Thread(target=self._run, name=f"stream-{n}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(30)

    def _next(self) -> tuple[str, int, str | None, dict[str, Any], str | None] | None:
        with self._lock:
            n = next(self._counter)
            if self._done and n % self.resend_every == 0:
                s = self.rng.choice(self._done)
                return ("resend", s.todo_id, s.output, {}, s.completion_id)
            if self._done and n % self.duplicate_every == 0:
                s = self.rng.choice(self._done)
                return ("duplicate", s.todo_id, f"second completion #{n}", {}, None)
            todo = next(self.todos, None)
            if todo is None:
                self.exhausted.set()
                return None
        if n % self.slow_every == 0:
            return ("slow", todo, None, {"transcript_path": "/nonexistent/transcript.jsonl"}, None)
        output = f"done #{n} for todo {todo}"
        if n % 7 == 0:
            output += " <script>alert(1)</script> \u202e\x1b[31m\x00 ünïcødé"
        return ("fresh", todo, output, {}, None)

    def _run(self) -> None:
        client = Client(self.config_path, timeout=self.timeout)
        try:
            self._loop(client)
        finally:
            getattr(client, "close", lambda: None)()

    def _loop(self, client: Client) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            job = self._next()
            if job is None:
                return
            kind, todo, output, kw, rid = job
            sent = self.ledger.complete(client, todo, output, request_id=rid, **kw)
            if kind == "fresh" and sent.state is not None:
                with self._lock:
                    self._done.append(sent)
            pause = self.interval - (time.monotonic() - started)
            if pause > 0:
                self._stop.wait(pause)


# --------------------------------------------------------------------------- the verdict


@dataclass
class Verdict:
    scenario: str
    faults: int
    acked: int
    present_once: int
    lost: int
    duplicated: int
    recovery: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def recover_text(self) -> str:
        if not self.recovery:
            return "-"
        worst = max(self.recovery)
        if len(self.recovery) == 1:
            return f"{worst:.1f} s"
        return f"max {worst:.1f} s, median {statistics.median(self.recovery):.1f} s"

    def record(self) -> None:
        if not RESULTS:
            return
        line = {
            "scenario": self.scenario,
            "faults": self.faults,
            "acked": self.acked,
            "present_once": self.present_once,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "recovery": [round(r, 2) for r in self.recovery],
            "recover_text": self.recover_text,
            "note": self.note,
            "scale": SCALE,
        }
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def assert_clean(self) -> None:
        self.record()
        detail = "\n  ".join(self.problems[:20])
        assert self.lost == 0 and self.duplicated == 0 and not self.problems, (
            f"{self.scenario}: acked {self.acked}, present once {self.present_once}, "
            f"lost {self.lost}, duplicated {self.duplicated}\n  {detail}"
        )


def snapshot(url: str, table: str = "stage_project_todos") -> dict[int, tuple]:
    conn = mysql_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT * FROM `{table}` ORDER BY id")
            return {int(row[0]): tuple(row) for row in cur.fetchall()}
    finally:
        conn.close()


def check(
    ledger: Ledger,
    url: str,
    before: dict[int, tuple],
    *,
    table: str = "stage_project_todos",
    extra_ids: Iterable[str] = (),
    faults: int | None = None,
    note: str = "",
) -> Verdict:
    """Compare the database with the history.

    - each acked completion id: exactly one completion_log row (else lost);
    - each todo: at most one row that acted (normal/emergency/reset); more, or a row whose
      completion id nobody sent, is a duplicate;
    - a completed todo holds the output of its `normal` completion; a todo no completion was sent
      for is exactly as it was before.
    """
    conn = mysql_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT completion_id, todo_id, kind FROM stage_completion_log")
            log = cur.fetchall()
            cur.execute(
                f"SELECT id, status, completed_at, claude_text_output FROM `{table}` ORDER BY id"
            )
            todos = {int(r[0]): r for r in cur.fetchall()}
            cur.execute(f"SELECT * FROM `{table}` ORDER BY id")
            rows = {int(r[0]): tuple(r) for r in cur.fetchall()}
    finally:
        conn.close()
    problems: list[str] = []
    per_id: dict[str, int] = {}
    by_todo: dict[int, list[tuple[str, str]]] = {}
    for cid, todo_id, kind in log:
        per_id[cid] = per_id.get(cid, 0) + 1
        by_todo.setdefault(int(todo_id), []).append((cid, kind))
    acked = ledger.acked()
    sent_ids = set(ledger.sent) | set(extra_ids)
    present_once = sum(1 for s in acked if per_id.get(s.completion_id) == 1)
    lost_ids = [s.completion_id for s in acked if s.completion_id not in per_id]
    duplicated = sum(n - 1 for n in per_id.values() if n > 1)
    for cid in per_id:
        if cid not in sent_ids:
            duplicated += 1
            problems.append(f"completion_log row {cid} was never sent")
    for todo_id, entries in by_todo.items():
        # A todo is completed once: one normal row (an emergency before it is replaced by it,
        # by design); every further completion must be a recorded `duplicate` that changed
        # nothing.
        for kind in ("normal", "emergency", "reset"):
            rows_of_kind = [cid for cid, k in entries if k == kind]
            if len(rows_of_kind) > 1:
                duplicated += len(rows_of_kind) - 1
                problems.append(f"todo {todo_id} has {len(rows_of_kind)} {kind} rows")
        normal = [cid for cid, kind in entries if kind == "normal"]
        row = todos.get(todo_id)
        acting = [kind for _, kind in entries if kind != "duplicate"]
        if acting and acting[-1] != "reset" and (row is None or row[1] != "completed"):
            problems.append(f"todo {todo_id} has log rows {entries} but is {row and row[1]}")
            continue
        if normal:
            sent = ledger.sent.get(normal[0])
            if sent is not None and sent.output is not None:
                text = (row[3] if row else None) or ""
                marker = sent.output.split(" <script>")[0]
                if marker not in text:
                    problems.append(
                        f"todo {todo_id}: text {text[:60]!r} is not the output of {normal[0]}"
                    )
    targeted = {s.todo_id for s in ledger.sent.values()}
    for todo_id, row in before.items():
        if todo_id not in targeted and todo_id not in by_todo and rows.get(todo_id) != row:
            problems.append(f"todo {todo_id} changed though no completion was sent for it")
    for cid in lost_ids[:10]:
        s = ledger.sent[cid]
        problems.append(f"lost: {cid} for todo {s.todo_id} ({s.state})")
    recoveries = [f.recovered_after for f in ledger.faults if f.recovered_after is not None]
    return Verdict(
        scenario=ledger.scenario,
        faults=len(ledger.faults) + ledger.injected if faults is None else faults,
        acked=len(acked),
        present_once=present_once,
        lost=len(lost_ids),
        duplicated=duplicated,
        recovery=recoveries,
        problems=problems,
        note=note,
    )


def settle(client_factory: Callable[[], Client], timeout: float = 60.0) -> None:
    """Wait until the agent's journal has nothing waiting (no straggler write after the check)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status = client_factory().status()
        except (AgentUnavailable, CommandRefused) as exc:
            last = exc
        else:
            journal = status.agent.journal if status.agent else {}
            last = journal
            busy = any(journal.get(s, 0) for s in ("accepted", "collected", "written"))
            if not busy and not any(f.name.endswith(".req") for f in _outbox(client_factory())):
                return
        time.sleep(0.1)
    raise AssertionError(f"the journal did not settle in {timeout:.0f} s: {last}")


def _outbox(client: Client) -> list[os.DirEntry]:
    try:
        return list(os.scandir(client.config.outbox_dir))
    except FileNotFoundError:
        return []
