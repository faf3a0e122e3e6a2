"""Bench P: the agent against what a user would pick instead, the same work, in one run.

Each completion is the same job everywhere: read the todo, render the report of a 4 KB Markdown
answer (headings, lists, code fences, a table, links) with the agent's renderer, UPDATE the
WordPress row in MariaDB, read it back. The peers:

- **the original system's style**: a fresh process per completion does it all synchronously in
  the hook (``peer_original.py``);
- **huey** (``SqliteHuey``): the hook process enqueues, ``huey_consumer -w 2`` (threads) does
  the work (``peer_huey.py``);
- **the agent**, in the three modes a user has: ``completionctl hook`` with a Stop payload
  carrying the answer (process hook); the same Stop event POSTed to the agent's HTTP hook
  endpoint (``hook.http_listen``), as Claude Code's ``"type": "http"`` hook does, on a
  kept-alive connection with the bearer token and ``X-Todo-Id`` (HTTP hook; 4 connections at a
  time for the rate); and ``ctl.Client.complete`` from a loop (library loop, 4 threads with a
  client each); against huey's enqueue loop (4 threads).

Every process runs in the production layout (``pip install .``, built offline; huey copied into
it). Rows: hook wall; hook start until the row is visible (polled from here); completions per
second (process modes: two launchers at a time, the cores there are; the modes take turns in
chunks, so a shared machine's drifting load falls on all alike); CPU per completion split
into the hooks (the processes; for the HTTP hook and the loops, this process's senders), the
service (the agent's processes, huey's consumer) and the MariaDB server (which other users of
the shared server also keep busy). The library's latency at idle, beside the floor, is bench E
(``bench/endtoend.py``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    CpuMeter,
    Outcome,
    Row,
    arguments,
    compiled_env,
    database_server_process,
    deployed_env,
    deployed_python,
    finish,
    free_port,
    median,
    ms,
    private_dir,
    verdict,
    wait_until,
)
from bench.db import TABLE, Database, add_todos, fresh_database, markdown_answer, server_answers
from bench.throughput import agent_config
from tests.dbfixtures import MYSQL_HOST, MYSQL_PASSWORD, MYSQL_PORT, MYSQL_USER

LAUNCHERS = 2  # process modes: hooks started at once (one per core)
SENDERS = 4  # loop modes: threads sending at once, each with its own client
PEER_FILES = ("peer_work.py", "peer_original.py", "peer_huey.py")
HUEY_HOOK = "import sys, peer_huey; peer_huey.complete(int(sys.argv[1]), sys.stdin.read())"


@dataclass
class Mode:
    """One way of completing as a process per completion: how its hook is started."""

    name: str
    argv: Callable[[int], list[str]] | None = None  # a process per completion
    env: dict[str, str] = field(default_factory=dict)
    service: list[Any] = field(default_factory=list)  # psutil processes doing the work


def visible(conn: Any, todo: int) -> bool:
    with conn.cursor() as cur:
        cur.execute(f"SELECT status FROM {TABLE} WHERE id = %s", (todo,))
        row = cur.fetchone()
    return bool(row) and row[0] == "completed"


def count_visible(conn: Any, ids: list[int]) -> int:
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT COUNT(*) FROM {TABLE} WHERE id BETWEEN %s AND %s AND status = 'completed'",
            (min(ids), max(ids)),
        )
        return int(cur.fetchone()[0])


def answer_file(root: Path, todo: int) -> Path:
    path = root / "answers" / f"{todo}.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(markdown_answer(todo))
    return path


def stop_event(root: Path, todo: int, answer: str) -> bytes:
    """Claude Code's Stop event for this todo's session, carrying the answer, as JSON."""
    return json.dumps(
        {
            "hook_event_name": "Stop",
            "session_id": f"peers-{todo}",
            "transcript_path": str(root / "no-transcript.jsonl"),
            "cwd": str(root),
            "stop_hook_active": False,
            "last_assistant_message": answer,
        }
    ).encode()


def stop_payload(root: Path, todo: int) -> Path:
    path = root / "answers" / f"{todo}.stop.json"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(stop_event(root, todo, markdown_answer(todo)))
    return path


class HttpHook:
    """Claude Code's ``"type": "http"`` hook: the event POSTed to the agent's endpoint with the
    bearer token and ``X-Todo-Id``, on one kept-alive connection (the agent answers HTTP/1.1)."""

    def __init__(self, port: int, token: str, root: Path) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.token = token
        self.root = root

    def post(self, todo: int, answer: str) -> None:
        self.connection.request(
            "POST",
            "/hook",
            body=stop_event(self.root, todo, answer),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self.token}",
                "X-Todo-Id": str(todo),
            },
        )
        response = self.connection.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"peers bench: the HTTP hook answered {response.status}")

    def close(self) -> None:
        self.connection.close()


def one_post(hook: HttpHook, todo: int, conn: Any) -> tuple[float, float, float]:
    """(POST until its empty 200, POST until the row is visible, the sender's CPU) for one."""
    answer = markdown_answer(todo)
    cpu = time.thread_time()
    started = time.perf_counter()
    hook.post(todo, answer)
    wall = time.perf_counter() - started
    cpu = time.thread_time() - cpu
    if not wait_until(lambda: visible(conn, todo), 60, 0.002):
        raise SystemExit(f"peers bench: http: todo {todo} not visible in 60 s")
    return wall, time.perf_counter() - started, cpu


def one_process(mode: Mode, todo: int, stdin: Path, conn: Any) -> tuple[float, float, float]:
    """(hook wall, hook start until the row is visible, the hook's CPU) for one completion."""
    assert mode.argv is not None
    env = {**mode.env, "TODO_ID": str(todo)}
    with stdin.open("rb") as source:
        started = time.perf_counter()
        errors = stdin.with_suffix(".err")
        with errors.open("wb") as sink:
            proc = subprocess.Popen(
                mode.argv(todo),
                env=env,
                stdin=source,
                stdout=subprocess.DEVNULL,
                stderr=sink,
                cwd=mode.env["CWD"],
            )
        wall = seen = None
        cpu = 0.0
        deadline = started + 60
        while wall is None or seen is None:
            if wall is None:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    wall = time.perf_counter() - started
                    cpu = usage.ru_utime + usage.ru_stime
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    if proc.returncode != 0:
                        said = errors.read_text(errors="replace").strip().splitlines()[-1:]
                        raise SystemExit(
                            f"peers bench: {mode.name} hook exited {proc.returncode}: {said}"
                        )
            if seen is None and visible(conn, todo):
                seen = time.perf_counter() - started
            if time.perf_counter() > deadline:
                proc.kill()
                raise SystemExit(f"peers bench: {mode.name}: todo {todo} not visible in 60 s")
            time.sleep(0.002)
    return wall, seen, cpu


def processes_until_visible(
    mode: Mode, ids: list[int], inputs: dict[int, Path], conn: Any
) -> tuple[float, float]:
    """Seconds for all these completions with LAUNCHERS hooks at a time, and the hooks' CPU."""
    assert mode.argv is not None
    pending = list(ids)
    lock = threading.Lock()
    cpu = [0.0]
    failed: list[str] = []

    def launcher() -> None:
        while True:
            with lock:
                if not pending or failed:
                    return
                todo = pending.pop()
            errors = inputs[todo].with_suffix(".err")
            with inputs[todo].open("rb") as source, errors.open("wb") as sink:
                proc = subprocess.Popen(
                    mode.argv(todo),  # type: ignore[misc]
                    env={**mode.env, "TODO_ID": str(todo)},
                    stdin=source,
                    stdout=subprocess.DEVNULL,
                    stderr=sink,
                    cwd=mode.env["CWD"],
                )
                _, status, usage = os.wait4(proc.pid, 0)
            with lock:
                cpu[0] += usage.ru_utime + usage.ru_stime
                if os.waitstatus_to_exitcode(status) != 0:
                    said = errors.read_text(errors="replace").strip().splitlines()[-1:]
                    failed.append(f"todo {todo}: {said}")

    started = time.perf_counter()
    # Daemons: a bench stopped by SIGTERM cleans up at once, not after the sends in flight.
    threads = [threading.Thread(target=launcher, daemon=True) for _ in range(LAUNCHERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failed:
        raise SystemExit(f"peers bench: {mode.name} hooks failed: {failed[:5]}")
    wait_all(conn, ids, mode.name)
    return time.perf_counter() - started, cpu[0]


def loop_until_visible(
    name: str, make_sender: Callable[[], Callable[[int, str], None]], ids: list[int], conn: Any
) -> tuple[float, float]:
    """Seconds to send all from SENDERS threads here (a sender each) until every row is
    visible, and this process's CPU meanwhile."""
    outputs = {todo: markdown_answer(todo) for todo in ids}
    sends = [make_sender() for _ in range(SENDERS)]
    errors: list[BaseException] = []

    def sender(index: int) -> None:
        try:
            for todo in ids[index::SENDERS]:
                sends[index](todo, outputs[todo])
        except BaseException as exc:
            errors.append(exc)

    # Daemons, as above.
    threads = [threading.Thread(target=sender, args=(i,), daemon=True) for i in range(SENDERS)]
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    if errors:
        raise SystemExit(f"peers bench: {name} loop failed: {errors[0]!r}")
    wait_all(conn, ids, name)
    elapsed = time.perf_counter() - started
    return elapsed, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


@dataclass
class Totals:
    elapsed: float = 0.0
    hook: float = 0.0
    service: float = 0.0
    mysqld: float = 0.0
    count: int = 0

    def add(self, elapsed: float, hook: float, used: dict[str, float], count: int) -> None:
        self.elapsed += elapsed
        self.hook += hook
        self.service += sum(v for k, v in used.items() if k.startswith("service"))
        self.mysqld += used.get("mysqld", float("nan"))
        self.count += count

    def per_completion(self) -> dict[str, float]:
        return {
            "hook": self.hook / self.count,
            "service": self.service / self.count,
            "mysqld": self.mysqld / self.count,
        }


def wait_all(conn: Any, ids: list[int], name: str) -> None:
    if not wait_until(lambda: count_visible(conn, ids) >= len(ids), 900, 0.02):
        raise SystemExit(f"peers bench: {name}: not all {len(ids)} rows visible in 900 s")


def peer_env(db: Database, root: Path, base: dict[str, str]) -> dict[str, str]:
    env = deployed_env(base)
    env.update(
        {
            "PYTHONPATH": str(root / "peers"),
            "BENCH_DB_HOST": MYSQL_HOST,
            "BENCH_DB_PORT": str(MYSQL_PORT),
            "BENCH_DB_USER": MYSQL_USER,
            "BENCH_DB_PASSWORD": MYSQL_PASSWORD or "",
            "BENCH_DB_NAME": db.name,
            "BENCH_HUEY_DB": str(root / "huey.db"),
            "CWD": str(root),
        }
    )
    return env


def run(size: str) -> Outcome:
    import psutil

    from ctl import Client
    from tests.harness import Agent, merge

    if not server_answers():
        raise SystemExit("peers bench: MariaDB does not answer on 127.0.0.1:3306")
    samples, processes, loops, chunks = (3, 6, 20, 1) if size == "tiny" else (30, 300, 1000, 5)
    with private_dir("bp-") as root, fresh_database() as db:
        python = str(deployed_python(root, extra=("huey",)))
        (root / "peers").mkdir()
        for name in PEER_FILES:
            shutil.copy2(REPO / "bench" / name, root / "peers" / name)
        env = peer_env(db, root, os.environ)
        port = free_port()
        agent = Agent(root, merge(agent_config(db), {"hook": {"http_listen": f"127.0.0.1:{port}"}}))
        agent.env = compiled_env(root, agent.env)
        consumer = None
        senders: list[Any] = []  # clients and connections of the loop modes, closed at the end
        try:
            agent.start()
            consumer = subprocess.Popen(
                [python, "-m", "huey.bin.huey_consumer", "peer_huey.huey", "-w", "2", "-q"],
                env=env,
                cwd=root,
                stdout=subprocess.DEVNULL,
                stderr=(root / "huey.log").open("wb"),
            )
            sys.path.insert(0, str(root / "peers"))
            os.environ.update({k: v for k, v in env.items() if k.startswith("BENCH_")})
            import peer_huey  # type: ignore[import-not-found]

            ctl = str(Path(python).parent / "completionctl")
            hook_env = {**deployed_env(agent.env), "CWD": str(root)}
            token = agent.ctl("hook-token").stdout.decode().strip()
            family = agent.family()
            modes = {
                "original": Mode(
                    "original",
                    lambda t: [python, str(root / "peers" / "peer_original.py"), str(t)],
                    env,
                ),
                "huey": Mode(
                    "huey",
                    lambda t: [python, "-c", HUEY_HOOK, str(t)],
                    env,
                    service=[psutil.Process(consumer.pid)],
                ),
                "agent": Mode(
                    "agent",
                    lambda t: [ctl, "--config", str(agent.config_path), "hook"],
                    hook_env,
                    service=family,
                ),
            }
            server = database_server_process()
            conn = db.connect()
            inputs: dict[str, Callable[[Path, int], Path]] = {
                "original": answer_file,
                "huey": answer_file,
                "agent": stop_payload,
            }
            # Latency: one completion at a time, the modes taking turns.
            hook = HttpHook(port, token, root)
            senders.append(hook)
            turns = [*modes, "http"]
            latency: dict[str, list[tuple[float, float, float]]] = {name: [] for name in turns}
            warm = 2
            todos = add_todos(db, (samples + warm) * len(turns))
            for index in range(samples + warm):
                shift = index % len(turns)
                for name in turns[shift:] + turns[:shift]:
                    todo = todos.pop()
                    if name == "http":
                        result = one_post(hook, todo, conn)
                    else:
                        result = one_process(modes[name], todo, inputs[name](root, todo), conn)
                    if index >= warm:
                        latency[name].append(result)

            # Throughput and CPU: the modes take turns in chunks, the order rotating, so that the
            # load of a shared machine, which drifts over minutes, falls on all of them alike.
            def meter(mode_service: list[Any]) -> CpuMeter:
                named = {f"service {i}": p for i, p in enumerate(mode_service)}
                if server is not None:
                    named["mysqld"] = server
                return CpuMeter(named)

            def agent_sender() -> Callable[[int, str], None]:
                own = Client(str(agent.config_path), timeout=30)
                senders.append(own)

                def send(todo: int, output: str) -> None:
                    own.complete(todo, output=output, queue_when_unreachable=False)

                return send

            def http_sender() -> Callable[[int, str], None]:
                own = HttpHook(port, token, root)
                senders.append(own)
                return own.post

            def huey_sender() -> Callable[[int, str], None]:
                return peer_huey.complete

            loop_modes = {
                "agent loop": (agent_sender, family),
                "huey loop": (huey_sender, [psutil.Process(consumer.pid)]),
                "agent http": (http_sender, family),
            }
            totals: dict[str, Totals] = {}
            for chunk in range(chunks):
                names = list(modes)[chunk % 3 :] + list(modes)[: chunk % 3]
                for name in names:
                    ids = add_todos(db, processes // chunks)
                    files = {todo: inputs[name](root, todo) for todo in ids}
                    m = meter(modes[name].service)
                    m.start()
                    elapsed, hook_cpu = processes_until_visible(modes[name], ids, files, conn)
                    totals.setdefault(f"{name} process", Totals()).add(
                        elapsed, hook_cpu, m.stop(), len(ids)
                    )
                shift = chunk % len(loop_modes)
                for name in list(loop_modes)[shift:] + list(loop_modes)[:shift]:
                    make, service = loop_modes[name]
                    ids = add_todos(db, loops // chunks)
                    m = meter(service)
                    m.start()
                    elapsed, hook_cpu = loop_until_visible(name, make, ids, conn)
                    totals.setdefault(name, Totals()).add(elapsed, hook_cpu, m.stop(), len(ids))
            rates = {key: t.count / t.elapsed for key, t in totals.items()}
            cpu = {key: t.per_completion() for key, t in totals.items()}
            conn.close()
        finally:
            for own in senders:
                own.close()
            if consumer is not None:
                consumer.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    consumer.wait(10)
                if consumer.poll() is None:
                    consumer.kill()
            agent.cleanup()

    return Outcome(rows(latency, rates, cpu, processes, loops))


def cpu_text(c: dict[str, float]) -> str:
    return (
        f"CPU/completion: hook {c['hook'] * 1000:.1f} ms, service {c['service'] * 1000:.1f} ms,"
        f" mysqld {c['mysqld'] * 1000:.1f} ms"
    )


def rows(
    latency: dict[str, list[tuple[float, float, float]]],
    rates: dict[str, float],
    cpu: dict[str, dict[str, float]],
    processes: int,
    loops: int,
) -> list[Row]:
    def p50(name: str, index: int) -> float:
        return median([sample[index] for sample in latency[name]])

    labels = {
        "original": "original system's style: a process per completion, synchronous",
        "huey": "huey: the hook process enqueues, `huey_consumer -w 2` works",
        "agent": "agent: `completionctl hook` (Stop) as a process",
    }
    out = []
    for name, label in labels.items():
        out.append(
            Row(
                "P",
                f"{label}: hook wall (hook CPU {p50(name, 2) * 1000:.0f} ms)",
                ms(p50(name, 0)),
                "",
                None,
                "",
                None,
            )
        )
    out.append(
        Row(
            "P",
            "agent: the Stop event POSTed to the HTTP hook (kept-alive connection): hook wall,"
            f" POST → empty 200 (sender CPU {p50('http', 2) * 1000:.1f} ms)",
            ms(p50("http", 0)),
            "",
            None,
            "",
            None,
        )
    )
    out.append(
        Row(
            "P",
            "hook start → row visible: agent process hook, against huey's (original:"
            f" {ms(p50('original', 1))})",
            ms(p50("agent", 1)),
            f"huey {ms(p50('huey', 1))}",
            p50("agent", 1) / p50("huey", 1),
            "≤ 0.5x",
            verdict(p50("agent", 1) / p50("huey", 1), at_most=0.5),
        )
    )
    out.append(
        Row(
            "P",
            "hook start → row visible: agent HTTP hook (Stop POSTed), against huey's hook process",
            ms(p50("http", 1)),
            f"huey {ms(p50('huey', 1))}",
            p50("http", 1) / p50("huey", 1),
            "—",
            None,
        )
    )
    out.append(
        Row(
            "P",
            f"completions/s, {processes} as processes ({LAUNCHERS} at a time): agent process hook,"
            f" against huey's hook process (original: {rates['original process']:.1f}/s;"
            f" agent {cpu_text(cpu['agent process'])}; huey {cpu_text(cpu['huey process'])};"
            f" original {cpu_text(cpu['original process'])})",
            f"{rates['agent process']:.1f}/s",
            f"huey {rates['huey process']:.1f}/s",
            rates["agent process"] / rates["huey process"],
            "≥ 1x",
            verdict(rates["agent process"] / rates["huey process"], at_least=1.0),
        )
    )
    out.append(
        Row(
            "P",
            f"completions/s, {loops} POSTed to the HTTP hook ({SENDERS} kept-alive connections):"
            " agent, against huey's hook process (hook = this process's senders;"
            f" {cpu_text(cpu['agent http'])})",
            f"{rates['agent http']:.0f}/s",
            f"huey {rates['huey process']:.1f}/s",
            rates["agent http"] / rates["huey process"],
            "—",
            None,
        )
    )
    out.append(
        Row(
            "P",
            f"completions/s, {loops} from a loop ({SENDERS} threads): agent `Client.complete`,"
            " against the original"
            f" system's processes ({cpu_text(cpu['agent loop'])})",
            f"{rates['agent loop']:.0f}/s",
            f"original {rates['original process']:.1f}/s",
            rates["agent loop"] / rates["original process"],
            "≥ 20x",
            verdict(rates["agent loop"] / rates["original process"], at_least=20),
        )
    )
    out.append(
        Row(
            "P",
            f"completions/s, {loops} from a loop ({SENDERS} threads): agent, against huey's"
            " enqueue loop"
            f" (huey {cpu_text(cpu['huey loop'])})",
            f"{rates['agent loop']:.0f}/s",
            f"huey {rates['huey loop']:.0f}/s",
            rates["agent loop"] / rates["huey loop"],
            "≥ 2x",
            verdict(rates["agent loop"] / rates["huey loop"], at_least=2),
        )
    )
    return out


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    return finish(args, "P. Against the peers, the same work", run(args.size))


if __name__ == "__main__":
    sys.exit(main())
