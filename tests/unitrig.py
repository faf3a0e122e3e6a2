"""An in-process rig for the planned API's tests: the parent's Intake and a Monitor on one real
journal, with the time handed in by the test (no child processes, no sleeping)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import protocol as p
from agent.intake import Intake
from agent.journal import Journal
from agent.monitor import Monitor
from protocol.config import Config
from tests.harness import T0, merge
from tests.harness import unit_config as harness_unit_config


def unit_config(root: Path, extra: dict[str, Any] | None = None) -> Config:
    """tests.harness.unit_config with deadlines long enough that only the test's clock fires
    them."""
    long_deadlines = {"behavior": {"completion_timeout": 600, "emergency_timeout": 3600}}
    return harness_unit_config(root, merge(long_deadlines, extra or {}))


class UnitRig:
    def __init__(self, root: Path, extra: dict[str, Any] | None = None) -> None:
        self.root = root
        self.config = unit_config(root, extra)
        self.journal = Journal.create(self.config.journal_path)
        self.intake = Intake(self.config, self.journal, lambda: {}, T0)
        self.monitor = self.new_monitor()
        self._n = 0

    def new_monitor(self) -> Monitor:
        monitor = Monitor(self.config, clock=lambda: T0)
        monitor.initialize()
        monitor.next_check = math.inf  # health rounds have their own tests
        return monitor

    def send(self, request: p.Request, at: float) -> p.Reply:
        return self.intake.apply(request, at).reply

    def rid(self, what: str) -> str:
        self._n += 1
        return f"{what}-{self._n}"

    def start(self, todo_id: int, at: float = T0, timeout: float | None = None) -> None:
        self.send(p.Start(request_id=self.rid("start"), todo_id=todo_id, timeout=timeout), at)

    def heartbeat(self, todo_id: int, at: float) -> None:
        self.send(p.Heartbeat(request_id=self.rid("hb"), todo_id=todo_id), at)

    def complete(self, todo_id: int, at: float) -> p.Reply:
        return self.send(p.Complete(request_id=self.rid("done"), todo_id=todo_id, output="ok"), at)

    def entries(self, todo_id: int, kind: str | None = None) -> list:
        return [e for e in self.journal.entries_for_todo(todo_id) if kind is None or e.kind == kind]

    def run(self, at: float) -> float:
        return self.monitor.run_once(at)

    def check(self, name: str) -> tuple[str, str, list[int]] | None:
        for check_name, status, message, ids, _at in self.journal.checks():
            if check_name == name:
                return status, message, ids
        return None

    def close(self) -> None:
        self.monitor.shutdown()
        self.journal.close()
