"""The site profile: which column of the todo table gets what, and in which time zone.

Owns the roles (`ROLES`), their defaults (the todo plugin's live table), the resolution of a
profile against the columns a table really has (done once, from information_schema or PRAGMA
table_info), and the conversion of an event's moment into what a DATETIME or TIMESTAMP column
holds in the site's zone.

Time rule: a DATETIME column holds the site's local wall-clock time of the moment the event
happened (what the plugin's `NOW()` / `current_time('mysql')` writes); a MySQL TIMESTAMP column is
written in UTC through a `+00:00` session, so the server stores the right instant and shows it in
any reader's zone. `time_zone = "SYSTEM"` means the database server's own zone on MySQL (the zone
its `NOW()` uses) and the machine's local zone on SQLite.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# role -> (default columns, what the column is for, in the words `check` prints)
ROLES: dict[str, tuple[tuple[str, ...], str]] = {
    "started": (("started_at", "execution_started_at"), "start time (set where NULL)"),
    "completed": (("completed_at", "completed_date"), "completion time"),
    "updated": (("updated_at",), "time of the agent's last change"),
    "report": (("claude_html_output",), "the report"),
    "text": (("claude_text_output",), "the plain output"),
    "summary": (("claude_summary",), "the one-line summary"),
    "queue_flag": (("bearbeiten",), "queue flag for `add` (1 = queued)"),
    "project": (("project_id",), "project id for `add`"),
    "priority": (("priority",), "priority for `add`"),
}
TIME_ROLES = ("started", "completed", "updated")
OUTPUT_ROLES = ("report", "text", "summary")
SYSTEM = "SYSTEM"

_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,64}")


def parse_columns(value: str | Sequence[str]) -> tuple[str, ...]:
    """A role's configured value (a name, a list of names, or "" for none) as a tuple."""
    names = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for name in names:
        if name == "":
            continue
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(f"column name {name!r} is not allowed: use letters, digits, _")
        if name not in out:
            out.append(name)
    return tuple(out)


def zone_of(name: str) -> tzinfo | None:
    """The tzinfo for an IANA name; None for "SYSTEM". ValueError names a bad zone."""
    if name == SYSTEM:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"time zone {name!r} is not an IANA zone name (e.g. Europe/Berlin) or SYSTEM"
        ) from exc


def local_zone() -> tzinfo:
    """The machine's own zone (what SYSTEM means for SQLite)."""
    zone = datetime.now().astimezone().tzinfo
    return zone if zone is not None else UTC


@dataclass(frozen=True)
class SiteProfile:
    """The configured profile: role -> column names (in the order given), and the zone name."""

    columns: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {role: spec[0] for role, spec in ROLES.items()}
    )
    time_zone: str = SYSTEM

    def __post_init__(self) -> None:
        unknown = sorted(set(self.columns) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown column role(s): {', '.join(unknown)}")
        zone_of(self.time_zone)  # validates

    @classmethod
    def from_settings(
        cls, columns: Mapping[str, str | Sequence[str]], time_zone: str
    ) -> SiteProfile:
        return cls({role: parse_columns(v) for role, v in columns.items()}, time_zone)

    @classmethod
    def of_config(cls, database: Any) -> SiteProfile:
        """From the config's `database` section (`columns` struct and `time_zone`)."""
        columns = {role: getattr(database.columns, role) for role in ROLES}
        return cls.from_settings(columns, database.time_zone)

    def wanted(self, role: str) -> tuple[str, ...]:
        return tuple(self.columns.get(role, ROLES[role][0]))


@dataclass(frozen=True)
class Column:
    name: str
    decl: str  # the declared type, lower case ("datetime", "timestamp", "enum('a','b')", ...)

    @property
    def is_timestamp(self) -> bool:
        return self.decl.startswith("timestamp")

    def enum_values(self) -> list[str] | None:
        if not self.decl.startswith("enum("):
            return None
        return [v.replace("''", "'") for v in re.findall(r"'((?:[^']|'')*)'", self.decl)]


@dataclass(frozen=True)
class Resolved:
    """The profile against one table: role -> the columns that exist, and what is missing."""

    present: dict[str, tuple[Column, ...]]
    missing: dict[str, tuple[str, ...]]
    table_columns: dict[str, str]

    def of(self, role: str) -> tuple[Column, ...]:
        return self.present.get(role, ())

    def first(self, role: str) -> Column | None:
        cols = self.of(role)
        return cols[0] if cols else None

    def has(self, name: str) -> bool:
        return name in self.table_columns


def resolve(profile: SiteProfile, table_columns: dict[str, str]) -> Resolved:
    present: dict[str, tuple[Column, ...]] = {}
    missing: dict[str, tuple[str, ...]] = {}
    for role in ROLES:
        wanted = profile.wanted(role)
        present[role] = tuple(Column(n, table_columns[n]) for n in wanted if n in table_columns)
        missing[role] = tuple(n for n in wanted if n not in table_columns)
    return Resolved(present, missing, dict(table_columns))


def wall_time(at: datetime, zone: tzinfo) -> str:
    """`at` (naive = UTC) as 'YYYY-MM-DD HH:MM:SS' on the wall clocks of `zone`."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


def from_wall_time(value: datetime, zone: tzinfo) -> datetime:
    """A naive wall-clock time of `zone` as naive UTC (the earlier reading when ambiguous)."""
    local = value.replace(tzinfo=zone, fold=0)
    return local.astimezone(UTC).replace(tzinfo=None, microsecond=0)


def zone_label(zone: tzinfo, at: datetime) -> str:
    """A zone's name for people: the IANA key where there is one, else its abbreviation."""
    key = getattr(zone, "key", None)
    if key:
        return str(key)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    name = at.astimezone(zone).tzname()
    if name:
        return name
    offset = at.astimezone(zone).utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    return f"UTC{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
