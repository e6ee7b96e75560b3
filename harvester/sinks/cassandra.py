"""The fleet store: every backend writes to one Cassandra cluster.

Writes are prepared, token-aware, asynchronous with a bounded number in
flight, marked idempotent, and retried briefly when a node timed out or too
few replicas were up. Each carries USING TIMESTAMP = the event time (see
cql.py), so retries and replays are harmless. `write` returns how many rows
the cluster acknowledged; otherwise it raises PartialWrite naming the rows to
retry (an outage: no host, a timeout) and the rows the cluster refused for what
they are (a key over 64 KiB, a value the column cannot take), never retried.

One write() stays short when the cluster is down: it stops sending at the first
"no host"/connection/timeout error and does not retry those itself (the daemon
retries whole flushes with its own backoff), and it keeps no driver object
(statement, future, exception) in what it raises.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import gc
import logging
import re
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from harvester import options as opt
from harvester.events import Row
from harvester.options import option
from harvester.sinks import cql
from harvester.sinks.base import Batch, Forgotten, PartialWrite, StoreError, write_taken
from harvester.sinks.tls import client_context

log = logging.getLogger(__name__)
RETRY_LOG_REPEAT = 60.0  # a storm of retried writes is logged once, then at most this often
YOUNG_GC_EVERY = 2000  # requests sent between two collections of the youngest generation (see _execute)
RECONNECT_SECONDS = 1.0  # how often the driver tries a node that is down (its default backs off to 600 s)
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


TRIM_AFTER_ROWS = 10_000  # after a write this big, hand freed heap memory back to the system


def _trim() -> None:
    """glibc keeps memory freed by the driver's I/O thread in that thread's arena: after a big write (the
    catch-up after an outage) the process would stay hundreds of MB larger. malloc_trim gives it back."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


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


def _kinds() -> dict[str, tuple[type, ...]]:
    """What a failed request means. outage: nothing to gain from retrying at once (no host, the connection,
    a client-side timeout): stop sending and let the caller back off. retry: a node was slow or too few
    replicas were up: retry briefly. refused: the request is invalid for what it holds (but see _classify)."""
    from cassandra import CoordinationFailure, InvalidRequest, OperationTimedOut, Unavailable, WriteTimeout
    from cassandra.cluster import NoHostAvailable
    from cassandra.connection import ConnectionException
    from cassandra.protocol import IsBootstrappingErrorMessage, OverloadedErrorMessage, ServerError

    return {"outage": (NoHostAvailable, ConnectionException, OperationTimedOut),
            "retry": (WriteTimeout, Unavailable, CoordinationFailure, OverloadedErrorMessage,
                      IsBootstrappingErrorMessage, ServerError),
            "refused": (InvalidRequest,)}


# An InvalidRequest that is about the schema, not the row: every row would get it; kept, not refused.
_SCHEMA_GONE = re.compile(r"unconfigured table|[Kk]eyspace .* does not exist|[Uu]ndefined column|"
                          r"[Tt]able .* does not exist")
BIND_ERRORS = (TypeError, ValueError, OverflowError)  # the driver cannot encode a value for the column


class _Req:
    """One request: rows of one account and table (one partition), as statement keys and parameters;
    bound only when sent, so rows waiting through an outage hold no driver objects."""

    __slots__ = ("items",)

    def __init__(self, *items: tuple[Row, str, tuple]) -> None:
        self.items: list[tuple[Row, str, tuple]] = list(items)

    @property
    def rows(self) -> list[Row]:
        return [r for r, _, _ in self.items]


CONSISTENCY = ("ANY", "ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM", "EACH_QUORUM", "LOCAL_ONE")


