"""Bench W: what the ``web`` process (dashboard and /metrics) costs, against the agent without it.

Two agents run side by side on the embedded SQLite database, with the production intervals and
the same history (completions made before the clock starts): one with ``web.listen`` and
``metrics.listen`` set, one without. Over the same windows, the bench reads the CPU of every
process of each and of the ``web`` process alone:

- idle: nothing happens;
- a page viewed: a client does what the dashboard's script does in a browser with the overview
  open (``/api/version`` every 2 s with the session cookie, the page fetched again whenever the
  journal changed), while both agents take one completion every 3 s;
- scraped: ``/metrics`` fetched every 15 s, as Prometheus does (one warm-up scrape before);
- then each kind of request 20 times back to back, for the CPU of one.

CPU is read per thread to the nanosecond (``schedstat``), so an idle window of 20 s still
resolves a hundredth of a percent. Memory is each process's RSS (and PSS, which counts shared
pages once; USS, its own pages). The ratios set the agent with web against the agent without it
in the same window; the agent without web is also held to bench 4's idle budget.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

from bench.common import (
    MIB,
    Outcome,
    Row,
    arguments,
    compiled_env,
    finish,
    private_dir,
    python_env,
    verdict,
)
from bench.db import output_text
from bench.idle import CPU_LIMIT, RSS_LIMIT, memory

POLL = 2.0  # agent/dashboard_assets.py's script: setInterval(refresh, 2000)
SCRAPE = 15.0  # a common Prometheus scrape_interval
FEED = 3.0  # one completion to each agent this often while the page is viewed
PRODUCTION = {"behavior": {"sweep_interval": 2.0, "health_check_interval": 300}}


def free_ports(count: int) -> list[int]:
    """Ports free now, all different (held together while they are picked)."""
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in held:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in held]


def add_todos(agent, count: int) -> list[int]:
    from agent.store import open_store

    store = open_store(f"sqlite:///{agent.sqlite_path}", timeout=5)
    try:
        store.ensure_schema(create_todo_table=True)
        return [store.add_todo(f"Bench todo {i}", "what to do") for i in range(count)]
    finally:
        store.close()


def journal_row(agent, sql: str) -> tuple:
    import sqlite3

    with contextlib.closing(
        sqlite3.connect(f"file:{agent.state / 'journal.db'}?mode=ro", uri=True)
    ) as db:
        return tuple(db.execute(sql).fetchone())


def cleaned(agent) -> int:
    return int(journal_row(agent, "SELECT COUNT(*) FROM entries WHERE state = 'cleaned'")[0])


def complete(client, todo_id: int) -> None:
    client.complete(todo_id, output=output_text(todo_id, 2048))


def wait_cleaned(agents: list, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while any(cleaned(a) < count for a in agents):
        if time.monotonic() > deadline:
            raise SystemExit(f"not all {count} completions were cleaned within {timeout:.0f} s")
        time.sleep(0.1)


class Viewer:
    """The overview open in a browser: what live.js requests, with the session cookie."""

    def __init__(self, agent, base: str) -> None:
        url = agent.ctl("dashboard").stdout.decode().strip()
        self.base = base
        self.session = requests.Session()
        if self.session.get(url, timeout=10).status_code != 200:  # the login, then "/"
            raise SystemExit(f"the dashboard login failed: {url}")
        for asset in ("/static/dash.css", "/static/live.js"):
            self.session.get(base + asset, timeout=10)
        self.version = self._version()
        self.polls = self.pages = 0

    def _version(self) -> int:
        return int(self.session.get(self.base + "/api/version", timeout=10).json()["version"])

    def poll(self) -> None:
        self.polls += 1
        version = self._version()
        if version != self.version:
            page = self.session.get(self.base + "/", headers={"X-Partial": "1"}, timeout=10)
            page.raise_for_status()
            self.version = version
            self.pages += 1


Snapshot = dict[int, tuple[float, dict[int, int]]]


def snapshot(processes: list[psutil.Process]) -> Snapshot:
    """Per process: its CPU seconds from /proc/PID/stat (every thread it ever had, but in 10 ms
    steps) and each live thread's nanoseconds on a CPU (/proc/PID/task/TID/schedstat)."""
    taken = {}
    for proc in processes:
        threads = {}
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                threads[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        taken[proc.pid] = (sum(proc.cpu_times()[:2]), threads)
    return taken


def used(before: Snapshot, after: Snapshot) -> float:
    """CPU seconds between two snapshots: to the nanosecond while no thread ended between them
    (those of threads that started count whole), else in /proc's 10 ms steps."""
    total = 0.0
    for pid, (coarse, threads) in after.items():
        old_coarse, old_threads = before[pid]
        if old_threads.keys() <= threads.keys():
            total += sum(ns - old_threads.get(tid, 0) for tid, ns in threads.items()) / 1e9
        else:
            total += coarse - old_coarse
    return total


def every(interval: float, action, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            action()
            stop.wait(interval)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def measure(groups: dict[str, list[psutil.Process]], seconds: float, *actions) -> dict[str, float]:
    """Percent of one core each group used over ``seconds`` while ``actions`` (interval,
    callable) repeat on threads of this process."""
    stop = threading.Event()
    before = {name: snapshot(procs) for name, procs in groups.items()}
    started = time.monotonic()
    threads = [every(interval, action, stop) for interval, action in actions]
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(30)
    elapsed = time.monotonic() - started
    return {
        name: used(before[name], snapshot(procs)) / elapsed * 100 for name, procs in groups.items()
    }


def per_request(web: list[psutil.Process], rest: list[psutil.Process], fetch, count: int):
    """CPU seconds per request of the web process and of the agent's other processes, over
    ``count`` requests back to back."""
    before_web, before_rest = snapshot(web), snapshot(rest)
    for _ in range(count):
        fetch()
    return used(before_web, snapshot(web)) / count, used(before_rest, snapshot(rest)) / count


def run(size: str) -> Outcome:
    from ctl import Client
    from tests.harness import Agent

    history, idle_s, view_s, scrape_s = (5, 2.0, 4.0, 2.0) if size == "tiny" else (150, 20, 30, 30)
    burst = 3 if size == "tiny" else 20
    feed_count = int(view_s / FEED) + 2
    with private_dir("bw-") as root:
        (root / "plain").mkdir()
        (root / "web").mkdir()
        web_port, metrics_port = free_ports(2)
        plain = Agent(root / "plain", PRODUCTION)
        web = Agent(
            root / "web",
            {
                **PRODUCTION,
                "web": {"listen": f"127.0.0.1:{web_port}"},
                "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            },
        )
        web.env = compiled_env(root, web.env)  # as deployed: memory without the compiler's
        plain.env = python_env(root, plain.env)  # the same bytecode, compiled above
        base = f"http://127.0.0.1:{web_port}"
        clients: dict[Path, Client] = {}
        try:
            plain.start()
            web.start()
            agents = [plain, web]
            todos = {a.root: add_todos(a, history + feed_count) for a in agents}
            clients.update({a.root: Client(str(a.config_path)) for a in agents})
            for agent in agents:
                for todo in todos[agent.root][:history]:
                    complete(clients[agent.root], todo)
            wait_cleaned(agents, history)
            web_proc = psutil.Process(web.children()["web"])
            groups = {
                "plain": plain.family(),
                "with": web.family(),
                "web": [web_proc],
            }
            # Warm up as a running dashboard is: the page rendered, /metrics scraped once.
            viewer = Viewer(web, base)
            scrape_url = f"http://127.0.0.1:{metrics_port}/metrics"
            requests.get(scrape_url, timeout=10).raise_for_status()
            time.sleep(1.0 if size == "tiny" else 5.0)

            idle = measure(groups, idle_s)
            rss_plain, pss_plain = memory(groups["plain"])
            rss_with, pss_with = memory(groups["with"])
            web_info = web_proc.memory_full_info()

            fed: list[int] = []

            def feed() -> None:
                index = history + len(fed)
                for agent in agents:
                    complete(clients[agent.root], todos[agent.root][index])
                fed.append(index)

            viewed = measure(groups, view_s, (POLL, viewer.poll), (FEED, feed))
            polls, pages = viewer.polls, viewer.pages
            wait_cleaned(agents, history + len(fed))
            time.sleep(1.0 if size == "tiny" else 4.0)  # the last completions settle

            scraped: list[float] = []

            def scrape() -> None:
                requests.get(scrape_url, timeout=10).raise_for_status()
                scraped.append(time.monotonic())

            scraped_window = measure(groups, scrape_s, (SCRAPE, scrape))

            def get(url: str, **options) -> None:
                viewer.session.get(url, timeout=10, **options).raise_for_status()

            rest = [p for p in groups["with"] if p.pid != web_proc.pid]
            todo, cid = journal_row(
                web, "SELECT todo_id, completion_id FROM entries WHERE kind = 'normal' LIMIT 1"
            )
            costs = {
                "the overview page": per_request(
                    [web_proc], rest, lambda: get(base + "/", headers={"X-Partial": "1"}), burst
                ),
                "a poll of /api/version": per_request(
                    [web_proc], rest, lambda: get(base + "/api/version"), burst
                ),
                "a report in a todo page's frame (the stored Markdown rendered)": per_request(
                    [web_proc], rest, lambda: get(f"{base}/todo/{todo}/report/{cid}"), burst
                ),
                "a scrape of /metrics": per_request(
                    [web_proc], rest, lambda: get(scrape_url), burst
                ),
            }
            scrapes = len(scraped)
            web_after = web_proc.memory_full_info()
            processes = len(groups["plain"])
        finally:
            for client in clients.values():
                client.close()
            plain.cleanup()
            web.cleanup()

    def pct(value: float) -> str:
        return f"{value:.2f}% of one core"

    def ratio(window: dict[str, float]) -> float | None:
        return window["with"] / window["plain"] if window["plain"] > 0 else None

    return Outcome(
        [
            Row(
                "W",
                "memory of the `web` process (dashboard and /metrics) after its first page and"
                f" scrape (PSS {web_info.pss / MIB:.0f} MiB, USS {web_info.uss / MIB:.0f} MiB);"
                f" ratio: the agent with web against without, all processes"
                f" ({rss_with / MIB:.0f} against {rss_plain / MIB:.0f} MiB RSS, PSS"
                f" {pss_with / MIB:.0f} against {pss_plain / MIB:.0f})",
                f"{web_info.rss / MIB:.0f} MiB",
                f"agent without web, all {processes} processes: {rss_plain / MIB:.0f} MiB",
                rss_with / rss_plain,
                "",
                None,
            ),
            Row(
                "W",
                f"memory of the `web` process after the page views, report views and scrapes (PSS"
                f" {web_after.pss / MIB:.0f} MiB, USS {web_after.uss / MIB:.0f} MiB)",
                f"{web_after.rss / MIB:.0f} MiB",
                f"before them: {web_info.rss / MIB:.0f} MiB",
                web_after.rss / web_info.rss,
                "",
                None,
            ),
            Row(
                "W",
                f"idle CPU of the `web` process over {idle_s:g} s; ratio: the agent with web"
                f" against without, all processes ({pct(idle['with'])})",
                pct(idle["web"]),
                f"agent without web: {pct(idle['plain'])}",
                ratio(idle),
                "",
                None,
            ),
            Row(
                "W",
                f"CPU of the `web` process with the overview open and live over {view_s:g} s"
                f" ({polls} polls of /api/version, {pages} page fetches; both agents took one"
                f" completion every {FEED:g} s); ratio: all processes ({pct(viewed['with'])})",
                pct(viewed["web"]),
                f"agent without web, same completions: {pct(viewed['plain'])}",
                ratio(viewed),
                "",
                None,
            ),
            Row(
                "W",
                f"CPU of the `web` process while /metrics is scraped every {SCRAPE:g} s, over"
                f" {scrape_s:g} s ({scrapes} scrapes); ratio: all processes"
                f" ({pct(scraped_window['with'])})",
                pct(scraped_window["web"]),
                f"agent without web, idle: {pct(scraped_window['plain'])}",
                ratio(scraped_window),
                "",
                None,
            ),
            *(
                Row(
                    "W",
                    f"CPU per request of the `web` process: {what} ({burst} back to back; the"
                    f" agent's other processes meanwhile {other * 1000:.1f} ms per request)",
                    f"{own * 1000:.1f} ms",
                    "",
                    None,
                    "",
                    None,
                )
                for what, (own, other) in costs.items()
            ),
            Row(
                "W",
                f"the agent without web keeps bench 4's budget: idle CPU of its {processes}"
                f" processes over {idle_s:g} s",
                pct(idle["plain"]),
                "",
                None,
                f"≤ {CPU_LIMIT:g}%",
                verdict(idle["plain"], at_most=CPU_LIMIT),
            ),
            Row(
                "W",
                f"the agent without web keeps bench 4's budget: RSS of its {processes} processes"
                f" (PSS {pss_plain / MIB:.0f} MiB)",
                f"{rss_plain / MIB:.0f} MiB",
                "",
                None,
                f"≤ {RSS_LIMIT // MIB} MiB",
                verdict(rss_plain, at_most=RSS_LIMIT),
            ),
        ]
    )


def main() -> int:
    args = arguments(__doc__.splitlines()[0])
    return finish(args, "W. The web process's cost", run(args.size))


if __name__ == "__main__":
    sys.exit(main())
