"""The fleet store: every backend writes to one Cassandra cluster.

Writes are prepared, token-aware, asynchronous with a bounded number in
flight, marked idempotent, and retried with backoff when a node timed out or
too few replicas were up. Each carries USING TIMESTAMP = the event time (see
cql.py), so retries and replays are harmless. `write` returns how many rows
the cluster acknowledged; when some are still not acknowledged after the
retries it raises PartialWrite naming them, so the caller keeps exactly those.
"""

from __future__ import annotations

import gc
import logging
import re
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from harvester.coalesce import Row
from harvester.config import Settings
from harvester.sinks import cql
from harvester.sinks.base import StoreError

log = logging.getLogger(__name__)
URL = re.compile(r"cassandra://(?P<hosts>[^/]+)/(?P<keyspace>[A-Za-z][A-Za-z0-9_]{0,47})/?")


class _Negotiation(logging.Filter):
    """The driver warns each time it negotiates the protocol down to what the cluster speaks (expected),
    and attaches tracebacks to connection warnings: harvester says what failed in one line itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Downgrading core protocol version"):
            return False
        if record.levelno < logging.CRITICAL and not log.isEnabledFor(logging.DEBUG):
            record.exc_info, record.exc_text = None, None
        return True


_driver_log = logging.getLogger("cassandra")
# The driver's INFO lines (datacenter chosen, hosts up) only with --log-level debug.
_driver_log.setLevel(logging.DEBUG if logging.getLogger().getEffectiveLevel() <= logging.DEBUG else logging.WARNING)
for _name in ("cassandra.cluster", "cassandra.connection", "cassandra.pool"):
    logging.getLogger(_name).addFilter(_Negotiation())


class PartialWrite(StoreError):
    """Some rows were not acknowledged; `failed` lists them (the rest are stored)."""

    def __init__(self, message: str, failed: list[Row], acknowledged: int) -> None:
        super().__init__(message)
        self.failed = failed
        self.acknowledged = acknowledged


def parse_url(url: str) -> tuple[list[str], int, str]:
    """cassandra://host1,host2[:port]/keyspace -> (hosts, port, keyspace); IPv6 hosts in [brackets]."""
    m = URL.fullmatch(url)
    if not m:
        raise StoreError(f"not a Cassandra URL: {url!r} (expected cassandra://host1,host2[:port]/keyspace)")
    hosts, port = [], 9042
    for part in m["hosts"].split(","):
        part = part.strip()
        hm = re.fullmatch(r"\[(?P<h6>[0-9A-Fa-f:.]+)\](?::(?P<p6>\d+))?|(?P<h>[^:\[\]]+)(?::(?P<p>\d+))?", part)
        if not hm:
            raise StoreError(f"{url!r}: cannot read host {part!r}")
        hosts.append(hm["h6"] or hm["h"])
        if hm["p6"] or hm["p"]:
            port = int(hm["p6"] or hm["p"])
    return hosts, port, m["keyspace"]


def _retryable() -> tuple[type, ...]:
    from cassandra import CoordinationFailure, OperationTimedOut, Unavailable, WriteTimeout
    from cassandra.cluster import NoHostAvailable
    from cassandra.connection import ConnectionException
    from cassandra.protocol import IsBootstrappingErrorMessage, OverloadedErrorMessage, ServerError

    return (WriteTimeout, Unavailable, OperationTimedOut, CoordinationFailure, NoHostAvailable,
            ConnectionException, OverloadedErrorMessage, IsBootstrappingErrorMessage, ServerError)


