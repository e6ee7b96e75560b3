"""What every store offers: idempotent, order-independent writes and key lookups."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, ClassVar, NamedTuple, Protocol

from harvester import metrics
from harvester.events import NativeTables, Row

log = logging.getLogger(__name__)
REFUSED_REPEAT = 60.0  # after the first refused row, name one again at most this often
SHOWN_USER_CHARS = 80  # a refused row's user name is cut to this in the log


class StoreError(Exception):
    """The store cannot be opened or written; the message is meant for the operator."""


class PartialWrite(StoreError):
    """A write that stored some rows and not others.

    `failed`: rows not acknowledged (an outage, a timeout): put back and retried.
    `refused`: (row, reason) the store refuses for what the row is (a key over the store's limit, a
    value its type cannot take): never retried, logged and counted.
    `acknowledged`: how many rows the store did take."""

    def __init__(self, message: str, failed: list[Row], acknowledged: int,
                 refused: list[tuple[Row, str]] | None = None) -> None:
        super().__init__(message)
        self.failed = failed
        self.refused = refused or []
        self.acknowledged = acknowledged

    @classmethod
    def of(cls, url: str, total: int, failed: list[Row], acknowledged: int, refused: list[tuple[Row, str]],
           why: str) -> PartialWrite:
        """The error every store raises for a write that left rows behind, said the same way."""
        parts = []
        if failed:
            parts.append(f"{len(failed)} of {total} row(s) not written ({why}); kept for a retry")
        if refused:
            parts.append(f"{len(refused)} row(s) refused (first: user {shown(refused[0][0].user)}: {refused[0][1]})")
        return cls(f"{url}: " + "; ".join(parts), failed, acknowledged, refused)


class Forgotten(NamedTuple):
    """A row `forget` removed, and the timestamp of the tombstone that removed it (Cassandra; None: SQLite)."""

    row: Row
    deleted_at_us: int | None = None
    table: str | None = None  # keyspace.table it was deleted from (Cassandra)


class Batch(Protocol):
    """What a store is handed to write: the rows the coalescing stage gathered (coalesce.Coalescer)."""

    def __len__(self) -> int: ...

    def take(self, limit: int | None = None) -> list[Row]:
        """Up to `limit` rows, in key order, taken out of the batch (rows a failed write gave back first)."""
        ...

    def settle(self, taken: int, failed: list[Row] | None = None) -> None:
        """A write of `taken` rows ended; `failed` of them go back for the next take."""
        ...

    def native_tables(self) -> NativeTables | None:
        """The native tables, for a store that writes them natively; None: take rows instead."""
        ...

    def tables_written(self, bad: list[bytes]) -> None:
        """The native tables were written (and emptied); `bad`: user names skipped, not UTF-8."""
        ...


class Store(Protocol):
    """A sink. `write` applies rows so that a stored time never moves backwards.

    A store class whose `lookup` may run in several threads at once says so with THREAD_SAFE_READS = True
    (`serve` then does not take turns); without it, lookups are made one at a time."""

    url: str

    def flush(self, sink: Batch) -> int:
        """Write and empty what `sink` gathered (most stores: write_taken(sink, self)); on a StoreError
        the sink keeps what was not acknowledged, for a retry."""
        ...

    def skipped(self) -> dict[str, int]:
        """Rows the store has no place for, by service or kind (a Cassandra layout without their column)."""
        ...

    def apply_schema(self) -> tuple[list[str], str]:
        """Create what is missing; returns the schema as `schema` gives it, and a note for the operator
        (what was created, how; a warning when writes are bound to fail)."""
        ...

    def write(self, rows: list[Row]) -> int:
        """Apply rows (newest wins, equal time: this write wins); return how many were sent.

        May raise PartialWrite (failed rows to retry, refused rows never to retry)."""
        ...

    def lookup(self, user: str) -> list[Row]:
        """Every row of one account, newest first."""
        ...

    def export(self) -> Iterator[Row]:
        """Every row."""
        ...

    def forget(self, user: str, service: str | None = None) -> list[Forgotten]:
        """Remove one service's login row of `user`, or (no service) all its login and last_event rows;
        returns what was removed."""
        ...

    def close(self) -> None: ...


class StoreOptions(Protocol):
    """A store's Options class: option() fields; their keys in the config file begin with PREFIX."""

    PREFIX: ClassVar[str]


