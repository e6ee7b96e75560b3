"""Keep only the newest event per key, so a batch reaches the store as one write per key.

The parser puts events straight into a Table: the native one (harvester._fastscan,
filled by the native scanner without a Python call per event) or PyTable, the same
contract in Python. Keys and values stay bytes until `take()` decodes the survivors,
which is also where a user name that is not UTF-8 is caught.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections import Counter
from typing import Protocol

from harvester import native
from harvester.events import Event, NativeTables, Row

log = logging.getLogger(__name__)
SAY_AGAIN_S = 60  # a recurring problem is logged once, then at most this often

# A value: (time_us, digits, ip, node, service, detail); ip/node still bytes (node may be the
# configured default, a str).
Value = tuple[int, int, "bytes | None", "bytes | str | None", str, "str | None"]


class Table(Protocol):
    """Newest value per (user, second); equal times: the later put wins."""

    def __len__(self) -> int: ...

    def put(self, user: bytes, second: str, t: int, digits: int, ip: bytes | None, node: bytes | str | None,
            service: str, detail: str | None = None) -> None: ...

    def items(self) -> list[tuple[tuple[bytes, str], Value]]: ...

    def newest(self) -> int:
        """The newest event time held (0 when empty)."""

    def update(self, items: list[tuple[tuple[bytes, str], Value]]) -> None: ...

    def dumps(self) -> bytes:
        """Every entry, serialised (a backfill worker's rows, for the parent's `merge`)."""
        ...

    def merge(self, data: bytes) -> None:
        """Apply another table's `dumps`, after the entries held (newest wins; equal times: the merged)."""
        ...

    def take(self, row_type: type, kind: str | None, limit: int | None = None) -> tuple[list, list[bytes]]:
        """Empty the table into row_type(user, service, kind or second, t, digits, ip, node, detail),
        sorted by (user, second), and the user names that are not UTF-8.

        With `limit`: only the first `limit` entries in that order (undecodable ones included); the
        others stay in the table, undecoded, for the next take."""


class PyTable:
    """The Table contract in Python (when the native module is not built or switched off)."""

    def __init__(self) -> None:
        self._d: dict[tuple[bytes, str], Value] = {}
        # What a limited take left, sorted, in reverse (the next entry last); its keys are not in _d.
        self._rest: list[tuple[tuple[bytes, str], Value]] = []

    def __len__(self) -> int:
        return len(self._d) + len(self._rest)

    def _unsort(self) -> None:
        rest, self._rest = self._rest, []
        self._d.update(rest)

    def put(self, user: bytes, second: str, t: int, digits: int, ip: bytes | None, node: bytes | str | None,
            service: str, detail: str | None = None) -> None:
        if self._rest:
            self._unsort()  # a put after a limited take (not the daemon's way): one place to look
        key = (user, second)
        cur = self._d.get(key)
        if cur is None or t >= cur[0]:
            self._d[key] = (t, digits, ip, node, service, detail)

    def items(self) -> list[tuple[tuple[bytes, str], Value]]:
        return [*self._d.items(), *self._rest]

    def newest(self) -> int:
        return max(max((v[0] for v in self._d.values()), default=0), max((v[0] for _, v in self._rest), default=0))

    def update(self, items: list[tuple[tuple[bytes, str], Value]]) -> None:
        for (user, second), value in items:
            self.put(user, second, *value)

    def dumps(self) -> bytes:
        return pickle.dumps(self.items(), protocol=pickle.HIGHEST_PROTOCOL)

    def merge(self, data: bytes) -> None:
        self.update(pickle.loads(data))  # noqa: S301 - our own worker's output

    def take(self, row_type: type, kind: str | None, limit: int | None = None) -> tuple[list, list[bytes]]:
        if limit is None:
            entries = sorted(self.items(), key=_first)
        else:
            if self._d:
                self._unsort()
                self._rest = sorted(self._d.items(), key=_first, reverse=True)
                self._d = {}
            entries = self._rest[:-limit - 1:-1] if limit > 0 else []
        rows: list = []
        bad: list[bytes] = []
        names: dict = {}
        for (user, second), (t, digits, ip, node, service, detail) in entries:
            try:
                u = user.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(user)
                continue
            rows.append(row_type(u, service, kind or second, t, digits, _text(ip, names), _text(node, names), detail))
        if limit is None:
            self._d, self._rest = {}, []
        else:
            del self._rest[len(self._rest) - len(entries):]
        return rows, bad


def new_table() -> Table:
    return native.fastscan.Table() if native.enabled() else PyTable()


