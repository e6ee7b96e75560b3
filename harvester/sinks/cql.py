"""Cassandra table layouts: the CQL each one needs and how rows map onto it.

Every write carries USING TIMESTAMP = the event time in microseconds, so
Cassandra's last-write-wins becomes newest-event-wins: no read before write,
no lightweight transaction, and replays or two backends converge.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING

from harvester.events import SERVICE_RENAMES, Row

if TYPE_CHECKING:
    from harvester.sinks.cassandra import CassandraOptions

# One deletion `forget` runs: (the row, CQL, its parameters, the USING TIMESTAMP, keyspace.table).
ForgetStep = tuple[Row, str, tuple, "int | None", str]

# The Dovecot Pro guide's dovecot_stats table has these three.
PER_USER_COLUMNS = {s: [f"last_login_{s}", f"remote_ip_{s}"] for s in ("imap", "pop3", "lmtp")}


# CQL reserved words a table or column could plausibly be named (plus "user", a keyword in
# CREATE USER): these, and names with capitals, are quoted.
_RESERVED = frozenset({
    "add", "allow", "alter", "and", "apply", "asc", "authorize", "batch", "begin", "by", "columnfamily", "create",
    "delete", "desc", "describe", "drop", "entries", "execute", "from", "full", "grant", "if", "in", "index",
    "infinity", "insert", "into", "keyspace", "limit", "modify", "nan", "norecursive", "not", "null", "of", "on",
    "or", "order", "primary", "rename", "replace", "revoke", "schema", "select", "set", "table", "to", "token",
    "truncate", "unlogged", "update", "use", "using", "view", "where", "with", "user"
})


def q(name: str) -> str:
    """A CQL identifier, quoted when it must be."""
    if name.lower() in _RESERVED or name != name.lower():
        return '"' + name.replace('"', '""') + '"'
    return name


@dataclass
class PerService:
    """One row per (account, service): the default, and the shape of Dovecot's last_login plugin."""

    keyspace: str
    table: str = "last_login"
    name: str = "per_service"
    event_ttl: int = 0  # seconds a last_event row lives after its write (0: for good)
    _statements: dict = field(default_factory=dict, repr=False, compare=False)  # (session, which) -> prepared

    def schema(self) -> list[str]:
        ks, t = q(self.keyspace), q(self.table)
        return [
            f"CREATE TABLE IF NOT EXISTS {ks}.{t} (\n"
            "    userid text,\n    service text,        -- imap, pop3, lmtp, submission, sieve, webmail\n"
            "    last_access timestamp, -- its write time is the same instant in microseconds\n"
            "    last_ip text,          -- client address; for lmtp the delivering MTA's\n"
            "    node text,             -- backend that logged it\n"
            "    PRIMARY KEY ((userid), service)\n)",
            f"CREATE TABLE IF NOT EXISTS {ks}.last_event (\n"
            "    userid text,\n    kind text,           -- auth_fail, aborted, refused, pop3_delete\n"
            "    service text,\n    time timestamp,\n    ip text,\n    node text,\n"
            "    detail text,         -- e.g. deleted=3 messages=3\n"
            "    PRIMARY KEY ((userid), kind)\n)",
        ]

    def lookup_cql(self) -> str:
        return (f"SELECT service, last_access, last_ip, node, WRITETIME(last_access) "
                f"FROM {q(self.keyspace)}.{q(self.table)} WHERE userid = ?")

    def statements(self) -> dict[str, str]:
        ks = q(self.keyspace)
        return {
            "login": f"INSERT INTO {ks}.{q(self.table)} (userid, service, last_access, last_ip, node) "
                     "VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?",
            "event": f"INSERT INTO {ks}.last_event (userid, kind, service, time, ip, node, detail) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ? AND TTL ?",
        }

    def table_of(self, key: str) -> str:
        """The table a statement key writes (rows of one account and table share a partition)."""
        return "last_event" if key == "event" else self.table

    def params(self, r: Row) -> tuple[str, tuple] | None:
        ms = r.time_us // 1000
        if r.kind == "login":
            return "login", (r.user, r.service, ms, r.ip, r.node, r.time_us)
        return "event", (r.user, r.kind, r.service, ms, r.ip, r.node, r.detail, r.time_us, self.event_ttl)

    def lookup(self, session, user: str) -> list[Row]:
        # Both tables at once: a lookup costs one round trip, not two.
        logins = session.execute_async(self._prepared(session, "lookup"), (user,))
        events = session.execute_async(self._prepared(session, "events"), (user,))
        rows = _renamed(Row(user, svc, "login", *_instant(at, wt), ip, node)
                        for svc, at, ip, node, wt in logins.result())
        rows += [Row(user, SERVICE_RENAMES.get(svc, svc), kind, *_instant(at, wt), ip, node, detail)
                 for kind, svc, at, ip, node, detail, wt in events.result()]
        return sorted(rows, key=lambda r: (r.kind != "login", -r.time_us, r.service))

    def export(self, session):
        cql = (f"SELECT userid, service, last_access, last_ip, node, WRITETIME(last_access) "
               f"FROM {q(self.keyspace)}.{q(self.table)}")
        rows = (Row(user, svc, "login", *_instant(at, wt), ip, node)
                for user, svc, at, ip, node, wt in session.execute(cql))
        for _, partition in groupby(rows, key=lambda r: r.user):  # a partition's rows come together
            yield from _renamed(partition)

    def forget_plan(self, session, user: str, service: str | None) -> list[ForgetStep]:
        """(row, DELETE, its parameters, the tombstone's timestamp, keyspace.table) for what `forget` removes:
        one service's login row, or (no service) every login and last_event row of `user`. Each row is deleted
        USING TIMESTAMP its newest cell's write time: a plain DELETE (now) cannot remove a cell written in the
        future, and a row written at a normal time gets a normal tombstone (hiding no later login)."""
        ks, t = q(self.keyspace), q(self.table)
        sel = (f"SELECT service, last_access, last_ip, node, WRITETIME(last_access), WRITETIME(last_ip), "
               f"WRITETIME(node) FROM {ks}.{t} WHERE userid = %s")
        found = session.execute(sel, (user,))
        if service is not None:  # and the rows an earlier version stored under its old name
            found = [r for r in found if SERVICE_RENAMES.get(r[0], r[0]) == service]
        out: list[ForgetStep] = []
        for svc, at, ip, node, *wts in found:
            ts = _newest(wts)
            if ts is not None:
                out.append((Row(user, svc, "login", *_instant(at, wts[0]), ip, node),
                            f"DELETE FROM {ks}.{t} USING TIMESTAMP %s WHERE userid = %s AND service = %s",
                            (ts, user, svc), ts, f"{ks}.{t}"))
        if service is None:
            for kind, svc, at, ip, node, detail, *wts in session.execute(
                    f"SELECT kind, service, time, ip, node, detail, WRITETIME(time), WRITETIME(service), "
                    f"WRITETIME(ip), WRITETIME(node), WRITETIME(detail) FROM {ks}.last_event WHERE userid = %s",
                    (user,)):
                ts = _newest(wts)
                if ts is not None:
                    out.append((Row(user, svc, kind, *_instant(at, wts[0]), ip, node, detail),
                                f"DELETE FROM {ks}.last_event USING TIMESTAMP %s WHERE userid = %s AND kind = %s",
                                (ts, user, kind), ts, f"{ks}.last_event"))
        return out

    def _prepared(self, session, which: str):
        """A lookup statement, prepared once per session (preparing is a round trip of its own)."""
        key = (id(session), which)
        if key not in self._statements:
            cql = self.lookup_cql() if which == "lookup" else (
                f"SELECT kind, service, time, ip, node, detail, WRITETIME(time) "
                f"FROM {q(self.keyspace)}.last_event WHERE userid = ?")
            self._statements[key] = session.prepare(cql)
        return self._statements[key]


