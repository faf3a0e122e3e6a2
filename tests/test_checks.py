"""The health checks' registry (agent/checks.py): the report's order, who computes what, and that
the code and docs/ARCHITECTURE.md name the same checks."""

from __future__ import annotations

import re
from pathlib import Path

import protocol as p
from agent.checks import (
    CHECKS,
    LOOP_CHECKS,
    MONITOR_CHECKS,
    ChildInfo,
    Source,
    children_check,
    journal_check,
    refused_check,
    render_health,
    waiting_check,
)

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.0


def _parent() -> dict[str, p.Check]:
    return {
        "children": children_check({"writer": ChildInfo(pid=1, alive=True, restarts=0)}),
        "journal": journal_check({}, None, [], NOW),
        "refused": refused_check([]),
        "waiting_for_person": waiting_check([]),
    }


def test_names_are_unique_and_split_by_who_computes_them() -> None:
    names = [c.name for c in CHECKS]
    assert len(names) == len(set(names))
    assert MONITOR_CHECKS == (
        "database",
        "hanging_todos",
        "orphaned_sessions",
        "stale_markers",
        "db_consistency",
        "log_sizes",
    )
    assert LOOP_CHECKS == ("predicted_hangs",)
    assert {c.name for c in CHECKS if c.source is Source.PARENT} == set(_parent())


def test_every_check_the_agent_computes_is_registered() -> None:
    computed = set()
    for path in (ROOT / "agent").glob("*.py"):
        computed |= set(re.findall(r'CheckResult\(\s*"(\w+)"', path.read_text()))
    assert computed, "the pattern no longer finds the checks"
    assert computed <= {c.name for c in CHECKS}


def test_the_architecture_doc_lists_the_registry() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| ([a-z ]+) \|", text, re.M)
    assert rows == [(c.name, c.source.value) for c in CHECKS]


def test_the_report_follows_the_registry_order_with_unknowns_until_saved() -> None:
    report = render_health(_parent(), [], NOW)
    assert [c.name for c in report.checks] == [c.name for c in CHECKS if not c.optional]
    unknown = [c.name for c in report.checks if c.status == "UNKNOWN"]
    assert unknown == [c.name for c in CHECKS if c.source is not Source.PARENT and not c.optional]
    assert report.status == "OK"  # UNKNOWN counts as OK: the monitor is starting


def test_saved_checks_carry_their_age_and_the_worst_status_wins() -> None:
    saved = [
        ("database", "CRITICAL", "unreachable", [], NOW - 7),
        ("fleet", "WARNING", "agent b silent", [3], NOW - 1),
    ]
    report = render_health(_parent(), saved, NOW)
    by_name = {c.name: c for c in report.checks}
    assert by_name["database"].message == "unreachable (7 s ago)"
    assert by_name["fleet"].todo_ids == [3]
    assert [c.name for c in report.checks][-1] == "fleet"
    assert report.status == "CRITICAL"


def test_the_parents_checks() -> None:
    dead = children_check({"writer": ChildInfo(pid=None, alive=False, restarts=2)})
    assert (dead.status, dead.message.startswith("not running: writer")) == ("CRITICAL", True)
    stuck = journal_check({"collected": 2}, NOW - 301, [], NOW)
    assert (stuck.status, stuck.message) == ("WARNING", "backlog 2; the oldest has waited 301 s")
    died = journal_check({"dead": 1, "accepted": 1}, NOW, [9], NOW)
    assert (died.status, died.todo_ids) == ("CRITICAL", [9])
    refused = refused_check([(4, "no such todo"), (2, "blocked")])
    assert (refused.status, refused.todo_ids) == ("WARNING", [2, 4])
    assert "latest: no such todo" in refused.message
    waiting = waiting_check([(5, "permission_prompt")])
    assert waiting.message == "todo 5: permission_prompt"
