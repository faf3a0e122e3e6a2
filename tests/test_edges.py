"""The edge helpers that exist once, in protocol/: database URL parser and masker, todo-id parser,
tmux socket arguments, the CURRENT_TODO_ID reader."""

from __future__ import annotations

from pathlib import Path

import pytest

import protocol as p
from protocol.config import ConfigError, load, read_todo_hint, tmux_socket_args
from protocol.dburl import MysqlTarget, mask_url, parse_url

SECRET = "s3cr"


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://wp:{SECRET}@db:3306/site",
        f"mysql://wp:{SECRET}/x@db/site",
        f"mysql://wp:{SECRET}?x@db/site",
        f"mysql://wp:{SECRET}#x@db/site",
        f"mysql://wp:{SECRET}@x@db/site",
        f"mariadb://wp:{SECRET}#?/@db:3306/site?unix_socket=/run/m.sock",
        f"mysql://wp:{SECRET}@localhost/site?unix_socket=/run/m.sock",
    ],
)
def test_the_masker_hides_any_password(url: str) -> None:
    masked = mask_url(url)
    assert SECRET not in masked
    assert masked.startswith(url.split("://")[0] + "://wp:***@")


def test_the_masker_keeps_what_is_not_a_password() -> None:
    assert mask_url("mysql://wp@db/site") == "mysql://wp@db/site"
    assert mask_url("sqlite:///var/x.db") == "sqlite:///var/x.db"
    assert (
        mask_url("mysql://wp:pw@db/site?unix_socket=/s") == "mysql://wp:***@db/site?unix_socket=/s"
    )
    assert mask_url("not a url") == "not a url"


@pytest.mark.parametrize("char", ["/", "?", "#", "@"])
def test_the_parser_takes_a_password_holding_url_characters(char: str) -> None:
    target = parse_url(f"mysql://wp:a{char}b@db:3307/site")
    assert target == MysqlTarget("wp", f"a{char}b", "db", 3307, "site")


@pytest.mark.parametrize("scheme", ["mysql", "mariadb", "mysql+pymysql"])
def test_config_and_store_agree_on_the_url_forms(tmp_path: Path, scheme: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[database]\nurl = "{scheme}://wp:{SECRET}#1@db/site"\n')
    config = load(str(path))
    assert isinstance(parse_url(config.database_url), MysqlTarget)


@pytest.mark.parametrize("url", ["mysql://wp:pw@db:99999/site", "mysql://db/site", "ftp://x/y"])
def test_config_refuses_what_the_store_refuses(tmp_path: Path, url: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[database]\nurl = "{url.replace("pw", SECRET)}"\n')
    with pytest.raises(ConfigError, match=r"database\.url") as info:
        load(str(path))
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError):
        parse_url(url)


@pytest.mark.parametrize(
    ("text", "todo_id"),
    [
        ("7", 7),
        (" 42\n", 42),
        ("007", 7),
        (str(p.TODO_ID_MAX), p.TODO_ID_MAX),
        (str(p.TODO_ID_MAX + 1), None),
        ("0", None),
        ("-3", None),
        ("+3", None),
        ("1_000", None),
        ("²", None),
        ("١٢", None),
        ("x", None),
        ("", None),
        (None, None),
    ],
)
def test_one_todo_id_parser(text: str | None, todo_id: int | None) -> None:
    assert p.parse_todo_id(text) == todo_id


def test_tmux_socket_arguments() -> None:
    assert tmux_socket_args("") == []
    assert tmux_socket_args(None) == []
    assert tmux_socket_args("/run/user/1/tmux.sock") == ["-S", "/run/user/1/tmux.sock"]
    assert tmux_socket_args("work") == ["-L", "work"]


def test_the_current_todo_id_reader(tmp_path: Path) -> None:
    hint = tmp_path / "CURRENT_TODO_ID"
    path = tmp_path / "config.toml"
    path.write_text(f'[marker]\ncurrent_todo_file = "{hint}"\n')
    config = load(str(path))
    assert read_todo_hint(config) is None
    hint.write_text("  12\n")
    assert read_todo_hint(config) == "12"
    hint.write_text("\n")
    assert read_todo_hint(config) is None