@dataclass
class CassandraOptions:
    """The Cassandra store's settings: cassandra_<name> in the config file (event_ttl_days as it is)."""

    PREFIX: ClassVar[str] = "cassandra_"
    layout: str = option(opt.choice("per_service", "per_user", "custom"), "per_service",
        "table shape: per_service (one row per account and service: last_login), per_user (one row per "
        "account, a column per service: dovecot_stats), custom (your table, see cassandra_columns)", "LAYOUT")
    table: str = option(opt.ident, "",
        "table name (default: last_login for per_service, dovecot_stats for per_user)", "NAME")
    user_column: str = option(opt.ident, "",
        "per_user/custom: the account column (default: user)", "NAME")
    columns: dict[str, list[str]] = option(opt.columns, {},
        "per_user/custom: service -> time column and IP column, e.g. "
        "imap=last_login_imap:remote_ip_imap,pop3=last_login_pop3:remote_ip_pop3 (services without one "
        "are skipped and counted)", "MAP")
    datacenter: str = option(opt.text, "",
        "local datacenter for routing (default: the first contact point's)", "DC")
    consistency: str = option(opt.choice(*CONSISTENCY), "LOCAL_QUORUM", "write consistency level", "LEVEL")
    username: str = option(opt.text, "", "user name (PasswordAuthenticator)", "NAME")
    password_file: str = option(opt.text, "",
        "file holding the password (its first line); never give a password on the command line", "FILE")
    tls_ca: str = option(opt.text, "", "CA certificate file: connect with TLS and verify the nodes", "FILE")
    tls_cert: str = option(opt.text, "", "client certificate file (TLS client authentication)", "FILE")
    tls_key: str = option(opt.text, "", "client certificate's key file", "FILE")
    tls_check_hostname: bool = option(opt.yes_no, True,
        "TLS: each node's certificate must name the address harvester connects to (the driver dials addresses: "
        "a contact point's name is resolved first; other nodes at the address the cluster gives); no: the "
        "chain alone", "yes|no")
    connect_timeout: float = option(opt.seconds, 10.0, "seconds to wait for a connection", "SECONDS")
    request_timeout: float = option(opt.seconds, 10.0, "seconds to wait for one write or read", "SECONDS")
    in_flight: int = option(opt.whole(1, 10_000), 256, "writes in flight at once from one process", "N")
    retries: int = option(opt.whole(0, 100), 5,
        "retries of a write that timed out or found too few replicas (backoff 0.2 s doubling, at most "
        "10 s)", "N")
    replication: str = option(opt.text, "",
        "keyspace replication for 'harvester schema --apply' (default: derived from the cluster: "
        "NetworkTopologyStrategy, per data centre min(3, its nodes))", "CQL_MAP")
    event_ttl_days: int = option(opt.whole(0, 7300), 30,
        "Cassandra: last_event rows expire this many days after they are written (bounds a password "
        "spray's rows; 0: never)", "DAYS", key="event_ttl_days")


