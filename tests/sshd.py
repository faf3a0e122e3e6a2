"""A throwaway OpenSSH server for the tunnel tests: Debian's `sshd` on 127.0.0.1, a free port.

`Sshd(root)` makes a host key and a client key under `root`, writes an sshd_config that lets
only that client key in (as the user running the tests) and allows local TCP forwarding, and
`start()`s `/usr/sbin/sshd -D`.  `known_hosts` and `identity` are what the agent's config
points at; `wrong_known_hosts()` and `wrong_identity()` make the two classic mistakes.
`kill9()` kills the listener and every session process it forked (what a crashed host does);
`start()` again brings it back on the same port with the same host key.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import psutil

from tests.harness import wait_for

SSHD = "/usr/sbin/sshd"


def have_sshd() -> bool:
    return os.path.exists(SSHD) and shutil.which("ssh") is not None and os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )


class Sshd:
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.port = port or free_port()
        self.user = getpass.getuser()
        self.host_key = root / "host_ed25519"
        self.identity = root / "client_ed25519"
        self.authorized = root / "authorized_keys"
        self.known_hosts = root / "known_hosts"
        self.config = root / "sshd_config"
        self.log = root / "sshd.log"
        keygen(self.host_key, "throwaway host key")
        keygen(self.identity, "throwaway client key")
        shutil.copy(f"{self.identity}.pub", self.authorized)
        host_pub = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "UsePAM no",
                    "StrictModes no",
                    "AllowTcpForwarding local",
                    "AllowStreamLocalForwarding no",
                    "X11Forwarding no",
                    "PermitTTY no",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def destination(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def start(self) -> Sshd:
        # Debian's sshd insists on its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._listening, 15, what=f"sshd listening on {self.port}")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"sshd exited {self.proc.returncode}: {self.log.read_text()}")
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def sessions(self) -> list[psutil.Process]:
        """The per-connection processes the listener forked."""
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill9(self) -> None:
        """SIGKILL the listener and all its sessions: the tunnels through it break at once."""
        if self.proc is None:
            return
        victims = self.sessions()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self.kill9()

    def wrong_known_hosts(self) -> Path:
        """A known_hosts that lists another key for this server (a man in the middle)."""
        other = self.root / "other_host_key"
        if not other.exists():
            keygen(other, "not the server's key")
        pub = Path(f"{other}.pub").read_text().split()
        path = self.root / "wrong_known_hosts"
        path.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        return path

    def wrong_identity(self) -> Path:
        """A client key the server does not accept."""
        path = self.root / "stranger_ed25519"
        if not path.exists():
            keygen(path, "not authorized")
        return path
