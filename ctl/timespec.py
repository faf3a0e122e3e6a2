"""Times on the command line: ``--in 10m`` and ``--at 2026-12-24T18:00``.

A time without an offset is read in the site's zone: ``database.time_zone`` when it names an
IANA zone, else this machine's local zone.
"""

from __future__ import annotations

import re
from datetime import datetime

from protocol.config import Config

_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(min|[smhd]?)", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "10m", "1h30m", "2d"; ValueError with a sentence otherwise."""
    compact = text.strip().replace(" ", "")
    pos, total = 0, 0.0
    while pos < len(compact):
        match = _PART.match(compact, pos)
        if match is None or match.end() == pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2).lower()]
        pos = match.end()
    if not compact or pos != len(compact):
        raise ValueError(f"{text!r} is not a duration: write e.g. 90s, 10m, 1h30m or 2d")
    return total


def site_zone(config: Config):
    """The zone a time without an offset means; None = this machine's local zone."""
    name = getattr(config.database, "time_zone", "") or ""
    if not name or name.upper() == "SYSTEM":
        return None
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"database.time_zone {name!r} is not a known time zone") from None


def parse_at(text: str, config: Config) -> datetime:
    """An ISO 8601 time; without an offset, in the site's zone."""
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: write e.g. 2026-12-24T18:00 or 2026-12-24T18:00+01:00"
        ) from None
    if at.tzinfo is None:
        zone = site_zone(config)
        at = at.replace(tzinfo=zone) if zone is not None else at.astimezone()
    return at
