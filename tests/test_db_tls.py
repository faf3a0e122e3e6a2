"""database.tls against a real MariaDB with TLS: a throwaway mariadbd of our own (the shared
server on 3306 must not be reconfigured), with certificates from a throwaway CA.

Users on it: `tls_user` (REQUIRE SSL), `x509_user` (REQUIRE X509: a client certificate signed
by the CA).  The shared server has no TLS, which gives the "server offers no TLS" case.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.dbroute import DbRoute, preflight
from protocol.config import ConfigError, load
from tests.harness import render_toml, short_tmp
from tests.mariadbd import Mariadbd, chown_mysql, have_mariadbd, throwaway_ca
from tests.sshd import free_port

pytestmark = [
    pytest.mark.mysql,
    pytest.mark.skipif(not have_mariadbd(), reason="needs mariadbd, mariadb-install-db, root"),
]


class TlsServer:
    def __init__(self, server: Mariadbd, certs: dict[str, Path], other_ca: Path) -> None:
        self.server, self.certs, self.other_ca = server, certs, other_ca

    def url(self, user: str) -> str:
        return f"mysql://{user}:secret@127.0.0.1:{self.server.port}/tlsdb"


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsServer]:
    root = short_tmp("tls-")
    certs = throwaway_ca(root / "certs")
    other = throwaway_ca(root / "other", name="other")["ca"]
    server_files = root / "server-certs"
    server_files.mkdir()
    for key in ("ca", "server_cert", "server_key"):
        shutil.copy(certs[key], server_files / certs[key].name)
    server = Mariadbd(
        root / "db",
        free_port(),
        [
            f"--ssl-ca={server_files / certs['ca'].name}",
            f"--ssl-cert={server_files / 'server.pem'}",
            f"--ssl-key={server_files / 'server.key'}",
        ],
    ).install()
    chown_mysql(server_files)
    server.start()
    try:
        server.execute(
            "CREATE DATABASE tlsdb",
            "CREATE USER 'tls_user'@'127.0.0.1' IDENTIFIED BY 'secret' REQUIRE SSL",
            "CREATE USER 'x509_user'@'127.0.0.1' IDENTIFIED BY 'secret' REQUIRE X509",
            "GRANT ALL ON tlsdb.* TO 'tls_user'@'127.0.0.1', 'x509_user'@'127.0.0.1'",
        )
        yield TlsServer(server, certs, other)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def config_for(tmp: Path, database: dict):
    path = tmp / "config.toml"
    path.write_text(render_toml({"state_dir": str(tmp / "state"), "database": database}))
    return load(str(path))


def roundtrip(config) -> int:
    """Through the agent's own route: schema, a todo added and read back."""
    route = DbRoute(config, "test")
    store = route.open()
    try:
        store.ensure_schema(create_todo_table=True)
        todo_id = store.add_todo("over TLS", "", "/tmp")
        assert todo_id in store.get_todos([todo_id])
        return todo_id
    finally:
        store.close()
        route.close()


@pytest.mark.slow
def test_require_and_verify_reach_a_server_that_demands_tls(
    tls_server: TlsServer, tmpdir_short: Path
) -> None:
    from agent.store import PermanentError

    url = tls_server.url("tls_user")
    # The server refuses this user without TLS: so a success below went over TLS.
    with pytest.raises(PermanentError, match="1045"):
        roundtrip(config_for(tmpdir_short, {"url": url}))
    assert roundtrip(config_for(tmpdir_short, {"url": url, "tls": "require"}))
    verify = {"url": url, "tls": "verify", "tls_ca": str(tls_server.certs["ca"])}
    assert roundtrip(config_for(tmpdir_short, verify))
    assert preflight(config_for(tmpdir_short, verify)) == []


@pytest.mark.slow
def test_verify_refuses_a_certificate_from_another_ca(
    tls_server: TlsServer, tmpdir_short: Path
) -> None:
    from agent.store import PermanentError

    config = config_for(
        tmpdir_short,
        {"url": tls_server.url("tls_user"), "tls": "verify", "tls_ca": str(tls_server.other_ca)},
    )
    with pytest.raises(PermanentError) as info:
        roundtrip(config)
    message = str(info.value)
    assert "certificate was refused" in message and "database.tls_ca" in message
    assert "not retried" in message


@pytest.mark.slow
def test_a_client_certificate_is_presented(tls_server: TlsServer, tmpdir_short: Path) -> None:
    from agent.store import PermanentError

    url = tls_server.url("x509_user")
    ca = str(tls_server.certs["ca"])
    with pytest.raises(PermanentError, match="1045"):
        roundtrip(config_for(tmpdir_short, {"url": url, "tls": "verify", "tls_ca": ca}))
    with_cert = {
        "url": url,
        "tls": "verify",
        "tls_ca": ca,
        "tls_cert": str(tls_server.certs["client_cert"]),
        "tls_key": str(tls_server.certs["client_key"]),
    }
    assert roundtrip(config_for(tmpdir_short, with_cert))


def test_tls_against_a_server_without_tls_is_refused_not_downgraded(
    mysql_url: str, tmpdir_short: Path
) -> None:
    from agent.store import PermanentError
    from tests.dbfixtures import mysql_connect

    conn = mysql_connect(mysql_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@have_ssl")
            (have_ssl,) = cur.fetchone()
    finally:
        conn.close()
    if have_ssl == "YES":
        pytest.skip("the shared server has TLS enabled; this case needs one without")
    with pytest.raises(PermanentError, match="does not offer TLS"):
        roundtrip(config_for(tmpdir_short, {"url": mysql_url, "tls": "require"}))


@pytest.mark.parametrize(
    ("database", "wanted"),
    [
        ({"tls": "require"}, "needs a MySQL database"),
        ({"url": "mysql://u@h/db", "tls_cert": "/x.pem", "tls": "require"}, "go together"),
        ({"url": "mysql://u@h/db", "tls_ca": "/ca.pem"}, "need database.tls"),
        ({"url": "mysql://u@h/db", "tls": "verify", "tls_ca": "ca.pem"}, "absolute path"),
        ({"url": "mysql://u@h/db", "tls": "maybe"}, "database.tls"),
    ],
)
def test_tls_settings_are_checked(database: dict, wanted: str, tmpdir_short: Path) -> None:
    with pytest.raises(ConfigError, match=wanted):
        config_for(tmpdir_short, database)


def test_unreadable_tls_files_stop_the_agent_with_exit_2(tmpdir_short: Path) -> None:
    import subprocess
    import sys

    path = tmpdir_short / "c.toml"
    path.write_text(
        render_toml(
            {
                "state_dir": str(tmpdir_short / "s"),
                "database": {"url": "mysql://u@h/db", "tls": "verify", "tls_ca": "/nonexistent"},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "database.tls_ca: /nonexistent is missing or not readable" in done.stderr
