"""Stores, and the registry of them: a URL's scheme names the store class that opens it.

A store is one module with one class that follows base.Store: its Options (the settings of its own,
declared with options.option beside its code), its URL_HELP, and the methods the commands use. Adding
one is that module plus its line in STORES; nothing else names a store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from harvester.sinks.base import Forgotten, PartialWrite, Store, StoreClass, StoreError, StoreOptions
from harvester.sinks.cassandra import CassandraStore
from harvester.sinks.redis import RedisStore
from harvester.sinks.sql import MariadbStore, MysqlStore, PostgresStore
from harvester.sinks.sqlite import SqliteStore

if TYPE_CHECKING:
    from harvester.config import Settings

# URL scheme -> store class (its URL_PREFIX) (its module is imported here; heavy drivers load when a store opens).
STORES: dict[str, StoreClass] = {
    "sqlite": SqliteStore,
    "cassandra": CassandraStore,
    "postgresql": PostgresStore,
    "mysql": MysqlStore,
    "mariadb": MariadbStore,
    "redis": RedisStore,
}


def store_options() -> list[type[StoreOptions]]:
    """Every registered store's Options class (config makes the file's keys and the flags from them)."""
    return [cls.Options for cls in STORES.values()]


def default_url() -> str:
    """$STATE_DIRECTORY (systemd) or $XDG_STATE_HOME or ~/.local/state, then harvester/harvester.db."""
    base = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    # Path.home() only without $STATE_DIRECTORY: a DynamicUser= service has no home directory at all.
    d = Path(base) if base else Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "harvester"
    return "sqlite:///" + str((d / "harvester.db").absolute())


def store_class(url: str) -> StoreClass:
    """The class that opens `url`, by its scheme."""
    cls = next((c for c in STORES.values() if url.startswith(c.URL_PREFIX)), None)
    if cls is None:
        raise StoreError(f"unknown store URL {url!r}: use " + " or ".join(c.URL_HELP for c in STORES.values()))
    return cls


def open_store(url: str | None, *, create: bool = True, settings: Settings | None = None) -> Store:
    """Open the store a URL names (None: the default SQLite file) with its options from `settings`."""
    url = url or default_url()
    cls = store_class(url)
    options = settings.store_options(cls.Options) if settings is not None else cls.Options()
    return cls(url, options, create=create)


__all__ = ["STORES", "Forgotten", "PartialWrite", "Store", "StoreError", "default_url", "open_store", "store_class",
           "store_options"]
