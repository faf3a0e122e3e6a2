"""Auto-recovery: what the health round (agent/health.py) does about what its checks found.

Each action goes into the journal like any request (through its named transitions), is logged,
and is keyed so it is never taken twice: a hang by its todo and the start of its silence, an
inconsistency likewise, an orphaned session dir by its inode and change time.
"""

from __future__ import annotations

import os
from pathlib import Path

from loguru import logger

from protocol.config import Config
from protocol.markers import trusted_stat

from . import access, reasons
from .archive import archive_orphan, archived_before, enforce_bounds, remove_tree
from .journal import Journal


class Recovery:
    def __init__(self, config: Config) -> None:
        self.config = config
        # Orphans archived (and warnings given), by (path, inode, mtime): each is handled once.
        self._archived_orphans: set[tuple[str, int, int]] = set()

    def force_complete(self, journal: Journal, todo_id: int, since: float, now: float) -> bool:
        """Queue one emergency completion for a hanging todo, unless one is already in hand.

        Keyed by the todo and the start of its silence, so it is taken once per hang; another
        agent sharing the database that acts on the same todo loses the writer's
        compare-and-set and is recorded as a duplicate that changes nothing.
        """
        completion_id = f"hang-{todo_id}-{int(since)}"
        added = journal.force_completion(
            todo_id,
            completion_id,
            reasons.english(
                "hanging",
                silent=f"{now - since:.0f}",
                limit=f"{self.config.behavior.hanging_after:.0f}",
            ),
            now,
        )
        if added:
            logger.bind(todo_id=todo_id, completion_id=completion_id, emergency=True).warning(
                "auto-recovery: forced completion of hanging todo {} (silent for {:.0f} s)",
                todo_id,
                now - since,
            )
        return added

    def reset_inconsistent(self, journal: Journal, todo_id: int, since: float, now: float) -> bool:
        completion_id = f"fix-{todo_id}-{int(since)}"
        added = journal.reset_if_idle(todo_id, completion_id, reasons.english("no_session"), now)
        if added:
            logger.bind(todo_id=todo_id, completion_id=completion_id, emergency=True).warning(
                "auto-recovery: todo {} is in_progress in the database, but this agent's session "
                "for it ended {:.0f} s ago and nothing waits to be written; resetting it to offen",
                todo_id,
                now - since,
            )
        return added

    def archive_orphan(
        self, todo_id: int, path: Path, served: frozenset[int], now: float
    ) -> bool | None:
        """Archive and remove one orphan: None when nothing was done, else whether it could be
        removed after the archive.  Only a dir of a user the agent acts for, and each dir (by
        inode and change time) once: one that cannot be removed is not archived every round."""
        log = logger.bind(todo_id=todo_id)
        try:
            fd = access.open_session_dir(path, served)
        except OSError as exc:
            key = (str(path), 0, 0)
            if key not in self._archived_orphans:  # said once, not every round
                self._archived_orphans.add(key)
                log.warning("orphan {} left alone: {}", path, exc.strerror or exc)
            return None
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        key = (str(path), info.st_ino, info.st_mtime_ns)
        if key in self._archived_orphans:
            return None
        earlier = archived_before(self.config.archive_dir, path, info)
        if earlier is not None:  # archived by an earlier monitor, and not removable since
            self._archived_orphans.add(key)
            log.warning("orphan {} was archived before ({}); not again", path, earlier.name)
            return None
        bounds = self.config.archive
        try:
            result = archive_orphan(
                self.config.archive_dir,
                path,
                now,
                session_owners=served,
                max_bytes=bounds.max_bytes,
                max_files=bounds.max_files,
            )
        except OSError as exc:
            log.error("could not archive orphan {}: {}", path, exc)
            return None
        self._archived_orphans.add(key)
        enforce_bounds(self.config, now)
        removed = remove_tree(path)
        log.warning(
            "auto-recovery: archived orphaned session dir {} (no live todo) into {}; {}",
            path,
            result.path,
            "removed it" if removed is None else f"could not remove it ({removed})",
        )
        return removed is None

    def remove_stale_markers(self, names: list[str]) -> list[str]:
        """Remove the stale legacy marker files this agent's users own; the ones removed."""
        removed = []
        served = access.served_uids(self.config)
        for name in names:
            try:
                trusted_stat(name, served)  # another user's file is not ours to remove
                os.unlink(name)
                removed.append(name)
                logger.warning("auto-recovery: removed stale marker {}", name)
            except OSError as exc:
                logger.error("could not remove stale marker {}: {}", name, exc)
        return removed
