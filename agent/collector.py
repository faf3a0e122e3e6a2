"""The collector: turns accepted completions into reports, without ever holding up anyone else.

Each accepted entry is collected on a small thread pool (the fallback chain: message, transcript,
session dir, tmux, database), rendered as an HTML report, its session files archived, and the
result journaled as ``collected`` for the writer.  A slow source delays only its own completion;
each source has its own timeout.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import zmq
from loguru import logger

import protocol as p

from .archive import archive_session
from .journal import Entry, TodoTimers
from .loop import ChildBase
from .report import render_report
from .sources import CollectRequest, TodoFacts, collect
from .store import StoreError, open_store
from .system_status import describe_system

WORKERS = 4
DB_READ_TIMEOUT = 3.0
DB_QUIET_AFTER_FAILURE = 30.0  # after a failed read, don't make every report wait for the database


@dataclass(frozen=True)
class Result:
    entry: Entry
    values: dict[str, object]


class TodoFactsReader:
    """Reads a todo's title and description with a short timeout, and stops asking for a while
    after a failure, so an outage costs one timeout, not one per completion."""

    def __init__(self, url: str, table: str, timeout: float, clock=time.monotonic) -> None:
        self.url, self.table, self.timeout, self.clock = url, table, timeout, clock
        self._quiet_until = 0.0
        self._local = threading.local()
        self._lock = threading.Lock()

    def __call__(self, todo_id: int) -> TodoFacts | None:
        if self.clock() < self._quiet_until:
            raise StoreError("the database did not answer recently; not asked again yet")
        store = getattr(self._local, "store", None)
        try:
            if store is None:
                store = open_store(self.url, table=self.table, timeout=self.timeout)
                self._local.store = store
            todo = store.get_todo(todo_id)
        except StoreError:
            with self._lock:
                self._quiet_until = self.clock() + DB_QUIET_AFTER_FAILURE
            if store is not None:
                store.close()
            self._local.store = None
            raise
        if todo is None:
            return None
        return TodoFacts(
            title=todo.title, description=todo.description, working_directory=todo.working_directory
        )


class Collector(ChildBase):
    name = "collector"
    rings = ("writer",)

    def open(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="collect")
        self.inflight: dict[str, Future[Result]] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.poller.register(self._wake_r, zmq.POLLIN)
        self.facts = TodoFactsReader(
            self.config.database_url,
            self.config.database.table,
            min(DB_READ_TIMEOUT, self.config.behavior.database_timeout),
        )

    def close(self) -> None:
        # In-flight work is simply redone by the next collector: the entries are still 'accepted'.
        self.pool.shutdown(wait=False, cancel_futures=True)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def work(self, now: float) -> float:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        self._harvest(now)
        room = WORKERS * 4 - len(self.inflight)
        if room > 0:
            for entry in self.journal.entries_in(("accepted",), limit=room + len(self.inflight)):
                if entry.completion_id in self.inflight:
                    continue
                timers = self.journal.timers(entry.todo_id)
                future = self.pool.submit(self._collect, entry, timers[0] if timers else None, now)
                future.add_done_callback(lambda _: os.write(self._wake_w, b"!"))
                self.inflight[entry.completion_id] = future
                room -= 1
                if room <= 0:
                    break
        return now + self.sweep

    def _harvest(self, now: float) -> None:
        done = [cid for cid, future in self.inflight.items() if future.done()]
        if not done:
            return
        updates = []
        for cid in done:
            future = self.inflight.pop(cid)
            try:
                result = future.result()
            except Exception:
                logger.bind(completion_id=cid).exception("collection crashed; it will be retried")
                continue
            updates.append((cid, result.values))
        if updates:
            self.journal.update_entries(updates, self.clock())
            self.ring("writer")

    # ------------------------------------------------------------ one completion (pool thread)

    def _collect(self, entry: Entry, timers: TodoTimers | None, now: float) -> Result:
        log = logger.bind(todo_id=entry.todo_id, completion_id=entry.completion_id)
        request = _decode(entry.request)
        output = getattr(request, "output", None)
        transcript = getattr(request, "transcript_path", None) or (
            timers.transcript_path if timers else None
        )
        tmux_target = getattr(request, "tmux_target", None) or self.config.collect.tmux_target
        session_dir = self.config.session_dir_for(entry.todo_id)
        emergency = entry.kind == "emergency"
        collect_request = CollectRequest(
            todo_id=entry.todo_id,
            output=output,
            transcript_path=transcript,
            session_dir=session_dir,
            tmux_target=tmux_target or None,
            emergency_reason=entry.reason if emergency else None,
        )
        collected = collect(
            collect_request,
            load_todo=self.facts,
            transcript_wait=self.config.collect.transcript_wait,
            tmux_timeout=self.config.collect.tmux_timeout,
            tmux_socket=self.config.collect.tmux_socket or None,
        )
        facts = None
        try:
            facts = self.facts(entry.todo_id)
        except StoreError as exc:
            log.info("todo details unavailable for the report: {}", exc)
        except Exception as exc:
            log.warning("todo details unavailable for the report: {}", exc)
        system_status = describe_system() if emergency else None
        if emergency:
            log.bind(emergency=True).warning(
                "emergency completion ({}); system: {}", entry.reason, system_status
            )
        started = None
        if timers is not None and timers.started_at:
            started = datetime.fromtimestamp(timers.started_at, UTC)
        report = render_report(
            todo_id=entry.todo_id,
            todo=facts,
            collected=collected,
            kind=entry.kind,
            started_at=started,
            completed_at=datetime.fromtimestamp(entry.created_at, UTC),
            reason=entry.reason,
            system_status=system_status,
        )
        values: dict[str, object] = {
            "state": "collected",
            "html": report.html,
            "text": report.text,
            "summary": report.summary,
            "source": collected.source,
            "problems": "\n".join(collected.problems) or None,
        }
        archive = self._archive(entry, session_dir, transcript, report.html, now, log)
        if archive is not None:
            values["archive_path"] = archive
        for problem in collected.problems:
            log.info("collection problem: {}", problem)
        log.info("collected from {}", collected.source)
        return Result(entry, values)

    def _archive(self, entry: Entry, session_dir, transcript, html, now, log) -> str | None:
        session = Path(session_dir) if session_dir and os.path.isdir(session_dir) else None
        transcript_path = Path(transcript) if transcript and os.path.isfile(transcript) else None
        if session is None and transcript_path is None:
            return None  # nothing on disk to keep; the report itself is in the database
        try:
            result = archive_session(
                self.config.archive_dir,
                entry.todo_id,
                now,
                session_dir=session,
                transcript=transcript_path,
                report_html=html,
            )
        except OSError as exc:
            log.error("archiving failed: {}; the session files will not be deleted", exc)
            return None
        for note in result.notes:
            log.info("archive: {}", note)
        log.info("archived {} file(s) into {}", result.files, result.path)
        return str(result.path)


def _decode(frame: bytes | None) -> p.Request | None:
    if not frame:
        return None
    try:
        return p.decode_request(frame)
    except (p.ProtocolError, msgspec.DecodeError):
        return None
