"""The collector: turns accepted completions into reports, without ever holding up anyone else.

Each accepted entry is collected on a small thread pool (the fallback chain: message, transcript,
session dir, tmux, database), rendered as an HTML report, its session files archived, and the
result journaled as ``collected`` for the writer.  A slow source delays only its own completion;
each source has its own timeout.  The pool's threads are daemons: a stop never waits for a slow
source, because the entry is still ``accepted`` and the next collector simply does it again.
"""

from __future__ import annotations

import dataclasses
import html
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path

import msgspec
import zmq
from loguru import logger

import protocol as p

from . import access, git_evidence
from .archive import archive_session, enforce_bounds
from .dbroute import DbRoute
from .journal import ANSWER_KINDS, Entry, Kind, State, TodoTimers
from .loop import ChildBase
from .report import Report, _first_lines, one_line, render_report, sanitize_capped
from .report_markdown import md_code_block
from .session_facts import read_facts
from .sources import Collected, CollectRequest, TodoFacts, collect
from .store import SiteProfile, Store, StoreError, open_store
from .system_status import describe_system

WORKERS = 4
DB_READ_TIMEOUT = 3.0
DB_QUIET_AFTER_FAILURE = 30.0  # after a failed read, don't make every report wait for the database
FACTS_BATCH = 200  # todos read with one query
CRASH_RETRY_MAX = 60.0  # a collection that crashed is tried again after a backoff up to this
FAIR_LOOKAHEAD = 64  # entries looked at beyond those that fit, to find other users' turns
ARCHIVED_STATUSES = ("offen", "in_progress", "completed")  # the writer records a completion


@dataclass(frozen=True)
class Result:
    entry: Entry
    values: dict[str, object]
    # (source, seconds, found) per source tried: recorded as stage timings with the result
    tried: tuple[tuple[str, float, bool], ...] = ()


class TodoFactsReader:
    """Reads todos' titles and descriptions for the reports, with a short timeout.

    One connection serves the pool's threads, and the todos of every entry the collector has
    taken up (``want``) are read together: a burst costs one query per round, not one per
    completion.  After a failure it stops asking for a while, so an outage costs one timeout,
    not one per completion.
    """

    def __init__(
        self,
        url: str,
        table: str,
        timeout: float,
        clock=time.monotonic,
        route=None,
        profile: SiteProfile | None = None,
    ) -> None:
        self.url, self.table, self.timeout, self.clock = url, table, timeout, clock
        self.route = route  # a DbRoute (ssh tunnel, TLS), or None for a direct connection
        self.profile = profile
        self._zone: tzinfo | None = None
        self.queries = 0
        self._quiet_until = 0.0
        self._lock = threading.Lock()
        self._store: Store | None = None
        self._wanted: set[int] = set()
        self._read: dict[int, TodoFacts | None] = {}  # the last query's answers, each used once

    def _open_store(self) -> None:
        if self._store is None and self.route is not None:
            self._store = self.route.open(timeout=self.timeout)
        elif self._store is None:
            self._store = open_store(
                self.url, table=self.table, timeout=self.timeout, profile=self.profile
            )

    def zone(self) -> tzinfo:
        """The site's zone for the report's times: asked once; UTC (and a log line) while the
        database cannot say, without asking again during the quiet time after a failure."""
        with self._lock:
            if self._zone is None:
                if self.clock() < self._quiet_until:
                    return UTC
                try:
                    self._open_store()
                    assert self._store is not None
                    self._zone = self._store.site_zone()
                except (StoreError, ValueError) as exc:
                    self._quiet_until = self.clock() + DB_QUIET_AFTER_FAILURE
                    logger.warning("the site's time zone is unknown ({}); times shown in UTC", exc)
                    return UTC
            return self._zone

    def want(self, todo_ids: list[int]) -> None:
        """These todos' facts will be asked for soon: read them with the next query."""
        with self._lock:
            self._wanted.update(todo_ids)

    def close(self) -> None:
        # A thread stuck in a query keeps the lock: the process is going anyway, so no wait.
        if self._lock.acquire(blocking=False):
            try:
                if self._store is not None:
                    self._store.close()
                    self._store = None
                if self.route is not None:
                    self.route.close()
            finally:
                self._lock.release()

    def __call__(self, todo_id: int) -> TodoFacts | None:
        with self._lock:
            if todo_id in self._read:
                return self._read.pop(todo_id)
            if self.clock() < self._quiet_until:
                raise StoreError("the database did not answer recently; not asked again yet")
            batch = [*sorted(self._wanted - {todo_id})[: FACTS_BATCH - 1], todo_id]
            try:
                self._open_store()
                assert self._store is not None
                self.queries += 1
                todos = self._store.get_todos(batch)
            except (StoreError, ValueError) as exc:
                self._quiet_until = self.clock() + DB_QUIET_AFTER_FAILURE
                if self._store is not None:
                    self._store.close()
                self._store = None
                if isinstance(exc, ValueError):  # an unusable URL or table: a store error
                    raise StoreError(f"database settings unusable: {exc}") from None
                raise
            self._wanted.difference_update(batch)
            # Answers from an earlier query that nobody took are dropped: asked again, they are
            # read fresh.
            self._read = {
                i: None
                if (todo := todos.get(i)) is None
                else TodoFacts(todo.title, todo.description, todo.working_directory, todo.status)
                for i in batch
            }
            return self._read.pop(todo_id)


