"""The SQL stores: PostgreSQL (psycopg 3) and MySQL/MariaDB (PyMySQL), one module because all but the
dialect is shared (sql_layouts.Dialect holds what differs).

A write is one transaction of one statement per table (sql_layouts: the newest-wins comparison is in the
statement). When the server is gone (a restart, a network cut) `write` raises PartialWrite with every row
to retry and reconnects at the next write: nothing is lost and the daemon's checkpoints wait, as with
Cassandra. A deadlock between two writers is retried at once; a row the server refuses for what it holds
(a value its column cannot take) is found by writing the batch's rows one by one, and set aside.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import random
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from harvester import options as opt
from harvester.events import SERVICES, Row
from harvester.options import option
from harvester.sinks import sql_layouts as sl
from harvester.sinks.base import Batch, Forgotten, PartialWrite, StoreError, write_taken
from harvester.sinks.tls import client_context

log = logging.getLogger(__name__)
DEADLOCK_RETRIES = 5  # a deadlock or serialization failure between two writers: retried this often at once
READ_TIMEOUT = 120  # seconds a MySQL/MariaDB statement may take before the connection counts as lost


def _services(v: Any) -> list[str]:
    items = [s.strip() for s in v.split(",")] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(s in SERVICES for s in items):
        raise ValueError(f"expected services out of {', '.join(SERVICES)}, comma-separated")
    return items


@dataclass
class SqlOptions:
    """The PostgreSQL and MySQL/MariaDB stores' settings: sql_<name> in the config file."""

    PREFIX: ClassVar[str] = "sql_"
    layout: str = option(opt.choice(*sl.LAYOUTS), "per_service",
        "table shape: per_service (Dovecot's last_login plugin table, plus node), per_user (a column per "
        "service), iredmail (iRedMail's vmail.last_login as it is), modoboa (core_user.last_login of existing "
        "accounts), custom (your table, see sql_columns)", "LAYOUT")
    table: str = option(opt.ident, "",
        "table name (default: last_login; per_user: dovecot_stats; modoboa: core_user)", "NAME")
    user_column: str = option(opt.ident, "",
        "per_user/custom/iredmail/modoboa: the account column (default: userid; iredmail and modoboa: "
        "username)", "NAME")
    columns: dict[str, list[str]] = option(opt.columns, {},
        "per_user/custom/iredmail: service -> time column and IP column, e.g. "
        "imap=last_login_imap:remote_ip_imap,pop3=last_login_pop3 (a BIGINT column holds milliseconds, an "
        "INT Unix seconds, a timestamp the instant; services without one are skipped and counted)", "MAP")
    modoboa_services: list[str] = option(_services, sl.MODOBOA_SERVICES,
        "modoboa: the services whose newest login goes into last_login", "SERVICE[,SERVICE...]")
    tls_ca: str = option(opt.text, "",
        "CA certificate file: connect with TLS, verify the server's certificate and host name", "FILE")
    tls_cert: str = option(opt.text, "",
        "client certificate file (TLS client authentication; without sql_tls_ca the server is verified "
        "against the system's CAs)", "FILE")
    tls_key: str = option(opt.text, "", "client certificate's key file (default: in sql_tls_cert)", "FILE")
    connect_timeout: float = option(opt.seconds, 10.0, "seconds to wait for a connection", "SECONDS")
    password_file: str = option(opt.text, "",
        "file holding the store's password (its first line): PostgreSQL, MySQL/MariaDB and Redis stores",
        "FILE", key="store_password_file")


@dataclass(frozen=True)
class Address:
    user: str | None
    password: str | None
    host: str
    port: int | None
    database: str


def parse_url(url: str, scheme: str) -> Address:
    """SQLAlchemy's form: scheme://user[:password]@host[:port]/database (user and password %-escaped)."""
    u = urlsplit(url)
    if u.scheme != scheme or not u.path.strip("/") or "/" in u.path.strip("/"):
        raise StoreError(f"not a {scheme} URL: {url!r} (expected {scheme}://user@host[:port]/database)")
    try:
        port = u.port
    except ValueError:
        raise StoreError(f"{url!r}: the port is not a number") from None
    return Address(unquote(u.username) if u.username else None, unquote(u.password) if u.password else None,
                   u.hostname or "localhost", port, unquote(u.path.strip("/")))


