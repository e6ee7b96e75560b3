"""Stores: SQLite (embedded default) and, for fleets, Cassandra."""

from __future__ import annotations

import os
from pathlib import Path

from harvester.config import Settings
from harvester.sinks.base import Forgotten, PartialWrite, Store, StoreError


def default_url() -> str:
    """$STATE_DIRECTORY (systemd) or $XDG_STATE_HOME or ~/.local/state, then harvester/harvester.db."""
    base = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    xdg = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "harvester"
    d = Path(base) if base else xdg
    return "sqlite:///" + str((d / "harvester.db").absolute())


def open_store(url: str | None, *, create: bool = True, settings: Settings | None = None) -> Store:
    """Open the store a URL names (None: the default SQLite file); `settings` carry Cassandra's options."""
    url = url or default_url()
    if url.startswith("sqlite:"):
        from harvester.sinks.sqlite import SqliteStore

        return SqliteStore(url, create=create, settings=settings)
    if url.startswith("cassandra:"):
        from harvester.sinks.cassandra import CassandraStore

        return CassandraStore(url, settings)
    raise StoreError(f"unknown store URL {url!r}: use sqlite:///path.db (or cassandra://hosts/keyspace)")


__all__ = ["Forgotten", "PartialWrite", "Store", "StoreError", "default_url", "open_store"]
