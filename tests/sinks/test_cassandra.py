"""The fleet store against a real Cassandra node: layouts, convergence, authentication, outages."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time

import pytest

from harvester.coalesce import Row
from harvester.config import Settings
from harvester.sinks import StoreError, open_store
from harvester.sinks.cassandra import CassandraOptions, CassandraStore, parse_url
from tests import corpus
from tests.conftest import ROOT, PrivateNode

T0 = 1_795_308_723_000_000  # 2026-11-22T01:32:03Z
_ks = itertools.count()


def test_urls_name_hosts_port_and_keyspace():
    assert parse_url("cassandra://cass1,cass2/mail") == (["cass1", "cass2"], 9042, "mail")
    assert parse_url("cassandra://10.0.0.1,10.0.0.2:19042/mail") == (["10.0.0.1", "10.0.0.2"], 19042, "mail")
    assert parse_url("cassandra://[2001:db8::1]:9142/m_1") == (["2001:db8::1"], 9142, "m_1")
    for bad in ("cassandra://host", "cassandra://h/bad-name", "cassandra:///ks"):
        with pytest.raises(StoreError, match="Cassandra URL"):
            parse_url(bad)


def settings_for(cassandra: dict, **extra) -> Settings:
    s = Settings()
    s.set("cassandra_username", "cassandra", "test")
    s.set("cassandra_password_file", cassandra["password_file"], "test")
    s.set("cassandra_replication", "{'class': 'SimpleStrategy', 'replication_factor': 1}", "test")
    s.set("cassandra_connect_timeout", 20, "test")
    for k, v in extra.items():
        s.set(k, v, "test")
    return s


def options_for(cassandra: dict, **extra) -> CassandraOptions:
    return settings_for(cassandra, **extra).store_options(CassandraOptions)


def fresh(cassandra: dict, **extra) -> CassandraStore:
    """A store on a keyspace of its own, schema applied."""
    url = f"cassandra://{cassandra['contact']}/t{int(time.time())}_{next(_ks)}"
    store = CassandraStore(url, options=options_for(cassandra, **extra))
    store.apply_schema()
    return store


def login(t: int, ip: str = "192.0.2.1", user: str = "jane@example.org", service: str = "imap", digits: int = 0,
          node: str = "mx1") -> Row:
    return Row(user, service, "login", t, digits, ip, node)


@pytest.fixture
def store(cassandra):
    s = fresh(cassandra)
    yield s
    s.session.execute(f"DROP KEYSPACE {s.keyspace}")
    s.close()


def test_rows_round_trip_with_microseconds_and_other_events(store):
    rows = [login(T0 + 242_533, "2001:db8::7", digits=6), login(T0 - 60_000_000, "198.51.100.4", service="pop3"),
            Row("jane@example.org", "pop3", "pop3_delete", T0 - 59_000_000, 0, "198.51.100.4", "mx1",
                "deleted=12 messages=14"),
            login(T0, None, user="user=<a>b,c d>", service="lmtp")]
    assert store.write(rows) == 4
    got = store.lookup("jane@example.org")
    assert got == [rows[0], rows[1], rows[2]]
    assert store.lookup("user=<a>b,c d>") == [rows[3]]
    assert sorted(store.export()) == sorted([rows[0], rows[1], rows[3]])


def test_out_of_order_and_replayed_writes_keep_the_newest_event(store):
    newest = login(T0 + 5_000_000, "192.0.2.5")
    store.write([newest])
    store.write([login(T0, "192.0.2.1"), login(T0 + 1_000_000, "192.0.2.2")])  # late, older events
    store.write([newest, newest])  # replayed
    assert store.lookup("jane@example.org") == [newest]


def test_per_user_layout_is_dovecot_stats_and_counts_services_without_a_column(cassandra):
    s = fresh(cassandra, cassandra_layout="per_user")
    try:
        rows = [login(T0, "2001:db8::1"), login(T0 + 1_000_000, "192.0.2.9", service="pop3"),
                login(T0 + 2_000_000, "local", service="lmtp"), login(T0 + 3_000_000, service="submission")]
        assert s.write(rows) == 3
        assert s.skipped() == {"submission": 1}
        cols = s.session.execute(f"SELECT last_login_imap, remote_ip_imap, remote_ip_lmtp FROM {s.keyspace}."
                                 "dovecot_stats WHERE \"user\" = 'jane@example.org'").one()
        assert str(cols[1]) == "2001:db8::1" and cols[2] is None  # an inet column takes no 'local'
        assert [r.service for r in s.lookup("jane@example.org")] == ["lmtp", "pop3", "imap"]
    finally:
        s.session.execute(f"DROP KEYSPACE {s.keyspace}")
        s.close()


def test_custom_layout_writes_into_the_operators_own_table(cassandra):
    s = fresh(cassandra)  # only for a keyspace; the custom store below uses the operator's table
    ks = s.keyspace
    s.session.execute(f"CREATE TABLE {ks}.plugin_logins (account text PRIMARY KEY, imap_at timestamp, "
                      "imap_from inet, pop_at timestamp)")
    c = CassandraStore(f"cassandra://{cassandra['contact']}/{ks}", options=options_for(
        cassandra, cassandra_layout="custom", cassandra_table="plugin_logins", cassandra_user_column="account",
        cassandra_columns={"imap": ["imap_at", "imap_from"], "pop3": ["pop_at"]}))
    try:
        c.write([login(T0, "192.0.2.1"), login(T0 + 1_000_000, "192.0.2.2", service="pop3"),
                 login(T0 + 2_000_000, service="lmtp")])
        assert c.skipped() == {"lmtp": 1}
        row = s.session.execute(f"SELECT imap_from, pop_at FROM {ks}.plugin_logins WHERE account = "
                                "'jane@example.org'").one()
        assert str(row[0]) == "192.0.2.1" and row[1] is not None
        assert [(r.service, r.ip) for r in c.lookup("jane@example.org")] == [("pop3", None), ("imap", "192.0.2.1")]
    finally:
        c.close()
        s.session.execute(f"DROP KEYSPACE {ks}")
        s.close()


def test_two_processes_backfilling_overlapping_logs_converge_on_the_newest_event(cassandra, tmp_path):
    """Two harvesters write the same accounts at the same time from overlapping halves of one log;
    the table must equal a single SQLite backfill of the whole log."""
    log = tmp_path / "maillog"
    corpus.write_maillog(log, lines=40_000, users=500, tz="UTC")
    lines = log.read_bytes().splitlines(keepends=True)

    def cut(i: int) -> int:  # move a cut to the next new second, so no equal-time pair straddles it
        while i < len(lines) and lines[i][:15] == lines[i - 1][:15]:
            i += 1
        return i

    a, b = cut(len(lines) * 7 // 10), cut(len(lines) * 3 // 10)
    (tmp_path / "first").write_bytes(b"".join(lines[:a]))
    (tmp_path / "second").write_bytes(b"".join(lines[b:]))
    s = fresh(cassandra)
    cfg = tmp_path / "h.toml"
    cfg.write_text(f'timezone = "UTC"\nyear = 2025\ncassandra_username = "cassandra"\n'
                   f'cassandra_password_file = "{cassandra["password_file"]}"\nflush_rows = 2000\n')
    url = f"cassandra://{cassandra['contact']}/{s.keyspace}"
    procs = [subprocess.Popen([sys.executable, "-m", "harvester", "backfill", "--config", str(cfg), "--store", url,
                               str(tmp_path / name)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for name in ("first", "second")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    ref = tmp_path / "ref.db"
    subprocess.run([sys.executable, "-m", "harvester", "backfill", "--config", str(cfg), "--store",
                    f"sqlite:///{ref}", str(log)], cwd=ROOT, check=True, capture_output=True)
    want = _export(f"sqlite:///{ref}", cfg)
    got = _export(url, cfg)
    assert len(want) > 1000
    assert got == want
    s.session.execute(f"DROP KEYSPACE {s.keyspace}")
    s.close()


def _export(url: str, cfg) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "harvester", "export", "--config", str(cfg), "--store", url],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return sorted((json.loads(line) for line in out.splitlines()), key=lambda d: (d["user"], d["service"]))


def test_a_wrong_password_is_a_clear_error(cassandra, tmp_path):
    wrong = tmp_path / "pw"
    wrong.write_text("not-the-password\n")
    s = settings_for(cassandra)
    s.set("cassandra_password_file", str(wrong), "test")
    with pytest.raises(StoreError, match="cannot connect to Cassandra.*(?i:authentication|credentials)"):
        CassandraStore(f"cassandra://{cassandra['contact']}/ks", options=s.store_options(CassandraOptions))
    s.set("cassandra_password_file", str(tmp_path / "missing"), "test")
    with pytest.raises(StoreError, match="cassandra_password_file .*missing: cannot read"):
        CassandraStore(f"cassandra://{cassandra['contact']}/ks", options=s.store_options(CassandraOptions))


def test_an_unreachable_cluster_is_a_clear_error_not_a_traceback(capsys):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    from harvester import cli

    assert cli.main(["lookup", "--store", f"cassandra://127.0.0.1:{port}/mail", "--cassandra-connect-timeout",
                     "2", "jane"]) == 2
    err = capsys.readouterr().err
    assert f"cannot connect to Cassandra at 127.0.0.1:{port}" in err and "Traceback" not in err


def test_schema_apply_creates_the_keyspace_and_prints_the_lookup(cassandra, capsys):
    from harvester import cli

    ks = f"schema{int(time.time())}"
    args = ["schema", "--store", f"cassandra://{cassandra['contact']}/{ks}", "--cassandra-username", "cassandra",
            "--cassandra-password-file", cassandra["password_file"], "--cassandra-replication",
            "{'class': 'SimpleStrategy', 'replication_factor': 1}", "--cassandra-layout", "per_user"]
    assert cli.main([*args, "--apply"]) == 0
    out = capsys.readouterr().out
    assert f"CREATE TABLE IF NOT EXISTS {ks}.dovecot_stats" in out and 'WHERE "user" = ?' in out
    s = open_store(f"cassandra://{cassandra['contact']}/{ks}", settings=settings_for(
        cassandra, cassandra_layout="per_user"))
    try:
        assert s.write([login(T0)]) == 1
        assert s.lookup("jane@example.org")[0].time_us == T0
        s.session.execute(f"DROP KEYSPACE {ks}")
    finally:
        s.close()


def test_rows_the_table_cannot_take_are_set_aside_and_the_rest_is_stored(cassandra, caplog):
    """A custom table whose pop3 column cannot take a time: the imap rows are stored and acknowledged,
    the pop3 rows are refused for what they are (PartialWrite.refused), counted and named, never retried."""
    from prometheus_client import REGISTRY

    from harvester.coalesce import Coalescer
    from harvester.sinks.base import PartialWrite, write_taken

    s = fresh(cassandra)
    ks = s.keyspace
    s.session.execute(f"CREATE TABLE {ks}.odd (account text PRIMARY KEY, imap_at timestamp, pop_at boolean)")
    c = CassandraStore(f"cassandra://{cassandra['contact']}/{ks}", options=options_for(
        cassandra, cassandra_layout="custom", cassandra_table="odd", cassandra_user_column="account",
        cassandra_columns={"imap": ["imap_at"], "pop3": ["pop_at"]}))
    sink = Coalescer()
    for i in range(20):
        sink.logins.put(f"u{i}".encode(), "imap", T0 + i, 0, b"192.0.2.1", b"mx1", "imap")
        if i % 4 == 0:
            sink.logins.put(f"u{i}".encode(), "pop3", T0 + i, 0, b"192.0.2.1", b"mx1", "pop3")
    def refused() -> float:
        return REGISTRY.get_sample_value("harvester_store_rows_refused_total", {"reason": "TypeError"}) or 0

    before = refused()
    try:
        with pytest.raises(PartialWrite) as e:
            c.write(sink.take())
        assert e.value.acknowledged == 20 and not e.value.failed and len(e.value.refused) == 5
        for i in range(20):
            sink.logins.put(f"u{i}".encode(), "imap", T0 + i, 0, b"192.0.2.1", b"mx1", "imap")
            if i % 4 == 0:
                sink.logins.put(f"u{i}".encode(), "pop3", T0 + i, 0, b"192.0.2.1", b"mx1", "pop3")
        assert write_taken(sink, c) == 20
        assert len(sink) == 0
        assert refused() - before == 5
        assert s.session.execute(f"SELECT count(*) FROM {ks}.odd").one()[0] == 20
    finally:
        c.close()
        s.session.execute(f"DROP KEYSPACE {ks}")
        s.close()


def test_a_store_outage_is_retried_and_what_was_not_acknowledged_stays_queued(tmp_path):
    """A node of its own goes down between two flushes: the second flush fails with every row still queued
    (no host: not retried inside the write, the daemon retries flushes with its own backoff); once the node
    is back the same flush stores them all."""
    from harvester.sinks.base import PartialWrite, flush

    node = PrivateNode(tmp_path / "node")
    node.start()
    try:
        store, sink = node.outage_store(T0, cassandra_retries=2, cassandra_request_timeout=2)
        for i in range(50):
            sink.logins.put(f"u{i}".encode(), "pop3", T0 + i, 0, b"192.0.2.2", b"mx1", "pop3")
        with pytest.raises(PartialWrite) as e:
            flush(sink, store)
        assert e.value.acknowledged == 0 and len(e.value.failed) == 50
        assert len(sink) == 50
        node.start()
        for _ in range(30):  # the driver reconnects on its own schedule
            try:
                assert flush(sink, store) == 50
                break
            except StoreError:
                time.sleep(1)
        assert len(sink) == 0
        assert [r.service for r in store.lookup("u7")] == ["pop3"] and store.lookup("jane")[0].ip == "192.0.2.1"
        store.close()
    finally:
        node.stop(check=False)


def test_forget_in_the_per_user_layout_deletes_one_service_column_pair_at_its_write_time(cassandra):
    s = fresh(cassandra, cassandra_layout="per_user")
    try:
        s.write([login(4_070_908_800_000_000, "192.0.2.9"), login(T0, "192.0.2.2", service="pop3")])
        (gone,) = s.forget("jane@example.org", "imap")
        assert gone.row.service == "imap" and gone.deleted_at_us == 4_070_908_800_000_000
        assert [(r.service, r.ip) for r in s.lookup("jane@example.org")] == [("pop3", "192.0.2.2")]
        s.write([login(T0 + 1, service="pop3", ip="192.0.2.3")])  # the other column pair is not hidden
        assert s.lookup("jane@example.org")[0].ip == "192.0.2.3"
        assert [f.row.service for f in s.forget("jane@example.org")] == ["pop3"]
        assert s.lookup("jane@example.org") == [] and s.forget("jane@example.org") == []
    finally:
        s.session.execute(f"DROP KEYSPACE {s.keyspace}")
        s.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_backfill_forks_its_helpers_before_the_cassandra_driver_starts_threads(cassandra, tmp_path, monkeypatch,
                                                                                workers):
    """A fork copies the locks the driver's threads hold, and none of those threads: a helper forked after
    the store connected could hang on one. The compressed files' reader (workers=1) and the workers are
    forked first; then the store connects; then the rows reach it."""
    import gzip
    import os
    import threading
    from pathlib import Path

    from harvester import backfill, segments

    golden = (Path(__file__).parent.parent / "golden" / "dovecot-2-4.log").read_bytes()
    for name in ("maillog.2.gz", "maillog.1.gz"):
        (tmp_path / name).write_bytes(gzip.compress(golden))
    (tmp_path / "maillog").write_bytes(golden)
    monkeypatch.setattr(segments, "MIN_SEGMENT", 64)
    before = set(threading.enumerate())
    at_fork: list[set] = []
    fork = os.fork

    def watched_fork() -> int:
        at_fork.append(set(threading.enumerate()) - before)
        return fork()

    monkeypatch.setattr(os, "fork", watched_fork)
    opened = []

    def open_store():
        opened.append(fresh(cassandra))
        assert len(threading.enumerate()) > len(before), "the driver was expected to run threads"
        return opened[0]

    settings = settings_for(cassandra, workers=workers, timezone="UTC", year=2026)
    summary = backfill.run([str(tmp_path / "maillog*")], settings, open_store, progress=False)
    assert at_fork and all(not new for new in at_fork), at_fork
    assert summary.rows_written and not summary.failed_files
    store = CassandraStore(opened[0].url, options=settings.store_options(CassandraOptions))
    try:
        assert {(r.service, r.ip) for r in store.lookup("u24") if r.kind == "login"} == {
            ("imap", "192.0.2.24"), ("pop3", "192.0.2.27"), ("submission", "192.0.2.35"), ("sieve", "192.0.2.36"),
            ("lmtp", "192.0.2.40")}
    finally:
        store.close()


def test_rows_an_earlier_version_stored_as_managesieve_are_read_and_forgotten_as_sieve(store):
    """No migration job: lookup and export read "managesieve" rows as "sieve" (the newer of the two where an
    account has both), and forgetting "sieve" removes both."""
    old = login(T0, "192.0.2.1", service="managesieve")
    store.write([old, login(T0 - 1_000_000, "192.0.2.2", user="b@example.org", service="managesieve"),
                 login(T0 + 1_000_000, "192.0.2.3", user="b@example.org", service="sieve")])
    assert store.lookup("jane@example.org") == [old._replace(service="sieve")]
    assert sorted((r.user, r.service, r.ip) for r in store.export()) == [
        ("b@example.org", "sieve", "192.0.2.3"), ("jane@example.org", "sieve", "192.0.2.1")]
    store.forget("b@example.org", "sieve")
    assert store.lookup("b@example.org") == []
