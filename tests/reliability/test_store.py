"""Store scenarios of issue 13: a row pinned in the future, a poison row, a password spray, a SQLite lock
held by another process, a Cassandra outage, and a keyspace made for more nodes than the cluster has.

Real SQLite files, the real Cassandra node ($HARVESTER_TEST_CASSANDRA) and, for the outage, a node of the
test's own; the daemon scenarios run a real `harvester run` process."""

from __future__ import annotations

import gc
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from harvester import native
from harvester.coalesce import Coalescer, Row
from harvester.sinks import PartialWrite, base, open_store
from harvester.sinks.base import StoreError, flush, shown, write_taken
from tests import daemon_kit
from tests.conftest import ROOT, PrivateNode, run_cli
from tests.sinks.test_cassandra import fresh, settings_for

T0 = 1_795_308_723_000_000  # 2026-11-22T01:32:03Z
T2099 = 4_070_908_800_000_000  # 2099-01-01T00:00:00Z
HOSTILE = "ev'il\x1b[31m\"\n\x07@example.org"  # quotes, an escape sequence, a newline, a bell


def login_line(user: str, second: int, ip: str = "192.0.2.1", service: str = "imap") -> bytes:
    return (f"Nov 22 10:{second // 60 % 60:02d}:{second % 60:02d} mx1 dovecot: {service}-login: Login: "
            f"user=<{user}>, method=PLAIN, rip={ip}, lip=10.0.0.1, mpid=1, session=<s{second}>\n").encode()


def fail_line(user: str, second: int, ip: str = "203.0.113.9") -> bytes:
    return (f"Nov 22 10:{second // 60 % 60:02d}:{second % 60:02d} mx1 dovecot: imap-login: Disconnected: "
            f"Connection closed (auth failed, 1 attempts in 2 secs): user=<{user}>, method=PLAIN, rip={ip}, "
            f"lip=10.0.0.1, session=<f{second}>\n").encode()


def cli_cassandra(cassandra: dict, url: str) -> list[str]:
    return ["--store", url, "--cassandra-username", "cassandra", "--cassandra-password-file",
            cassandra["password_file"]]


def refused_total(reason: str) -> float:
    return REGISTRY.get_sample_value("harvester_store_rows_refused_total", {"reason": reason}) or 0.0


@pytest.fixture
def keyspace(cassandra):
    s = fresh(cassandra)
    yield s
    s.session.execute(f"DROP KEYSPACE IF EXISTS {s.keyspace}")
    s.close()


# -- item 6: forget --------------------------------------------------------------------------------------

