"""Keep only the newest event per key, so a batch reaches the store as one write per key.

The parser fills these dicts directly (a call per event would cost more than
the rest of the work); keys and values stay bytes until `rows()` decodes the
survivors, which is also where a user name that is not UTF-8 is caught.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from harvester.events import Event

# A value: (time_us, digits, ip, node, service, detail); ip/node still bytes (node may be the
# configured default, a str).
Value = tuple[int, int, "bytes | None", "bytes | str | None", str, "str | None"]


def newest(table: dict, key: tuple, value: Value) -> None:
    """Store `value` unless the table holds a newer one; equal times: the later call wins.

    (Parser.feed inlines this on its hot path.)
    """
    cur = table.get(key)
    if cur is None or value[0] >= cur[0]:
        table[key] = value


class Row(NamedTuple):
    """One store row: the newest event of its kind for one account."""

    user: str
    service: str
    kind: str  # "login" for last-login rows, else the event kind (auth_fail, pop3_delete, ...)
    time_us: int
    digits: int
    ip: str | None
    node: str | None
    detail: str | None = None


class Coalescer:
    """Newest login per (user, service) and newest other event per (user, kind).

    Events arrive in line order, so on equal times the later line wins (>=).
    With `trace=True` every event is also kept in order (for test-patterns).
    """

    def __init__(self, trace: bool = False) -> None:
        self.logins: dict[tuple[bytes, str], Value] = {}
        self.others: dict[tuple[bytes, str], Value] = {}
        self.trace: list | None = [] if trace else None
        self.bad_users: list[bytes] = []

    def __len__(self) -> int:
        return len(self.logins) + len(self.others)

    def take(self) -> list[Row]:
        """Decode what was gathered into rows and start empty (the caller writes them)."""
        logins, others = self.logins, self.others
        self.logins, self.others = {}, {}
        out = [r for r in self._rows(logins, None)]
        out.extend(self._rows(others, True))
        return out

    def _rows(self, table: dict, other: bool | None) -> Iterator[Row]:
        names: dict = {}
        for (user, second), (t, digits, ip, node, service, detail) in table.items():
            try:
                u = user.decode("utf-8")
            except UnicodeDecodeError:
                self.bad_users.append(user)
                continue
            yield Row(u, service, second if other else "login", t, digits,
                      None if ip is None else names.get(ip) or _text(ip, names),
                      None if node is None else names.get(node) or _text(node, names), detail)

    def events(self) -> list[Event]:
        """The traced events, decoded (invalid UTF-8 shown with replacement characters)."""
        return [Event(k, s, u.decode("utf-8", "replace"), t, d, _text(ip, {}), _text(n, {}), det)
                for k, s, u, t, d, ip, n, det in (self.trace or ())]


def _text(raw: bytes | str | None, cache: dict) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    s = cache.get(raw)
    if s is None:
        s = cache[raw] = raw.decode("utf-8", "replace")
    return s
