"""SQL table layouts (PostgreSQL, MySQL/MariaDB): which table and columns a row goes to, how its time is
encoded there, and the one statement per table that keeps the newest event.

A layout is a list of Targets. A Target is one table written by one upsert (or, for Modoboa, one UPDATE):
key columns, the time column newest-wins compares, and the columns that move with the time. The comparison
is in the statement (PostgreSQL: ON CONFLICT ... DO UPDATE ... WHERE; MySQL/MariaDB: ON DUPLICATE KEY UPDATE
with the comparison in each assignment, the time assigned last), so two writers never race and a replay
changes nothing; an equal time takes the write (the later line), as the SQLite store does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from harvester.events import SERVICES, Row

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MYSQL_ROWS_PER_STATEMENT = 1000  # a multi-row statement stays far below max_allowed_packet (16 MiB)

# Column kinds, from the column's data type: how a time is stored in it.
MS, SECONDS, STAMP, TEXT, INET = "ms", "s", "timestamp", "text", "inet"
_KINDS = {"bigint": MS, "integer": SECONDS, "int": SECONDS, "mediumint": SECONDS,
          "timestamp with time zone": STAMP, "timestamp without time zone": STAMP, "timestamp": STAMP,
          "datetime": STAMP, "inet": INET}


def column_kind(data_type: str) -> str:
    """A column's kind from information_schema.columns.data_type (bigint: ms; int: Unix seconds; timestamps)."""
    return _KINDS.get(data_type.lower(), TEXT)


def encode(time_us: int, kind: str, naive: bool):
    """An event time as the column takes it (`naive`: MySQL's DATETIME, which holds UTC without a zone)."""
    if kind == MS:
        return time_us // 1000
    if kind == SECONDS:
        return time_us // 1_000_000
    t = EPOCH + timedelta(microseconds=time_us)
    return t.replace(tzinfo=None) if naive else t


def decode(value, kind: str) -> tuple[int, int]:
    """(microseconds, fractional digits) of a stored time."""
    if kind == MS:
        us = int(value) * 1000
    elif kind == SECONDS:
        us = int(value) * 1_000_000
    else:
        t = value if value.tzinfo else value.replace(tzinfo=UTC)
        d = t - EPOCH
        us = (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds
    return us, 0 if us % 1_000_000 == 0 else 3 if us % 1000 == 0 else 6


@dataclass(frozen=True)
class Target:
    """One table and the statement that writes it. A row's values are keys + (time,) + moves + fixed."""

    table: str
    keys: tuple[str, ...]
    time: str
    moves: tuple[str, ...] = ()  # set together with the time, only when it wins
    fixed: tuple[str, ...] = ()  # set when the row is inserted (iRedMail's domain)
    update_only: bool = False  # never insert (Modoboa's accounts)
    known: tuple[str, str] | None = None  # (table, user column): only accounts that have a row there

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.keys, self.time, *self.moves, *self.fixed)


class Dialect:
    """What differs between the servers: identifier quoting, the upsert, how values travel."""

    name = ""
    naive_times = False

    def q(self, name: str) -> str:
        raise NotImplementedError

    def statements(self, t: Target, kinds: dict[str, str], n: int) -> list[tuple[str, list]]:
        """(SQL, [start, end] of the rows it takes, or [] for all) for n rows of one target."""
        raise NotImplementedError

    @staticmethod
    def params(values: Sequence[tuple]) -> list:
        """The statement's parameters for these rows' values."""
        raise NotImplementedError


