"""Throwaway MariaDB servers for tests that must configure a server (TLS, Galera) and so may
not touch the shared one on 3306.

`Mariadbd(root, port)` makes its own datadir with `mariadb-install-db`, owned by user `mysql`
(mariadbd and rsync state transfer need that; as root in a /tmp dir they fail), and runs
`mariadbd --no-defaults` as `mysql` on 127.0.0.1 with a small footprint.  Admin statements go
through its Unix socket as root.  `throwaway_ca()` makes a CA and certificates with openssl.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pymysql

from tests.harness import wait_for

MARIADBD = "/usr/sbin/mariadbd"
SMALL = [
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=16M",
    "--performance-schema=OFF",
    "--skip-name-resolve",
    "--max-connections=60",
    "--key-buffer-size=1M",
    "--table-open-cache=200",
]


def have_mariadbd() -> bool:
    try:
        pwd.getpwnam("mysql")
    except KeyError:
        return False
    return (
        os.path.exists(MARIADBD)
        and shutil.which("mariadb-install-db") is not None
        and os.geteuid() == 0
    )


def chown_mysql(*paths: Path) -> None:
    entry = pwd.getpwnam("mysql")
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)
        if path.is_dir():
            for sub in path.rglob("*"):
                os.chown(sub, entry.pw_uid, entry.pw_gid)


class Mariadbd:
    def __init__(self, root: Path, port: int, extra: list[str] | None = None) -> None:
        self.root = root
        self.port = port
        self.extra = list(extra or [])
        self.datadir = root / "data"
        self.socket = root / "mysqld.sock"
        self.log = root / "error.log"
        # Its own tmpdir: a bootstrap in the shared /tmp failed once on a temp table file that
        # vanished under it ("Error on delete of '/tmp/#sql-temptable-…'").
        self.tmpdir = root / "tmp"
        self.proc: subprocess.Popen[bytes] | None = None

    def install(self) -> Mariadbd:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.tmpdir.mkdir(mode=0o700, exist_ok=True)
        # User mysql must be able to walk down to its datadir (test dirs are 0700).
        for parent in self.root.parents:
            if parent == Path("/tmp") or parent == parent.parent:
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
        chown_mysql(self.root)
        if not (self.datadir / "mysql").is_dir():
            done = subprocess.run(
                [
                    "mariadb-install-db",
                    "--no-defaults",
                    f"--datadir={self.datadir}",
                    f"--tmpdir={self.tmpdir}",
                    "--user=mysql",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ],
                capture_output=True,
                text=True,
                timeout=180,
            )
            if done.returncode != 0:
                raise AssertionError(
                    f"mariadb-install-db for {self.datadir} exited {done.returncode}: "
                    f"{(done.stderr or done.stdout)[-2000:]}"
                )
        return self

    def command(self) -> list[str]:
        return [
            MARIADBD,
            "--no-defaults",
            "--user=mysql",
            f"--datadir={self.datadir}",
            f"--tmpdir={self.tmpdir}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.socket}",
            f"--pid-file={self.root / 'mysqld.pid'}",
            f"--log-error={self.log}",
            *SMALL,
            *self.extra,
        ]

    def start(self, *, wait: bool = True, timeout: float = 90) -> Mariadbd:
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        wait_for(self._answers, timeout, interval=0.2, what=f"mariadbd on {self.port}")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise AssertionError(f"mariadbd on {self.port} exited {self.proc.returncode}: {tail}")
        try:
            self.admin().close()
        except pymysql.err.MySQLError:
            return False
        return True

    def admin(self, **kw: Any) -> pymysql.connections.Connection:
        return pymysql.connect(
            unix_socket=str(self.socket), user="root", autocommit=True, connect_timeout=3, **kw
        )

    def execute(self, *statements: str) -> list[tuple]:
        conn = self.admin()
        try:
            rows: list[tuple] = []
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
                    rows = list(cur.fetchall())
            return rows
        finally:
            conn.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def kill9(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def throwaway_ca(root: Path, name: str = "ca") -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed
    by it (EC P-256, valid one day).  Returns the file paths by role."""
    root.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
        "-subj", f"/CN=throwaway {name}", cwd=root,
    )  # fmt: skip
    ext = root / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who, cn in (("server", "localhost"), ("client", "completiond")):
        _openssl(
            "req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={cn}",
            cwd=root,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{who}.csr", "-CA", f"{name}.pem", "-CAkey", f"{name}.key",
            "-CAcreateserial", "-out", f"{who}.pem", "-days", "1", "-extfile", str(ext),
            cwd=root,
        )  # fmt: skip
    return {
        "ca": root / f"{name}.pem",
        "server_cert": root / "server.pem",
        "server_key": root / "server.key",
        "client_cert": root / "client.pem",
        "client_key": root / "client.key",
    }