class CassandraStore:
    """Last-login rows in a Cassandra keyspace, in the layout the settings choose."""

    Options = CassandraOptions
    URL_HELP = "cassandra://host/keyspace"
    URL_PREFIX = "cassandra://"
    THREAD_SAFE_READS = True  # the driver's session takes requests from many threads at once

    def __init__(self, url: str, options: CassandraOptions | None = None, *, create: bool = True) -> None:
        from cassandra import ConsistencyLevel
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
        from cassandra.policies import ConstantReconnectionPolicy, DCAwareRoundRobinPolicy, TokenAwarePolicy

        o = self.options = options or CassandraOptions()
        self.url = url
        hosts, port, self.keyspace = parse_url(url)
        try:
            self.layout = cql.layout(o, self.keyspace)
        except ValueError as e:
            raise StoreError(str(e)) from None
        self._skipped: Counter = Counter()  # rows the layout has no column for, by service or kind
        self._prepared: dict[str, object] = {}
        self._kinds = _kinds()
        self._retry_log = [float("-inf"), 0]  # (when last logged, retries since)
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(
                DCAwareRoundRobinPolicy(local_dc=o.datacenter or None)),
            consistency_level=getattr(ConsistencyLevel, o.consistency),
            request_timeout=o.request_timeout,
        )
        auth = None
        if o.username:
            auth = PlainTextAuthProvider(o.username, _password(o))
        self.cluster = Cluster(
            hosts, port=port, execution_profiles={EXEC_PROFILE_DEFAULT: profile}, auth_provider=auth,
            # The driver checks a node's certificate against the address it dials (contact points resolved first);
            # fleets whose certificates carry DNS names only set cassandra_tls_check_hostname = no.
            ssl_context=client_context("cassandra", o.tls_ca, o.tls_cert, o.tls_key,
                                       check_hostname=o.tls_check_hostname),
            connect_timeout=o.connect_timeout,
            control_connection_timeout=o.connect_timeout,
            # A node that comes back is noticed within about a second (the default waits up to 600 s).
            reconnection_policy=ConstantReconnectionPolicy(RECONNECT_SECONDS, max_attempts=None))
        try:
            self.session = self.cluster.connect()
        except NoHostAvailable as e:
            self.cluster.shutdown()
            why = "; ".join(f"{h}: {err}" for h, err in e.errors.items()) or str(e)
            if "reset by peer" in why and not o.tls_ca:
                why += " (a node that takes only TLS? set cassandra_tls_ca)"
            elif any(m in why for m in ("Hostname mismatch", "IP address mismatch", "doesn't match")):
                why += (" (the node's certificate does not name the address harvester connected to: add that "
                        "address to the certificate's subjectAltName, or set cassandra_tls_check_hostname = no to "
                        "verify the chain alone)")
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
                _drop_traceback(e)
                raise StoreError(f"{self.url}: {e} (does the schema exist? see 'harvester schema --apply')") from None
            st.is_idempotent = True
            self._prepared[key] = st
        return st

    def write(self, rows: list[Row]) -> int:
        gc_was = gc.isenabled()
        gc.disable()  # the driver makes several objects per request: cyclic GC rescanning them cost 40 %
        try:
            acked, failed, refused, why = self._write(rows)
        except StoreError:
            raise
        except Exception as e:  # whatever the driver raises, the caller keeps every row and the daemon runs on
            _drop_traceback(e)
            log.error("%s: unexpected error while writing: %s: %s", self.url, type(e).__name__, e)
            raise PartialWrite(f"{self.url}: write failed: {type(e).__name__}: {e}", rows, 0) from None
        finally:
            if gc_was:
                gc.enable()
            if len(rows) >= TRIM_AFTER_ROWS:
                _trim()
        if failed or refused:
            raise PartialWrite.of(self.url, len(rows), failed, acked, refused, why)
        return acked

    def _write(self, rows: list[Row]) -> tuple[int, list[Row], list[tuple[Row, str]], str]:
        """(acknowledged, rows to retry, rows refused with the reason, why the rows to retry failed).

        Only texts and rows leave this frame: no future, statement or driver exception."""
        started = time.monotonic()
        pending = self._requests(rows)
        why = self._prepare({key for req in pending for _, key, _ in req.items})
        if why:  # nothing can be sent: every row is retried by the caller, no request was made
            return 0, [r for req in pending for r in req.rows], [], why
        refused: list[tuple[Row, str]] = []
        failed: list[Row] = []
        acked, attempt, why = 0, 0, ""
        errors: Counter = Counter()
        while pending:
            retry: list[_Req] = []
            again: list[_Req] = []
            for req, (kind, text) in zip(pending, self._execute(pending, refused), strict=True):
                if kind == "ok":
                    acked += len(req.items)
                elif kind == "refused" and len(req.items) > 1:  # which of the batch's rows? each alone
                    again += [_Req(item) for item in req.items]
                elif kind == "refused":
                    refused.append((req.items[0][0], text))
                else:
                    errors[text.split(":", 1)[0]] += 1
                    why = why or text
                    if kind == "retry":
                        retry.append(req)
                    else:  # an outage (or an error nothing here can fix): send nothing more in this write
                        failed += req.rows
            delay = min(0.2 * 2 ** attempt, 10.0)
            if failed or (retry and (attempt >= self.options.retries or time.monotonic() - started
                                     + delay >= self.options.request_timeout)):
                failed += [r for req in retry + again for r in req.rows]  # the caller retries with its backoff
                break
            if retry:
                self._log_retry(len(retry), errors, delay)
                time.sleep(delay)
                attempt += 1
            pending = again + retry
        if failed and errors:
            why = f"{dict(errors)}; first: {why}"
        return acked, failed, refused, why

    def _prepare(self, keys: set[str]) -> str:
        """Prepare the statements this write needs that are not prepared yet, once, before any request is
        sent: "" when they are ready, else why not (no node up, or the prepare failed), and the write sends
        nothing. The driver keeps a failed prepare's future (with its exception) in its timer queue long
        after the prepare returned: a per-request prepare raised in _bind left each retry's frames, and the
        20,000 requests in them, reachable from there (7 MB per retry while the cluster was down)."""
        missing = sorted(k for k in keys if k not in self._prepared)
        if not missing:
            return ""
        if not any(h.is_up for h in self.cluster.metadata.all_hosts()):  # known down: do not even ask the driver
            return "NoHostAvailable: no Cassandra node is up"
        for key in missing:
            try:
                self._statement(key)
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001 - an outage or a driver error: classified, said, retried later
                _drop_traceback(e)
                try:
                    return self._classify(e)[1]
                except Exception:  # noqa: BLE001 - the rows must come back whatever the classification does
                    return f"{type(e).__name__}: {e}"
        return ""

    def _log_retry(self, n: int, errors: Counter, delay: float) -> None:
        """A retry storm: said once, then at most once a minute with how many retries there were since."""
        last, since = self._retry_log
        now = time.monotonic()
        if now - last >= RETRY_LOG_REPEAT:
            log.warning("%s: %d write(s) failed (%s), retrying in %.1f s%s", self.url, n, dict(errors), delay,
                        f" ({since} more retried since the last report)" if since else "")
            self._retry_log[:] = [now, 0]
        else:
            self._retry_log[1] = since + n

    def _execute(self, requests: list[_Req], refused: list[tuple[Row, str]]) -> list[tuple[str, str]]:
        """Send the requests with at most cassandra_in_flight outstanding; (kind, error text) each, kind one of
        ok, refused, retry, outage, error. Rows whose values cannot be bound go to `refused` (and out of
        their request). After the first outage error nothing more is sent: the rest get that error.

        Not the driver's execute_concurrent: when every request fails at once (no host up), its callbacks
        start the next request inside the previous one's callback and the stack overflows."""
        results: list = [("ok", "")] * len(requests)
        slots = threading.BoundedSemaphore(self.options.in_flight)
        lock, all_done = threading.Lock(), threading.Event()
        left = [len(requests)]
        stop: list = [None]

        def finish(i: int, e: BaseException | None) -> None:
            if e is not None:
                try:
                    results[i] = self._classify(e)
                except Exception:  # noqa: BLE001 - never leave write() waiting for a count that stopped
                    results[i] = ("error", f"{type(e).__name__}: {e}")
                if results[i][0] == "outage" and stop[0] is None:
                    stop[0] = results[i]
            slots.release()
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    all_done.set()

        for i, req in enumerate(requests):
            if i % YOUNG_GC_EVERY == YOUNG_GC_EVERY - 1:
                # The driver's per-request reference cycles would pile up while write() holds GC off (1.3 GB
                # for 500,000 rows): collect the young generations, not the old one (what made GC cost 40 %).
                gc.collect(1 if i % (10 * YOUNG_GC_EVERY) == 10 * YOUNG_GC_EVERY - 1 else 0)
            slots.acquire()
            if stop[0] is not None:
                results[i] = stop[0]
                finish(i, None)
                continue
            try:
                st = self._bind(req, refused)
                if st is None:  # every row of it refused
                    finish(i, None)
                    continue
                future = self.session.execute_async(st, None)
            except Exception as e:
                _drop_traceback(e)
                finish(i, e)
                continue
            future.add_callbacks(callback=lambda _, i=i: finish(i, None), errback=lambda e, i=i: finish(i, e))
            del st, future
        if requests:
            all_done.wait()
        return results

    def _classify(self, e: BaseException) -> tuple[str, str]:
        """(kind, text) of a failed request, with what to do about it when the operator can fix it."""
        text = f"{type(e).__name__}: {e}"
        for kind, types in self._kinds.items():
            if isinstance(e, types):
                if kind == "refused" and _SCHEMA_GONE.search(str(e)):
                    return "error", text + " (does the schema exist? see 'harvester schema --apply')"
                if "Cannot achieve consistency level" in text or type(e).__name__ == "Unavailable":
                    return kind, text + " -- " + self._replication_hint()
                return kind, text
        return "error", text

    def _replication_hint(self) -> str:
        """What to do when writes find too few replicas: the keyspace's replication vs the nodes up."""
        ks = self.cluster.metadata.keyspaces.get(self.keyspace)
        have = ks.replication_strategy.export_for_schema() if ks is not None else "?"
        return (f"keyspace {self.keyspace} has replication {have}, while the cluster's nodes up are "
                f"{_nodes_up(self.cluster)}: with cassandra_consistency = {self.options.consistency} "
                f"a write needs a quorum of each row's replicas up. Fix: ALTER KEYSPACE {cql.q(self.keyspace)} "
                f"WITH replication = {derive_replication(self.cluster)} (then run nodetool repair), "
                "or set cassandra_consistency = LOCAL_ONE")

    def _requests(self, rows: list[Row]) -> list[_Req]:
        """One request per partition and table: an account's rows of one table go in one unlogged
        single-partition batch (each statement keeps its own USING TIMESTAMP). Rows arrive sorted by
        account, so they are consecutive."""
        out: list[_Req] = []
        req: _Req | None = None
        for r in rows:
            p = self.layout.params(r)
            if p is None:
                self._skipped[r.place] += 1
                continue
            key, params = p
            if req is None or req.items[0][0].user != r.user or (
                    self.layout.table_of(key) != self.layout.table_of(req.items[0][1])):
                req = _Req()
                out.append(req)
            req.items.append((r, key, params))
        return out

    def _bind(self, req: _Req, refused: list[tuple[Row, str]]):
        """The request's statement (one bound statement, or an unlogged batch); rows whose values the
        column types cannot take move from the request to `refused`. None when none is left."""
        from cassandra.query import BatchStatement, BatchType

        bound = []
        for item in list(req.items):
            r, key, params = item
            try:
                bound.append(self._statement(key).bind(params))
            except BIND_ERRORS as e:
                refused.append((r, f"{type(e).__name__}: {e}"))
                req.items.remove(item)
        if len(bound) <= 1:
            return bound[0] if bound else None
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        for b in bound:
            batch.add(b)
        batch.is_idempotent = True
        return batch

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

    def forget(self, user: str, service: str | None = None) -> list[Forgotten]:
        """Delete the rows USING TIMESTAMP their cells' newest write time (see cql's forget_plan)."""
        def run() -> list[Forgotten]:
            plan = self.layout.forget_plan(self.session, user, service)
            for _, stmt, params, _, _ in plan:
                self.session.execute(stmt, params)
            return [Forgotten(row, ts, table) for row, _, _, ts, table in plan]

        return self._read(run)

    # -- schema ------------------------------------------------------------------
    def replication(self) -> tuple[str, str]:
        """The keyspace replication `apply_schema` creates, and where it comes from."""
        if self.options.replication:
            return self.options.replication, "cassandra_replication"
        return derive_replication(self.cluster), f"derived from the cluster's nodes ({_nodes_up(self.cluster)})"

    def replication_problem(self) -> str | None:
        """Why writes at the configured consistency cannot succeed with the keyspace's replication and the
        nodes the cluster has (a keyspace made for three nodes on a one-node cluster), or None."""
        ks = self.cluster.metadata.keyspaces.get(self.keyspace)
        if ks is None or self.options.consistency not in ("QUORUM", "LOCAL_QUORUM", "EACH_QUORUM"):
            return None
        opts = ast.literal_eval(ks.replication_strategy.export_for_schema())
        nodes = _nodes_by_dc(self.cluster)
        if "SimpleStrategy" in opts.get("class", ""):
            need = {"all data centres": (_rf(opts.get("replication_factor", 1)), sum(nodes.values()))}
        else:
            need = {dc: (_rf(v), nodes.get(dc, 0)) for dc, v in opts.items()
                    if dc not in ("class", "replication_factor")}
        if any(rf // 2 + 1 > n for rf, n in need.values()):
            return self._replication_hint()
        return None

    @staticmethod
    def schema(url: str, options: CassandraOptions) -> list[str]:
        return schema(options, url)

    def apply_schema(self) -> tuple[list[str], str]:
        """Create the keyspace and tables that are missing; returns the schema with the replication used,
        and a note saying which (a warning too, when an existing keyspace needs more nodes than there are)."""
        replication, why = self.replication()
        statements = schema(self.options, self.url, replication)
        for stmt in statements[:-1]:
            try:
                self.session.execute(stmt, timeout=60)
            except Exception as e:
                raise StoreError(f"{self.url}: {e}\nwhile running:\n{stmt}") from None
        note = f"-- created what was missing in {self.url}; keyspace replication {replication} ({why})"
        problem = self.replication_problem()
        if problem:
            note += f"\nharvester: warning: the keyspace already existed and writes will fail: {problem}"
        return statements, note

    def flush(self, sink: Batch) -> int:
        return write_taken(sink, self)

    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    def close(self) -> None:
        self.cluster.shutdown()


def schema(o: CassandraOptions, url: str, replication: str | None = None) -> list[str]:
    """CREATE KEYSPACE, CREATE TABLE(s), and last the lookup query a support tool runs.

    The replication: cassandra_replication, else `replication` (derived from the cluster), else, when
    printed without a cluster to look at, three replicas per data centre (with a note saying so)."""
    _, _, keyspace = parse_url(url)
    try:
        lay = cql.layout(o, keyspace)
    except ValueError as e:
        raise StoreError(str(e)) from None
    repl = o.replication or replication
    note = "" if repl else ("-- replication: 'harvester schema --apply' derives it from the cluster (per data centre "
                            "min(3, its nodes));\n-- set cassandra_replication to choose it yourself\n")
    ks = (f"{note}CREATE KEYSPACE IF NOT EXISTS {cql.q(keyspace)}\n"
          f"    WITH replication = {repl or DEFAULT_REPLICATION} AND durable_writes = true")
    return [ks, *lay.schema(), lay.lookup_cql()]


DEFAULT_REPLICATION = "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}"


def _nodes_by_dc(cluster) -> dict[str, int]:
    nodes: Counter = Counter()
    for h in cluster.metadata.all_hosts():
        nodes[h.datacenter or "datacenter1"] += 1
    return dict(nodes)


def _nodes_up(cluster) -> str:
    up: Counter = Counter(h.datacenter or "datacenter1" for h in cluster.metadata.all_hosts() if h.is_up)
    return ", ".join(f"{dc}: {up[dc]} of {n} up" for dc, n in sorted(_nodes_by_dc(cluster).items())) or "none known"


def derive_replication(cluster) -> str:
    """NetworkTopologyStrategy with min(3, nodes there) replicas per data centre: quorum writes then work
    on a one- or two-node cluster as on a large one."""
    dcs = _nodes_by_dc(cluster)
    if not dcs:
        return DEFAULT_REPLICATION
    return "{'class': 'NetworkTopologyStrategy', " + ", ".join(
        f"'{dc}': {min(3, n)}" for dc, n in sorted(dcs.items())) + "}"


def _drop_traceback(e: BaseException) -> None:
    """Cut a driver exception (and those it names or chains) from the frames it was raised through: the driver
    may keep it (a failed future lingers in its timer queue), and its traceback's frames, with their callers
    (f_back), would keep a write's rows and requests alive with it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen or not isinstance(x, BaseException):
            continue
        seen.add(id(x))
        if x.__traceback__ is not None:
            traceback.clear_frames(x.__traceback__)
            x.__traceback__ = None
        errors = getattr(x, "errors", None)  # NoHostAvailable: host -> the exception it got there
        todo += [x.__cause__, x.__context__, *(errors.values() if isinstance(errors, dict) else ())]


def _rf(v) -> int:
    """A replication factor as the driver shows it ('3', or '3/1' with transient replicas)."""
    return int(str(v).split("/")[0])


def _password(o: CassandraOptions) -> str:
    path = o.password_file
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
