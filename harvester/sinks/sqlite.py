"""The embedded store: one SQLite file, for one machine or a first try.

Rows are upserted with a WHERE on the stored time, so replays, late and
out-of-order writes never move a time backwards and applying the same logs
twice gives the same table.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from harvester import native
from harvester.events import SERVICE_RENAMES, Row
from harvester.options import choice, option
from harvester.sinks.base import Batch, Forgotten, StoreError, write_taken
from harvester.timeparse import rfc3339

SCHEMA = """
CREATE TABLE IF NOT EXISTS last_login (
    user          TEXT    NOT NULL,
    service       TEXT    NOT NULL,  -- imap, pop3, lmtp, submission, sieve, webmail
    last_login    TEXT    NOT NULL,  -- RFC 3339 UTC at the log's precision
    last_login_us INTEGER NOT NULL,  -- the same instant, epoch microseconds (for ordering)
    last_ip       TEXT,              -- client address; for lmtp the delivering MTA's
    node          TEXT,              -- backend that logged it
    PRIMARY KEY (user, service)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_event (
    user      TEXT    NOT NULL,
    kind      TEXT    NOT NULL,      -- auth_fail, aborted, refused, pop3_delete
    service   TEXT    NOT NULL,
    time      TEXT    NOT NULL,
    time_us   INTEGER NOT NULL,
    ip        TEXT,
    node      TEXT,
    detail    TEXT,                  -- e.g. deleted=3 messages=3
    PRIMARY KEY (user, kind)
) WITHOUT ROWID;
"""

_LOGIN_UPDATE = """
ON CONFLICT (user, service) DO UPDATE SET
    last_login = excluded.last_login, last_login_us = excluded.last_login_us,
    last_ip = excluded.last_ip, node = excluded.node
WHERE excluded.last_login_us >= last_login.last_login_us
"""

UPSERT_LOGIN = """
INSERT INTO last_login (user, service, last_login, last_login_us, last_ip, node)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)""" + _LOGIN_UPDATE

# Version 1 of the file's contents (PRAGMA user_version): service names as events.SERVICES has them. A store
# of an earlier harvester is brought to it once, when it is opened: rows of a renamed service (ManageSieve's
# "managesieve" -> "sieve") join the new name's, the newer of the two kept.
USER_VERSION = 1
RENAME_SERVICE = ["""
INSERT INTO last_login (user, service, last_login, last_login_us, last_ip, node)
SELECT user, :new, last_login, last_login_us, last_ip, node FROM last_login WHERE service = :old""" + _LOGIN_UPDATE,
                  "DELETE FROM last_login WHERE service = :old",
                  "UPDATE last_event SET service = :new WHERE service = :old"]

_EVENT_UPDATE = """
ON CONFLICT (user, kind) DO UPDATE SET
    service = excluded.service, time = excluded.time, time_us = excluded.time_us,
    ip = excluded.ip, node = excluded.node, detail = excluded.detail
