"""Configuration: one JSON or TOML file decoded into frozen structs.

Shared by the agent and the client, so it imports nothing but msgspec and the standard library.
A wrong key or type raises ConfigError naming the key path; with no file, defaults serve.

The hook's hot path reads its TOML through ``load_for_client``: a JSON copy of the decoded file
in the user's cache dir, used while the file's stat is unchanged, spares every hook the TOML
parser (``tomllib`` is ~5 ms of imports, more than the rest of the client's own modules).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from .dburl import is_mysql, parse_url
from .dburl import mask_url as mask_url  # re-exported: tests and older callers

IPC_PATH_MAX = 107  # sockaddr_un.sun_path minus the terminating NUL
STREAM_SUFFIX = ".stream"  # the stream socket is the ipc socket's path with this added

Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]


class ConfigError(Exception):
    """A configuration problem; the message names the file and the key."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


ColumnName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_]{0,64}$")]
ColumnNames = ColumnName | list[ColumnName]  # a name, a list of names, or "" for none


class Columns(_Section, frozen=True, kw_only=True):
    """The site profile: which column of the todo table gets what (see the README)."""

    started: ColumnNames = msgspec.field(
        default_factory=lambda: ["started_at", "execution_started_at"]
    )
    completed: ColumnNames = msgspec.field(
        default_factory=lambda: ["completed_at", "completed_date"]
    )
    updated: ColumnNames = "updated_at"
    report: ColumnNames = "claude_html_output"
    text: ColumnNames = "claude_text_output"
    summary: ColumnNames = "claude_summary"
    queue_flag: ColumnNames = "bearbeiten"
    project: ColumnNames = "project_id"
    priority: ColumnNames = "priority"


class Database(_Section, frozen=True, kw_only=True):
    url: str = ""  # "" = sqlite:///<state_dir>/todos.db
    table: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_]{1,64}$")] = "stage_project_todos"
    # Reach MySQL through an OpenSSH tunnel: "user@host" or "user@host:port" (see agent/dbroute).
    ssh: str = ""
    ssh_identity: str = ""  # private key file; "" = ssh's own defaults
    ssh_known_hosts: str = ""  # known_hosts file; "" = ssh's own (~/.ssh/known_hosts)
    # TLS to a server reached directly: "require" encrypts, "verify" also checks CA and host name.
    tls: Literal["off", "require", "verify"] = "off"
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # The nodes of a cluster ("host[:port]" each, in order of preference); replaces the host in
    # database.url.  The writer fails over to the next when one is down or not ready.
    hosts: list[str] = []
    # After a failover, go back to the first node that answers this many seconds later.
    failback_after: Positive = 60.0
    # "SYSTEM": the database server's zone (MySQL), the machine's zone (SQLite); or an IANA name.
    time_zone: str = "SYSTEM"
    columns: Columns = Columns()


class Report(_Section, frozen=True, kw_only=True):
    db_format: Literal["markdown", "html_fragment", "page"] = "markdown"
    language: Literal["de", "en"] = "de"


class Behavior(_Section, frozen=True, kw_only=True):
    completion_timeout: Positive = 300.0
    emergency_timeout: Positive = 1800.0
    enable_robust_completion: bool = True
    enable_emergency_handlers: bool = True
    auto_recovery: bool = True
    auto_recovery_scope: Literal["own", "all"] = "own"
    max_retries: NonNegativeInt = 3
    retry_max_delay: Positive = 60.0
    database_timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 30.0
    health_check_interval: Positive = 300.0
    hanging_after: Positive = 3600.0
    log_max_bytes: Annotated[int, msgspec.Meta(gt=0)] = 10 * 1024 * 1024
    # How often the agent sweeps the journal and the outbox for work a lost doorbell left behind.
    sweep_interval: Positive = 2.0
    # The seed's timeout for its ssh calls: bounds the tunnel's connect and keep-alives.
    ssh_timeout: Positive = 30.0
    # Accepted from the seed's config for compatibility; the agent has no use for them.
    auto_archive: bool = True
    cleanup_orphaned: bool = True


