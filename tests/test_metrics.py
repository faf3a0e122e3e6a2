"""Stage timings, `completionctl metrics` and the Prometheus endpoint, checked against runs whose
delays are known: a slow transcript, a database outage of a measured length."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from agent.journal import StageRow
from agent.metrics import durations, percentile
from tests.dbfixtures import proxied_url
from tests.harness import Agent, wait_for
from tests.tcpproxy import TcpProxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["content-type"].startswith("text/plain; version=")
        return str(response.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, parsed by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(parsed, name: str, **labels: str) -> float | None:
    return parsed.get((name, tuple(sorted(labels.items()))))


# ---------------------------------------------------------------- without processes


def test_the_web_process_without_its_extra_is_a_configuration_error(tmpdir_short) -> None:
    from agent.web import missing_web_packages
    from tests.harness import unit_config

    off = unit_config(tmpdir_short)
    assert missing_web_packages(off, find=lambda name: None) is None  # no web child: fine
    on = unit_config(tmpdir_short, {"web": {"listen": "127.0.0.1:8765"}})
    assert missing_web_packages(on) is None  # the test venv has the extra
    problem = missing_web_packages(on, find=lambda name: None if name == "uvicorn" else object())
    assert problem is not None
    assert "web.listen needs the web extra" in problem and "missing: uvicorn" in problem
    assert "pip install 'completion-agent[web]'" in problem


def test_stage_durations_from_a_completions_rows() -> None:
    def row(i: int, stage: str, at: float, seconds: float | None = None) -> StageRow:
        return StageRow(i, "c", stage, at, seconds, None)

    rows = [
        row(1, "accepted", 10.0),
        row(2, "sent", 9.9, 0.1),
        row(3, "source:transcript", 12.0, 2.0),
        row(4, "source:message", 12.0, 0.0),
        row(5, "collected", 12.5),
        row(6, "attempt", 13.0),
        row(7, "attempt", 20.0),
        row(8, "written", 20.0),
        row(9, "verified", 21.0),
        row(10, "cleaned", 21.5),
    ]
    got = {name: round(seconds, 3) for name, seconds, _ in durations(rows)}
    assert got == {
        "source:transcript": 2.0,
        "source:message": 0.0,
        "intake": 0.1,
        "collect": 2.5,
        "write": 7.5,
        "verify": 1.0,
        "clean": 0.5,
        "end_to_end": 11.1,
    }
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([5.0], 0.99) == 5.0
    assert percentile([], 0.5) is None


# ---------------------------------------------------------------- the real agent


@pytest.mark.slow
def test_prometheus_endpoint_parses_and_matches_the_journal(make_agent) -> None:
    port = free_port()
    agent = make_agent({"metrics": {"listen": f"127.0.0.1:{port}"}}).start()
    assert set(agent.children()) == {"collector", "writer", "monitor", "web"}
    done = [agent.add(f"Done {i}") for i in range(3)]
    for todo in done:
        assert agent.ctl("complete", str(todo), "--output", "ok").returncode == 0
    armed = agent.add("Armed")
    assert agent.ctl("start", str(armed), "--timeout", "600").returncode == 0
    for todo in done:
        agent.wait_states(todo, "cleaned")
    agent.wait_states(armed, "cleaned")  # the start itself

    text = scrape(port)
    parsed = samples(text)
    assert value(parsed, "completiond_stage_duration_seconds_count", stage="end_to_end") == 3
    assert value(parsed, "completiond_stage_duration_seconds_count", stage="collect") == 3
    assert value(parsed, "completiond_source_duration_seconds_count", source="message") == 3
    assert (
        value(parsed, "completiond_entries_finished_total", kind="normal", outcome="applied") == 3
    )
    assert value(parsed, "completiond_entries_finished_total", kind="start", outcome="applied") == 1
    assert value(parsed, "completiond_backlog") == 0
    assert value(parsed, "completiond_deadlines_armed") == 1
    assert value(parsed, "completiond_agent_up") == 1
    for child in ("collector", "writer", "monitor", "web"):
        assert value(parsed, "completiond_child_up", child=child) == 1
    wait_for(
        lambda: value(samples(scrape(port)), "completiond_database_up") == 1,
        what="the monitor's database check",
    )
    # The end-to-end sum is what status reports per completion.
    total = sum(agent.todo_status(t)["entries"][0]["timings"]["end_to_end"] for t in done)
    reported = value(parsed, "completiond_stage_duration_seconds_sum", stage="end_to_end")
    assert reported == pytest.approx(total, abs=1e-6)

    # promtool (Debian's prometheus package) checks the exposition and Prometheus's naming rules.
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()

    # The web process dies like any child: restarted, and the endpoint answers again.
    web = agent.children()["web"]
    os.kill(web, signal.SIGKILL)
    wait_for(lambda: agent.children().get("web", web) != web, what="web restarted")
    parsed = wait_for(lambda: _try_scrape(port), what="the endpoint back")
    assert value(parsed, "completiond_stage_duration_seconds_count", stage="end_to_end") == 3
    assert value(parsed, "completiond_child_restarts_total", child="web") == 1


def _try_scrape(port: int):
    try:
        return samples(scrape(port))
    except OSError:
        return None


@pytest.mark.slow
def test_metrics_off_by_default_and_metrics_text(agent: Agent) -> None:
    assert set(agent.children()) == {"collector", "writer", "monitor"}
    todo = agent.add("Counted")
    agent.ctl("complete", str(todo), "--output", "x")
    agent.wait_states(todo, "cleaned")
    result = agent.ctl("metrics", "--since", "30m")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "last 30m" in out and "normal    applied 1" in out and "end_to_end" in out
    assert agent.ctl("metrics", "--since", "soon").returncode == 2


@pytest.mark.slow
@pytest.mark.mysql
def test_timings_and_metrics_show_a_slow_transcript_and_a_database_outage(
    make_agent, mysql_url: str, wordpress_table: str, tcp_proxy: TcpProxy
) -> None:
    transcript_wait = 2.0
    agent = make_agent(
        {
            "database": {"url": proxied_url(mysql_url, tcp_proxy)},
            "behavior": {"database_timeout": 2, "max_retries": 1, "retry_max_delay": 1},
            "collect": {"transcript_wait": transcript_wait},
        }
    ).start()
    slow, outage = agent.add("Slow transcript"), agent.add("Through an outage")

    # A transcript without a final message: the collector waits transcript_wait, then falls back.
    transcript = agent.root / "transcript.jsonl"
    transcript.write_text("")
    result = agent.ctl(
        "complete", str(slow), "--output-file", "/dev/null", "--transcript", str(transcript)
    )
    assert result.returncode == 0, result.stderr
    slow_status = agent.wait_states(slow, "cleaned", timeout=30)

    # The database goes away for a measured time while a completion waits.
    tcp_proxy.mode = "refuse"
    tcp_proxy.cut()
    cut_at = time.time()
    assert agent.ctl("complete", str(outage), "--output", "made it").returncode == 0

    def failed_attempt() -> bool:
        status = agent.todo_status(outage)
        return bool(status) and status["entries"][0]["attempts"] >= 1

    wait_for(failed_attempt, 20, what="a failed write")
    time.sleep(max(0.0, cut_at + 4.0 - time.time()))  # the outage lasts 4 s
    tcp_proxy.mode = "pass"
    restored_at = time.time()
    outage_status = agent.wait_states(outage, "cleaned", timeout=30)
    outage_length = restored_at - cut_at

    slow_timings = slow_status["entries"][0]["timings"]
    assert transcript_wait <= slow_timings["source:transcript"] < transcript_wait + 3.0
    assert slow_timings["collect"] >= transcript_wait
    entry = outage_status["entries"][0]
    timings = entry["timings"]
    # Written once the database was back: the write stage runs from the collection (during the
    # outage) to the write after it, no more than a probe interval and a backoff beyond it.
    collected_at = entry["created_at"] + timings["collect"]
    assert collected_at < restored_at
    waited = restored_at - collected_at
    assert waited - 0.1 <= timings["write"] <= waited + 8.0
    assert timings["end_to_end"] >= timings["write"]
    print(f"outage {outage_length:.2f} s; timings {timings}; slow transcript {slow_timings}")

    report = agent.ctl_json("metrics", "--since", "1h")
    assert report["counts"]["normal"] == {"applied": 2}
    assert report["stages"]["end_to_end"]["count"] == 2
    assert report["stages"]["write"]["p99"] == pytest.approx(
        max(timings["write"], slow_status["entries"][0]["timings"]["write"]), rel=0.05
    )
    assert transcript_wait <= report["stages"]["source:transcript"]["p50"] < transcript_wait + 3
    assert report["retries"] >= 1
    assert report["backlog"] == 0 and report["dead"] == 0
    assert len(report["hourly"]) in (24, 25)
    recent = report["hourly"][-2:]  # the test may run across the turn of an hour
    assert sum(h["completions"] for h in recent) == 2
    assert sum(h["verified"] for h in recent) == 2
    assert max(h["p95_end_to_end"] or 0 for h in recent) >= 0.9 * timings["end_to_end"]
