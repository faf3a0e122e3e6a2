"""An OpenSSH tunnel to the database host: the system's `ssh`, started and watched by its owner.

`SshTunnel.ensure()` returns the path of a local Unix socket that leads, through `ssh -N -L`, to
the MySQL server as the ssh server sees it.  It starts `ssh` when it is not running, restarts it
with backoff after it died, and turns what ssh said on stderr into one short cause ("connection
refused", "host key mismatch", "auth failed", ...), raised as a `TunnelError` (a
TransientError: completions wait in the journal until the tunnel works).

Never a password prompt (BatchMode), host keys checked strictly against the configured
known_hosts, keep-alives so that a dead peer is noticed within about `timeout` seconds, and
ExitOnForwardFailure so that ssh never runs without its forward.  No logging here (the store
package logs nothing): the owner asks `failure()` and `events()` what happened.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .base import TransientError

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
_PR_SET_PDEATHSIG = 1


class TunnelError(TransientError):
    """ssh could not bring the tunnel up, or it died; the message names the cause."""

    def __init__(self, message: str, *, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True, slots=True)
class SshSettings:
    user: str
    host: str
    port: int
    identity: str = ""
    known_hosts: str = ""
    timeout: float = 30.0
    ssh: str = "ssh"

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def base_args(self) -> list[str]:
        """ssh's options common to the tunnel and to `ssh -G` (the config it would use)."""
        alive = max(1, round(self.timeout / 3))
        args = [
            self.ssh,
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"ConnectTimeout={max(1, round(self.timeout))}",
            "-o", f"ServerAliveInterval={alive}",
            "-o", "ServerAliveCountMax=3",
            "-o", "ExitOnForwardFailure=yes",
            "-o", "StreamLocalBindUnlink=yes",
            "-o", "StreamLocalBindMask=0177",
            "-o", "ControlMaster=no",
            "-o", "ControlPath=none",
            "-p", str(self.port),
        ]  # fmt: skip
        if self.identity:
            args += ["-o", "IdentitiesOnly=yes", "-i", self.identity]
        if self.known_hosts:
            args += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
            args += ["-o", "GlobalKnownHostsFile=/dev/null"]
        return args


# What ssh says on stderr, first match wins: (pattern, cause, advice).
_CAUSES: list[tuple[re.Pattern[str], str, str]] = [
    (
        re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed"),
        "host key mismatch",
        "the server's key is not the one in known_hosts: if the server was really re-keyed, "
        "replace its line (ssh-keygen -R, then ssh-keyscan after checking the fingerprint)",
    ),
    (
        re.compile(r"No \S+ host key is known for|Host key verification failed"),
        "host key unknown",
        "add the server's key to known_hosts (ssh-keyscan -p PORT HOST >> KNOWN_HOSTS after "
        "checking its fingerprint)",
    ),
    (
        re.compile(r"Permission denied|Too many authentication failures"),
        "auth failed",
        "the server refused the key: check database.ssh_identity and the server's authorized_keys",
    ),
    (
        re.compile(r"UNPROTECTED PRIVATE KEY FILE|bad permissions"),
        "auth failed",
        "the identity file is readable by others: chmod 600 it",
    ),
    (re.compile(r"Connection refused"), "connection refused", "is sshd running on that port?"),
    (
        re.compile(r"[Cc]onnection timed out|Operation timed out|timed out"),
        "timed out",
        "the host does not answer: network, firewall or host down",
    ),
    (
        re.compile(r"Could not resolve hostname|Name or service not known"),
        "unknown host name",
        "check the host in database.ssh",
    ),
    (
        re.compile(r"No route to host|Network is unreachable"),
        "host unreachable",
        "check the network route to the host",
    ),
    (
        re.compile(r"forwarding failed|cannot listen|Could not request local forwarding"),
        "forward failed",
        "the local socket could not be created: check the state dir",
    ),
    (
        re.compile(
            r"Connection closed by|Connection reset|Broken pipe|not responding|"
            r"Connection to .* closed"
        ),
        "connection lost",
        "the ssh connection broke; it is restarted",
    ),
]


def explain(stderr: str, returncode: int | None) -> tuple[str, str]:
    """(cause, detail) for what ssh printed before it exited."""
    for pattern, cause, advice in _CAUSES:
        if pattern.search(stderr):
            return cause, advice
    lines = [
        line.strip()
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(("Warning:", "@", "debug"))
    ]
    if lines:
        return "ssh failed", lines[-1][:300]
    return "ssh exited", f"exit status {returncode}"


