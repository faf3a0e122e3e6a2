"""`database.url`: the one parser (to a connection target) and the one password masker.

The config validates with it, the store connects with it, and logs, status and errors show
``mask_url(url)``.  The URL forms:

    sqlite:///ABS/PATH.db
    mysql://USER[:PASS]@HOST[:PORT]/DB
    mysql://USER[:PASS]@localhost/DB?unix_socket=/run/mysqld/mysqld.sock
    mysql://USER[:PASS]@HOST1[:PORT],HOST2[:PORT],.../DB   (the nodes of a cluster, in order)

(``mariadb://`` and ``mysql+pymysql://`` mean ``mysql://``.)  User, password and database are
percent-decoded.  Nothing here ever puts a password into an error message or a repr.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, unquote

import msgspec  # not dataclasses: the hook's hot path validates the URL and imports this

MYSQL_SCHEMES = ("mysql", "mariadb", "mysql+pymysql")


class SqliteTarget(msgspec.Struct, frozen=True):
    path: Path


class MysqlTarget(msgspec.Struct, frozen=True):
    user: str
    password: str
    host: str
    port: int
    database: str
    unix_socket: str | None = None
    # Several hosts (a Galera cluster): all of them in order, the first being host:port.
    nodes: tuple[tuple[str, int], ...] = ()

    def __repr__(self) -> str:  # never the password
        return f"MysqlTarget({self.redacted()!r})"

    @property
    def all_nodes(self) -> tuple[tuple[str, int], ...]:
        return self.nodes or ((self.host, self.port),)

    def redacted(self) -> str:
        where = ",".join(node_name(h, p) for h, p in self.all_nodes)
        if self.unix_socket is not None:
            where = self.host
        user = f"{self.user}:***" if self.password else self.user
        query = f"?unix_socket={self.unix_socket}" if self.unix_socket else ""
        return f"mysql://{user}@{where}/{self.database}{query}"


def node_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def with_nodes(target: MysqlTarget, nodes: list[str]) -> MysqlTarget:
    """`target` with its hosts replaced by `nodes` ("host[:port]" each; database.hosts)."""
    parsed = tuple(_host_port(n, n) for n in nodes)
    if not parsed:
        return target
    (host, port), *_ = parsed
    return msgspec.structs.replace(
        target, host=host, port=port, nodes=parsed if len(parsed) > 1 else ()
    )


def _host_port(hostport: str, shown: str) -> tuple[str, int]:
    if hostport.startswith("["):  # [IPv6]:port
        host, bracket, portpart = hostport[1:].partition("]")
        if not bracket or (portpart and not portpart.startswith(":")):
            raise ValueError(f"database URL {shown!r} has a malformed [IPv6] host")
        port_text = portpart[1:]
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise ValueError(f"database URL {shown!r} names no host: use mysql://USER@HOST/DB")
    port = 3306
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(
                f"database URL {shown!r} has an invalid port {port_text!r}: use 1-65535"
            )
        port = int(port_text)
    return host, port


def is_mysql(url: str) -> bool:
    """Whether ``url`` names a MySQL/MariaDB server (any of its schemes)."""
    return url.partition("://")[0].lower() in MYSQL_SCHEMES


def mask_url(url: str) -> str:
    """`url` with any password replaced by ***, safe for logs and messages.

    The user info ends at the last "@" of the URL, so a password holding "/", "?", "#" or "@"
    (which a URL should percent-encode, but people paste) is hidden whole; at worst more than
    the password is hidden, never less.
    """
    head, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, tail = rest.rpartition("@")
    if at and ":" in userinfo:
        return f"{head}://{userinfo.split(':', 1)[0]}:***@{tail}"
    return url


redact_url = mask_url  # the store's name for it


def parse_url(url: str) -> SqliteTarget | MysqlTarget:
    """Parse a database URL; raise ValueError with a sentence (never the password) if it is bad."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(
            f"database URL {mask_url(str(url))!r} is not a URL: use sqlite:///ABS/PATH.db "
            "or mysql://USER:PASS@HOST:PORT/DB"
        )
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "sqlite":
        return _parse_sqlite(url, rest)
    if scheme in MYSQL_SCHEMES:
        return _parse_mysql(url, rest)
    raise ValueError(
        f"database URL {mask_url(url)!r} has scheme {scheme!r}: use sqlite:// or mysql://"
    )


def _parse_sqlite(url: str, rest: str) -> SqliteTarget:
    path, _, query = rest.partition("?")
    if query:
        raise ValueError(f"sqlite URL {url!r} takes no query parameters")
    # sqlite:///abs/path -> rest == "/abs/path"; anything before that slash is a host.
    # SQLAlchemy's sqlite:////abs/path means the same file, so extra slashes are accepted.
    if not path.startswith("/"):
        raise ValueError(
            f"sqlite URL {url!r} needs an absolute path with three slashes: sqlite:///ABS/PATH.db"
        )
    p = Path("/" + unquote(path).lstrip("/"))
    if p.name in ("", ".", ".."):
        raise ValueError(f"sqlite URL {url!r} names a directory, not a database file")
    return SqliteTarget(p)


def _parse_mysql(url: str, rest: str) -> MysqlTarget:
    shown = mask_url(url)
    form = "mysql://USER[:PASS]@HOST[:PORT]/DB[?unix_socket=/PATH]"
    # The user info ends at the last "@" (as in mask_url): a password may hold "/", "?" or "#".
    userinfo, at, rest = rest.rpartition("@")
    rest, _, query = rest.partition("?")
    hostport, slash, dbpath = rest.partition("/")
    if not at or not userinfo:
        raise ValueError(f"database URL {shown!r} names no user: use {form}")
    user, _, password = userinfo.partition(":")
    user, password = unquote(user), unquote(password)
    if not user:
        raise ValueError(f"database URL {shown!r} names no user: use {form}")
    if not hostport:
        raise ValueError(f"database URL {shown!r} names no host: use {form}")
    nodes = tuple(_host_port(part, shown) for part in hostport.split(","))
    (host, port), *_ = nodes
    database = unquote(dbpath)
    if not slash or not database or "/" in database:
        raise ValueError(f"database URL {shown!r} names no single database: use {form}")
    unix_socket = None
    if query:
        try:
            params = parse_qs(query, strict_parsing=True)
        except ValueError:
            raise ValueError(f"database URL {shown!r} has a malformed query string") from None
        unknown = sorted(set(params) - {"unix_socket"})
        if unknown:
            raise ValueError(
                f"database URL {shown!r} has unknown parameter(s) {', '.join(unknown)}: "
                "only unix_socket is understood"
            )
        (unix_socket,) = params["unix_socket"][-1:]
        if not unix_socket.startswith("/"):
            raise ValueError(f"database URL {shown!r}: unix_socket must be an absolute path")
    if len(nodes) > 1 and unix_socket:
        raise ValueError(f"database URL {shown!r}: unix_socket goes with one host only")
    return MysqlTarget(
        user, password, host, port, database, unix_socket, nodes if len(nodes) > 1 else ()
    )