class Collect(_Section, frozen=True, kw_only=True):
    session_dir: str = "/tmp/claude_session_{todo_id}"
    tmux_target: str = ""
    tmux_socket: str = ""  # tmux -S path or -L name; "" = the user's default server
    transcript_wait: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    tmux_timeout: Positive = 3.0
    cleanup: bool = True  # delete the session dir after a verified, archived completion
    # Paths a tcp:// peer names (transcript, cwd, tmux target) are refused: the agent cannot
    # tell which local user is asking.  Turn on only where every peer is trusted.
    remote_paths: bool = False


SessionEndAction = Literal["complete_if_open", "complete", "heartbeat", "nothing"]
# The port of the HTTP hook endpoint: fixed, so the shipped settings can name it.
HTTP_HOOK_PORT = 47613


class SessionEndMeans(_Section, frozen=True, kw_only=True):
    """What SessionEnd does, by its ``reason``; a reason not listed acts as ``other``."""

    clear: SessionEndAction = "nothing"  # /clear: the same work goes on in a new session
    resume: SessionEndAction = "nothing"  # the session is switched to another one, not ended
    logout: SessionEndAction = "complete_if_open"
    prompt_input_exit: SessionEndAction = "complete_if_open"
    bypass_permissions_disabled: SessionEndAction = "complete_if_open"
    other: SessionEndAction = "complete_if_open"

    def action(self, reason: str | None) -> SessionEndAction:
        if reason and reason in self.__struct_fields__:
            return getattr(self, reason)
        return self.other


class Hook(_Section, frozen=True, kw_only=True):
    timeout: Positive = 0.5
    stop_means: Literal["complete", "heartbeat"] = "complete"
    # A table by reason; one word (the old form) applies to every reason.
    session_end_means: SessionEndMeans | SessionEndAction = SessionEndMeans()
    on_failure: Literal["reset", "complete", "wait"] = "reset"
    final_after: Positive = 600.0  # seconds after a todo's last Stop when its result is final
    http_listen: str = f"127.0.0.1:{HTTP_HOOK_PORT}"  # "" = no HTTP hook endpoint

    def session_end_action(self, reason: str | None) -> SessionEndAction:
        means = self.session_end_means
        return means if isinstance(means, str) else means.action(reason)


class Health(_Section, frozen=True, kw_only=True):
    refused_window: Positive = 3600.0  # a refusal raises the `refused` check for this long


class Marker(_Section, frozen=True, kw_only=True):
    enabled: bool = False
    completed_file: str = "/tmp/TASK_COMPLETED"
    current_todo_file: str = "/tmp/CURRENT_TODO_ID"
    stale_after: Positive = 3600.0


class Fleet(_Section, frozen=True, kw_only=True):
    # Several agents on one MySQL database: one silent this long is a WARNING on the others.
    stale_after: Positive = 120.0


class Journal(_Section, frozen=True, kw_only=True):
    retention_days: Annotated[float, msgspec.Meta(ge=0)] = 14.0


class Predict(_Section, frozen=True, kw_only=True):
    """Predictive recovery: flag a session silent past its learned quantile of past gaps."""

    enabled: bool = True
    min_samples: Annotated[int, msgspec.Meta(ge=1)] = 50
    quantile: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.99
    act: Literal["warn", "shorten"] = "warn"
    min_timeout: Positive = 60.0  # "shorten" never brings a deadline closer than this
    history_days: Positive = 90.0  # samples older than this are forgotten


class Metrics(_Section, frozen=True, kw_only=True):
    listen: str = ""  # "HOST:PORT" serves /metrics (Prometheus) from the web process; "" = off


class Web(_Section, frozen=True, kw_only=True):
    listen: str = ""  # "HOST:PORT" serves the dashboard from the web process; "" = off
    language: Literal["en", "de"] = "en"
    tls_cert: str = ""
    tls_key: str = ""


