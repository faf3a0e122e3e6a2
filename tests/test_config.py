"""Configuration: defaults, both formats, the seed's behavior block, errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import protocol.config
from protocol.config import ConfigError, load, load_for_client, mask_url

SEED_BEHAVIOR = {
    "completion_timeout": 300,
    "emergency_timeout": 1800,
    "enable_robust_completion": True,
    "enable_emergency_handlers": True,
    "auto_recovery": True,
    "max_retries": 3,
    "database_timeout": 30,
    "health_check_interval": 300,
    "ssh_timeout": 30,
}


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("COMPLETION_CONFIG", raising=False)


def test_no_file_means_defaults_under_xdg_state_home(tmp_path: Path) -> None:
    config = load()
    assert config.state_dir == str(tmp_path / "state" / "completion")
    assert config.endpoint == f"ipc://{tmp_path}/state/completion/completiond.sock"
    assert config.database_url == f"sqlite:///{tmp_path}/state/completion/todos.db"
    assert config.database.table == "stage_project_todos"
    assert config.behavior.completion_timeout == 300
    assert config.collect.session_dir == "/tmp/claude_session_{todo_id}"
    assert config.hook.timeout == 0.5
    assert config.marker.enabled is False


def test_seed_json_behavior_block_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"behavior": SEED_BEHAVIOR}))
    assert load(str(path)).behavior.max_retries == 3


def test_toml_file_found_through_xdg_config_home(tmp_path: Path) -> None:
    path = tmp_path / "config" / "completion" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text('[database]\ntable = "todos"\n[behavior]\nhanging_after = 60\n')
    config = load()
    assert config.source == str(path)
    assert config.database.table == "todos"
    assert config.behavior.hanging_after == 60


def test_completion_config_env_wins_over_xdg(tmp_path: Path, monkeypatch) -> None:
    env_file = tmp_path / "env.toml"
    env_file.write_text("[behavior]\nmax_retries = 9\n")
    monkeypatch.setenv("COMPLETION_CONFIG", str(env_file))
    assert load().behavior.max_retries == 9


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[behavior]\ncompletion_timout = 5\n", ["completion_timout", "behavior"]),
        ("surprise = 1\n", ["surprise"]),
        ("[behavior]\nmax_retries = -1\n", ["behavior.max_retries"]),
        ('[behavior]\nauto_recovery = "yes"\n', ["behavior.auto_recovery"]),
        ('[hook]\nstop_means = "explode"\n', ["hook.stop_means"]),
        ('[database]\ntable = "x; DROP TABLE y"\n', ["database.table"]),
        ('[database]\nurl = "postgres://x"\n', ["database.url"]),
        ('socket_mode = "777x"\n', ["socket_mode"]),
        ("[behavior]\ncompletion_timeout = 100\nemergency_timeout = 10\n", ["emergency_timeout"]),
        ("[behavior\n", ["config.toml"]),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, names: list[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    for name in names:
        assert name in str(info.value)


def test_ipc_path_too_long_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'state_dir = "/tmp/{"x" * 120}"\n')
    with pytest.raises(ConfigError, match="limit of 107"):
        load(str(path))


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"use \.toml or \.json"):
        (tmp_path / "c.yaml").write_text("a: 1")
        load(str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.toml"))


def test_mask_url_hides_the_password() -> None:
    assert mask_url("mysql://wp:s3cret@db:3306/site") == "mysql://wp:***@db:3306/site"
    assert mask_url("mysql://wp@db/site") == "mysql://wp@db/site"


def test_client_config_is_parsed_once_then_read_from_a_private_cache_without_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'state_dir = "relative-state"\n[database]\nurl = "mysql://app:s3cret@db.example:3306/wp"\n'
        "[hook]\ntimeout = 0.25\n"
    )
    first = load_for_client(str(path))
    assert first.hook.timeout == 0.25
    assert first.state_dir == str(tmp_path / "relative-state")
    assert first.database.url == "mysql://app:***@db.example:3306/wp"
    (cache,) = (tmp_path / "cache" / "completion").iterdir()
    assert cache.stat().st_mode & 0o777 == 0o600
    assert cache.parent.stat().st_mode & 0o777 == 0o700
    assert b"s3cret" not in cache.read_bytes()

    def no_parsing(data: bytes, where: Path) -> None:
        raise AssertionError("the unchanged file was parsed again")

    monkeypatch.setattr(protocol.config, "parse", no_parsing)
    assert load_for_client(str(path)) == first
    # Any change of the file is read afresh.
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path.write_text("[hook]\ntimeout = 0.75\n")
    assert load_for_client(str(path)).hook.timeout == 0.75
    # The full loader still gives the agent the real URL.
    path.write_text('[database]\nurl = "mysql://app:s3cret@db.example:3306/wp"\n')
    assert load(str(path)).database.url == "mysql://app:s3cret@db.example:3306/wp"


def test_client_config_cache_that_is_broken_or_unwritable_falls_back_to_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[hook]\ntimeout = 0.25\n")
    load_for_client(str(path))
    (cache,) = (tmp_path / "cache" / "completion").iterdir()
    cache.write_bytes(b"{not json")
    assert load_for_client(str(path)).hook.timeout == 0.25
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "config.toml" / "under-a-file"))
    assert load_for_client(str(path)).hook.timeout == 0.25
    path.write_text("[hook]\ntimeout = -1\n")
    with pytest.raises(ConfigError, match=r"hook\.timeout"):
        load_for_client(str(path))