class CassandraStore:
    """Last-login rows in a Cassandra keyspace, in the layout the settings choose."""

    def __init__(self, url: str, settings: Settings | None = None) -> None:
        from cassandra import ConsistencyLevel
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
        from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

        settings = settings or Settings()
        self.url = url
        self.settings = settings
        hosts, port, self.keyspace = parse_url(url)
        try:
            self.layout = cql.layout(settings, self.keyspace)
        except ValueError as e:
            raise StoreError(str(e)) from None
        self.skipped: Counter = Counter()  # rows the layout has no column for, by service or kind
        self._prepared: dict[str, object] = {}
        self._retry_on = _retryable()
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(
                DCAwareRoundRobinPolicy(local_dc=settings.cassandra_datacenter or None)),
            consistency_level=getattr(ConsistencyLevel, settings.cassandra_consistency),
            request_timeout=settings.cassandra_request_timeout,
        )
        auth = None
        if settings.cassandra_username:
            auth = PlainTextAuthProvider(settings.cassandra_username, _password(settings))
        self.cluster = Cluster(
            hosts, port=port, execution_profiles={EXEC_PROFILE_DEFAULT: profile}, auth_provider=auth,
            ssl_context=_tls(settings), connect_timeout=settings.cassandra_connect_timeout,
            control_connection_timeout=settings.cassandra_connect_timeout)
        try:
            self.session = self.cluster.connect()
        except NoHostAvailable as e:
            self.cluster.shutdown()
            why = "; ".join(f"{h}: {err}" for h, err in e.errors.items()) or str(e)
            if "reset by peer" in why and not settings.cassandra_tls_ca:
                why += " (a node that takes only TLS? set cassandra_tls_ca)"
            raise StoreError(f"cannot connect to Cassandra at {','.join(hosts)}:{port}: {why}") from None
        except Exception as e:  # the driver raises a handful of types for a refused TLS or auth handshake
            self.cluster.shutdown()
            raise StoreError(f"cannot connect to Cassandra at {','.join(hosts)}:{port}: {e}") from None

    # -- writes ------------------------------------------------------------------
    def _statement(self, key: str):
        st = self._prepared.get(key)
        if st is None:
            from cassandra import InvalidRequest

            try:
                st = self.session.prepare(self.layout.statements()[key])
            except InvalidRequest as e:
                raise StoreError(f"{self.url}: {e} (does the schema exist? see 'harvester schema --apply')") from None
            st.is_idempotent = True
            self._prepared[key] = st
        return st

    def write(self, rows: list[Row]) -> int:
        gc_was = gc.isenabled()
        gc.disable()  # the driver makes several objects per request: cyclic GC rescanning them cost 40 %
        try:
            return self._write(rows)
        except StoreError:
            raise
        except Exception as e:  # whatever the driver raises, the caller keeps every row and the daemon runs on
            log.exception("%s: unexpected error while writing", self.url)
            raise PartialWrite(f"{self.url}: write failed: {type(e).__name__}: {e}", rows, 0) from None
        finally:
            if gc_was:
                gc.enable()

    def _execute(self, requests: list) -> list[tuple[bool, object]]:
        """Run the requests with at most cassandra_in_flight outstanding; (ok, result or error) each.

        Not the driver's execute_concurrent: when every request fails at once (no host up), its callbacks
        start the next request inside the previous one's callback and the stack overflows."""
        results: list = [None] * len(requests)
        slots = threading.BoundedSemaphore(self.settings.cassandra_in_flight)
        lock, all_done = threading.Lock(), threading.Event()
        left = [len(requests)]

        def finish(i: int, ok: bool, res: object) -> None:
            results[i] = (ok, res)
            slots.release()
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    all_done.set()

        for i, (_, st, params) in enumerate(requests):
            slots.acquire()
            try:
                future = self.session.execute_async(st, params)
            except Exception as e:
                finish(i, False, e)
                continue
            future.add_callbacks(callback=lambda r, i=i: finish(i, True, r),
                                 errback=lambda e, i=i: finish(i, False, e))
        if requests:
            all_done.wait()
        return results

    def _write(self, rows: list[Row]) -> int:
        requests, refused = self._requests(rows)
        acked, attempt = 0, 0
        while requests:
            results = self._execute(requests)
            failed = [(req, res) for req, (ok, res) in zip(requests, results, strict=True) if not ok]
            acked += sum(len(req[0]) for req in requests) - sum(len(req[0]) for req, _ in failed)
            if not failed:
                break
            errors = Counter(type(res).__name__ for _, res in failed)
            final = [res for _, res in failed if not isinstance(res, self._retry_on)]
            if final or attempt >= self.settings.cassandra_retries:
                lost = [r for req, _ in failed for r in req[0]]
                first = (final or [failed[0][1]])[0]
                raise PartialWrite(f"{self.url}: {len(lost)} of {len(rows)} row(s) not written after "
                                   f"{attempt} retries ({dict(errors)}; first: {first})", lost, acked)
            delay = min(0.2 * 2 ** attempt, 10.0)
            log.warning("%s: %d write(s) failed (%s), retrying in %.1f s", self.url, len(failed), dict(errors),
                        delay)
            time.sleep(delay)
            attempt += 1
            requests = [req for req, _ in failed]
        if refused:
            raise PartialWrite(f"{self.url}: {len(refused)} of {len(rows)} row(s) cannot be written to this table "
                               f"(first: {refused[0][0]}: {refused[0][1]})", [r for r, _ in refused], acked)
        return acked

    def _requests(self, rows: list[Row]) -> tuple[list[tuple[list[Row], object, None]], list[tuple[Row, Exception]]]:
        """One request per partition and table: an account's rows of one table go in one unlogged
        single-partition batch (each statement keeps its own USING TIMESTAMP). Rows arrive sorted by
        account, so they are consecutive. Rows whose values the table's types refuse come back apart."""
        from cassandra.query import BatchStatement, BatchType

        out: list[tuple[list[Row], object, None]] = []
        refused: list[tuple[Row, Exception]] = []
        group: list[tuple[Row, str, object]] = []

        def close() -> None:
            if len(group) == 1:
                r, _, bound = group[0]
                out.append(([r], bound, None))
            elif group:
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                for _, _, bound in group:
                    batch.add(bound)
                batch.is_idempotent = True
                out.append(([g[0] for g in group], batch, None))
            group.clear()

        for r in rows:
            p = self.layout.params(r)
            if p is None:
                self.skipped[r.service if r.kind == "login" else r.kind] += 1
                continue
            key, params = p
            try:
                bound = self._statement(key).bind(params)
            except (TypeError, ValueError, OverflowError) as e:
                refused.append((r, e))
                continue
            if group and (group[0][0].user != r.user or self.layout.table_of(key) != self.layout.table_of(
                    group[0][1])):
                close()
            group.append((r, key, bound))
        close()
        return out, refused

    # -- reads -------------------------------------------------------------------
    def lookup(self, user: str) -> list[Row]:
        return self._read(lambda: self.layout.lookup(self.session, user))

    def export(self) -> Iterator[Row]:
        yield from self._read(lambda: list(self.layout.export(self.session)))

    def _read(self, fn):
        from cassandra import DriverException, RequestExecutionException

        try:
            return fn()
        except (RequestExecutionException, DriverException) as e:
            raise StoreError(f"{self.url}: read failed: {e}") from None

    # -- schema ------------------------------------------------------------------
    def apply_schema(self) -> list[str]:
        """Create the keyspace and tables that are missing; returns the statements run."""
        done = []
        for stmt in schema(self.settings, self.url)[:-1]:
            try:
                self.session.execute(stmt, timeout=60)
            except Exception as e:
                raise StoreError(f"{self.url}: {e}\nwhile running:\n{stmt}") from None
            done.append(stmt)
        return done

    def close(self) -> None:
        self.cluster.shutdown()