NOTIFY_EVENTS = ("completed", "forced", "reset", "failed", "dead", "health", "agent")
NotifyEvent = Literal["completed", "forced", "reset", "failed", "dead", "health", "agent"]


class Notify(_Section, frozen=True, kw_only=True):
    """One notification target: an Apprise URL, or json:// / jsons:// for a signed webhook."""

    url: str
    name: str = ""  # "" = notify-N (its place in the list, from 1)
    events: list[NotifyEvent] = msgspec.field(
        default_factory=lambda: ["completed", "forced", "reset", "failed", "dead", "health"]
    )
    min_interval: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # coalesce what comes sooner
    language: Literal["en", "de"] = "en"
    secret: str = ""  # Standard Webhooks secret, "whsec_" + base64; json:// and jsons:// only
    timeout: Positive = 10.0


class Archive(_Section, frozen=True, kw_only=True):
    max_bytes: PositiveInt = 200 * 1024 * 1024  # one archive (apparent sizes: sparse counts)
    max_files: PositiveInt = 2000  # one archive
    max_total_bytes: PositiveInt = 4 * 1024 * 1024 * 1024  # all archives; oldest go first
    retention_days: Annotated[float, msgspec.Meta(ge=0)] = 90.0  # 0 = kept until over the total


class Limits(_Section, frozen=True, kw_only=True):
    """What one requester other than the agent's own user may send (shared sockets)."""

    requests_per_second: Positive = 20.0
    bytes_per_minute: PositiveInt = 64 * 1024 * 1024
    max_peers: PositiveInt = 512  # connections of one user at once; more are shut at once


class Config(_Section, frozen=True, kw_only=True):
    state_dir: str = ""
    endpoint: str = ""
    socket_mode: Annotated[str, msgspec.Meta(pattern=r"^0?[0-7]{3}$")] = "0600"
    socket_group: str = ""
    # Users (besides the agent's own) allowed on the socket; empty = whoever the socket's mode
    # and group let in.
    socket_allowed_uids: list[NonNegativeInt] = []
    database: Database = Database()
    behavior: Behavior = Behavior()
    collect: Collect = Collect()
    hook: Hook = Hook()
    health: Health = Health()
    marker: Marker = Marker()
    journal: Journal = Journal()
    predict: Predict = Predict()
    fleet: Fleet = Fleet()
    metrics: Metrics = Metrics()
    web: Web = Web()
    notify: list[Notify] = []
    report: Report = Report()
    archive: Archive = Archive()
    limits: Limits = Limits()
    source: str = ""  # the file this came from; set by load(), not by the user

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{Path(self.state_dir) / 'todos.db'}"

    @property
    def logs_dir(self) -> Path:
        return Path(self.state_dir) / "logs"

    @property
    def outbox_dir(self) -> Path:
        return Path(self.state_dir) / "outbox"

    @property
    def archive_dir(self) -> Path:
        return Path(self.state_dir) / "archive"

    @property
    def journal_path(self) -> Path:
        return Path(self.state_dir) / "journal.db"

    @property
    def stream_socket_path(self) -> Path | None:
        """The one-shot clients' stream socket (agent.streamdoor), beside the ipc endpoint's
        socket; None for a tcp:// endpoint, or when the path would be over the kernel's limit
        (the clients then use the ZeroMQ socket)."""
        if not self.endpoint.startswith("ipc://"):
            return None
        path = self.endpoint[len("ipc://") :] + STREAM_SUFFIX
        return Path(path) if len(os.fsencode(path)) <= IPC_PATH_MAX else None

    @property
    def hook_token_path(self) -> Path:
        return Path(self.state_dir) / "hook-token"

    @property
    def pid_path(self) -> Path:
        return Path(self.state_dir) / "completiond.pid"

    def session_dir_for(self, todo_id: int) -> str:
        return self.collect.session_dir.replace("{todo_id}", str(todo_id))


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "completion"