class WorkerPool:
    """A fixed set of daemon threads running jobs from a queue.

    Unlike ThreadPoolExecutor, whose threads the interpreter joins at exit, a job stuck in a
    slow source does not hold up the process's exit on SIGTERM.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Result], *args: object) -> Future[Result]:
        future: Future[Result] = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Tell every thread to stop after its current job; wait for none of them."""
        for _ in self._threads:
            self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the harvester, which logs it
                future.set_exception(exc)


class Collector(ChildBase):
    name = "collector"
    rings = ("writer",)
    # COLLECTED is made again from ACCEPTED (fsynced by intake before its ack) if a power loss
    # drops it: the session's files are deleted only after the writer's VERIFIED, whose fsync
    # covers this commit too.  Not waiting for the disk takes an fsync off every completion.
    durable_journal = False

    def open(self) -> None:
        self.pool = WorkerPool(WORKERS, "collect")
        self.inflight: dict[str, Future[Result]] = {}
        self.requesters: dict[str, int | None] = {}  # completion id in flight -> requester
        self.crashes: dict[str, tuple[int, float]] = {}  # completion id -> (count, retry at)
        # Collected results not yet in the journal (its write failed): written on the next try.
        self.unrecorded: dict[str, dict[str, object]] = {}
        self.tried: dict[str, tuple[tuple[str, float, bool], ...]] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._wake_lock = threading.Lock()
        self._closed = False
        self.poller.register(self._wake_r, zmq.POLLIN)
        self.facts = TodoFactsReader(
            self.config.database_url,
            self.config.database.table,
            min(DB_READ_TIMEOUT, self.config.behavior.database_timeout),
            route=DbRoute(self.config, "collector"),
            profile=SiteProfile.of_config(self.config.database),
        )

    def close(self) -> None:
        # In-flight work is simply redone by the next collector: the entries are still 'accepted'.
        for future in self.inflight.values():
            future.cancel()  # only those not started yet
        self.pool.shutdown()
        self.facts.close()
        with self._wake_lock:  # a job finishing now must not write into a reused descriptor
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _wake(self, _future: object) -> None:
        with self._wake_lock:
            if not self._closed:
                os.write(self._wake_w, b"!")

    def work(self, now: float) -> float:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        self._harvest(now)
        room = WORKERS * 4 - len(self.inflight)
        if room > 0:
            limit = room + len(self.inflight) + len(self.crashes) + FAIR_LOOKAHEAD
            # Heads first: which entries wait, without their requests (an output each, up to
            # MiBs); the payloads are loaded only for those about to be taken up.
            heads = self.journal.heads_in((State.ACCEPTED,), limit=limit)
            self.facts.want([head[1] for head in heads if head[0] not in self.inflight])
            candidates = [
                cid
                for cid, *_ in heads
                if cid not in self.inflight
                and cid not in self.unrecorded
                and not (cid in self.crashes and now < self.crashes[cid][1])
            ]
            busy = Counter(self.requesters.values())
            taken = 0
            while room > 0 and taken < len(candidates):
                chunk = candidates[taken : taken + room]
                taken += len(chunk)
                for entry in self.journal.entries_by_id(chunk):
                    if entry.state != State.ACCEPTED:
                        continue  # moved on since the heads were read
                    # Another user's completions take at most half the workers: a burst of
                    # slow ones (empty transcripts waited for) cannot hold up the agent user's
                    # own.
                    requester = getattr(_decode(entry.request), "requester_uid", None)
                    if not access.is_self(requester):
                        if busy[requester] >= WORKERS // 2:
                            continue
                        busy[requester] += 1
                    self.requesters[entry.completion_id] = requester
                    timers = self.journal.timers(entry.todo_id)
                    starter = self._starter(entry.todo_id)
                    git_base = self.journal.git_head(entry.todo_id)
                    future = self.pool.submit(
                        self._collect, entry, timers[0] if timers else None, starter, now, git_base
                    )
                    future.add_done_callback(self._wake)
                    self.inflight[entry.completion_id] = future
                    room -= 1
                    if room <= 0:
                        break
        wake = now + self.sweep
        retries = [at for _, at in self.crashes.values() if at > now]
        return min([wake, *retries])

    def _harvest(self, now: float) -> None:
        done = [cid for cid, future in self.inflight.items() if future.done()]
        if not done and not self.unrecorded:
            return
        # Results whose journal write failed last time come first: collecting them again would
        # archive the session again.
        updates = list(self.unrecorded.items())
        for cid in done:
            future = self.inflight.pop(cid)
            self.requesters.pop(cid, None)
            try:
                result = future.result()
            except Exception:
                count = self.crashes.get(cid, (0, 0.0))[0] + 1
                delay = min(CRASH_RETRY_MAX, self.sweep * 2**count)
                self.crashes[cid] = (count, now + delay)
                logger.bind(completion_id=cid).exception(
                    "collection crashed ({} time(s)); tried again in {:.0f} s", count, delay
                )
                continue
            self.crashes.pop(cid, None)
            updates.append((cid, result.values))
            self.unrecorded[cid] = result.values
            self.tried[cid] = result.tried
        if not updates:
            return
        # Compare-and-set: an entry superseded meanwhile (a reset at the emergency deadline
        # marks waiting emergency completions failed) stays what it is.
        landed = self.journal.collected(updates, self.clock(), tried=self.tried)
        self.unrecorded.clear()
        self.tried.clear()
        if landed < len(updates):
            logger.info("{} collected entr(ies) had moved on meanwhile", len(updates) - landed)
        if landed:
            self.ring("writer")

    # ------------------------------------------------------------ one completion (pool thread)

    def _starter(self, todo_id: int) -> int | None:
        """The user whose start request armed the todo (the session's user), if known."""
        for request in self.journal.start_requests(todo_id)[:1]:
            return getattr(_decode(request), "requester_uid", None)
        return None

    def _collect(
        self,
        entry: Entry,
        timers: TodoTimers | None,
        starter: int | None,
        now: float,
        git_base: tuple[str, str] | None = None,
    ) -> Result:
        log = logger.bind(todo_id=entry.todo_id, completion_id=entry.completion_id)
        log.debug("collecting the {} completion", entry.kind)
        request = _decode(entry.request)
        # Whoever named a path is whose rights it is read with (agent.access): the requester
        # for the paths its request carries, the starter for those the start recorded.
        requester = getattr(request, "requester_uid", None) if request else starter
        output = getattr(request, "output", None)
        transcript = getattr(request, "transcript_path", None)
        cwd = getattr(request, "cwd", None)
        reader = requester
        if not transcript and timers is not None and timers.transcript_path:
            transcript, cwd, reader = timers.transcript_path, cwd or timers.cwd, starter
        cwd = cwd or (timers.cwd if timers else None)
        if transcript and cwd and not os.path.isabs(transcript):
            transcript = os.path.join(cwd, transcript)  # the agent's own cwd means nothing here
        tmux_target = getattr(request, "tmux_target", None)
        tmux_reader = requester
        if not tmux_target and self.config.collect.tmux_target:
            tmux_target, tmux_reader = self.config.collect.tmux_target, None  # the config's
        if not access.is_self(tmux_reader) and tmux_reader != reader:
            tmux_target = None  # one reader per collection; the transcript's wins
        session_dir = self.config.session_dir_for(entry.todo_id)
        # The session dir is the session's: its starter's (or, never started here, the
        # requester's), besides the agent's own.
        session_owners = access.trusted_owners(starter if starter is not None else requester)
        emergency = entry.kind == Kind.EMERGENCY
        collect_request = CollectRequest(
            todo_id=entry.todo_id,
            output=output,
            transcript_path=transcript,
            session_dir=session_dir,
            tmux_target=tmux_target or None,
            emergency_reason=entry.reason if emergency else None,
            requester_uid=reader if transcript else tmux_reader,
            session_owners=session_owners,
            remote_paths=self.config.collect.remote_paths,
        )
        collected = collect(
            collect_request,
            load_todo=self.facts,
            transcript_wait=self.config.collect.transcript_wait,
            tmux_timeout=self.config.collect.tmux_timeout,
            tmux_socket=self.config.collect.tmux_socket or None,
        )
        if _failed_session(entry):
            # A session whose last word was an API error (hook.on_failure): the report says so.
            collected = dataclasses.replace(
                collected,
                problems=(*collected.problems, f"the session failed: {entry.reason}"),
            )
        facts = None
        known = False  # whether the database answered (facts None then: no such todo)
        try:
            facts = self.facts(entry.todo_id)
            known = True
        except StoreError as exc:
            log.info("todo details unavailable for the report: {}", exc)
        except Exception as exc:
            log.warning("todo details unavailable for the report: {}", exc)
        system_status = None
        if emergency:
            try:
                system_status = describe_system()
            except Exception as exc:
                system_status = f"system status unavailable: {exc}"
            log.bind(emergency=True).warning(
                "emergency completion ({}); system: {}", entry.reason, system_status
            )
        started = None
        if timers is not None and timers.started_at:
            started = datetime.fromtimestamp(timers.started_at, UTC)
        completed = datetime.fromtimestamp(entry.created_at, UTC)
        session = None
        opener = self._opener(reader)
        if transcript and os.path.isfile(transcript) and opener is not False:
            try:
                session = read_facts(Path(transcript), opener=opener or None)
            except OSError as exc:
                log.info("the transcript's facts are unavailable: {}", exc)
        evidence = None
        repo = (git_base[0] if git_base else None) or cwd
        # git runs as whoever named the directory: the starter for the start's cwd, the
        # requester for one this request names (never as the agent for another user).
        namer = requester if getattr(request, "cwd", None) and not git_base else starter
        git_uid = starter if access.is_self(namer) else namer
        if repo and not (git_uid == p.REMOTE and not self.config.collect.remote_paths):
            try:
                evidence = git_evidence.evidence(
                    repo, git_base[1] if git_base else None, uid=git_uid
                )
            except Exception as exc:  # evidence is a bonus: it must never cost the completion
                log.warning("git evidence failed: {}", exc)
        try:
            report = render_report(
                todo_id=entry.todo_id,
                todo=facts,
                collected=collected,
                kind=entry.kind,
                started_at=started,
                completed_at=completed,
                reason=entry.reason,
                system_status=system_status,
                zone=self.facts.zone(),
                language=self.config.report.language,
                db_format=self.config.report.db_format,
                session=session,
                evidence=evidence,
            )
        except Exception:
            # A bug in the renderer must not keep the completion from the database.
            log.exception("rendering the report failed; storing a plain one instead")
            report = plain_report(entry.todo_id, collected, completed)
        text, summary = report.text, report.summary
        if _failed_session(entry):
            said = sanitize_capped(entry.reason or "", 1000)
            text = f"[The session failed: {said}]\n\n{text}"
            summary = f"Session failed ({said}). {summary}"[:1000]
        values: dict[str, object] = {
            "html": report.for_database,
            "text": text,
            "summary": summary,
            "source": collected.source,
            "problems": "\n".join(collected.problems) or None,
        }
        if getattr(request, "event", None) == "Stop" and entry.kind in ANSWER_KINDS:
            # A Stop ends a turn, not necessarily the work: the monitor archives once the
            # todo's result is final (its session ended, or hook.final_after passed).
            log.debug("archive deferred until the result is final")
        elif known and (facts is None or facts.status not in ARCHIVED_STATUSES):
            # The writer will refuse it: nothing of it is worth disk space (or an attacker's
            # completions for todos that do not exist would fill the disk).
            log.info("not archived: the todo does not exist or is {}", facts and facts.status)
        else:
            archive = self._archive(
                entry,
                session_dir,
                session_owners,
                transcript,
                reader,
                lambda: _page_of(report, entry.todo_id, collected, completed, log),
                now,
                log,
            )
            if archive is not None:
                values["archive_path"] = archive
        if request is not None and getattr(request, "output", None):
            # The output lives on in the report: the journal row does not keep it twice.
            values["request"] = p.encode(msgspec.structs.replace(request, output=None))
        for problem in collected.problems:
            log.info("collection problem: {}", problem)
        log.info("collected from {}", collected.source)
        return Result(entry, values, collected.tried)

    def _opener(self, uid: int | None):
        """How to open a path ``uid`` named: None (as the agent, its own user), a function
        (agent.access.open_as), or False (a tcp:// peer's path, not read at all)."""
        if access.is_self(uid):
            return None
        if uid == p.REMOTE and not self.config.collect.remote_paths:
            return False
        return lambda path: access.open_as(path, uid, remote_paths=self.config.collect.remote_paths)

    def _archive(
        self,
        entry: Entry,
        session_dir,
        owners,
        transcript,
        reader,
        report_html: Callable[[], str],
        now,
        log,
    ) -> str | None:
        session = Path(session_dir) if session_dir and os.path.isdir(session_dir) else None
        transcript_path = Path(transcript) if transcript and os.path.isfile(transcript) else None
        if session is None and transcript_path is None:
            return None  # nothing on disk to keep; the report itself is in the database
        bounds = self.config.archive
        try:
            result = archive_session(
                self.config.archive_dir,
                entry.todo_id,
                now,
                session_dir=session,
                transcript=transcript_path,
                report_html=report_html(),
                session_owners=owners,
                transcript_opener=None
                if access.is_self(reader)
                else lambda path: access.open_as(
                    path, reader, remote_paths=self.config.collect.remote_paths
                ),
                max_bytes=bounds.max_bytes,
                max_files=bounds.max_files,
            )
        except Exception as exc:
            log.error("archiving failed: {}; the session files will not be deleted", exc)
            return None
        for note in result.notes:
            log.info("archive: {}", note)
        log.info("archived {} file(s) into {}", result.files, result.path)
        enforce_bounds(self.config, now, log)
        return str(result.path)