@dataclass
class Wide:
    """One row per account, a time (and IP) column per service: Dovecot Pro's dovecot_stats, or yours."""

    keyspace: str
    table: str
    user_column: str
    columns: dict[str, list[str]] = field(default_factory=dict)
    name: str = "per_user"
    _statements: dict = field(default_factory=dict, repr=False, compare=False)  # session -> prepared lookup

    def schema(self) -> list[str]:
        cols = [f"    {q(self.user_column)} text PRIMARY KEY"]
        for cs in self.columns.values():
            cols.append(f"    {q(cs[0])} timestamp")
            if len(cs) > 1:
                cols.append(f"    {q(cs[1])} inet")
        return [f"CREATE TABLE IF NOT EXISTS {q(self.keyspace)}.{q(self.table)} (\n" + ",\n".join(cols) + "\n)"]

    def lookup_cql(self) -> str:
        sel = []
        for cs in self.columns.values():
            sel += [q(cs[0]), f"WRITETIME({q(cs[0])})"] + ([q(cs[1])] if len(cs) > 1 else [])
        return (f"SELECT {', '.join(sel)} FROM {q(self.keyspace)}.{q(self.table)} "
                f"WHERE {q(self.user_column)} = ?")

    def statements(self) -> dict[str, str]:
        out = {}
        for svc, cs in self.columns.items():
            sets = ", ".join(f"{q(c)} = ?" for c in cs)
            out[svc] = (f"UPDATE {q(self.keyspace)}.{q(self.table)} USING TIMESTAMP ? SET {sets} "
                        f"WHERE {q(self.user_column)} = ?")
        return out

    def table_of(self, key: str) -> str:
        return self.table

    def params(self, r: Row) -> tuple[str, tuple] | None:
        cs = self.columns.get(r.service) if r.kind == "login" else None
        if cs is None:
            return None
        values: tuple = (r.time_us, r.time_us // 1000)
        if len(cs) > 1:
            values += (_inet(r.ip),)
        return r.service, values + (r.user,)

    def lookup(self, session, user: str) -> list[Row]:
        out = []
        if id(session) not in self._statements:  # prepared once per session (a round trip of its own)
            self._statements[id(session)] = session.prepare(self.lookup_cql())
        for row in session.execute(self._statements[id(session)], (user,)):
            i = 0
            for svc, cs in self.columns.items():
                at, wt = row[i], row[i + 1]
                ip = row[i + 2] if len(cs) > 1 else None
                i += 2 + (len(cs) > 1)
                if at is not None:
                    out.append(Row(user, svc, "login", *_instant(at, wt), ip, None))
        return sorted(out, key=lambda r: (-r.time_us, r.service))

    def export(self, session):
        cql = self.lookup_cql().split(" WHERE ")[0].replace("SELECT ", f"SELECT {q(self.user_column)}, ", 1)
        for row in session.execute(cql):
            user, i = row[0], 1
            for svc, cs in self.columns.items():
                at, wt = row[i], row[i + 1]
                ip = row[i + 2] if len(cs) > 1 else None
                i += 2 + (len(cs) > 1)
                if at is not None:
                    yield Row(user, svc, "login", *_instant(at, wt), ip, None)


    def forget_plan(self, session, user: str, service: str | None) -> list[ForgetStep]:
        """As PerService.forget_plan, per service column pair (a pinned column does not pin the others)."""
        out: list[ForgetStep] = []
        for svc, cs in self.columns.items():
            if service is not None and svc != service:
                continue
            sel = ", ".join(f"{q(c)}, WRITETIME({q(c)})" for c in cs)
            row = session.execute(f"SELECT {sel} FROM {q(self.keyspace)}.{q(self.table)} "
                                  f"WHERE {q(self.user_column)} = %s", (user,)).one()
            if row is None or row[0] is None:
                continue
            ts = _newest(row[1::2])
            ip = row[2] if len(cs) > 1 else None
            out.append((Row(user, svc, "login", *_instant(row[0], row[1]), None if ip is None else str(ip), None),
                        f"DELETE {', '.join(q(c) for c in cs)} FROM {q(self.keyspace)}.{q(self.table)} "
                        f"USING TIMESTAMP %s WHERE {q(self.user_column)} = %s", (ts, user), ts,
                        f"{q(self.keyspace)}.{q(self.table)}"))
        return out


Layout = PerService | Wide


def layout(o: CassandraOptions, keyspace: str) -> Layout:
    """The layout the options choose (cassandra_layout, _table, _user_column, _columns)."""
    kind = o.layout
    if kind == "per_service":
        return PerService(keyspace, o.table or "last_login", event_ttl=o.event_ttl_days * 86400)
    columns = {SERVICE_RENAMES.get(svc, svc): cs  # a configuration written before a service was renamed
               for svc, cs in (o.columns or (PER_USER_COLUMNS if kind == "per_user" else {})).items()}
    if kind == "custom" and not (o.table and o.columns):
        raise ValueError("cassandra_layout = custom needs cassandra_table and cassandra_columns "
                         "(and usually cassandra_user_column)")
    return Wide(keyspace, o.table or "dovecot_stats", o.user_column or "user",
                columns, kind)


def _renamed(rows: Iterable[Row]) -> list[Row]:
    """One account's login rows with old service names read as new ones (events.SERVICE_RENAMES: rows an
    earlier harvester stored as "managesieve" are "sieve"), the newer row kept where an account has both."""
    out: dict[str, Row] = {}
    for r in rows:
        r = r._replace(service=SERVICE_RENAMES.get(r.service, r.service))
        if r.service not in out or r.time_us > out[r.service].time_us:
            out[r.service] = r
    return list(out.values())


def _instant(at, writetime: int | None) -> tuple[int, int]:
    """(microseconds, digits) of a stored time: the write time when it is the same instant (ours are),
    else the column's milliseconds (rows another writer left)."""
    from datetime import UTC

    ms = round(at.replace(tzinfo=UTC).timestamp() * 1000)
    us = writetime if writetime is not None and writetime // 1000 == ms else ms * 1000
    digits = 0 if us % 1_000_000 == 0 else 3 if us % 1000 == 0 else 6
    return us, digits


def _newest(writetimes) -> int | None:
    """The newest of a row's cells' write times (None: no cell with a value)."""
    return max((w for w in writetimes if w is not None), default=None)


def _inet(ip: str | None) -> str | None:
    """An IP for an inet column; anything else (a name, 'local') is stored as no IP."""
    if ip is None:
        return None
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None
