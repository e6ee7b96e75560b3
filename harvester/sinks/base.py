"""What every store offers: idempotent, order-independent writes and key lookups."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from harvester.coalesce import Row


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