class Postgres(Dialect):
    """One statement per target and write: the columns travel as arrays (unnest), one round trip."""

    name = "postgresql"
    ARRAY = {MS: "bigint[]", SECONDS: "bigint[]", STAMP: "timestamptz[]", TEXT: "text[]", INET: "inet[]"}

    def q(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    def sql(self, t: Target, kinds: dict[str, str]) -> str:
        q = self.q
        cols = t.columns
        alias = ", ".join(f"c{i}" for i in range(len(cols)))
        arrays = ", ".join(f"%s::{self.ARRAY[kinds.get(c, TEXT)]}" for c in cols)
        src = f"unnest({arrays}) AS v({alias})"
        newer = f"o.{q(t.time)} IS NULL OR o.{q(t.time)} < v.c{len(t.keys)}"
        if t.update_only:
            match = " AND ".join(f"o.{q(k)} = v.c{i}" for i, k in enumerate(t.keys))
            return (f"UPDATE {q(t.table)} AS o SET {q(t.time)} = v.c{len(t.keys)} FROM {src}\n"
                    f"WHERE {match} AND ({newer})")
        select = f"SELECT {alias} FROM {src}"
        if t.known:
            select += f" WHERE EXISTS (SELECT 1 FROM {q(t.known[0])} AS k WHERE k.{q(t.known[1])} = v.c0)"
        sets = ", ".join(f"{q(c)} = EXCLUDED.{q(c)}" for c in (t.time, *t.moves))
        return (f"INSERT INTO {q(t.table)} AS o ({', '.join(q(c) for c in cols)})\n{select}\n"
                f"ON CONFLICT ({', '.join(q(k) for k in t.keys)}) DO UPDATE SET {sets}\n"
                f"WHERE o.{q(t.time)} IS NULL OR o.{q(t.time)} <= EXCLUDED.{q(t.time)}")

    def statements(self, t: Target, kinds: dict[str, str], n: int) -> list[tuple[str, list]]:
        return [(self.sql(t, kinds), [])]

    @staticmethod
    def params(values: Sequence[tuple]) -> list:
        return [list(col) for col in zip(*values, strict=True)]


class Mysql(Dialect):
    """MySQL and MariaDB: multi-row statements of MYSQL_ROWS_PER_STATEMENT rows."""

    name = "mysql"
    naive_times = True

    def q(self, name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    def sql(self, t: Target, kinds: dict[str, str], rows: int) -> str:
        q = self.q
        cols = t.columns
        T = q(t.table)  # noqa: N806
        one = "(" + ", ".join(self._slot(kinds.get(c, TEXT)) for c in cols) + ")"
        if t.update_only:
            first = "SELECT " + ", ".join(f"{self._slot(kinds.get(c, TEXT))} AS c{i}" for i, c in enumerate(cols))
            union = " UNION ALL ".join([first] + ["SELECT " + one[1:-1]] * (rows - 1))
            match = " AND ".join(f"o.{q(k)} = v.c{i}" for i, k in enumerate(t.keys))
            n = len(t.keys)
            return (f"UPDATE {T} AS o JOIN ({union}) AS v ON {match}\n"
                    f"SET o.{q(t.time)} = v.c{n} WHERE o.{q(t.time)} IS NULL OR o.{q(t.time)} < v.c{n}")
        newer = f"{T}.{q(t.time)} IS NULL OR VALUES({q(t.time)}) >= {T}.{q(t.time)}"
        # Assignments run left to right and see the columns already assigned: the time goes last.
        sets = ", ".join(f"{q(c)} = IF({newer}, VALUES({q(c)}), {T}.{q(c)})" for c in (*t.moves, t.time))
        if t.known:
            first = "SELECT " + ", ".join(f"{self._slot(kinds.get(c, TEXT))} AS c{i}" for i, c in enumerate(cols))
            union = " UNION ALL ".join([first] + ["SELECT " + one[1:-1]] * (rows - 1))
            src = (f"SELECT * FROM ({union}) AS v WHERE EXISTS (SELECT 1 FROM {q(t.known[0])} AS k "
                   f"WHERE k.{q(t.known[1])} = v.c0)")
        else:
            src = "VALUES " + ", ".join([one] * rows)
        return f"INSERT INTO {T} ({', '.join(q(c) for c in cols)})\n{src}\nON DUPLICATE KEY UPDATE {sets}"

    @staticmethod
    def _slot(kind: str) -> str:
        return "CAST(%s AS DATETIME(6))" if kind == STAMP else "%s"

    def statements(self, t: Target, kinds: dict[str, str], n: int) -> list[tuple[str, list]]:
        out = []
        for start in range(0, n, MYSQL_ROWS_PER_STATEMENT):
            rows = min(MYSQL_ROWS_PER_STATEMENT, n - start)
            out.append((self.sql(t, kinds, rows), [start, start + rows]))
        return out

    @staticmethod
    def params(values: Sequence[tuple]) -> list:
        return [v for row in values for v in row]


DIALECTS: dict[str, Dialect] = {"postgresql": Postgres(), "mysql": Mysql()}


# -- layouts ----------------------------------------------------------------------------------------------
Routed = tuple[Target, tuple]  # a row's values for one target


@dataclass
class Layout:
    """A layout: its targets, which of its tables it owns (creates, adds columns to) and how rows map."""

    name: str
    table: str
    user_column: str
    owned: bool
    services: dict[str, list[str]] = field(default_factory=dict)  # service -> [time column, IP column]
    events: bool = False  # last_event rows (layouts that own their tables)

    def login_targets(self) -> dict[str, Target]:
        """service -> the target its logins go to."""
        raise NotImplementedError

    def targets(self) -> list[Target]:
        out = list(dict.fromkeys(self.login_targets().values()))
        return out + ([EVENT_TARGET(self.table, self.user_column)] if self.events else [])

    def route(self, r: Row) -> Routed | None:
        """The target and values of one row; None: the layout has no place for it (counted as skipped)."""
        if r.kind != "login":
            if not self.events:
                return None
            e = EVENT_TARGET(self.table, self.user_column)
            return e, (r.user, r.kind, r.time_us, r.service, r.ip, r.node, r.detail)
        t = self.login_targets().get(r.service)
        if t is None:
            return None
        return t, self.values(t, r)

    def values(self, t: Target, r: Row) -> tuple:
        return (r.user, r.time_us, *([r.ip] if t.moves else []))

    def ddl(self, d: Dialect) -> list[str]:
        """CREATE TABLE statements of the tables the layout owns (none for a preset's)."""
        return []

    def required(self) -> dict[str, list[str]]:
        """table -> columns the layout writes or reads (checked against the server's)."""
        out: dict[str, list[str]] = {}
        for t in self.targets():
            out.setdefault(t.table, [])
            out[t.table] += [c for c in t.columns if c not in out[t.table]]
        return out

    def shown(self) -> dict[str, list[str]]:
        """service -> columns, once per column pair (iRedMail's imap column holds imap and webmail: imap)."""
        seen: dict[tuple[str, ...], str] = {}
        for svc, cs in self.services.items():
            seen.setdefault(tuple(cs), svc)
        return {svc: list(cs) for cs, svc in seen.items()}

    def read(self, user: str, row: tuple, kinds: dict[str, str]) -> list[Row]:
        """Login rows of one stored row: user column first, then per service its time (and IP) column."""
        out, i = [], 1
        for svc, cs in self.shown().items():
            at = row[i]
            ip = row[i + 1] if len(cs) > 1 else None
            i += len(cs)
            if at is not None:
                out.append(Row(user, svc, "login", *decode(at, kinds[cs[0]]), None if ip is None else str(ip), None))
        return out

    def select(self, d: Dialect) -> str:
        """The rows' columns, for lookup (WHERE user = %s appended) and export."""
        cols = [self.user_column] + [c for cs in self.shown().values() for c in cs]
        return f"SELECT {', '.join(d.q(c) for c in cols)} FROM {d.q(self.table)}"


def EVENT_TARGET(login_table: str, user_column: str) -> Target:  # noqa: N802 - a constant of two names
    """last_event: auth failures, aborted logins, refusals, POP3 deletions; only of accounts with a login row
    (a password spray of made-up names adds none), as the SQLite store's default."""
    return Target("last_event", ("userid", "kind"), "event_time", ("service", "ip", "node", "detail"),
                  known=(login_table, user_column))


def _table(d: Dialect, name: str, cols: list[str], key: list[str]) -> str:
    lines = []
    for c in cols:  # "definition  -- comment": the comma goes before the comment
        defn, _, comment = c.partition("  -- ")
        lines.append(f"    {defn}," + (f"  -- {comment}" if comment else ""))
    body = "\n".join(lines) + f"\n    PRIMARY KEY ({', '.join(d.q(k) for k in key)})"
    tail = " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin" if d.name == "mysql" else ""
    return f"CREATE TABLE IF NOT EXISTS {d.q(name)} (\n{body}\n){tail}"


def _event_ddl(d: Dialect) -> str:
    q = d.q
    return _table(d, "last_event", [
        f"{q('userid')} VARCHAR(255) NOT NULL", f"{q('kind')} VARCHAR(16) NOT NULL  -- auth_fail, aborted, refused, "
        "pop3_delete", f"{q('event_time')} BIGINT NOT NULL  -- Unix time in milliseconds",
        f"{q('service')} VARCHAR(10)", f"{q('ip')} VARCHAR(40)", f"{q('node')} VARCHAR(255)",
        f"{q('detail')} TEXT  -- e.g. deleted=3 messages=3"], ["userid", "kind"])


@dataclass
class PerService(Layout):
    """Dovecot's last_login plugin table (its SQL dict example), plus node: one row per account and service."""

    def login_targets(self) -> dict[str, Target]:
        t = Target(self.table, ("userid", "service"), "last_access", ("last_ip", "node"))
        return dict.fromkeys(SERVICES, t)

    def route(self, r: Row) -> Routed | None:
        if r.kind != "login":
            return super().route(r)
        t = self.login_targets()[SERVICES[0]]
        return t, (r.user, r.service, r.time_us, r.ip, r.node)

    def ddl(self, d: Dialect) -> list[str]:
        q = d.q
        return [_table(d, self.table, [
            f"{q('userid')} VARCHAR(255) NOT NULL", f"{q('service')} VARCHAR(10) NOT NULL  -- imap, pop3, lmtp, "
            "submission, sieve, webmail", f"{q('last_access')} BIGINT NOT NULL  -- Unix time in milliseconds",
            f"{q('last_ip')} VARCHAR(40)  -- client address; for lmtp the delivering MTA's",
            f"{q('node')} VARCHAR(255)  -- backend that logged it"], ["userid", "service"]), _event_ddl(d)]

    def select(self, d: Dialect) -> str:
        q = d.q
        cols = ("userid", "service", "last_access", "last_ip", "node")
        return f"SELECT {', '.join(q(c) for c in cols)} FROM {q(self.table)}"

    def read(self, user: str, row: tuple, kinds: dict[str, str]) -> list[Row]:
        _, svc, at, ip, node = row
        return [Row(user, svc, "login", *decode(at, MS), ip, node)]


@dataclass
class Wide(Layout):
    """One row per account, a time (and IP) column per service: per_user (owned), custom and iRedMail's."""

    fixed_domain: bool = False  # iRedMail: fill `domain` from the user name on insert

    def login_targets(self) -> dict[str, Target]:
        out = {}
        for svc, cs in self.services.items():
            out[svc] = Target(self.table, (self.user_column,), cs[0], tuple(cs[1:]),
                              ("domain",) if self.fixed_domain else ())
        return out

    def values(self, t: Target, r: Row) -> tuple:
        v = super().values(t, r)
        if self.fixed_domain:
            v += (r.user.rpartition("@")[2] if "@" in r.user else "",)
        return v

    def ddl(self, d: Dialect) -> list[str]:
        if not self.owned:
            return []
        q = d.q
        cols = [f"{q(self.user_column)} VARCHAR(255) NOT NULL"]
        for cs in self.services.values():
            cols.append(f"{q(cs[0])} BIGINT  -- Unix time in milliseconds")
            cols += [f"{q(c)} VARCHAR(40)" for c in cs[1:]]
        return [_table(d, self.table, cols, [self.user_column]), _event_ddl(d)]


@dataclass
class Modoboa(Layout):
    """Modoboa's core_user.last_login (Django's DateTimeField, UTC): the newest login of the configured
    services, on accounts that exist; never an insert."""

    def login_targets(self) -> dict[str, Target]:
        t = Target(self.table, (self.user_column,), "last_login", update_only=True)
        return dict.fromkeys(self.services, t)

    def values(self, t: Target, r: Row) -> tuple:
        return (r.user, r.time_us)

    @property
    def label(self) -> str:
        """The service of the rows lookup shows: the services whose newest login the column holds."""
        return "+".join(self.services)

    def select(self, d: Dialect) -> str:
        return f"SELECT {d.q(self.user_column)}, {d.q('last_login')} FROM {d.q(self.table)}"

    def read(self, user: str, row: tuple, kinds: dict[str, str]) -> list[Row]:
        return [] if row[1] is None else [Row(user, self.label, "login", *decode(row[1], STAMP), None, None)]


PER_USER_COLUMNS = {s: [f"last_login_{s}", f"remote_ip_{s}"] for s in SERVICES}
# iRedMail's vmail.last_login: Unix seconds; deliveries in lda; webmail (Roundcube) logs in over IMAP.
IREDMAIL_COLUMNS = {"imap": ["imap"], "webmail": ["imap"], "pop3": ["pop3"], "lmtp": ["lda"]}
MODOBOA_SERVICES = ["imap", "pop3", "webmail"]  # what Modoboa's post-login script covered (and webmail)
LAYOUTS = ("per_service", "per_user", "iredmail", "modoboa", "custom")
DEFAULT_TABLES = {"per_service": "last_login", "per_user": "dovecot_stats", "iredmail": "last_login",
                  "modoboa": "core_user"}


def layout(name: str, table: str = "", user_column: str = "", columns: dict[str, list[str]] | None = None,
           modoboa_services: list[str] | None = None) -> Layout:
    """The layout the settings choose (sql_layout, sql_table, sql_user_column, sql_columns)."""
    table = table or DEFAULT_TABLES.get(name, "")
    if name == "per_service":
        return PerService(name, table, "userid", owned=True, events=True)
    if name == "modoboa":
        return Modoboa(name, table, user_column or "username", owned=False,
                       services=dict.fromkeys(modoboa_services or MODOBOA_SERVICES, ["last_login"]))
    if name == "iredmail":
        return Wide(name, table, user_column or "username", owned=False, services=columns or IREDMAIL_COLUMNS,
                    fixed_domain=True)
    if name == "per_user":
        return Wide(name, table, user_column or "userid", owned=True, services=columns or PER_USER_COLUMNS,
                    events=True)
    if name == "custom":
        if not (table and columns):
            raise ValueError("sql_layout = custom needs sql_table and sql_columns (and usually sql_user_column)")
        return Wide(name, table, user_column or "userid", owned=False, services=columns)
    raise ValueError(f"unknown sql_layout {name!r}: one of {', '.join(LAYOUTS)}")
