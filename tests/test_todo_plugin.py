"""The agent against the todo plugin's own table and display paths (issue #12).

The plugin's live schema (tests/fixtures/todo-plugin/live-schema.sql, written from its docs) on
MariaDB: start, completion, reset and `add` leave the columns the plugin, its dashboard and its
scripts read (execution_started_at, completed_at, completed_date, bearbeiten, project_id), in
the site's zone, for the moment the event happened. Its old activator schema: `check` says what
is missing. Its renderers: the Markdown report, opened through the real Parsedown (safe mode on
and off) and htmlspecialchars-in-<pre> in headless Chromium, runs and loads nothing for every
hostile payload.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.report import SUMMARY_MAX_CHARS, render_report
from agent.sources import Collected, TodoFacts
from agent.store import SiteProfile, Store, TodoWrite, TransientError, open_store
from tests.dbfixtures import mysql_connect, proxied_url, raw_execute
from tests.plugin_views import (
    CHROMIUM,
    PARSEDOWN,
    PHP,
    Browser,
    admin_page,
    render_views,
    view_problems,
)
from tests.tcpproxy import TcpProxy

FIXTURES = Path(__file__).parent / "fixtures" / "todo-plugin"
HOSTILE = sorted((Path(__file__).parent / "hostile_payloads").glob("[0-9]*"))
TABLE = "stage_project_todos"
BERLIN = ZoneInfo("Europe/Berlin")
# The plugin's own queries (cli/todo, scripts/cleanup_stuck_todos.sh as the issue quotes it).
QUEUE = (
    f"SELECT id FROM {TABLE} WHERE status='offen' AND bearbeiten=1 ORDER BY priority DESC, id ASC"
)
STUCK = f"SELECT id FROM {TABLE} WHERE status='in_progress' AND execution_started_at IS NULL"


def live_table(url: str, table: str = TABLE) -> str:
    ddl = (FIXTURES / "live-schema.sql").read_text()
    body = ddl[ddl.index("CREATE TABLE") :]
    raw_execute(url, body.replace("{table}", table))
    return table


def activator_table(url: str, table: str) -> str:
    ddl = (FIXTURES / "activator-schema.sql").read_text()
    raw_execute(url, ddl[ddl.index("CREATE TABLE") :].replace("{table}", table))
    return table


def row(url: str, todo_id: int, *, session_zone: str = "+00:00") -> dict:
    """The todo's row as a reader whose session is in `session_zone` sees it."""
    conn = mysql_connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SET time_zone = '{session_zone}'")
            cur.execute(f"SELECT * FROM {TABLE} WHERE id = %s", (todo_id,))
            names = [d[0] for d in cur.description]
            values = cur.fetchone()
    finally:
        conn.close()
    return dict(zip(names, values, strict=True))


def ids(url: str, sql: str) -> list[int]:
    return [int(r[0]) for r in raw_execute(url, sql)]


def write(cid: str, todo_id: int, kind: str, at: datetime, **kw: object) -> TodoWrite:
    return TodoWrite(cid, todo_id, kind, at, **kw)  # type: ignore[arg-type]


def wall(at: datetime, zone: ZoneInfo) -> datetime:
    return at.replace(tzinfo=UTC).astimezone(zone).replace(tzinfo=None)


@pytest.fixture
def berlin_store(mysql_url: str) -> Iterator[Store]:
    live_table(mysql_url)
    store = open_store(
        mysql_url, table=TABLE, timeout=10, profile=SiteProfile(time_zone="Europe/Berlin")
    )
    store.ensure_schema(create_todo_table=False)
    yield store
    store.close()


# --------------------------------------------------------------------------- the life cycle


