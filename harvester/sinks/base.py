"""What every store offers: idempotent, order-independent writes and key lookups."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from harvester.coalesce import Coalescer, Row


class StoreError(Exception):
    """The store cannot be opened or written; the message is meant for the operator."""


class Store(Protocol):
    """A sink. `write` applies rows so that a stored time never moves backwards."""

    url: str

    def write(self, rows: list[Row]) -> int:
        """Apply rows (newest wins, equal time: this write wins); return how many were sent."""
        ...

    def lookup(self, user: str) -> list[Row]:
        """Every row of one account, newest first."""
        ...

    def export(self) -> Iterator[Row]:
        """Every row."""
        ...

    def close(self) -> None: ...


def flush(sink: Coalescer, store: Store) -> int:
    """Write and empty what `sink` gathered; on a StoreError the sink keeps it for a retry.

    A store may offer its own `flush` (SQLite: straight from the native tables)."""
    own = getattr(store, "flush", None)
    return own(sink) if own is not None else write_taken(sink, store)


def write_taken(sink: Coalescer, store: Store) -> int:
    """`sink.take()` into `store.write`, putting the rows back when the write fails."""
    rows = sink.take()
    if not rows:
        return 0
    try:
        return store.write(rows)
    except StoreError as e:
        sink.put_back(getattr(e, "failed", rows))  # a partial write names the rows still missing
        raise
    except Exception:  # a bug or an unexpected library error must not cost the rows either
        sink.put_back(rows)
        raise