def test_forget_removes_a_login_pinned_in_2099_from_sqlite_and_shows_hostile_names_escaped(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/h.db"
    store = open_store(url)
    store.write([Row(HOSTILE, "imap", "login", T2099, 0, "192.0.2.1", "mx1"),
                 Row(HOSTILE, "pop3", "login", T0, 0, "192.0.2.2", "mx1"),
                 Row(HOSTILE, "imap", "auth_fail", T0, 0, "203.0.113.9", "mx1"),
                 Row("jane", "imap", "login", T0, 0, "192.0.2.3", "mx1")])
    capsys.readouterr()
    assert run_cli("forget", "--store", url, HOSTILE, "imap") == 0
    out = capsys.readouterr().out
    assert "2099-01-01T00:00:00Z" in out and shown(HOSTILE) in out
    assert "\x1b" not in out and "\x07" not in out and out.count("\n") == 2  # the name's newline is escaped
    assert [(r.service, r.kind) for r in store.lookup(HOSTILE)] == [("pop3", "login"), ("imap", "auth_fail")]
    store.write([Row(HOSTILE, "imap", "login", T0 + 60_000_000, 0, "192.0.2.9", "mx1")])  # the next real login
    assert store.lookup(HOSTILE)[0].time_us == T0 + 60_000_000

    assert run_cli("forget", "--store", url, HOSTILE) == 0  # every row of the account, its failures too
    assert store.lookup(HOSTILE) == [] and len(store.lookup("jane")) == 1
    capsys.readouterr()
    assert run_cli("forget", "--store", url, HOSTILE) == 1
    assert "nothing to forget" in capsys.readouterr().out
    store.close()


def test_forget_deletes_a_cassandra_row_written_in_2099_and_says_what_its_tombstone_hides(keyspace, cassandra,
                                                                                          capsys):
    s = keyspace
    url = f"cassandra://{cassandra['contact']}/{s.keyspace}"
    s.write([Row(HOSTILE, "imap", "login", T2099, 0, "192.0.2.1", "mx1"),
             Row(HOSTILE, "pop3", "login", T0, 0, "192.0.2.2", "mx1"),
             Row(HOSTILE, "imap", "auth_fail", T0, 0, "203.0.113.9", "mx1")])
    capsys.readouterr()
    assert run_cli("forget", *cli_cassandra(cassandra, url), HOSTILE, "imap") == 0
    out = capsys.readouterr().out
    assert shown(HOSTILE) in out and "\x1b" not in out and "2099-01-01T00:00:00Z" in out
    assert "hides every later real write" in out and f"ALTER TABLE {s.keyspace}.last_login WITH gc_grace_seconds" in out
    assert [(r.service, r.kind) for r in s.lookup(HOSTILE)] == [("pop3", "login"), ("imap", "auth_fail")]

    # What the note says: the tombstone (at 2099) hides the next real imap login ...
    s.write([Row(HOSTILE, "imap", "login", T0 + 1, 0, "192.0.2.7", "mx1")])
    assert [r.service for r in s.lookup(HOSTILE) if r.kind == "login"] == ["pop3"]
    # ... until it is purged the way the note says, and then the pinned row does not come back.
    s.session.execute(f"ALTER TABLE {s.keyspace}.last_login WITH gc_grace_seconds = 0 "
                      "AND memtable_flush_period_in_ms = 1000")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        s.write([Row(HOSTILE, "imap", "login", T0 + 2, 0, "192.0.2.8", "mx1")])
        if any(r.service == "imap" and r.kind == "login" for r in s.lookup(HOSTILE)):
            break
        time.sleep(2)
    s.session.execute(f"ALTER TABLE {s.keyspace}.last_login WITH gc_grace_seconds = 864000 "
                      "AND memtable_flush_period_in_ms = 0")
    assert [(r.service, r.ip) for r in s.lookup(HOSTILE) if r.kind == "login"] == [("imap", "192.0.2.8"),
                                                                                   ("pop3", "192.0.2.2")]

    # Rows written at their own (past) times get tombstones that hide nothing later.
    capsys.readouterr()
    assert run_cli("forget", *cli_cassandra(cassandra, url), HOSTILE) == 0
    out = capsys.readouterr().out
    assert "auth_fail" in out and "note:" not in out
    assert s.lookup(HOSTILE) == []
    s.write([Row(HOSTILE, "pop3", "login", T0 + 3, 0, "192.0.2.4", "mx1")])
    assert [r.service for r in s.lookup(HOSTILE)] == ["pop3"]
    assert run_cli("forget", *cli_cassandra(cassandra, url), "nobody@example.org") == 1


# -- item 7: a poison row ------------------------------------------------------------------------------------

def test_a_user_name_over_cassandras_key_limit_is_set_aside_and_the_rest_is_stored(keyspace, caplog):
    s = keyspace
    poison = "x" * 70_000 + "\x1b[2J"
    sink = Coalescer()
    for i in range(10):
        sink.logins.put(f"u{i}".encode(), "imap", T0 + i, 0, b"192.0.2.1", b"mx1", "imap")
    sink.put_back([Row(poison, "imap", "login", T0, 0, "192.0.2.66", "mx1")])  # as if it got past the parser
    before = refused_total("InvalidRequest")
    with caplog.at_level(logging.ERROR):
        assert flush(sink, s) == 10
    assert len(sink) == 0  # nothing left to retry: the daemon's checkpoints move on
    assert refused_total("InvalidRequest") - before == 1
    named = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(named) == 1 and "'xxxxxxxx" in named[0] and "70004 chars" in named[0] and len(named[0]) < 1500
    sink.logins.put(b"u99", "imap", T0, 0, b"192.0.2.1", b"mx1", "imap")
    assert flush(sink, s) == 1 and s.lookup("u99")


def test_a_poison_user_name_does_not_stall_the_daemon_on_cassandra(tmp_path, keyspace, cassandra):
    url = f"cassandra://{cassandra['contact']}/{keyspace.keyspace}"
    (tmp_path / "log").mkdir()
    log = tmp_path / "log" / "maillog"
    log.write_bytes(login_line("u1", 1) + login_line("p" * 70_000, 2) + login_line("u2", 3))
    # --max-user-bytes: past the parser's own bound (bad input, skipped before any store), so that the
    # name reaches the cluster, as from a version without that bound or a pack that lets it through.
    proc = daemon_kit.start(tmp_path, url, "--cassandra-username", "cassandra", "--cassandra-password-file",
                            cassandra["password_file"], "--max-user-bytes", "100000")
    try:
        deadline = time.monotonic() + 60
        while not keyspace.lookup("u2") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        with log.open("ab") as f:
            f.write(login_line("u3", 4))
        while not keyspace.lookup("u3") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert keyspace.lookup("u1") and keyspace.lookup("u3")
        time.sleep(1)  # a few more flushes: none may fail
    finally:
        err = daemon_kit.stop(proc)
    assert "refused 1 row(s)" in err
    assert "rows kept" not in err and "still failing" not in err and "not stored" not in err, err[-3000:]


# -- item 8: password spray ----------------------------------------------------------------------------------

def spray_log(path: Path, names: int) -> None:
    """A spray of `names` made-up names, among them real accounts' logins and failures; newbie's first
    login comes after its failure, in the same batch."""
    lines = [login_line("alice", 0), fail_line("alice", 1), login_line("bob", 2, service="pop3")]
    lines += [fail_line(f"spray{i}@example.org", 3 + i % 3000) for i in range(names)]
    lines += [fail_line("bob", 3100), fail_line("newbie", 3101), login_line("newbie", 3102)]
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_password_spray_leaves_failure_rows_only_for_real_accounts_in_sqlite(tmp_path, monkeypatch, engine):
    if engine == "native" and not native.enabled():
        pytest.skip("the native module is not built")
    monkeypatch.setattr(native, "ENGINE", engine)
    spray_log(tmp_path / "maillog", 5000)
    db = tmp_path / "h.db"
    assert run_cli("backfill", "--store", f"sqlite:///{db}", "--timezone", "UTC", "--year", "2026",
                   str(tmp_path / "maillog")) == 0
    with sqlite3.connect(db) as c:
        events = sorted(c.execute("SELECT user, kind FROM last_event"))
        logins = sorted(c.execute("SELECT user FROM last_login"))
    assert events == [("alice", "auth_fail"), ("bob", "auth_fail"), ("newbie", "auth_fail")]
    assert logins == [("alice",), ("bob",), ("newbie",)]


def test_a_password_spray_into_cassandra_writes_failure_rows_that_expire(tmp_path, keyspace, cassandra):
    spray_log(tmp_path / "maillog", 500)
    url = f"cassandra://{cassandra['contact']}/{keyspace.keyspace}"
    assert run_cli("backfill", *cli_cassandra(cassandra, url), "--timezone", "UTC", "--year", "2026",
                   str(tmp_path / "maillog")) == 0
    ttls = {u: t for u, t in keyspace.session.execute(f"SELECT userid, TTL(time) FROM {keyspace.keyspace}.last_event")}
    assert len(ttls) == 503 and all(t is not None and 29 * 86400 < t <= 30 * 86400 for t in ttls.values())
    logins = keyspace.session.execute(f"SELECT userid, TTL(last_access) FROM {keyspace.keyspace}.last_login")
    assert sorted(logins) == [("alice", None), ("bob", None), ("newbie", None)]  # logins never expire


# -- item 9: a SQLite lock held elsewhere, a writer thread ---------------------------------------------------

def test_the_sqlite_store_opened_in_one_thread_is_written_from_another(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/h.db")
    sink = Coalescer()
    sink.logins.put(b"jane", "imap", T0, 0, b"192.0.2.1", b"mx1", "imap")
    assert flush(sink, store) == 1  # the main thread writes once (the native writer opens here) ...
    errors: list[BaseException] = []

    def writer() -> None:  # ... then the daemon's writer thread goes on
        try:
            sink.logins.put(b"bob", "imap", T0, 0, b"192.0.2.2", b"mx1", "imap")
            flush(sink, store)
            store.write([Row("eve", "imap", "login", T0, 0, "192.0.2.3", "mx1")])
        except BaseException as e:  # noqa: BLE001 - a pyo3 panic is a BaseException
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    t.join()
    assert errors == []
    assert sorted(r.user for r in store.export()) == ["bob", "eve", "jane"]
    store.close()


def test_a_sqlite_lock_held_by_a_support_tool_delays_rows_names_the_lock_and_loses_none(tmp_path, log_lines):
    (tmp_path / "log").mkdir()
    db = tmp_path / "h.db"
    w = daemon_kit.Writer(tmp_path / "log" / "maillog", log_lines)
    proc = daemon_kit.start(tmp_path, f"sqlite:///{db}")
    try:
        w.write(1000)
        first = daemon_kit.reference(tmp_path, log_lines[:1000])
        assert daemon_kit.settle(db, first, proc) == first
        holder = subprocess.Popen([sys.executable, "-c", (
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(10); c.execute('COMMIT')")],
            stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        w.write(2000)
        assert holder.wait(timeout=30) == 0
        w.write(1000)
        want = daemon_kit.reference(tmp_path, log_lines[:4000])
        assert daemon_kit.settle(db, want, proc, timeout=60) == want
    finally:
        w.close()
        err = daemon_kit.stop(proc)
    assert "another process holds a lock on the database" in err


# -- item 10: a Cassandra outage ------------------------------------------------------------------------------

def _rss_kib() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4


def test_a_cassandra_outage_keeps_no_driver_objects_writes_return_at_once_and_recovery_takes_seconds(tmp_path,
                                                                                                     capsys):
    """25,000 rows wait (more than a slice of WRITE_ROWS): a write with the node down fails on the first slice,
    the only one decoded (put back as rows); the rest stays in the tables until the node is back."""
    node = PrivateNode(tmp_path / "node")
    node.start()
    try:
        store, sink = node.outage_store(T0, cassandra_request_timeout=5)
        for i in range(25_000):
            sink.logins.put(f"u{i}".encode(), "pop3", T0 + i, 0, b"192.0.2.2", b"mx1", "pop3")
        gc.collect()
        rss = _rss_kib()
        took = []
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(PartialWrite) as e:
                flush(sink, store)
            took.append(time.monotonic() - started)
            assert e.value.acknowledged == 0 and len(e.value.failed) == base.WRITE_ROWS == 20_000
            assert len(sink.pending) == 20_000 and len(sink.logins) == 5_000 and sink.waiting() == 25_000
            gc.collect()  # what is only garbage goes; what the exception or the store holds stays
            alive = [o for o in gc.get_objects() if type(o).__name__ in ("BoundStatement", "BatchStatement",
                                                                        "ResponseFuture")]
            assert alive == []  # neither the exception nor the store holds a statement or a future
        gc.collect()
        grown = _rss_kib() - rss
        node.start()
        back = time.monotonic()
        while True:
            try:
                assert flush(sink, store) == 25_000
                break
            except PartialWrite:
                assert time.monotonic() - back < 30, "the driver did not notice the node's return"
                time.sleep(0.2)
        recovered = time.monotonic() - back
        with capsys.disabled():
            print(f"\noutage: write() with no host up took {', '.join(f'{t:.2f}' for t in took)} s; "
                  f"RSS grew {grown} KiB over 5 failed writes of 25,000 waiting rows "
                  f"({grown * 1024 / 25_000:.0f} B/row); writes worked {recovered:.1f} s after the node was up")
        assert store.lookup("u7")[0].service == "pop3" and store.lookup("u24999")[0].service == "pop3"
        assert len(sink) == sink.waiting() == 0
        store.close()
    finally:
        node.stop(check=False)


class SliceStore:
    """An in-memory store whose writes fail as told (`fail`: None stores, "down" raises a StoreError, "half"
    stores the first half and names the rest in a PartialWrite), noting what the sink held during each."""

    url = "memory:"

    def __init__(self, sink: Coalescer) -> None:
        self.sink = sink
        self.rows: dict[tuple[str, str], Row] = {}
        self.fail: list[str | None] = []
        self.stored = 0
        self.seen: list[dict] = []  # per write: its rows, the sink's waiting(), what stayed in its tables, ...

    def flush(self, sink: Coalescer) -> int:
        return write_taken(sink, self)

    def write(self, rows: list[Row]) -> int:
        self.seen.append({"rows": len(rows), "waiting": self.sink.waiting(), "pending": len(self.sink.pending),
                          "tables": len(self.sink.logins) + len(self.sink.others), "stored": self.stored,
                          "set_aside": self.sink.bad_input()["utf8"]})
        how = self.fail.pop(0) if self.fail else None
        if how == "down":
            raise StoreError("memory: down")
        n = len(rows) // 2 if how == "half" else len(rows)
        for r in rows[:n]:
            key = (r.user, r.service if r.kind == "login" else r.kind)
            if key not in self.rows or r.time_us >= self.rows[key].time_us:
                self.rows[key] = r
        self.stored += n
        if how == "half":
            raise PartialWrite("memory: half", rows[n:], n)
        return n


def outage_batch(n_logins: int, n_others: int) -> Coalescer:
    sink = Coalescer()
    for i in range(n_logins):
        sink.logins.put(f"u{i:05d}".encode(), "imap" if i % 3 else "pop3", T0 + i, 0, b"192.0.2.1", b"mx1",
                        "imap" if i % 3 else "pop3")
    sink.logins.put(b"\xffnot-utf8", "imap", T0, 0, None, None, "imap")
    for i in range(n_others):
        sink.others.put(f"u{i:05d}".encode(), "auth_fail", T0 + i, 0, b"203.0.113.9", None, "imap")
    return sink


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_long_outage_is_caught_up_a_slice_at_a_time_and_a_failed_write_puts_back_only_its_slice(monkeypatch,
                                                                                                   engine):
    """The daemon's batch after a long outage: write_taken decodes one slice (WRITE_ROWS) at a time, the rest
    stays in the tables; a failed write puts back only its own slice's rows (a PartialWrite: those it names),
    the retry goes on from there, and at the end everything is stored once, as a write of all of it at once
    would have stored it. While a slice is out, waiting() still counts it."""
    if engine == "native" and not native.enabled():
        pytest.skip("the native module is not built")
    monkeypatch.setattr(native, "ENGINE", engine)
    monkeypatch.setattr(base, "WRITE_ROWS", 1000)
    sink, reference = outage_batch(4500, 1200), outage_batch(4500, 1200)
    total = len(sink)
    assert total == 5701
    store = SliceStore(sink)

    store.fail = [None, "down"]
    with pytest.raises(StoreError):
        flush(sink, store)
    assert [w["rows"] for w in store.seen] == [1000, 1000]
    assert len(sink.pending) == 1000 and len(sink.logins) + len(sink.others) == total - 2000
    assert sink.waiting() == len(sink) == total - 1000 and sink.out == 0

    store.fail = ["half"]
    with pytest.raises(PartialWrite):
        flush(sink, store)
    assert len(sink.pending) == 500 and sink.waiting() == total - 1500

    assert flush(sink, store) == total - 1 - 1500
    assert len(sink) == sink.waiting() == 0 and sink.bad_input() == {"utf8": 1}
    assert store.rows == {(r.user, r.service if r.kind == "login" else r.kind): r for r in reference.take()}
    assert len(store.seen) == 2 + 1 + 5  # the retry: 500 put back and 3,701 entries left, 1,000 a write
    for w in store.seen:  # only the slice being written was out of the batch, and it still counted as waiting
        assert w["waiting"] == total - w["stored"] - w["set_aside"]
        assert w["waiting"] == w["pending"] + w["tables"] + w["rows"] and w["rows"] <= 1000


def test_take_with_a_limit_gives_put_back_rows_first_then_logins_then_other_events():
    sink = outage_batch(5, 3)
    rows = sink.take(4)
    assert [(r.user, r.kind) for r in rows] == [(f"u{i:05d}", "login") for i in range(4)] and sink.out == 4
    sink.settle(4, rows[2:])  # two stored, two to retry
    assert sink.out == 0 and len(sink) == 2 + 2 + 3
    rows = sink.take(5)
    assert [(r.user, r.kind) for r in rows] == [("u00002", "login"), ("u00003", "login"), ("u00004", "login"),
                                                ("u00000", "auth_fail"), ("u00001", "auth_fail")]
    assert sink.bad_input() == {"utf8": 1}  # set aside, counted in the limit of 5
    sink.put_back(rows[3:])
    sink.put_back(rows[:1])  # taken before the rows still pending: in front of them
    assert [(r.user, r.kind) for r in sink.take()] == [("u00002", "login"), ("u00000", "auth_fail"),
                                                       ("u00001", "auth_fail"), ("u00002", "auth_fail")]


# -- item 14: replication from the cluster -------------------------------------------------------------------

def test_schema_apply_on_a_one_node_cluster_makes_a_keyspace_that_takes_quorum_writes(cassandra, capsys):
    ks = f"derive{int(time.time())}"
    url = f"cassandra://{cassandra['contact']}/{ks}"
    capsys.readouterr()
    assert run_cli("schema", *cli_cassandra(cassandra, url), "--apply") == 0
    err = capsys.readouterr().err
    assert "{'class': 'NetworkTopologyStrategy', 'datacenter1': 1}" in err and "derived" in err
    store = open_store(url, settings=settings_for(cassandra, cassandra_replication=""))
    try:
        assert store.write([Row("jane", "imap", "login", T0, 0, "192.0.2.1", "mx1")]) == 1
    finally:
        store.session.execute(f"DROP KEYSPACE {ks}")
        store.close()


def test_writes_that_find_too_few_replicas_say_how_to_fix_the_keyspace(cassandra, capsys):
    three = "{'class': 'NetworkTopologyStrategy', 'datacenter1': 3}"
    store = fresh(cassandra, cassandra_replication=three)
    url = f"cassandra://{cassandra['contact']}/{store.keyspace}"
    try:
        with pytest.raises(PartialWrite) as e:
            store.write([Row("jane", "imap", "login", T0, 0, "192.0.2.1", "mx1")])
        msg = str(e.value)
        assert "Cannot achieve consistency level LOCAL_QUORUM" in msg
        assert (f"ALTER KEYSPACE {store.keyspace} WITH replication = {{'class': 'NetworkTopologyStrategy', "
                "'datacenter1': 1}") in msg and "cassandra_consistency = LOCAL_ONE" in msg
        capsys.readouterr()
        assert run_cli("schema", *cli_cassandra(cassandra, url), "--apply") == 0
        assert "writes will fail" in capsys.readouterr().err
    finally:
        store.session.execute(f"DROP KEYSPACE {store.keyspace}")
        store.close()


def test_the_daemon_module_runs_from_this_checkout():
    """The scenarios above run `python -m harvester` from ROOT: it must be this worktree's code."""
    out = subprocess.run([sys.executable, "-c", "import harvester; print(harvester.__file__)"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith(str(ROOT))


def test_the_store_counts_as_up_from_its_first_acknowledged_slice_of_a_long_catch_up(monkeypatch):
    """After an outage the writer works through everything that waited, a slice at a time (a minute for
    500,000 rows into Cassandra here): harvester_store_up must say 1 as soon as one slice is stored, not
    only after the last."""
    from harvester import metrics
    from harvester.sinks import base

    monkeypatch.setattr(base, "WRITE_ROWS", 1000)
    sink = Coalescer()
    for i in range(3000):
        sink.logins.put(f"u{i}".encode(), "imap", T0 + i, 0, b"192.0.2.1", b"mx1", "imap")
    seen: list[float] = []

    class Store:
        url = "memory:"

        def write(self, rows: list[Row]) -> int:
            seen.append(metrics.STORE_UP._value.get())
            return len(rows)

    metrics.STORE_UP.set(0)
    assert write_taken(sink, Store()) == 3000
    assert seen == [0, 1, 1]
