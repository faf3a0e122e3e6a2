"""`database.url` parsing and masking live in ``protocol.dburl`` (the config validates with the
same parser the store connects with); this module keeps the store's import path."""

from protocol.dburl import (
    MysqlTarget,
    SqliteTarget,
    mask_url,
    node_name,
    parse_url,
    redact_url,
    with_nodes,
)

__all__ = [
    "MysqlTarget",
    "SqliteTarget",
    "mask_url",
    "node_name",
    "parse_url",
    "redact_url",
    "with_nodes",
]