@pytest.mark.mysql
def test_live_schema_life_cycle_in_berlin_on_a_utc_server(
    mysql_url: str, berlin_store: Store
) -> None:
    (server_zone,) = raw_execute(mysql_url, "SELECT @@global.time_zone")[0]
    (offset,) = raw_execute(mysql_url, "SELECT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), NOW())")[0]
    assert offset == 0, f"this test wants a UTC server; it is {server_zone} at {offset} s"
    store = berlin_store
    tid = store.add_todo("Login prüfen 🚀", "Beschreibung", "/srv/site")
    assert ids(mysql_url, QUEUE) == [tid]  # `add` queues it the way the plugin's CLI looks

    # start: both start columns set, so the plugin's stuck-task cleanup leaves it alone
    started = datetime(2026, 7, 1, 1, 20, 5)  # summer: Berlin is UTC+2
    assert store.apply([write("s-1", tid, "start", started)])[0].outcome == "applied"
    r = row(mysql_url, tid)
    assert r["status"] == "in_progress"
    # TIMESTAMP columns hold the instant: a +00:00 reader sees UTC, a +02:00 reader Berlin
    assert r["execution_started_at"] == started and r["started_at"] == started
    assert row(mysql_url, tid, session_zone="+02:00")["execution_started_at"] == wall(
        started, BERLIN
    )
    assert tid not in ids(mysql_url, STUCK)

    # complete, written "after an outage": the DATETIME columns carry the event's Berlin time
    event = datetime.now(UTC).replace(tzinfo=None, microsecond=0) - timedelta(hours=1)
    report = render_report(
        todo_id=tid,
        todo=TodoFacts("Login prüfen 🚀", "Beschreibung", "/srv/site"),
        collected=Collected("Alles erledigt.\n\nDetails …", "transcript", (), True, False),
        kind="normal",
        started_at=started,
        completed_at=event,
        zone=BERLIN,
    )
    done = write(
        "c-1", tid, "normal", event, html=report.db, text=report.text, summary=report.summary
    )
    assert store.apply([done])[0].outcome == "applied"
    r = row(mysql_url, tid)
    assert r["status"] == "completed"
    assert r["completed_at"] == wall(event, BERLIN) == r["completed_date"]
    assert r["completed_at"] != event  # not UTC: the plugin's NOW() writes Berlin time
    assert r["claude_summary"] == "✅ Alles erledigt. Details …"
    assert r["claude_html_output"].startswith(f"✅ Todo #{tid} erledigt: Login prüfen 🚀\n")
    assert f"{wall(event, BERLIN):%Y-%m-%d %H:%M:%S} Europe/Berlin" in r["claude_html_output"]
    # read back through the store: UTC again
    todo = store.get_todo(tid)
    assert todo is not None and todo.completed_at == event and todo.started_at == started
    assert store.verify(done, store.apply([done])[0]) is True  # a replay is "already"
    assert [k for _, k in store.logged_kinds(tid)] == ["normal"]
    assert raw_execute(mysql_url, "SHOW TABLES LIKE 'stage_completion_log'")


@pytest.mark.mysql
def test_reset_requeues_and_clears_the_start_time(mysql_url: str, berlin_store: Store) -> None:
    store = berlin_store
    tid = store.add_todo("zurücksetzen")
    at = datetime(2026, 1, 10, 8, 0, 0)
    store.apply([write("s-1", tid, "start", at)])
    assert ids(mysql_url, QUEUE) == []
    assert store.apply([write("r-1", tid, "reset", at + timedelta(hours=1))])[0].outcome == (
        "applied"
    )
    r = row(mysql_url, tid)
    assert (r["status"], r["execution_started_at"], r["started_at"]) == ("offen", None, None)
    assert ids(mysql_url, QUEUE) == [tid]  # the plugin's queue picks it again
    # started again: the start columns are set fresh
    store.apply([write("s-2", tid, "start", at + timedelta(hours=2))])
    assert row(mysql_url, tid)["execution_started_at"] == at + timedelta(hours=2)