WHERE excluded.time_us >= last_event.time_us
"""

# event_rows = "all": every account named in a failure gets a row (a password spray: one per made-up name).
UPSERT_EVENT = """
INSERT INTO last_event (user, kind, service, time, time_us, ip, node, detail)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)""" + _EVENT_UPDATE

# event_rows = "known" (the default): only accounts with a stored login. Run after the batch's logins in
# the same transaction, so an account's first login and a failure in one batch both land.
UPSERT_KNOWN_EVENT = """
INSERT INTO last_event (user, kind, service, time, time_us, ip, node, detail)
SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8 WHERE EXISTS (SELECT 1 FROM last_login WHERE user = ?1)""" + _EVENT_UPDATE

BUSY_SECONDS = 2.0  # wait this long for another process's lock, then fail (the daemon retries with backoff)
# Every connection's (the Python one and the native writer's). FULL: each commit syncs the WAL; with NORMAL a
# commit can roll back after a power cut while the daemon's checkpoint (synced) says its lines were stored.
# 64 MiB of cache: big batches touch many B-tree pages.
PRAGMAS = "PRAGMA synchronous=FULL; PRAGMA cache_size=-65536;"

def params(rows: list[Row]) -> tuple[list[tuple], list[tuple]]:
    """Rows as the parameters of UPSERT_LOGIN and UPSERT_EVENT (times as RFC 3339 text)."""
    logins = [(r.user, r.service, rfc3339(r.time_us, r.digits), r.time_us, r.ip, r.node)
              for r in rows if r.kind == "login"]
    events = [(r.user, r.kind, r.service, rfc3339(r.time_us, r.digits), r.time_us, r.ip, r.node, r.detail)
              for r in rows if r.kind != "login"]
    return logins, events


# The native one builds the same tuples ten times faster.
_params = native.fastscan.sqlite_params if native.fastscan is not None else params

# What a support tool runs (also printed in the README).
LOOKUP_SQL = """
SELECT service, last_login, last_ip, node FROM last_login
WHERE user = ? ORDER BY last_login_us DESC
"""


def path_from_url(url: str) -> Path:
    """sqlite:///relative/path.db or sqlite:////absolute/path.db (SQLAlchemy's convention)."""
    if not url.startswith("sqlite:///"):
        raise StoreError(f"not a SQLite URL: {url!r} (expected sqlite:///relative.db or sqlite:////abs.db)")
    rest = url[len("sqlite:///"):]
    if not rest:
        raise StoreError(f"{url!r} names no file")
    return Path(rest)


@dataclass
class SqliteOptions:
    """The SQLite store's settings (their keys in the config file carry no prefix)."""

    PREFIX: ClassVar[str] = ""
    event_rows: str = option(choice("known", "all"), "known",
        "which accounts get last_event rows (failed logins, POP3 deletions): known (only accounts with a "
        "stored login, so a password spray of made-up names adds no rows; SQLite only, Cassandra cannot "
        "check without a read: see event_ttl_days) or all", "known|all")