def _page_of(report: Report, todo_id: int, collected: Collected, completed: datetime, log) -> str:
    """The report's page for the archive, built now (render_report defers it: most completions
    never need it); a bug in it archives the plain page instead, as a failed render does."""
    try:
        return report.html
    except Exception:
        log.exception("rendering the report's page failed; archiving a plain one instead")
        return plain_report(todo_id, collected, completed).html


def _failed_session(entry: Entry) -> bool:
    """A completion of a session whose last word was StopFailure (hook.on_failure)."""
    return bool(entry.reason) and (
        entry.kind == Kind.FAILURE
        or (entry.kind == Kind.NORMAL and (entry.reason or "").startswith("StopFailure"))
    )


def plain_report(todo_id: int, collected: Collected, completed: datetime) -> Report:
    """The last-resort report when the real renderer failed: escaped text in one <pre>."""
    text = sanitize_capped(collected.text, 1_000_000)
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'">\n'
        f"<title>Todo {todo_id} — completion report</title>\n</head>\n<body>\n"
        f"<h1>Todo {todo_id}</h1>\n<p>Completed {completed:%Y-%m-%dT%H:%M:%S} UTC; output from "
        f"{html.escape(collected.source)} (the full report could not be rendered).</p>\n"
        f"<pre>{html.escape(text, quote=False)}</pre>\n</body>\n</html>\n"
    )
    # Markdown for the plugin whatever db_format says: it is inert on every path it is shown.
    db = f"Todo #{todo_id}\n\n## Output\n\n{md_code_block(text)}\n"
    return Report(html=page, text=text, summary=one_line(_first_lines(text), warning=False), db=db)


def _decode(frame: bytes | None) -> p.Request | None:
    if not frame:
        return None
    try:
        return p.decode_request(frame)
    except (p.ProtocolError, msgspec.DecodeError):
        return None