def schema(settings: Settings, url: str) -> list[str]:
    """CREATE KEYSPACE, CREATE TABLE(s), and last the lookup query a support tool runs."""
    _, _, keyspace = parse_url(url)
    try:
        lay = cql.layout(settings, keyspace)
    except ValueError as e:
        raise StoreError(str(e)) from None
    ks = (f"CREATE KEYSPACE IF NOT EXISTS {cql.q(keyspace)}\n"
          f"    WITH replication = {settings.cassandra_replication} AND durable_writes = true")
    return [ks, *lay.schema(), lay.lookup_cql()]


def _password(settings: Settings) -> str:
    path = settings.cassandra_password_file
    if not path:
        raise StoreError("cassandra_username is set but cassandra_password_file is not "
                         "(the password is read from a file, never given on the command line)")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"cassandra_password_file {path}: cannot read: {getattr(e, 'strerror', None) or e}") \
            from None
    if not lines or not lines[0]:
        raise StoreError(f"cassandra_password_file {path}: the first line is empty")
    return lines[0]


def _tls(settings: Settings) -> ssl.SSLContext | None:
    if settings.cassandra_tls_key and not settings.cassandra_tls_cert:
        raise StoreError("cassandra_tls_key is set but cassandra_tls_cert is not")
    if not (settings.cassandra_tls_ca or settings.cassandra_tls_cert):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # contact points are usually addresses; the chain is still verified
    try:
        if settings.cassandra_tls_ca:
            ctx.load_verify_locations(settings.cassandra_tls_ca)
        else:
            ctx.load_default_certs()
        if settings.cassandra_tls_cert:
            def encrypted() -> str:  # else OpenSSL would prompt on the terminal (or fail obscurely without one)
                raise StoreError(f"cassandra_tls_key {settings.cassandra_tls_key or settings.cassandra_tls_cert}: "
                                 "the key is encrypted; harvester needs an unencrypted key "
                                 "(openssl pkey -in KEY -out PLAIN_KEY)")

            ctx.load_cert_chain(settings.cassandra_tls_cert, settings.cassandra_tls_key or None, password=encrypted)
    except (OSError, ssl.SSLError) as e:
        raise StoreError(f"Cassandra TLS files: {e}") from None
    return ctx