class SqliteStore:
    """Last-login rows in a local SQLite file (WAL, one writer)."""

    Options = SqliteOptions
    URL_HELP = "sqlite:///relative.db, sqlite:////absolute.db"
    URL_PREFIX = "sqlite:///"

    def __init__(self, url: str, options: SqliteOptions | None = None, *, create: bool = True) -> None:
        self.url = url
        self.path = path_from_url(url)
        self.upsert_event = UPSERT_KNOWN_EVENT if (options or SqliteOptions()).event_rows == "known" else UPSERT_EVENT
        if not create and not self.path.exists():
            raise StoreError(f"{self.path}: no such store (run 'harvester backfill' first, or pass --store)")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread=False: opened here, written from the daemon's writer thread (one at a time).
            self.db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(PRAGMAS)
            self.db.executescript(SCHEMA)
            if self.db.execute("PRAGMA user_version").fetchone()[0] < USER_VERSION:
                self._upgrade()
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{self.path}: cannot open SQLite store: {e}") from None
        self._writer: Any = None  # harvester._fastscan.SqliteWriter, made at the first native flush

    def _upgrade(self) -> None:
        """Bring a store written by an earlier harvester to USER_VERSION, in one transaction (another
        process opening it meanwhile waits, then finds it done)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self.db.execute("PRAGMA user_version").fetchone()[0] < USER_VERSION:
                for old, new in SERVICE_RENAMES.items():
                    for sql in RENAME_SERVICE:
                        self.db.execute(sql, {"old": old, "new": new})
                self.db.execute(f"PRAGMA user_version = {USER_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    @staticmethod
    def schema(url: str, options: SqliteOptions) -> list[str]:
        return [SCHEMA.strip().removesuffix(";"), LOOKUP_SQL.strip()]

    def apply_schema(self) -> tuple[list[str], str]:
        """The tables are made when the store opens; nothing is left to do."""
        return self.schema(self.url, SqliteOptions()), f"-- created what was missing in {self.url}"

    def skipped(self) -> dict[str, int]:
        """Every row has its place in the two tables."""
        return {}

    def flush(self, sink: Batch) -> int:
        """Write and empty what `sink` gathered; on a failure the sink keeps it.

        Native tables go straight into SQLite through the native writer (same upserts, no
        Python row per key, about a third less time), merged with the sink's runs as they are
        written; anything else goes through `write`.
        """
        tables = sink.native_tables()
        if tables is None:
            return write_taken(sink, self)
        try:
            if self._writer is None:
                self._writer = native.fastscan.SqliteWriter(str(self.path), UPSERT_LOGIN, self.upsert_event, PRAGMAS,
                                                            int(BUSY_SECONDS * 1000))
            written, bad = self._writer.write(tables.logins, tables.others, tables.login_runs, tables.other_runs)
        except RuntimeError as e:
            raise StoreError(self._failure(e)) from None
        sink.tables_written(bad)
        return written

    def write(self, rows: list[Row]) -> int:
        # Rows in key order (as Batch.take gives them) make the B-tree inserts sequential: about
        # twice as fast for large batches. Any order is correct: of two rows of one key, the later wins.
        logins, events = _params(rows)
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(UPSERT_LOGIN, logins)
            self.db.executemany(self.upsert_event, events)
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise StoreError(self._failure(e)) from None
        return len(logins) + len(events)

    def _failure(self, e: Exception) -> str:
        """A failed write, for the operator: a lock held elsewhere is named as such (it is retried)."""
        text = str(e)
        if "locked" in text or "busy" in text:
            return (f"{self.path}: write failed: {text}: another process holds a lock on the database (a support "
                    f"tool's open transaction, e.g. BEGIN EXCLUSIVE?); waited {BUSY_SECONDS:.0f} s, retried later")
        return f"{self.path}: write failed: {text}"

    def forget(self, user: str, service: str | None = None) -> list[Forgotten]:
        """Delete one service's login row, or every login and last_event row of `user`."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            gone = [r for r in self.lookup(user) if (r.kind == "login" and service in (None, r.service))
                    or (r.kind != "login" and service is None)]
            if service is None:
                self.db.execute("DELETE FROM last_login WHERE user = ?", (user,))
                self.db.execute("DELETE FROM last_event WHERE user = ?", (user,))
            else:
                self.db.execute("DELETE FROM last_login WHERE user = ? AND service = ?", (user, service))
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise StoreError(self._failure(e)) from None
        return [Forgotten(r) for r in gone]

    def lookup(self, user: str) -> list[Row]:
        rows = [Row(user, s, "login", t, _digits(text), ip, node)
                for s, text, t, ip, node in self.db.execute(
                    "SELECT service, last_login, last_login_us, last_ip, node FROM last_login "
                    "WHERE user = ? ORDER BY last_login_us DESC, service", (user,))]
        rows += [Row(user, s, k, t, _digits(text), ip, node, detail)
                 for k, s, text, t, ip, node, detail in self.db.execute(
                     "SELECT kind, service, time, time_us, ip, node, detail FROM last_event "
                     "WHERE user = ? ORDER BY time_us DESC, kind", (user,))]
        return rows

    def export(self) -> Iterator[Row]:
        for u, s, text, t, ip, node in self.db.execute(
                "SELECT user, service, last_login, last_login_us, last_ip, node FROM last_login "
                "ORDER BY user, service"):
            yield Row(u, s, "login", t, _digits(text), ip, node)

    def close(self) -> None:
        self._writer = None  # its connection closes first, so the last one to close checkpoints the WAL
        self.db.close()


def _digits(text: str) -> int:
    """Fractional digits of a stored RFC 3339 time (its precision)."""
    dot = text.find(".")
    return 0 if dot < 0 else len(text) - dot - 2
