"""The fleet registry on MySQL/MariaDB: one row per agent, and who started which todo.

`<prefix>completion_agents` (prefix: the todo table's, `stage_` for `stage_project_todos`) holds
each agent's id, host, pid, version, start, last sighting, backlog and health, upserted by its
writer every sweep.  `<prefix>completion_claims` says which agent started a todo.  Times are the
server's (`UTC_TIMESTAMP(6)`), and ages are computed by the server, so the hosts' clocks do not
matter.  A survivor takes over a vanished agent's todo with one compare-and-set UPDATE on its
claim: whoever changes the row won; everyone else sees 0 rows and stands down.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .base import LOG_TABLE, PermanentError, StoreError, log_table_for


def table_prefix(todo_table: str) -> str:
    """The prefix the audit table gets (`stage_` for `stage_project_todos`; see base)."""
    return log_table_for(todo_table).removesuffix(LOG_TABLE)


@dataclass(frozen=True, slots=True)
class AgentBeat:
    agent_id: str
    host: str
    pid: int
    version: str
    started_at: datetime  # naive UTC
    backlog: int
    health: str  # OK | WARNING | CRITICAL | UNKNOWN
    node: str = ""


@dataclass(frozen=True, slots=True)
class FleetMember:
    agent_id: str
    host: str
    pid: int
    version: str
    started_at: datetime
    last_seen: datetime
    age: float  # seconds since last_seen, by the server's clock
    backlog: int
    health: str
    node: str


class Fleet:
    """Fleet operations on a MysqlStore's connection (same locks, same error handling)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        prefix = table_prefix(store.table)
        self.agents = f"`{prefix}completion_agents`"
        self.claims = f"`{prefix}completion_claims`"

    def ensure(self) -> None:
        """Create the two tables where missing.  Existence is checked first: a CREATE, even
        IF NOT EXISTS, is DDL that Galera runs in total order across the cluster, aborting
        what conflicts with it."""
        s = self.store
        with s._lock, s._transaction(write=True) as cur:
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.TABLES"
                " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN (%s, %s)",
                (self.agents.strip("`"), self.claims.strip("`")),
            )
            if int(cur.fetchone()[0]) == 2:
                return
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {self.agents} ("
                "`agent_id` VARCHAR(128) COLLATE utf8mb4_bin NOT NULL, "
                "`host` VARCHAR(255) NOT NULL, "
                "`pid` INT NOT NULL, "
                "`version` VARCHAR(32) NOT NULL, "
                "`started_at` DATETIME NOT NULL, "
                "`last_seen` DATETIME(6) NOT NULL, "
                "`backlog` INT NOT NULL DEFAULT 0, "
                "`health` VARCHAR(16) NOT NULL DEFAULT 'UNKNOWN', "
                "`node` VARCHAR(255) NOT NULL DEFAULT '', "
                "PRIMARY KEY (`agent_id`)"
                ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
            )
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {self.claims} ("
                "`todo_id` BIGINT NOT NULL, "
                "`agent_id` VARCHAR(128) COLLATE utf8mb4_bin NOT NULL, "
                "`claimed_at` DATETIME(6) NOT NULL, "
                "PRIMARY KEY (`todo_id`)"
                ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"
            )

    def beat(self, beat: AgentBeat) -> None:
        s = self.store
        with s._lock, s._transaction(write=True) as cur:
            cur.execute(
                f"INSERT INTO {self.agents} (agent_id, host, pid, version, started_at, last_seen,"
                " backlog, health, node) VALUES (%s, %s, %s, %s, %s, UTC_TIMESTAMP(6), %s, %s, %s)"
                " ON DUPLICATE KEY UPDATE host = VALUES(host), pid = VALUES(pid),"
                " version = VALUES(version), started_at = VALUES(started_at),"
                " last_seen = VALUES(last_seen), backlog = VALUES(backlog),"
                " health = VALUES(health), node = VALUES(node)",
                (
                    beat.agent_id,
                    beat.host[:255],
                    beat.pid,
                    beat.version[:32],
                    beat.started_at.replace(microsecond=0),
                    beat.backlog,
                    beat.health[:16],
                    beat.node[:255],
                ),
            )

    def members(self) -> list[FleetMember]:
        s = self.store
        with s._lock, s._transaction(write=False) as cur:
            cur.execute(
                "SELECT agent_id, host, pid, version, started_at, last_seen,"
                " TIMESTAMPDIFF(MICROSECOND, last_seen, UTC_TIMESTAMP(6)) / 1e6,"
                f" backlog, health, node FROM {self.agents} ORDER BY host, agent_id"
            )
            rows = cur.fetchall()
        return [
            FleetMember(
                str(r[0]),
                str(r[1]),
                int(r[2]),
                str(r[3]),
                r[4],
                r[5],
                float(r[6]),
                int(r[7]),
                str(r[8]),
                str(r[9]),
            )
            for r in rows
        ]

    def claim(self, todo_ids: list[int], agent_id: str) -> None:
        """This agent started these todos (a later start by another agent takes them over)."""
        if not todo_ids:
            return
        s = self.store
        with s._lock, s._transaction(write=True) as cur:
            cur.executemany(
                f"INSERT INTO {self.claims} (todo_id, agent_id, claimed_at)"
                " VALUES (%s, %s, UTC_TIMESTAMP(6)) ON DUPLICATE KEY UPDATE"
                " agent_id = VALUES(agent_id), claimed_at = VALUES(claimed_at)",
                [(int(t), agent_id) for t in todo_ids],
            )

    def orphans(self, me: str, silent_for: float) -> list[tuple[int, str, float]]:
        """(todo id, owner, owner's silence in s): in_progress todos whose claiming agent has
        not been seen for `silent_for` seconds (and is not `me`)."""
        s = self.store
        with s._lock, s._transaction(write=False) as cur:
            cur.execute(
                "SELECT c.todo_id, c.agent_id,"
                " TIMESTAMPDIFF(MICROSECOND, a.last_seen, UTC_TIMESTAMP(6)) / 1e6"
                f" FROM {self.claims} c JOIN {self.agents} a ON a.agent_id = c.agent_id"
                f" JOIN {s._t} t ON t.id = c.todo_id"
                " WHERE t.status = 'in_progress' AND c.agent_id <> %s"
                " AND a.last_seen < UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND"
                " ORDER BY c.todo_id",
                (me, int(silent_for * 1e6)),
            )
            return [(int(r[0]), str(r[1]), float(r[2])) for r in cur.fetchall()]

    def take_over(self, todo_id: int, owner: str, me: str) -> bool:
        """Compare-and-set: the claim passes from `owner` to `me` only if `owner` still holds
        it.  True for exactly one of the agents that try."""
        s = self.store
        with s._lock, s._transaction(write=True) as cur:
            changed = cur.execute(
                f"UPDATE {self.claims} SET agent_id = %s, claimed_at = UTC_TIMESTAMP(6)"
                " WHERE todo_id = %s AND agent_id = %s",
                (me, int(todo_id), owner),
            )
        return int(changed or 0) == 1


def fleet_of(store: Any) -> Fleet:
    """The fleet registry of `store`; PermanentError on the embedded SQLite (one host only)."""
    if not hasattr(store, "target"):
        raise PermanentError(
            "the fleet registry needs MySQL/MariaDB (the embedded SQLite is local)"
        )
    return Fleet(store)


__all__ = ["AgentBeat", "Fleet", "FleetMember", "StoreError", "fleet_of", "table_prefix"]