class SshTunnel:
    """One `ssh -N -L SOCKET:REMOTE` process, owned by one process of the agent."""

    def __init__(self, settings: SshSettings, *, remote: str, socket_path: Path) -> None:
        self.settings = settings
        self.remote = remote  # "HOST:PORT" or "/remote/unix.sock", as the ssh server sees it
        self.socket_path = socket_path
        self.err_path = socket_path.with_suffix(".err")
        self.pid_path = socket_path.with_suffix(".pid")
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._failure: TunnelError | None = None
        self._delay = 0.0
        self._next_start = 0.0
        self.starts = 0  # ssh processes started, for logs and tests
        self._events: list[str] = []

    # ------------------------------------------------------------ queries

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def alive(self) -> bool:
        with self._lock:
            return self._proc is not None and self._proc.poll() is None

    def failure(self) -> TunnelError | None:
        """The last failure, if the tunnel is not up now (None while it works)."""
        with self._lock:
            self._reap()
            return None if self.alive() else self._failure

    def events(self) -> list[str]:
        """What happened since the last call (tunnel up, tunnel died and why), for the log."""
        with self._lock:
            self._reap()
            events, self._events = self._events, []
            return events

    def describe(self) -> str:
        return f"ssh to {self.settings.where}"

    # ------------------------------------------------------------ use

    def ensure(self) -> str:
        """The local socket's path, with ssh running; TunnelError when it cannot be had now."""
        with self._lock:
            self._reap()
            if self.alive() and self.socket_path.exists():
                return str(self.socket_path)
            now = time.monotonic()
            if self._failure is not None and now < self._next_start:
                wait = self._next_start - now
                raise TunnelError(
                    f"{self._failure} (next try in {wait:.0f} s)", cause=self._failure.cause
                )
            self._start()
            return str(self.socket_path)

    def close(self) -> None:
        with self._lock:
            self._stop()

    # ------------------------------------------------------------ internals

    def _reap(self) -> None:
        """Notice an ssh that exited since we looked; remember why."""
        proc = self._proc
        if proc is None or proc.poll() is None:
            return
        self._proc = None
        self._failure = self._error(proc.returncode)
        self._events.append(f"tunnel down: {self._failure}")
        self._backoff()
        with contextlib.suppress(OSError):
            self.pid_path.unlink()

    def _error(self, returncode: int | None) -> TunnelError:
        try:
            stderr = self.err_path.read_text(errors="replace")
        except OSError:
            stderr = ""
        cause, detail = explain(stderr, returncode)
        return TunnelError(f"{self.describe()}: {cause} ({detail})", cause=cause)

    def _backoff(self) -> None:
        self._delay = min(max(self._delay * 2, BACKOFF_FIRST), BACKOFF_MAX)
        self._next_start = time.monotonic() + self._delay

    def _command(self) -> list[str]:
        s = self.settings
        return [
            *s.base_args(),
            "-N",
            "-n",
            "-L",
            f"{self.socket_path}:{self.remote}",
            f"{s.user}@{s.host}",
        ]

    def _start(self) -> None:
        self._stop()
        self._kill_stale()
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        if shutil.which(self.settings.ssh) is None:
            self._failure = TunnelError(
                f"{self.describe()}: ssh not found (install openssh-client)", cause="no ssh"
            )
            self._backoff()
            raise self._failure
        main_thread = threading.current_thread() is threading.main_thread()
        with open(self.err_path, "wb") as err:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                # Dies with us when we were started from the main thread (a thread's exit would
                # fire it too early); otherwise the pid file lets the next owner end it.
                preexec_fn=_die_with_parent if main_thread else None,
                start_new_session=True,
            )
        self.starts += 1
        self.pid_path.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + self.settings.timeout + 2
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._reap()
                assert self._failure is not None
                raise self._failure
            if self.socket_path.exists():
                self._failure = None
                self._delay = 0.0
                self._events.append(f"tunnel up: {self.describe()} (ssh pid {self._proc.pid})")
                return
            time.sleep(0.02)
        self._stop()
        self._failure = TunnelError(
            f"{self.describe()}: timed out (no forward after {self.settings.timeout:.0f} s)",
            cause="timed out",
        )
        self._backoff()
        raise self._failure

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            with contextlib.suppress(OSError):
                self.pid_path.unlink()
            with contextlib.suppress(OSError):
                self.socket_path.unlink()

    def _kill_stale(self) -> None:
        """An ssh a killed predecessor left behind for this socket: end it."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if f"{self.socket_path}:{self.remote}".encode() in cmdline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def known_host_problem(settings: SshSettings) -> str | None:
    """None when ssh knows the server's host key; else a sentence saying how to add it.

    Asks `ssh -G` which name, port and known_hosts files ssh would use (so ~/.ssh/config's
    Hostname, Port and HostKeyAlias count), then `ssh-keygen -F` whether a key is listed.
    """
    keygen = shutil.which("ssh-keygen")
    if shutil.which(settings.ssh) is None or keygen is None:
        return "ssh is not installed (apt-get install openssh-client)"
    try:
        out = subprocess.run(
            [*settings.base_args(), "-G", f"{settings.user}@{settings.host}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run ssh -G: {exc}"
    if out.returncode != 0:
        return f"ssh -G refused the settings: {out.stderr.strip()[:300]}"
    conf: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition(" ")
        conf.setdefault(key.lower(), value)
    host = conf.get("hostkeyalias") or conf.get("hostname") or settings.host
    port = int(conf.get("port", settings.port))
    name = host if port == 22 else f"[{host}]:{port}"
    files = [
        os.path.expanduser(f)
        for key in ("userknownhostsfile", "globalknownhostsfile")
        for f in conf.get(key, "").split()
        if f != "/dev/null"
    ]
    for path in files:
        if not os.path.isfile(path):
            continue
        found = subprocess.run(
            [keygen, "-F", name, "-f", path], capture_output=True, timeout=10, check=False
        )
        if found.returncode == 0 and found.stdout.strip():
            return None
    target = settings.known_hosts or (files[0] if files else "~/.ssh/known_hosts")
    scan = f"ssh-keyscan -p {port} {host}" if port != 22 else f"ssh-keyscan {host}"
    return (
        f"the ssh host key of {name} is not in {' or '.join(files) or 'any known_hosts file'}; "
        f"check the server's fingerprint (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub on "
        f"the server), then add it: {scan} >> {target}"
    )
