"""Shared fixtures: a short private directory per test, and real agents inside it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Agent, short_tmp

pytest_plugins = ["tests.dbfixtures", "tests.galera"]

# On CI (.ci/run) every tool the tests drive is installed: a skip there means a test did not run,
# and must fail instead of passing quietly. On a laptop, skips stay skips.
NO_SKIPS = os.environ.get("COMPLETION_NO_SKIPS") == "1"


# Fixtures that start real processes (agents and their children): every test using one is slow,
# so `pytest -m "not slow"` is the quick run of everything else.  Modules whose every test starts
# processes of its own say so with a module-level `pytestmark = pytest.mark.slow`.
PROCESS_FIXTURES = frozenset({"agent", "make_agent", "mysql_agent", "tmux_for", "tmux_socket"})
# Modules whose every test runs programs (the bench, supervisord, systemd-analyze, logrotate).
SLOW_MODULES = frozenset({"test_bench", "test_supervisord", "test_systemd", "test_logrotate"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())) or (
            module is not None and module.__name__.rpartition(".")[2] in SLOW_MODULES
        ):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped on CI (COMPLETION_NO_SKIPS=1): {reason}"


@pytest.fixture(scope="session", autouse=True)
def _private_user_dirs() -> Iterator[None]:
    """No test touches the user's own dirs: the client's config cache always goes to a private
    directory, and the state and config dirs do too unless the environment names them."""
    root = short_tmp("ca-xdg-")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        for name in ("XDG_STATE_HOME", "XDG_CONFIG_HOME"):
            if not os.environ.get(name):
                patch.setenv(name, str(root / name.lower()))
        yield
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tmpdir_short() -> Iterator[Path]:
    """A private directory under /tmp with a short path (ipc sockets need short paths)."""
    root = short_tmp()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_agent(tmpdir_short: Path) -> Iterator[Callable[..., Agent]]:
    """Build agents (not started) in the test's private directory; all are killed at the end."""
    agents: list[Agent] = []

    def make(config: dict[str, Any] | None = None, *, name: str = "a") -> Agent:
        root = tmpdir_short / name
        root.mkdir(exist_ok=True)
        agent = Agent(root, config)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.cleanup()


@pytest.fixture
def agent(make_agent: Callable[..., Agent]) -> Agent:
    """A running completiond on the embedded default (SQLite)."""
    return make_agent().start()