class SetAside:
    """Rows set aside because their user name cannot be stored, by reason: counts and the first example
    only (a spray of distinct bad names must not grow memory), told in the log once, then at most once a
    minute. One per run: the daemon's batches share it, so its figures and its log span all of them."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.samples: dict[str, bytes] = {}
        self._said = 0  # set-aside rows the log has told
        self._say_at = 0.0

    def note(self, reason: str, names: list[bytes]) -> None:
        if not names:
            return
        self.counts[reason] += len(names)
        self.samples.setdefault(reason, names[0][:160])
        now = time.monotonic()
        if now >= self._say_at:
            self._say_at = now + SAY_AGAIN_S
            n = sum(self.counts.values())
            log.warning("%d row(s) whose user name is not valid UTF-8, skipped (%d so far; first: %r)",
                        n - self._said, n, self.samples[reason][:80])
            self._said = n


class Coalescer:
    """Newest login per (user, service) and newest other event per (user, kind).

    Events arrive in line order, so on equal times the later line wins.
    With `trace=True` every event is also kept in order (for test-patterns).
    """

    def __init__(self, trace: bool = False, set_aside: SetAside | None = None) -> None:
        self.logins: Table = new_table()
        self.others: Table = new_table()
        self.trace: list | None = [] if trace else None
        self.set_aside = set_aside or SetAside()
        # Other processes' tables (Table.dumps of logins, of others; their entry count), oldest
        # first, applied after the tables' own entries: the SQLite writer merges them as it writes.
        self.runs: list[tuple[bytes, bytes, int]] = []
        self.pending: list[Row] = []  # taken, not accepted by the store: written first at the next take
        self.out = 0  # rows `take` gave out that no `settle` has answered for yet (a write under way)
        self._lock = threading.RLock()  # `waiting` is read from another thread than the one that takes

    def __len__(self) -> int:
        return len(self.logins) + len(self.others) + sum(n for _, _, n in self.runs) + len(self.pending)

    def waiting(self) -> int:
        """Rows not stored yet: what is gathered, and what a write has taken out of it and not yet settled
        (the daemon's loop reads it while its writer thread takes and writes)."""
        with self._lock:
            return len(self) + self.out

    def newest(self) -> int:
        """The newest event time gathered (0 when empty)."""
        return max(self.logins.newest(), self.others.newest(), max((r.time_us for r in self.pending), default=0))

    def add_run(self, logins: bytes, others: bytes, entries: int) -> None:
        """Keep another process's tables (dumps) to apply after everything gathered so far."""
        self.runs.append((logins, others, entries))

    def absorb_runs(self) -> None:
        """Merge the runs into the tables (for stores that take rows)."""
        for logins, others, _ in self.runs:
            self.logins.merge(logins)
            self.others.merge(others)
        self.runs = []

    def take(self, limit: int | None = None) -> list[Row]:
        """Decode what was gathered into rows in key order and start empty (the caller writes them).

        Rows put back by an earlier failed write come first: of two rows of one key in one write the
        later wins, and what the tables gathered since is newer. With `limit`, at most that many rows
        (table entries whose user name is set aside count too): the put-back rows first, then logins,
        then other events, each table in key order; what is left stays in the tables, not decoded, so
        a big batch is written a slice at a time without a Python row per entry of it."""
        with self._lock:
            self.absorb_runs()
            if limit is None:
                out, self.pending = self.pending, []
            else:
                out, self.pending = self.pending[:limit], self.pending[limit:]
            for table, kind in ((self.logins, "login"), (self.others, None)):
                room = None if limit is None else limit - len(out)
                if room is not None and room <= 0:
                    break
                if len(table):
                    rows, bad = table.take(Row, kind, room)
                    self.note_bad_users(bad)
                    out += rows
            self.out += len(out)
            return out

    def settle(self, taken: int, failed: list[Row] | None = None) -> None:
        """A write of `taken` rows of `take` ended; `failed` of them go back for the next take (put_back),
        the others are done with (stored or set aside)."""
        with self._lock:
            if failed:
                self.put_back(failed)
            self.out = max(self.out - taken, 0)

    def native_tables(self) -> NativeTables | None:
        """The native tables as they are, and other processes' runs (their dumps), for a store that writes
        them without a Python row per entry (SQLite's native writer), which empties the tables and then
        calls `tables_written`. None when that cannot be: Python tables, or rows a failed write put back
        (rows, not table entries)."""
        fs = native.fastscan
        if fs is None or not isinstance(self.logins, fs.Table) or not isinstance(self.others, fs.Table) \
                or self.pending:
            return None
        return NativeTables(self.logins, self.others, [r[0] for r in self.runs], [r[1] for r in self.runs])

    def tables_written(self, bad: list[bytes]) -> None:
        """The native tables and the runs were written (the writer emptied the tables); `bad`: user names
        it skipped for not being UTF-8."""
        self.runs = []
        self.note_bad_users(bad)

    def note_bad_users(self, names: list[bytes]) -> None:
        """Count rows set aside because their user name is not UTF-8 (reason "utf8"); the stores'
        writers call it for the names they skip."""
        self.set_aside.note("utf8", names)

    def bad_input(self) -> Counter[str]:
        """Rows set aside so far, by reason ("utf8"): cumulative, a copy (for metrics and summaries).
        Line-level bad input (timestamp, future, long_user, nul, long_line) is the Parser's stats.bad."""
        return Counter(self.set_aside.counts)

    def bad_sample(self, reason: str) -> bytes | None:
        """The first set-aside user name of `reason`, or None."""
        return self.set_aside.samples.get(reason)

    def put_back(self, rows: list[Row]) -> None:
        """Keep rows that `take` gave out and the store did not accept, as they are, for the next `take`:
        in front of the rows still pending (`take` gave those out after these).

        Not back into the tables: a store that is down would have every retry decode, re-encode and
        re-insert them, and each round left native heap behind (40 MB per retry of 100,000 rows, in the
        daemon's writer thread)."""
        with self._lock:
            self.pending = rows + self.pending if self.pending else rows

    def events(self) -> list[Event]:
        """The traced events, decoded (invalid UTF-8 shown with replacement characters)."""
        return [Event(k, s, u.decode("utf-8", "replace"), t, d, _text(ip, {}), _text(n, {}), det)
                for k, s, u, t, d, ip, n, det in (self.trace or ())]


def _first(item: tuple) -> tuple:
    return item[0]


def _text(raw: bytes | str | None, cache: dict) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    s = cache.get(raw)
    if s is None:
        s = cache[raw] = raw.decode("utf-8", "replace")
    return s