def find_config_file(explicit: str | None = None) -> Path | None:
    """--config, then $COMPLETION_CONFIG, then the XDG config dir, then /etc; None = defaults."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("COMPLETION_CONFIG")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    for base in (Path(xdg) / "completion", Path("/etc/completion")):
        for name in ("config.toml", "config.json"):
            if (base / name).is_file():
                return base / name
    return None


_PATH_IN_MESSAGE = re.compile(r"`\$\.?([^`]*)`")


def _explain(exc: msgspec.DecodeError, path: Path) -> str:
    # msgspec says "... - at `$.behavior.max_retries`"; users write behavior.max_retries.
    text = _PATH_IN_MESSAGE.sub(lambda m: f"`{m.group(1) or '(top level)'}`", str(exc))
    return f"{path}: {text}"


def parse(data: bytes, path: Path) -> Config:
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            config = msgspec.toml.decode(data, type=Config)
        elif suffix == ".json":
            config = msgspec.json.decode(data, type=Config)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml or .json")
    except msgspec.DecodeError as exc:
        raise ConfigError(_explain(exc, path)) from None
    if config.source:
        raise ConfigError(f"{path}: unknown field `source` (it is set by the agent, not the file)")
    return config


def load(explicit: str | None = None) -> Config:
    """Find, read, validate and complete the configuration (defaults filled in)."""
    path = find_config_file(explicit)
    if path is None:
        config = Config()
    else:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        config = parse(data, path)
    return _complete(config, path)


CACHE_FORMAT = 1


def load_for_client(explicit: str | None = None) -> Config:
    """``load`` for the hot path of ``completionctl`` (hook, complete, start, heartbeat).

    A TOML file is decoded once and kept as JSON in ``$XDG_CACHE_HOME/completion`` (0600 in a
    0700 dir), keyed by the file's path and stamped with its device, inode, size, mtime and
    ctime (and this module's own mtime, so an upgrade with new fields is not served a stale
    shape): any edit, replacement or touch of the file reads it afresh. The copy has no
    database password: the client never talks to the database, so the returned config's
    ``database.url`` is masked (and the ``[[notify]]`` targets, tokens and secrets, left out).
    Where the cache cannot be used, the file is simply parsed.
    """
    path = find_config_file(explicit)
    if path is None or path.suffix.lower() != ".toml":
        return load(explicit)
    try:
        st = path.stat()
        stamp = [
            CACHE_FORMAT,
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            os.stat(__file__).st_mtime_ns,
        ]
    except OSError:
        return load(explicit)
    cache = _cache_file(path)
    try:
        with open(cache, "rb") as f:
            cached = msgspec.json.decode(f.read(), type=_Cached)
        if cached.stamp == stamp and cached.path == os.path.abspath(path):
            return _complete(cached.config, path)
    except (OSError, msgspec.DecodeError):
        pass
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    config = parse(data, path)
    client_view = msgspec.structs.replace(
        config,
        database=msgspec.structs.replace(config.database, url=mask_url(config.database.url)),
        notify=[],  # notification URLs and secrets stay in the file only
    )
    record = _Cached(path=os.path.abspath(path), stamp=stamp, config=client_view)
    _write_cache(cache, msgspec.json.encode(record))
    return _complete(client_view, path)


class _Cached(msgspec.Struct, frozen=True):
    path: str
    stamp: list[int]
    config: Config


def _cache_file(path: Path) -> Path:
    # crc32, not a hash from hashlib (whose import alone costs more than the TOML parse saved):
    # two keys that collide only share a file, whose path and stamp then miss.
    import binascii

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    # One copy per installation too: two of them (another version, a venv) do not take turns.
    key = binascii.crc32(os.fsencode(f"{os.path.abspath(path)}\0{__file__}"))
    return Path(base) / "completion" / f"config-{key:08x}.json"


def _write_cache(cache: Path, data: bytes) -> None:
    """Write the copy atomically, private to the user; a cache that cannot be written is none."""
    try:
        cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temp = cache.with_name(f".{cache.name}.{os.getpid()}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(temp, cache)
    except OSError:
        pass


def _complete(config: Config, path: Path | None) -> Config:
    state_dir = Path(config.state_dir).expanduser() if config.state_dir else default_state_dir()
    if not state_dir.is_absolute():
        base = path.parent if path else Path.cwd()
        state_dir = (base / state_dir).resolve()
    endpoint = config.endpoint or f"ipc://{state_dir / 'completiond.sock'}"
    validate_endpoint(endpoint)
    url = config.database.url
    if url:
        try:
            parse_url(url)
        except ValueError as exc:
            raise ConfigError(f"database.url: {exc}") from None
    _check_ssh_tls(config.database, url)
    if config.database.table == "completion_log":
        raise ConfigError(
            "database.table: completion_log is the agent's own audit table; name the todo table"
        )
    if config.database.time_zone != "SYSTEM":
        # Imported here: the hook's hot path loads this module and rarely needs a zone.
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(config.database.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"database.time_zone: {config.database.time_zone!r} is not an IANA zone name "
                "(e.g. Europe/Berlin) or SYSTEM"
            ) from None
    if config.behavior.emergency_timeout < config.behavior.completion_timeout:
        raise ConfigError(
            "behavior.emergency_timeout must not be shorter than behavior.completion_timeout"
        )
    for key, listen in (
        ("metrics.listen", config.metrics.listen),
        ("web.listen", config.web.listen),
    ):
        if listen:
            split_listen(listen, key)
    web = config.web
    if (
        web.listen
        and not is_loopback(split_listen(web.listen, "web.listen")[0])
        and not (web.tls_cert and web.tls_key)
    ):
        raise ConfigError(
            f"web.listen: {config.web.listen!r} is not a loopback address; the dashboard "
            "shows private todo output, so set web.tls_cert and web.tls_key (or listen on "
            "127.0.0.1)"
        )
    notify = []
    names: set[str] = set()
    for index, target in enumerate(config.notify, 1):
        name = target.name or f"notify-{index}"
        if name in names:
            raise ConfigError(f"notify[{index}].name: {name!r} is used twice")
        names.add(name)
        scheme = target.url.split("://", 1)[0].lower() if "://" in target.url else ""
        if not scheme:
            raise ConfigError(f"notify[{index}].url: {mask_secret_url(target.url)!r} has no scheme")
        if target.secret:
            if scheme not in ("json", "jsons"):
                raise ConfigError(
                    f"notify[{index}].secret: only json:// and jsons:// webhooks are signed"
                )
            if not _valid_whsec(target.secret):
                raise ConfigError(
                    f"notify[{index}].secret: must be whsec_ followed by base64 (the Standard "
                    'Webhooks form), e.g. from `python3 -c "import base64,os; '
                    "print('whsec_' + base64.b64encode(os.urandom(24)).decode())\"`"
                )
        notify.append(msgspec.structs.replace(target, name=name))
    http_listen_address(config.hook.http_listen)
    return msgspec.structs.replace(
        config,
        notify=notify,
        state_dir=str(state_dir),
        endpoint=endpoint,
        source=str(path) if path else "",
    )


SSH_DESTINATION = re.compile(
    r"^([A-Za-z0-9._][A-Za-z0-9._-]*)@([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?$"
)


def parse_ssh(value: str) -> tuple[str, str, int]:
    """`user@host[:port]` (an IPv6 host in brackets) as (user, host, port); ConfigError if bad."""
    m = SSH_DESTINATION.match(value)
    port = int(m.group(3)) if m and m.group(3) else 22
    if not m or not 0 < port < 65536 or m.group(2).startswith("-"):
        raise ConfigError(
            f"database.ssh: {value!r} is not a destination: use user@host or user@host:port"
        )
    return m.group(1), m.group(2).strip("[]"), port


def _check_ssh_tls(db: Database, url: str) -> None:
    if (db.ssh or db.tls != "off") and not is_mysql(url):
        key = "database.ssh" if db.ssh else "database.tls"
        raise ConfigError(f"{key} needs a MySQL database: set database.url to mysql://...")
    if db.hosts and not url.startswith("mysql://"):
        raise ConfigError("database.hosts needs a MySQL database: set database.url to mysql://...")
    for node in db.hosts:
        if not re.match(r"^([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?$", node):
            raise ConfigError(f"database.hosts: {node!r} is not host or host:port")
    if db.ssh and (db.hosts or "," in url.partition("@")[2].partition("/")[0]):
        raise ConfigError("database.ssh leads to one server: it cannot go with several hosts")
    if db.ssh:
        parse_ssh(db.ssh)
    elif db.ssh_identity or db.ssh_known_hosts:
        raise ConfigError("database.ssh_identity and ssh_known_hosts need database.ssh")
    for key in ("ssh_identity", "ssh_known_hosts", "tls_ca", "tls_cert", "tls_key"):
        value = getattr(db, key)
        if value and not Path(value).is_absolute():
            raise ConfigError(f"database.{key}: {value!r} must be an absolute path")
    if bool(db.tls_cert) != bool(db.tls_key):
        raise ConfigError("database.tls_cert and database.tls_key go together: set both or none")
    if db.tls == "off" and (db.tls_ca or db.tls_cert):
        raise ConfigError("database.tls_ca/tls_cert/tls_key need database.tls = require or verify")


def http_listen_address(listen: str) -> tuple[str, int] | None:
    """``hook.http_listen`` as (host, port); None when it is off ("")."""
    if not listen:
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"hook.http_listen: {listen!r} must be HOST:PORT (e.g. 127.0.0.1:{HTTP_HOOK_PORT}), "
            'or "" to turn the HTTP hook endpoint off'
        )
    return host.strip("[]"), int(port)


def validate_endpoint(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        length = len(os.fsencode(endpoint[len("ipc://") :]))
        if length > IPC_PATH_MAX:
            raise ConfigError(
                f"endpoint: the ipc path is {length} bytes, over the kernel's limit of "
                f"{IPC_PATH_MAX}; set a shorter state_dir or endpoint"
            )
    elif not endpoint.startswith("tcp://"):
        raise ConfigError(f"endpoint: {endpoint!r} must start with ipc:// or tcp://")


def tmux_socket_args(socket: str | None) -> list[str]:
    """tmux's server arguments for collect.tmux_socket: ``-S path`` for a socket path, ``-L
    name`` for a socket name, nothing for the user's default server.  Everyone running tmux
    for the agent builds them here."""
    if not socket:
        return []
    return ["-S", socket] if "/" in socket else ["-L", socket]


def read_todo_hint(config: Config, owners: frozenset[int] | None = None) -> str | None:
    """What the CURRENT_TODO_ID file (marker.current_todo_file) holds, stripped; None when it
    is missing, unreadable or empty, or not to be trusted: it must be a regular file (not a
    symlink, not a FIFO: the read never blocks) owned by one of ``owners`` (default: this
    process's user) and not writable by everybody.  ``protocol.parse_todo_id`` tells whether
    it is an id."""
    from protocol.markers import read_marker

    try:
        text = read_marker(config.marker.current_todo_file, owners or frozenset({os.geteuid()}))
    except OSError:
        return None
    return text.strip() or None


def split_listen(listen: str, key: str = "listen") -> tuple[str, int]:
    """ "HOST:PORT" (IPv6 as "[::1]:PORT") -> (host, port); ConfigError names ``key``."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {listen!r} must be HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _valid_whsec(secret: str) -> bool:
    import base64
    import binascii

    if not secret.startswith("whsec_"):
        return False
    try:
        return len(base64.b64decode(secret[len("whsec_") :], validate=True)) >= 16
    except (binascii.Error, ValueError):
        return False


def mask_secret_url(url: str) -> str:
    """A notification URL as logs and status show it: scheme and host, nothing that may be a
    token (Apprise URLs carry tokens in the user, the password, the path and the query)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable url>"
    scheme = parts.scheme or "?"
    rest = "/***" if (parts.path.strip("/") or parts.query or parts.username) else ""
    return f"{scheme}://{host}{port}{rest}"