class StoreClass(Protocol):
    """What the registry (sinks/__init__.py) knows of a store's class."""

    @property
    def Options(self) -> type[StoreOptions]:  # noqa: N802 - the class attribute's name
        """A dataclass of options.option() fields: the store's own settings."""
        ...

    @property
    def URL_HELP(self) -> str:  # noqa: N802
        """The URL forms it opens, for error messages."""
        ...

    @property
    def URL_PREFIX(self) -> str:  # noqa: N802
        """How its URLs begin (the registry's and the config check's test)."""
        ...

    def __call__(self, url: str, options: Any, *, create: bool = True) -> Store: ...

    def schema(self, url: str, options: Any) -> list[str]:
        """The statements that create the store, and last the query a support tool runs to look one
        account up (what `harvester schema` prints; no connection needed)."""
        ...


def flush(sink: Batch, store: Store) -> int:
    """Write and empty what `sink` gathered; on a StoreError the sink keeps it for a retry."""
    return store.flush(sink)


WRITE_ROWS = 20_000  # rows handed to one store.write: what a store builds per write stays this small


def write_taken(sink: Batch, store: Store) -> int:
    """`sink.take(WRITE_ROWS)` into `store.write` until the sink is empty; when a write fails, its rows still
    to retry go back (Batch.settle) and the error is raised.

    Slices bound what a store makes per row (Cassandra's requests) and what is decoded into Python rows
    (one slice: the rest stays in the sink's tables as they are), whatever waited; against a store that
    is down a retry fails on its first slice. Rows the store refused (PartialWrite.refused) are logged,
    counted and dropped: one poison row must not stall every later write. When nothing is left to retry,
    the acknowledged count is returned."""
    done = 0
    while len(sink):
        part = sink.take(WRITE_ROWS)
        failed = part  # until the store says otherwise: no error (a StoreError, a bug) may cost rows
        try:
            done += store.write(part)
            failed = []
            metrics.STORE_UP.set(1)  # a slice was acknowledged: the store is up, however much is left to write
        except PartialWrite as e:
            set_aside(store.url, e.refused)
            failed = e.failed
            if failed:
                raise
            done += e.acknowledged
        finally:
            sink.settle(len(part), failed)
    return done


_last_named: dict[str, float] = {}  # store URL -> when it last named a refused row


def set_aside(url: str, refused: list[tuple[Row, str]]) -> None:
    """Count rows a store refused (harvester_store_rows_refused_total{reason}) and name one in the log:
    the first, then at most one a minute (a flood of them must not flood the log)."""
    if not refused:
        return
    by_reason: dict[str, int] = {}
    for _, reason in refused:
        label = reason_label(reason)
        by_reason[label] = by_reason.get(label, 0) + 1
    for label, n in by_reason.items():
        metrics.ROWS_REFUSED.labels(label).inc(n)
    now = time.monotonic()
    if now - _last_named.get(url, float("-inf")) >= REFUSED_REPEAT:
        _last_named[url] = now
        r, reason = refused[0]
        log.error("%s refused %d row(s) for what they are; set aside, never retried (counted in "
                  "harvester_store_rows_refused_total); first: user %s service %s kind %s: %s", url, len(refused),
                  shown(r.user), shown(r.service), r.kind, reason[:300])


def reason_label(reason: str) -> str:
    """A bounded metric label for a refusal's reason text: its leading word (an exception's name)."""
    head = reason.split(":", 1)[0].strip()
    return head if head.isidentifier() and len(head) <= 40 else "other"


def shown(text: str, limit: int = SHOWN_USER_CHARS) -> str:
    """Text from a log line as an operator may see it: control characters and quotes escaped, cut to `limit`.

    The one place stores and `harvester forget` print user names; the escaping is escape.for_terminal's."""
    from harvester.escape import for_terminal

    out = "'" + for_terminal(text[:limit]) + "'"
    return out + f"...({len(text)} chars)" if len(text) > limit else out
