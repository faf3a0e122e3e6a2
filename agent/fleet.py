"""Several agents on one MySQL/MariaDB (or Galera cluster): the fleet registry's agent side.

- The writer upserts this agent's row (`<prefix>completion_agents`) every sweep (`Beacon`), and
  records a claim for every todo whose start it applied.
- The monitor's health round lists the fleet: an agent silent past `fleet.stale_after` is a
  WARNING; a todo whose claiming agent has been silent past `hanging_after` is taken over by
  exactly one survivor (a compare-and-set on the claim) and force-completed like a hanging todo
  of its own.  No election, no coordinator: the database's row decides.
"""

from __future__ import annotations

import hashlib
import os
import socket
from datetime import UTC, datetime
from importlib import metadata

from protocol.config import Config

from .store import StoreError
from .store.fleet import AgentBeat, Fleet, FleetMember, fleet_of

SEVERITY = {"OK": 0, "UNKNOWN": 1, "WARNING": 1, "CRITICAL": 2}


def agent_id(config: Config) -> str:
    """Stable across restarts of the same agent (host + state dir), distinct between agents."""
    digest = hashlib.sha256(str(config.state_path).encode()).hexdigest()[:10]
    return f"{socket.gethostname()}:{digest}"


def version() -> str:
    try:
        return metadata.version("completion-agent")
    except metadata.PackageNotFoundError:
        return "unknown"


class Beacon:
    """The writer's side: this agent's row, every `interval` seconds, and its claims."""

    def __init__(self, config: Config, interval: float) -> None:
        self.config = config
        self.enabled = config.database_url.startswith("mysql://")
        self.id = agent_id(config)
        self.interval = interval
        self.started_at = datetime.now(UTC).replace(tzinfo=None)
        self.next_at = 0.0
        self._ready_for: object = None  # the store the tables were ensured on
        self.error: str | None = None

    def _fleet(self, store) -> Fleet:
        fleet = fleet_of(store)
        if self._ready_for is not store:
            fleet.ensure()
            self._ready_for = store
        return fleet

    def due(self, now: float) -> bool:
        return self.enabled and now >= self.next_at

    def beat(self, store, now: float, *, backlog: int, health: str) -> str | None:
        """Upsert the row; the error as a sentence when it failed (the next sweep tries again)."""
        self.next_at = now + self.interval
        try:
            self._fleet(store).beat(
                AgentBeat(
                    agent_id=self.id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    version=version(),
                    started_at=self.started_at,
                    backlog=backlog,
                    health=health,
                    node=str(getattr(store, "node", "")),
                )
            )
        except StoreError as exc:
            self._ready_for = None
            changed = self.error != str(exc)
            self.error = str(exc)
            return str(exc) if changed else None
        self.error = None
        return None

    def claim(self, store, todo_ids: list[int]) -> str | None:
        if not self.enabled or not todo_ids:
            return None
        try:
            self._fleet(store).claim(todo_ids, self.id)
        except StoreError as exc:
            self._ready_for = None
            return str(exc)
        return None


def worst(statuses: list[str]) -> str:
    if not statuses:
        return "UNKNOWN"
    return max(statuses, key=lambda s: SEVERITY.get(s, 1))


def stale_members(members: list[FleetMember], me: str, stale_after: float) -> list[FleetMember]:
    return [m for m in members if m.agent_id != me and m.age > stale_after]


def describe(member: FleetMember, stale_after: float) -> str:
    state = "STALE" if member.age > stale_after else member.health
    return (
        f"{member.agent_id} on {member.host} pid {member.pid} v{member.version}: {state}, "
        f"seen {member.age:.0f} s ago, backlog {member.backlog}"
        + (f", node {member.node}" if member.node else "")
    )
