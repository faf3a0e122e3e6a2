"""Export: one .tar.gz per todo — archive dirs, report, journal history, database row — for a
completed, a forced and a reset todo, opened and checked; never the password; and from the
archive alone when the journal is gone and the database does not answer."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ctl import Client
from ctl.export import ExportError, export_todo
from protocol.config import load
from tests.dbfixtures import MysqlServer, create_wordpress_table, fetch_row
from tests.harness import Agent, render_toml, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.mysql]


@pytest.fixture
def secret_url(mysql_server: MysqlServer, mysql_url: str) -> Iterator[tuple[str, str]]:
    """The test's database, reached as a throwaway user with a password."""
    with mysql_server.throwaway_user(mysql_url.rsplit("/", 1)[1]) as (url, password):
        yield url, password


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def export(agent: Agent, todo_id: int) -> tuple[dict[str, bytes], dict]:
    path = agent.root / f"export-{todo_id}.tar.gz"
    result = agent.ctl("export", str(todo_id), "-o", str(path))
    assert result.returncode == 0, result.stderr.decode()
    assert path.stat().st_mode & 0o077 == 0  # private, like the archive it copies
    files = members(path)
    return files, json.loads(files[f"todo_{todo_id}/metadata.json"])


def test_bundles_of_a_completed_a_forced_and_a_reset_todo(
    make_agent: Callable[..., Agent], secret_url: tuple[str, str]
) -> None:
    url, password = secret_url
    create_wordpress_table(url.replace(url.split("@")[0], "mysql://root"))
    agent = make_agent(
        {
            "database": {"url": url},
            "behavior": {
                "completion_timeout": 2,
                "emergency_timeout": 5,
                "health_check_interval": 3600,
            },
        }
    ).start()
    done, forced, reset = agent.add("Done"), agent.add("Forced"), agent.add("Reset")
    for todo in (done, forced, reset):
        session = agent.sessions / f"claude_session_{todo}"
        session.mkdir()
        (session / "output.md").write_text(f"work of todo {todo}\n")
        # A careless session left the database password in a file: the export must not carry it.
        (session / ".env").write_text(f"DB_PASSWORD={password}\n")
        # Only `forced` may reach its 2 s deadline, however slow the machine is today.
        timeout = ["--timeout", "60"] if todo == done else []
        assert agent.ctl("start", str(todo), *timeout).returncode == 0
    client = Client(str(agent.config_path))
    client.waiting(reset, reason="permission_prompt: may I deploy?")  # never force-completed
    client.close()
    assert agent.ctl("complete", str(done), "--output", "All 12 tests pass.").returncode == 0

    def row(todo: int) -> dict:
        return fetch_row(url, todo) or {}

    wait_for(lambda: row(done).get("status") == "completed", what="the completion")
    wait_for(lambda: row(forced).get("status") == "completed", timeout=30, what="the forced one")
    wait_for(lambda: row(reset).get("status") == "offen", timeout=40, what="the reset")
    wait_for(lambda: "cleaned" in agent.entry_states(done), what="the archive and cleanup")
    wait_for(lambda: "cleaned" in agent.entry_states(forced), what="the forced one's archive")

    files, meta = export(agent, done)
    top = f"todo_{done}"
    assert meta["todo_id"] == done
    assert meta["database_row"] is True, meta["database_problem"]
    assert meta["archives"] and all(a.startswith(f"todo_{done}_") for a in meta["archives"])
    assert f"{top}/report.html" in files and b"All 12 tests pass." in files[f"{top}/report.html"]
    assert b"All 12 tests pass." in files[f"{top}/report.md"]
    history = json.loads(files[f"{top}/journal.json"])
    assert [e["kind"] for e in history["entries"]] == ["start", "normal"]
    assert all("request" not in e for e in history["entries"])
    db_row = json.loads(files[f"{top}/database_row.json"])
    assert db_row["row"]["status"] == "completed" and db_row["row"]["id"] == done
    assert "***" in db_row["database"]
    archived = [n for n in files if n.startswith(f"{top}/archive/") and n.endswith("output.md")]
    assert archived and files[archived[0]] == f"work of todo {done}\n".encode()

    files, meta = export(agent, forced)
    history = json.loads(files[f"todo_{forced}/journal.json"])
    assert "emergency" in [e["kind"] for e in history["entries"]]
    assert json.loads(files[f"todo_{forced}/database_row.json"])["row"]["status"] == "completed"
    assert f"todo_{forced}/report.html" in files

    files, meta = export(agent, reset)
    history = json.loads(files[f"todo_{reset}/journal.json"])
    assert "reset" in [e["kind"] for e in history["entries"]]
    assert json.loads(files[f"todo_{reset}/database_row.json"])["row"]["status"] == "offen"
    assert any(n.endswith("/session/output.md") for n in files)  # the reset archived the dir

    on_disk = [p.read_bytes() for p in (agent.state / "archive").rglob(".env")]
    assert any(password.encode() in data for data in on_disk)  # the archive kept it as it was
    for todo in (done, forced, reset):
        bundle = agent.root / f"export-{todo}.tar.gz"
        for name, data in members(bundle).items():
            assert password.encode() not in data, f"the password leaked into {name}"
        assert (
            password.encode()
            not in agent.ctl("--json", "export", str(todo), "--format", "json").stdout
        )

    # --format json: the metadata only, no file written.
    result = agent.ctl("export", str(done), "--format", "json", "-o", str(agent.root / "no.tgz"))
    assert result.returncode == 0
    assert json.loads(result.stdout)["archives"] == meta_archives(agent, done)
    assert not (agent.root / "no.tgz").exists()

    # From the archive alone: the agent gone, its journal deleted, the database unreachable.
    assert agent.stop() == 0
    agent.state.joinpath("journal.db").unlink()
    offline = agent.root / "offline.toml"
    config = dict(agent.config, database={"url": "mysql://nobody:x@127.0.0.1:1/none"})
    offline.write_text(render_toml(config))
    metadata = export_todo(load(str(offline)), done, str(agent.root / "alone.tar.gz"))
    assert metadata["journal_problem"] and metadata["database_problem"]
    files = members(agent.root / "alone.tar.gz")
    assert b"All 12 tests pass." in files[f"todo_{done}/report.html"]
    assert any(n.endswith("/session/output.md") for n in files)
    with pytest.raises(ExportError, match="nothing is known about todo 4242"):
        export_todo(load(str(offline)), 4242, str(agent.root / "none.tar.gz"))


def meta_archives(agent: Agent, todo: int) -> list[str]:
    return sorted(
        p.name for p in (agent.state / "archive").iterdir() if p.name.startswith(f"todo_{todo}_")
    )