def _password(a: Address, o: SqlOptions) -> str | None:
    """The URL's password, else store_password_file's first line, else none (trust, peer or TLS auth)."""
    if a.password is not None or not o.password_file:
        return a.password
    try:
        lines = Path(o.password_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"store_password_file {o.password_file}: cannot read: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    if not lines or not lines[0]:
        raise StoreError(f"store_password_file {o.password_file}: the first line is empty")
    return lines[0]


def system_ca_bundle() -> str:
    """The system's CA bundle file (SSL_CERT_FILE, else OpenSSL's default: /usr/lib/ssl/cert.pem on Debian), or
    libpq's "system" when neither exists."""
    paths = ssl.get_default_verify_paths()
    for f in (paths.cafile, paths.openssl_cafile):
        if f and os.path.isfile(f):
            return f
    return "system"


def _tls_hint(why: str, o: SqlOptions, host: str) -> str:
    """What to check for a connection the TLS handshake or the server refused: the setting to fix."""
    low = why.lower()
    if any(m in low for m in ("does not match host name", "hostname mismatch", "ip address mismatch")):
        return (f" (the server's certificate does not name {host}, the store URL's host: use a name or address "
                "the certificate holds)")
    if "certificate verify failed" in low:
        return (" (check sql_tls_ca: it must hold the CA that signed the server's certificate)" if o.tls_ca else
                " (verified against the system's CAs, as sql_tls_ca is not set: set it to the server's CA)")
    # MariaDB closes the handshake on a client certificate it does not trust (EOF); the others send an alert.
    if any(m in low for m in ("client certificate", "certificate required", "unknown ca", "bad certificate")) or (
            o.tls_cert and "eof occurred" in low):
        if o.tls_cert:
            return (" (the server refused the client certificate or closed the TLS handshake: check sql_tls_cert "
                    "and sql_tls_key, signed by a CA the server trusts)")
        return (" (the server requires a client certificate its CA signed: set sql_tls_cert and sql_tls_key"
                + ("" if o.tls_ca else ", and sql_tls_ca to verify the server") + ")")
    if not (o.tls_ca or o.tls_cert) and ("no encryption" in low or "insecure transport" in low):
        return " (a server that takes only TLS: set sql_tls_ca)"
    if "access denied" in low and not o.tls_cert:  # MySQL/MariaDB say no more for a missing certificate
        return (" (check the password; a user that requires a client certificate (REQUIRE X509) needs "
                "sql_tls_cert and sql_tls_key" + ("" if o.tls_ca else ", and a server that takes only TLS "
                                                  "sql_tls_ca") + ")")
    return ""


class SqlStore:
    """Last-login rows in a PostgreSQL or MySQL/MariaDB database, in the layout the settings choose."""

    Options = SqlOptions
    URL_HELP = ""
    URL_PREFIX = ""
    SCHEME = ""
    DIALECT: sl.Dialect = sl.DIALECTS["postgresql"]

    def __init__(self, url: str, options: SqlOptions | None = None, *, create: bool = True) -> None:
        self.options = o = options or SqlOptions()
        self.url = url
        self.address = parse_url(url, self.SCHEME)
        self.layout = _layout(o)
        self.d = self.DIALECT
        self._password = _password(self.address, o)
        # The server's chain verified against sql_tls_ca (else the system's CAs), its name against the URL's host.
        self._tls = client_context("sql", o.tls_ca, o.tls_cert, o.tls_key)
        self._skipped: Counter = Counter()
        self.conn: Any = None
        self.kinds: dict[str, dict[str, str]] = {}  # table -> column -> sl column kind
        self.limits: dict[str, dict[str, int | None]] = {}  # table -> column -> characters it holds
        try:
            self.conn = self._connect()
        except StoreError:
            raise
        except Exception as e:  # each driver raises its own types for refused, unreachable, bad password, TLS
            why = f"{type(e).__name__}: {_first_line(e)}"
            raise StoreError(f"cannot connect to {self._where()}: {why}"
                             f"{_tls_hint(why, o, self.address.host)}") from None
        self._created = self._check(create)  # what opening it made (apply_schema says so)

    # -- connections (per server) -----------------------------------------------------------------------
    def _connect(self) -> Any:
        raise NotImplementedError

    def _classify(self, e: BaseException) -> str:
        """data (the rows: find and refuse the bad one), deadlock (retry at once), or outage (retry later)."""
        raise NotImplementedError

    def _columns_sql(self) -> str:
        raise NotImplementedError

    def _where(self) -> str:
        a = self.address
        return f"{self.SCHEME}://{a.user or ''}@{a.host}:{a.port or ''}/{a.database}"

    def _connection(self) -> Any:
        if self.conn is None:
            self.conn = self._connect()
        return self.conn

    def _drop(self) -> None:
        """Forget a connection that failed: the next write opens a new one."""
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # it is gone either way
                conn.close()

    def _rollback(self) -> None:
        try:
            self.conn.rollback()
        except Exception:  # noqa: BLE001 - a connection that cannot even roll back is dropped
            self._drop()

    # -- the tables ---------------------------------------------------------------------------------------
    def _load_columns(self) -> None:
        cur = self._connection().cursor()
        for table in self.layout.required():
            cur.execute(self._columns_sql(), (table,))
            found = cur.fetchall()
            self.kinds[table] = {str(c): sl.column_kind(str(t)) for c, t, _ in found}
            self.limits[table] = {str(c): n for c, _, n in found}
        self.conn.commit()

    def _check(self, create: bool) -> list[str]:
        """Tables and columns the layout needs: an owned table missing is created (with `create`), a
        preset's is named with what it lacks. Returns what was created or added."""
        done: list[str] = []
        self._load_columns()
        missing = {t: [c for c in cols if c not in self.kinds[t]] for t, cols in self.layout.required().items()}
        if create and self.layout.owned and any(missing.values()):
            try:
                done = self._create(missing)
            except Exception:  # noqa: BLE001 - another process creating them at the same moment: look again
                self._rollback()
                self._load_columns()
                missing = {t: [c for c in cols if c not in self.kinds[t]] for t, cols in self.layout.required().items()}
                if any(missing.values()):
                    try:
                        done = self._create(missing)
                    except Exception as e:
                        self._rollback()
                        raise StoreError(f"{self._where()}: cannot create the tables: {type(e).__name__}: "
                                         f"{_first_line(e)}") from None
            self._load_columns()
            missing = {t: [c for c in cols if c not in self.kinds[t]] for t, cols in self.layout.required().items()}
        for t, cols in missing.items():
            if not self.kinds[t]:
                how = ("run 'harvester schema --apply', or open the store for writing" if self.layout.owned else
                       f"sql_layout = {self.layout.name} writes a table that must exist; harvester never creates it")
                raise StoreError(f"{self._where()}: no table {t} ({how})")
            if cols:
                raise StoreError(f"{self._where()}: table {t} lacks the column(s) {', '.join(cols)} that "
                                 f"sql_layout = {self.layout.name} needs" + (
                                     "" if self.layout.owned else "; harvester never alters a table it does not own"))
        for target in self.layout.targets():
            if self.kinds[target.table][target.time] == sl.TEXT:
                raise StoreError(f"{self._where()}: column {target.table}.{target.time} holds text; a time "
                                 "column must be BIGINT (milliseconds), INT (Unix seconds) or a timestamp")
        return done

    def _create(self, missing: dict[str, list[str]]) -> list[str]:
        """The owned tables (IF NOT EXISTS), and the columns an existing one lacks (the plugin's: node)."""
        done = []
        cur = self.conn.cursor()
        for stmt in self.layout.ddl(self.d):
            cur.execute(stmt)
        for t, cols in missing.items():
            if self.kinds[t]:
                for c in cols:
                    cur.execute(f"ALTER TABLE {self.d.q(t)} ADD COLUMN {self.d.q(c)} "
                                f"{'BIGINT' if c in self._time_columns() else 'VARCHAR(255)'}")
                    done.append(f"added column {t}.{c}")
            elif cols:
                done.append(f"created table {t}")
        self.conn.commit()
        return done

    def _time_columns(self) -> set[str]:
        return {t.time for t in self.layout.targets()}

    @classmethod
    def schema(cls, url: str, options: SqlOptions) -> list[str]:
        parse_url(url, cls.SCHEME)
        lay = _layout(options)
        d = cls.DIALECT
        out = lay.ddl(d)
        if not lay.owned:
            out = [f"-- sql_layout = {lay.name} writes the existing table(s) "
                   + "; ".join(f"{t} ({', '.join(cols)})" for t, cols in lay.required().items())
                   + ": harvester checks their columns and never creates or alters them"]
        return [*out, lay.select(d) + f" WHERE {d.q(lay.user_column)} = ?"]

    def apply_schema(self) -> tuple[list[str], str]:
        done = self._created + self._check(create=True)
        return self.schema(self.url, self.options), (f"-- {', '.join(done)} in {self._where()}" if done else
                                                     f"-- {self._where()} has what sql_layout = "
                                                     f"{self.layout.name} needs")

    # -- writes --------------------------------------------------------------------------------------------
    def flush(self, sink: Batch) -> int:
        return write_taken(sink, self)

    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    def _plan(self, rows: list[Row], refused: list[tuple[Row, str]]) -> dict[sl.Target, list[tuple[Row, tuple]]]:
        """Per target, (row, values) in key order, values encoded for their columns; one per key (the newest,
        of equal times the later): a statement may not touch a row twice. Rows without a place are counted,
        rows a column cannot take are refused."""
        per: dict[sl.Target, dict[tuple, tuple[Row, tuple]]] = {}
        for r in rows:
            routed = self.layout.route(r)
            if routed is None:
                self._skipped[r.place] += 1
                continue
            t, values = routed
            values, why = self._encode(t, values)
            if why:
                refused.append((r, why))
                continue
            key = values[:len(t.keys)]
            got = per.setdefault(t, {})
            old = got.get(key)
            if old is None or old[0].time_us <= r.time_us:
                got[key] = (r, values)
        # Logins first: last_event takes only accounts with a login row, this batch's included.
        order = sorted(per.items(), key=lambda item: item[0].known is not None)
        return {t: [got[k] for k in sorted(got)] for t, got in order}

    def _encode(self, t: sl.Target, values: tuple) -> tuple[tuple, str]:
        """The values as the target's columns take them, or why the row cannot be stored."""
        kinds, limits = self.kinds[t.table], self.limits[t.table]
        out = list(values)
        for i, c in enumerate(t.columns):
            v = out[i]
            if c == t.time:
                out[i] = sl.encode(v, kinds[c], self.d.naive_times)
            elif isinstance(v, str):
                if self.d.name == "postgresql" and "\x00" in v:  # PostgreSQL text cannot hold NUL
                    if i < len(t.keys):
                        return (), f"ValueError: {c} holds a NUL character, which PostgreSQL text cannot"
                    v = v.replace("\x00", "")
                limit = limits.get(c)
                if limit is not None and len(v) > limit:
                    if i < len(t.keys):
                        return (), f"ValueError: {c} is {len(v)} characters, column {t.table}.{c} holds {limit}"
                    v = v[:limit]
                if kinds.get(c) == sl.INET:
                    v = _inet(v)
                out[i] = v
        return tuple(out), ""

    def write(self, rows: list[Row]) -> int:
        refused: list[tuple[Row, str]] = []
        plan = self._plan(rows, refused)
        sent = [r for items in plan.values() for r, _ in items]
        why = ""
        for attempt in range(DEADLOCK_RETRIES):
            try:
                self._execute(plan)
                why = ""
                break
            except Exception as e:  # noqa: BLE001 - whatever the driver raises, no row is lost
                kind = self._classify(e)
                why = f"{type(e).__name__}: {_first_line(e)}"
                if kind == "deadlock" and attempt < DEADLOCK_RETRIES - 1:
                    time.sleep(random.uniform(0.01, 0.1) * (attempt + 1))
                    continue
                if kind == "data":
                    acked, failed, bad, why = self._one_by_one(sent)
                    return self._done(rows, acked, failed, refused + bad, why)
                return self._done(rows, 0, sent, refused, why)
        return self._done(rows, len(sent), [], refused, why)

    def _done(self, rows: list[Row], acked: int, failed: list[Row], refused: list[tuple[Row, str]], why: str) -> int:
        if failed or refused:
            raise PartialWrite.of(self.url, len(rows), failed, acked, refused, why)
        return acked

    def _one_by_one(self, rows: list[Row]) -> tuple[int, list[Row], list[tuple[Row, str]], str]:
        """A batch the server refused for a value: each row in its own transaction, to refuse only the bad."""
        acked, bad = 0, []  # type: int, list[tuple[Row, str]]
        for i, r in enumerate(rows):
            try:
                self._execute(self._plan([r], bad))
                acked += 1
            except Exception as e:  # noqa: BLE001
                text = f"{type(e).__name__}: {_first_line(e)}"
                if self._classify(e) != "data":
                    return acked, rows[i:], bad, text
                bad.append((r, text))
        return acked, [], bad, ""

    def _execute(self, plan: dict[sl.Target, list[tuple[Row, tuple]]]) -> None:
        """One transaction: every target's statement(s); on any error rolled back (or the connection
        dropped) and raised."""
        try:
            conn = self._connection()
            cur = conn.cursor()
            for t, items in plan.items():
                values = [v for _, v in items]
                kinds = self.kinds[t.table]
                for sql, part in self.d.statements(t, kinds, len(values)):
                    chunk = values[part[0]:part[1]] if part else values
                    cur.execute(sql, self.d.params(chunk))
            conn.commit()
        except Exception as e:
            if self.conn is not None and self._classify(e) != "outage":
                self._rollback()
            else:
                self._drop()
            raise

    # -- reads ----------------------------------------------------------------------------------------------
    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            cur = self._connection().cursor()
            cur.execute(sql, params)
            out = list(cur.fetchall())
            self.conn.commit()
            return out
        except Exception as e:
            self._drop()
            raise StoreError(f"{self._where()}: read failed: {type(e).__name__}: {_first_line(e)}") from None

    def lookup(self, user: str) -> list[Row]:
        lay, q = self.layout, self.d.q
        kinds = self.kinds[lay.table]
        rows = [r for row in self._read(lay.select(self.d) + f" WHERE {q(lay.user_column)} = %s", (user,))
                for r in lay.read(user, row, kinds)]
        if lay.events:
            rows += [Row(user, svc, kind, *sl.decode(at, sl.MS), ip, node, detail)
                     for kind, svc, at, ip, node, detail in self._read(
                         f"SELECT {q('kind')}, {q('service')}, {q('event_time')}, {q('ip')}, {q('node')}, "
                         f"{q('detail')} FROM {q('last_event')} WHERE {q('userid')} = %s", (user,))]
        return sorted(rows, key=lambda r: (r.kind != "login", -r.time_us, r.service))

    def export(self) -> Iterator[Row]:
        lay = self.layout
        kinds = self.kinds[lay.table]
        order = [lay.user_column] + (["service"] if isinstance(lay, sl.PerService) else [])
        for row in self._read(lay.select(self.d) + " ORDER BY " + ", ".join(self.d.q(c) for c in order)):
            yield from sorted(lay.read(row[0], row, kinds), key=lambda r: r.service)

    def forget(self, user: str, service: str | None = None) -> list[Forgotten]:
        """Delete the account's rows (per_service, last_event), or empty its service columns (wide layouts);
        never anything in Modoboa's accounts."""
        lay, q = self.layout, self.d.q
        if isinstance(lay, sl.Modoboa):
            raise StoreError("sql_layout = modoboa: harvester never deletes from Modoboa's accounts")
        gone = [r for r in self.lookup(user) if (r.kind == "login" and service in (None, r.service))
                or (r.kind != "login" and service is None)]
        stmts: list[tuple[str, tuple]] = []
        if isinstance(lay, sl.PerService):
            where = f"{q('userid')} = %s" + ("" if service is None else f" AND {q('service')} = %s")
            stmts.append((f"DELETE FROM {q(lay.table)} WHERE {where}", (user,) if service is None else (user, service)))
        else:
            cols = [c for s, cs in lay.services.items() if service in (None, s) for c in cs]
            if cols:
                stmts.append((f"UPDATE {q(lay.table)} SET {', '.join(f'{q(c)} = NULL' for c in cols)} "
                              f"WHERE {q(lay.user_column)} = %s", (user,)))
        if lay.events and service is None:
            stmts.append((f"DELETE FROM {q('last_event')} WHERE {q('userid')} = %s", (user,)))
        try:
            cur = self._connection().cursor()
            for sql, params in stmts:
                cur.execute(sql, params)
            self.conn.commit()
        except Exception as e:
            self._drop()
            raise StoreError(f"{self._where()}: forget failed: {type(e).__name__}: {_first_line(e)}") from None
        return [Forgotten(r) for r in gone]

    def close(self) -> None:
        self._drop()


def _layout(o: SqlOptions) -> sl.Layout:
    try:
        return sl.layout(o.layout, o.table, o.user_column, o.columns, o.modoboa_services)
    except ValueError as e:
        raise StoreError(str(e)) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _inet(ip: str | None) -> str | None:
    """An address for an inet column; anything else (a name, 'local') is stored as no address."""
    try:
        return None if ip is None else str(ipaddress.ip_address(ip))
    except ValueError:
        return None


class PostgresStore(SqlStore):
    """PostgreSQL through psycopg 3: the columns travel as arrays, one statement per table and write."""

    URL_HELP = "postgresql://user@host[:port]/database"
    URL_PREFIX = "postgresql://"
    SCHEME = "postgresql"
    DIALECT = sl.DIALECTS["postgresql"]

    def _connect(self) -> Any:
        import psycopg

        a, o = self.address, self.options
        tls: dict[str, Any] = {}
        if self._tls is not None:  # libpq makes its own context from the same files (_tls has checked them)
            # verify-full: the chain and the host name, as for MySQL. Without sql_tls_ca, the system's CA bundle
            # by its path: psycopg[binary]'s own OpenSSL looks for "system" CAs where Debian keeps none.
            tls = {"sslmode": "verify-full", "sslrootcert": o.tls_ca or system_ca_bundle()}
            if o.tls_cert:
                tls.update(sslcert=o.tls_cert, sslkey=o.tls_key or o.tls_cert)
        return psycopg.connect(host=a.host, port=a.port or 5432, user=a.user, password=self._password,
                               dbname=a.database, connect_timeout=max(1, round(o.connect_timeout)),
                               application_name="harvester", **tls)

    def _columns_sql(self) -> str:
        return ("SELECT column_name, data_type, character_maximum_length FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = %s")

    def _classify(self, e: BaseException) -> str:
        state = getattr(e, "sqlstate", None) or ""
        if state in ("40P01", "40001"):
            return "deadlock"
        if state[:2] in ("22", "23"):
            return "data"
        return "outage"


class MysqlStore(SqlStore):
    """MySQL and MariaDB through PyMySQL: multi-row statements (sql_layouts.MYSQL_ROWS_PER_STATEMENT)."""

    URL_HELP = "mysql://user@host[:port]/database"
    URL_PREFIX = "mysql://"
    SCHEME = "mysql"
    DIALECT = sl.DIALECTS["mysql"]
    DATA_ERRORS = frozenset({1048, 1264, 1265, 1292, 1366, 1406, 1062, 1452, 3988})

    def _connect(self) -> Any:
        import pymysql

        a, o = self.address, self.options
        # Our context, not PyMySQL's ssl_* (which verify nothing without ssl_ca): the chain and host name.
        tls: dict[str, Any] = {} if self._tls is None else {"ssl": self._tls}
        conn = pymysql.connect(
            host=a.host, port=a.port or 3306, user=a.user or "", password=self._password or "", database=a.database,
            charset="utf8mb4", connect_timeout=o.connect_timeout, read_timeout=READ_TIMEOUT,
            write_timeout=READ_TIMEOUT, autocommit=False,
            # UTC for TIMESTAMP columns; strict, so a value a column cannot take is an error, never cut silently.
            init_command="SET time_zone = '+00:00', sql_mode = CONCAT_WS(',', NULLIF(@@sql_mode, ''), "
                         "'STRICT_ALL_TABLES')", **tls)
        if self._tls is not None:
            self._require_tls(conn)
        return conn

    def _require_tls(self, conn: Any) -> None:
        """A backstop: PyMySQL >= 1.2 already refuses, before authenticating, a server that offers no TLS when it
        is given a context."""
        cur = conn.cursor()
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        cipher = (cur.fetchone() or ("", ""))[1]
        conn.commit()
        if not cipher:
            conn.close()
            raise StoreError(f"cannot connect to {self._where()}: the server does not speak TLS, which "
                             "sql_tls_ca / sql_tls_cert ask for")

    def _columns_sql(self) -> str:
        return ("SELECT column_name, data_type, character_maximum_length FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND table_name = %s")

    def _classify(self, e: BaseException) -> str:
        code = e.args[0] if e.args and isinstance(e.args[0], int) else 0
        if code in (1213, 1205):
            return "deadlock"
        if code in self.DATA_ERRORS or type(e).__name__ == "DataError":
            return "data"
        return "outage"


class MariadbStore(MysqlStore):
    """mariadb:// (SQLAlchemy's name for the same server family)."""

    URL_HELP = "mariadb://user@host[:port]/database"
    URL_PREFIX = "mariadb://"
    SCHEME = "mariadb"