@pytest.mark.mysql
def test_a_schedule_refuses_a_todo_the_plugin_created_after_it(
    mysql_url: str, berlin_store: Store
) -> None:
    """The plugin inserts todos without created_at (its TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    kept in UTC whatever the session's zone): a scheduled completion made before such a row
    existed is refused; one made after it applies.  The site is in Berlin, the server in UTC."""
    store = berlin_store
    conn = mysql_connect(mysql_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SET time_zone = '+01:00'")  # a WordPress session in the site's zone
            cur.execute(
                f"INSERT INTO {TABLE} (title, description, status, bearbeiten)"
                " VALUES ('made by the plugin', '', 'offen', 1)"
            )
            tid = int(cur.lastrowid)
        conn.commit()
    finally:
        conn.close()
    now = datetime.now(UTC)
    # 20 minutes: reading the UTC column as Berlin wall time would age the row by an hour and
    # let this write through.
    early = write("sched-early", tid, "normal", now, not_created_after=now - timedelta(minutes=20))
    [refused] = store.apply([early])
    assert refused.outcome == "refused" and "after this completion was scheduled" in refused.reason
    assert row(mysql_url, tid)["status"] == "offen"
    later = write("sched-later", tid, "normal", now, not_created_after=now + timedelta(minutes=1))
    assert store.apply([later])[0].outcome == "applied"
    assert row(mysql_url, tid)["status"] == "completed"


@pytest.mark.mysql
def test_start_of_a_todo_the_plugin_put_in_progress_fills_only_null_start_columns(
    mysql_url: str, berlin_store: Store
) -> None:
    store = berlin_store
    tid = store.add_todo("vom Plugin gestartet")
    earlier = datetime(2026, 3, 1, 12, 0, 0)
    # the plugin's CLI: status in_progress, started_at set, execution_started_at left NULL
    raw_execute(
        mysql_url,
        f"UPDATE {TABLE} SET status='in_progress', started_at=? WHERE id=?",
        (earlier.strftime("%Y-%m-%d %H:%M:%S"), tid),
    )
    assert tid in ids(mysql_url, STUCK)
    store.apply([write("s-1", tid, "start", earlier + timedelta(minutes=3))])
    r = row(mysql_url, tid)
    assert r["started_at"] == earlier  # kept: only NULL columns are filled
    assert r["execution_started_at"] == earlier + timedelta(minutes=3)
    assert tid not in ids(mysql_url, STUCK)


@pytest.mark.mysql
def test_completion_written_after_an_outage_carries_the_event_time(
    mysql_url: str, tcp_proxy: TcpProxy
) -> None:
    live_table(mysql_url)
    profile = SiteProfile(time_zone="Europe/Berlin")
    store = open_store(proxied_url(mysql_url, tcp_proxy), table=TABLE, timeout=3, profile=profile)
    store.ensure_schema(create_todo_table=False)
    tid = store.add_todo("Ausfall")
    store.apply([write("s-1", tid, "start", datetime(2026, 12, 1, 9, 0, 0))])
    event = datetime(2026, 12, 1, 9, 30, 0)  # winter: Berlin is UTC+1
    store.close()
    tcp_proxy.mode = "refuse"
    with pytest.raises(TransientError):
        store.apply([write("c-1", tid, "normal", event, summary="✅ x")])
    tcp_proxy.mode = "pass"
    assert store.apply([write("c-1", tid, "normal", event, summary="✅ x")])[0].outcome == (
        "applied"
    )
    r = row(mysql_url, tid)
    assert r["completed_at"] == datetime(2026, 12, 1, 10, 30, 0) == r["completed_date"]
    store.close()


@pytest.mark.mysql
def test_system_zone_writes_what_the_servers_now_writes(mysql_url: str) -> None:
    live_table(mysql_url)
    store = open_store(mysql_url, table=TABLE, timeout=10)  # time_zone = SYSTEM
    store.ensure_schema(create_todo_table=False)
    tid = store.add_todo("jetzt")
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    store.apply([write("s-1", tid, "start", now), write("c-1", tid, "normal", now)])
    (server_now,) = raw_execute(mysql_url, "SELECT NOW()")[0]  # a session in the server's zone
    r = row(mysql_url, tid)
    assert abs((r["completed_at"] - server_now).total_seconds()) < 60
    assert r["completed_date"] == r["completed_at"]
    zone = store.site_zone()
    assert (
        zone.utcoffset(None) == server_now - datetime.now(UTC).replace(tzinfo=None, microsecond=0)
        or abs((zone.utcoffset(None) or timedelta(0)).total_seconds()) < 3600 * 15
    )
    store.close()


def test_sqlite_follows_the_same_time_rule(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/todos.db"
    store = open_store(url, table=TABLE, timeout=5, profile=SiteProfile(time_zone="Europe/Berlin"))
    store.ensure_schema(create_todo_table=True)
    tid = store.add_todo("lokal", priority="hoch", project_id=4)
    at = datetime(2026, 7, 1, 10, 0, 0)
    store.apply([write("s-1", tid, "start", at), write("c-1", tid, "normal", at)])
    (values,) = raw_execute(
        url,
        f"SELECT started_at, execution_started_at, completed_at, completed_date, bearbeiten,"
        f" project_id, priority FROM {TABLE} WHERE id = ?",
        (tid,),
    )
    assert values == (
        "2026-07-01 12:00:00",
        "2026-07-01 12:00:00",
        "2026-07-01 12:00:00",
        "2026-07-01 12:00:00",
        1,
        4,
        "hoch",
    )
    todo = store.get_todo(tid)
    assert todo is not None and todo.completed_at == at  # read back as UTC
    store.close()
    # SYSTEM on SQLite is the machine's zone
    local = open_store(url, table=TABLE, timeout=5)
    assert local.site_zone().utcoffset(at) == datetime.now().astimezone().utcoffset()
    local.close()


# --------------------------------------------------------------------------- add, check


def _config(tmp_path: Path, url: str, table: str = TABLE, extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'state_dir = "{tmp_path}/state"\n[database]\nurl = "{url}"\ntable = "{table}"\n{extra}'
    )
    return path


def ctl(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPLETION_")}
    return subprocess.run(
        [sys.executable, "-m", "ctl", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.mysql
def test_add_puts_the_todo_into_the_plugins_queue(mysql_url: str, tmp_path: Path) -> None:
    live_table(mysql_url)
    config = _config(tmp_path, mysql_url)
    low = ctl(config, "--json", "add", "später", "--priority", "niedrig")
    high = ctl(config, "--json", "add", "dringend", "--priority", "kritisch", "--project-id", "7")
    parked = ctl(config, "--json", "add", "geparkt", "--no-queue")
    assert low.returncode == high.returncode == parked.returncode == 0, low.stderr + high.stderr
    low_id, high_id, parked_id = (json.loads(r.stdout)["id"] for r in (low, high, parked))
    assert ids(mysql_url, QUEUE) == [high_id, low_id]  # priority DESC, parked one not queued
    r = row(mysql_url, high_id)
    assert (r["bearbeiten"], r["project_id"], r["priority"], r["status"]) == (
        1,
        7,
        "kritisch",
        "offen",
    )
    assert row(mysql_url, parked_id)["bearbeiten"] == 0
    bad = ctl(config, "add", "x", "--priority", "urgent")
    assert bad.returncode == 2 and "niedrig, mittel, hoch, kritisch" in bad.stderr


@pytest.mark.mysql
def test_check_prints_the_mapping_for_the_live_schema(mysql_url: str, tmp_path: Path) -> None:
    live_table(mysql_url)
    config = _config(tmp_path, mysql_url, extra='time_zone = "Europe/Berlin"\n')
    assert ctl(config, "db", "init").returncode == 0
    result = ctl(config, "--json", "check")
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["database"]["ok"], checks["database"]
    columns = json.loads(result.stdout)["columns"]
    assert "time zone: Europe/Berlin" in columns
    assert any(
        line.startswith("started")
        and "started_at (TIMESTAMP, stored as UTC), execution_started_at (TIMESTAMP" in line
        for line in columns
    )
    assert any(
        line.startswith("completed") and "completed_at, completed_date" in line for line in columns
    )
    assert any(line.startswith("queue_flag") and "bearbeiten" in line for line in columns)


@pytest.mark.mysql
def test_check_says_what_the_old_activator_schema_lacks(mysql_url: str, tmp_path: Path) -> None:
    table = activator_table(mysql_url, "wp_project_todos")
    config = _config(tmp_path, mysql_url, table)
    result = ctl(config, "check")
    out = result.stdout
    assert result.returncode == 1
    assert re.search(
        r"FAIL database +column `status` of `wp_project_todos` is enum\('pending'", out
    )
    assert "(it lacks offen)" in out
    expected = [
        "started    -> nothing: the table has no started_at, execution_started_at; start time",
        "completed  -> completed_date  (the table has no completed_at: not written)",
        "updated    -> updated_at",
        "report     -> nothing: the table has no claude_html_output; the report is not written",
        "text       -> nothing: the table has no claude_text_output",
        "summary    -> nothing: the table has no claude_summary",
        "queue_flag -> nothing: the table has no bearbeiten",
        "project    -> nothing: the table has no project_id",
        "priority   -> priority",
        'set database.columns.report = "claude_output"',
        "status cannot be offen: no start, completion or reset is written",
        "wp_completion_log` does not exist yet",
    ]
    for line in expected:
        assert line in out, f"{line!r} not in:\n{out}"


# --------------------------------------------------------------------------- the audit table


def test_unprefixed_completion_log_moves_once(store_url: str) -> None:
    store = open_store(store_url, table=TABLE, timeout=10)
    store.ensure_schema(create_todo_table=True)
    mine = store.add_todo("meins")
    raw_execute(store_url, "DROP TABLE stage_completion_log")
    raw_execute(
        store_url,
        "CREATE TABLE completion_log (id INTEGER PRIMARY KEY, completion_id VARCHAR(64),"
        " todo_id INTEGER, kind VARCHAR(16), sources VARCHAR(255), attempts INTEGER,"
        " created_at VARCHAR(19), logged_at VARCHAR(19))",
    )
    for n, todo in enumerate((mine, mine + 1000)):
        raw_execute(
            store_url,
            "INSERT INTO completion_log VALUES (?, ?, ?, 'normal', 'message', 1,"
            " '2026-01-01 00:00:00', '2026-01-01 00:00:00')",
            (n + 1, f"c-{n}", todo),
        )
    fresh = open_store(store_url, table=TABLE, timeout=10)
    assert any(
        "moves them into `stage_completion_log`" in line for line in fresh.describe_profile()
    )
    fresh.ensure_schema(create_todo_table=True)
    assert fresh.moved_log_rows == 1
    assert [k for _, k in fresh.logged_kinds(mine)] == ["normal"]
    assert raw_execute(store_url, "SELECT completion_id, todo_id FROM completion_log") == [
        ("c-1", mine + 1000)  # another site's row stays where it was
    ]
    again = open_store(store_url, table=TABLE, timeout=10)
    again.ensure_schema(create_todo_table=True)
    assert again.moved_log_rows == 0
    assert any("not used by this site" in line for line in again.describe_profile())
    for s in (store, fresh, again):
        s.close()


def test_the_audit_table_takes_the_todo_tables_prefix() -> None:
    from agent.store.base import log_table_for

    assert log_table_for("stage_project_todos") == "stage_completion_log"
    assert log_table_for("wp_project_todos") == "wp_completion_log"
    assert log_table_for("project_todos") == "completion_log"
    assert log_table_for("todos") == "completion_log"
    assert log_table_for("site2_todos") == "site2_completion_log"


# --------------------------------------------------------------------------- the report


def _hostile() -> list[tuple[str, str]]:
    assert len(HOSTILE) >= 50
    return [(p.stem, p.read_bytes().decode("utf-8", "surrogateescape")) for p in HOSTILE]


def _reports(name: str, text: str, beacon: str) -> dict[str, str]:
    text = text.replace("BEACON", beacon)
    facts = TodoFacts(title=text, description=text, working_directory=text)
    at = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
    normal = render_report(
        todo_id=7,
        todo=facts,
        collected=Collected(text, "message", (text,), True, False),
        kind="normal",
        started_at=at,
        completed_at=at,
        zone=BERLIN,
    )
    forced = render_report(
        todo_id=7,
        todo=facts,
        collected=Collected(text, "tmux", (text, text), False, False),
        kind="emergency",
        started_at=None,
        completed_at=at,
        reason=text,
        system_status=text,
        zone=BERLIN,
        language="en",
    )
    return {f"{name}.normal": normal.db, f"{name}.forced": forced.db}


@pytest.fixture
def browser() -> Iterator[Browser]:
    for tool in (PHP, CHROMIUM, str(PARSEDOWN)):
        if not Path(tool).exists():
            pytest.skip(f"{tool} is missing (scripts/test installs it as root)")
    server = Browser()
    yield server
    server.close()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_markdown_report_is_inert_in_every_plugin_view(browser: Browser) -> None:
    docs: dict[str, str] = {}
    for name, text in _hostile():
        docs.update(_reports(name, text, browser.beacon(name)))
    names = list(docs)
    views = render_views([docs[n] for n in names])
    opened: list[str] = []
    for name, rendered in zip(names, views, strict=True):
        doc = docs[name]
        assert doc.encode("utf-8")  # strict UTF-8: no lone surrogates reach the column
        first = doc.split("\n", 1)[0]
        assert first.startswith(("✅ Todo #7 erledigt: ", "⚠️ Todo #7 completed by force: "))
        for view in ("parsedown", "parsedown-safe", "pre"):
            html = rendered[view]
            problems = view_problems(html)
            assert not problems, f"{name} via {view}: {problems[:5]}"
            page = f"{name}.{view}"
            browser.add(page, admin_page(page, html))
            opened.append(page)
    browser.verdict(opened)


def test_markdown_reads_well_as_plain_text_and_its_first_line_says_what_was_done() -> None:
    result = render_report(
        todo_id=12,
        todo=TodoFacts("Login-Formular validieren", "E-Mail & Passwort", "/srv/site"),
        collected=Collected(
            "## Fertig\n\n<b>Alle</b> Tests laufen.", "transcript", (), True, False
        ),
        kind="normal",
        started_at=datetime(2026, 7, 1, 1, 20, tzinfo=UTC),
        completed_at=datetime(2026, 7, 1, 2, 0, tzinfo=UTC),
        zone=BERLIN,
    )
    md = result.db
    assert md[:100].split("\n")[0] == "✅ Todo #12 erledigt: Login-Formular validieren"
    assert "- Gestartet: 2026-07-01 03:20:00 Europe/Berlin" in md
    assert "- Abgeschlossen: 2026-07-01 04:00:00 Europe/Berlin" in md
    assert "## Ausgabe\n\n    ## Fertig\n\n    <b>Alle</b> Tests laufen.\n" in md
    assert result.html.startswith("<!DOCTYPE html>")  # the archive's page is still the page
    assert result.summary == "✅ Fertig Alle Tests laufen."


def test_db_format_page_and_fragment() -> None:
    args = dict(
        todo_id=3,
        todo=None,
        collected=Collected("out <script>x</script>", "message", (), False, False),
        kind="normal",
        started_at=None,
        completed_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    page = render_report(**args, db_format="page")  # type: ignore[arg-type]
    fragment = render_report(**args, db_format="html_fragment")  # type: ignore[arg-type]
    assert page.db == page.html and page.db.startswith("<!DOCTYPE html>")
    assert fragment.db.startswith('<div class="completion-report" lang="de">')
    for absent in ("<!DOCTYPE", "<style", "<head>", "<meta", "<script"):
        assert absent not in fragment.db
    assert "out &lt;script&gt;x&lt;/script&gt;" in fragment.db


@pytest.mark.parametrize("kind", ["normal", "emergency"])
def test_summary_is_one_plain_line_with_the_plugins_prefix(kind: str) -> None:
    for name, text in _hostile():
        result = render_report(
            todo_id=1,
            todo=None,
            collected=Collected(text * 3, "message", (), True, False),
            kind=kind,
            started_at=None,
            completed_at=datetime(2026, 1, 1, tzinfo=UTC),
            reason=text if kind == "emergency" else None,
        )
        summary = result.summary
        assert len(summary) <= SUMMARY_MAX_CHARS, name
        assert "\n" not in summary and "<" not in summary and ">" not in summary, name
        assert summary.startswith("⚠️ " if kind == "emergency" else "✅ "), name
        assert summary.encode("utf-8")


def test_language_switches_every_fixed_string() -> None:
    args = dict(
        todo_id=5,
        todo=None,
        collected=Collected("", "none", ("tmux: no target",), False, False),
        kind="emergency",
        started_at=None,
        completed_at=datetime(2026, 1, 1, tzinfo=UTC),
        reason="timeout",
    )
    de = render_report(**args)  # type: ignore[arg-type]
    en = render_report(**args, language="en")  # type: ignore[arg-type]
    assert de.summary == "⚠️ Notabschluss: timeout" and en.summary == "⚠️ Forced completion: timeout"
    for word in ("Abschluss", "Gestartet: unbekannt", "Probleme beim Sammeln", "Ausgabe"):
        assert word in de.db and word not in en.db
    assert '<html lang="de">' in de.html and '<html lang="en">' in en.html
