"""The embedded store: times never move backwards, replays change nothing."""

from __future__ import annotations

import pytest

from harvester import native
from harvester.coalesce import Coalescer, Row
from harvester.config import Settings
from harvester.sinks import StoreError, open_store
from harvester.sinks.sqlite import path_from_url


def row(t: int, ip: str = "192.0.2.1", user: str = "jane", service: str = "imap", kind: str = "login") -> Row:
    return Row(user, service, kind, t, 0, ip, "mx1")


@pytest.fixture
def store(tmp_path):
    s = open_store("sqlite:///" + str(tmp_path / "h.db"))
    yield s
    s.close()


def test_urls_follow_sqlalchemy():
    assert str(path_from_url("sqlite:///rel/h.db")) == "rel/h.db"
    assert str(path_from_url("sqlite:////var/lib/h.db")) == "/var/lib/h.db"
    with pytest.raises(StoreError):
        path_from_url("sqlite://h.db")


def test_an_older_write_never_moves_the_time_backwards(store):
    store.write([row(2_000_000, "192.0.2.2")])
    store.write([row(1_000_000, "192.0.2.1")])
    assert [(r.time_us, r.ip) for r in store.lookup("jane")] == [(2_000_000, "192.0.2.2")]


def test_equal_time_the_later_write_wins_and_replay_is_idempotent(store):
    store.write([row(5_000_000, "192.0.2.1")])
    store.write([row(5_000_000, "192.0.2.9")])
    assert store.lookup("jane")[0].ip == "192.0.2.9"
    before = list(store.export())
    store.write([row(5_000_000, "192.0.2.9")])
    assert list(store.export()) == before


def test_lookup_is_newest_first_and_keeps_other_events_apart(store):
    store.write([row(1_000_000, service="pop3"), row(3_000_000, service="lmtp"), row(2_000_000),
                 row(4_000_000, kind="auth_fail")])
    rows = store.lookup("jane")
    assert [(r.kind, r.service) for r in rows] == [("login", "lmtp"), ("login", "imap"), ("login", "pop3"),
                                                   ("auth_fail", "imap")]
    assert len(list(store.export())) == 3


def test_time_text_keeps_the_precision(store):
    store.write([Row("a", "imap", "login", 1_795_312_323_242_533, 6, None, None),
                 Row("b", "imap", "login", 1_795_312_323_000_000, 0, None, None)])
    texts = dict(store.db.execute("SELECT user, last_login FROM last_login").fetchall())
    assert texts == {"a": "2026-11-22T01:52:03.242533Z", "b": "2026-11-22T01:52:03Z"}


def test_missing_store_for_lookup_says_what_to_do(tmp_path):
    with pytest.raises(StoreError, match="run 'harvester backfill' first"):
        open_store("sqlite:///" + str(tmp_path / "none.db"), create=False)


def test_two_rows_of_one_key_in_one_write_keep_their_order(store):
    store.write([row(5_000_000, "192.0.2.9"), row(5_000_000, "192.0.2.1")])
    assert store.lookup("jane")[0].ip == "192.0.2.1"


def filled() -> Coalescer:
    """A coalescer holding every kind of value a table can hold (bytes or str node, no IP,
    a detail, a user name that is not UTF-8), as the parser leaves them."""
    sink = Coalescer()
    for i in range(300):
        sink.logins.put(f"user{i % 97}@example.org".encode(), "imap", 1_795_308_723_000_000 + i, i % 7,
                        f"2001:db8::{i:x}".encode(), b"mx1", "imap")
        sink.logins.put(b"j\xc3\xa4ne", "pop3", 1_795_308_723_000_000 - i, 0, None, "configured-node", "pop3")
    sink.logins.put(b"\xff\xfe", "imap", 1, 0, None, None, "imap")
    sink.others.put(b"user1@example.org", "pop3_delete", 1_795_308_724_000_000, 0, b"192.0.2.1", b"mx2", "pop3",
                    "deleted=2 messages=3")  # (accounts with a login: event_rows = known keeps their events)
    sink.others.put(b"user2@example.org", "auth_fail", 1_795_308_725_000_000, 3, b"198.51.100.7", None, "imap")
    return sink


def dump(store) -> list:
    return [store.db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in ("last_login", "last_event")]


@pytest.mark.skipif(native.fastscan is None, reason="the row path is the only path")
def test_the_native_flush_stores_exactly_what_the_row_path_stores(tmp_path):
    fast, slow = (open_store(f"sqlite:///{tmp_path}/{n}.db") for n in ("fast", "slow"))
    a, b = filled(), filled()
    assert fast.flush(a) == 100
    rows = b.take()
    assert slow.write(rows) == 100
    assert dump(fast) == dump(slow) and len(dump(fast)[0]) == 98
    assert a.bad_input() == b.bad_input() == {"utf8": 1} and a.bad_sample("utf8") == b"\xff\xfe"
    assert len(a) == 0
    fast.close()
    slow.close()


def with_runs() -> Coalescer:
    """A coalescer with its own rows and two later processes' tables as runs: overlapping keys,
    newer and older times, equal times (the later run wins), keys only some of them have."""
    sink = filled()
    for shift in (1, 2):
        part = Coalescer()
        for i in range(0, 300, 2 * shift):
            part.logins.put(f"user{i % 131}@example.org".encode(), "imap", 1_795_308_723_000_000 + 150 * shift,
                            0, f"192.0.2.{shift}".encode(), b"mx%d" % shift, "imap")
        part.logins.put(b"j\xc3\xa4ne", "pop3", 1_795_308_723_000_000, 0, b"198.51.100.1", f"n{shift}", "pop3")
        part.others.put(b"eve", "auth_fail", 1_795_308_725_000_000, 3, b"203.0.113.%d" % shift, None, "imap")
        sink.add_run(part.logins.dumps(), part.others.dumps(), len(part))
    return sink


@pytest.mark.skipif(native.fastscan is None, reason="runs are merged into the tables on the row path")
def test_runs_merged_while_writing_store_what_merging_them_first_stores(tmp_path):
    every = Settings()
    every.set("event_rows", "all", "test")  # eve has no login: kept only with event_rows = all
    fast, slow = (open_store(f"sqlite:///{tmp_path}/{n}.db", settings=every) for n in ("fast", "slow"))
    a, b = with_runs(), with_runs()
    written = fast.flush(a)
    rows = b.take()
    assert written == slow.write(rows) == len(rows)
    assert dump(fast) == dump(slow)
    assert ("eve", "auth_fail", "imap", "2026-11-22T00:52:05.000Z", 1_795_308_725_000_000, "203.0.113.2",
            None, None) in dump(fast)[1]
    assert len(a) == 0 and not a.runs and a.bad_input() == {"utf8": 1}
    fast.close()
    slow.close()


def test_a_failed_flush_commits_nothing_and_keeps_the_rows_for_a_retry(store):
    store.db.execute("CREATE TRIGGER no BEFORE INSERT ON last_event BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    sink = filled()
    with pytest.raises(StoreError, match="disk says no"):
        store.flush(sink)
    assert dump(store) == [[], []]
    assert len(sink) == (101 if native.enabled() else 100)  # the native path keeps the non-UTF-8 name too
    store.db.execute("DROP TRIGGER no")
    assert store.flush(sink) == 100
    assert len(sink) == 0 and sink.bad_input() == {"utf8": 1}


@pytest.mark.parametrize("engine", ["native", "python"])
def test_a_flush_after_a_failed_slice_stores_the_put_back_rows_and_what_stayed_in_the_tables(tmp_path, monkeypatch,
                                                                                              engine):
    """On the row path (write_taken) a big batch goes a slice (WRITE_ROWS) at a time; the second slice's write
    fails: its rows are put back, the rest stays in the tables, and the next flush (the row path again, rows
    being pending, native tables or not) stores all of it as one write of everything would have."""
    from harvester.sinks import base

    if engine == "native" and not native.enabled():
        pytest.skip("the native module is not built")
    monkeypatch.setattr(native, "ENGINE", engine)
    monkeypatch.setattr(base, "WRITE_ROWS", 40)
    store, ref = (open_store(f"sqlite:///{tmp_path}/{n}.db") for n in ("h", "ref"))
    sink = filled()
    ref.write(filled().take())
    writes = []
    real = store.write

    def second_fails(rows):
        writes.append(len(rows))
        if len(writes) == 2:
            raise StoreError("disk says no")
        return real(rows)

    monkeypatch.setattr(store, "write", second_fails)
    with pytest.raises(StoreError):
        base.write_taken(sink, store)
    assert writes == [40, 40] and len(sink.pending) == 40 and len(sink.logins) + len(sink.others) == 101 - 80
    assert store.flush(sink) == 60 and len(sink) == 0
    assert dump(store) == dump(ref) and sink.bad_input() == {"utf8": 1}


@pytest.mark.skipif(native.fastscan is None, reason="the row path is the only path")
def test_the_native_flush_stores_what_a_limited_take_left_in_the_tables(tmp_path):
    fast, ref = (open_store(f"sqlite:///{tmp_path}/{n}.db") for n in ("fast", "ref"))
    sink = filled()
    ref.write(filled().take())
    rows, bad = sink.logins.take(Row, "login", 10)
    assert len(rows) == 10 and not bad
    fast.write(rows)
    assert fast.flush(sink) == 100 - 10 and len(sink) == 0
    assert dump(fast) == dump(ref)


def test_a_store_of_an_earlier_version_gets_its_managesieve_rows_as_sieve_once_keeping_the_newer(tmp_path):
    """Earlier versions stored ManageSieve logins as "managesieve"; opening the file renames them to "sieve"
    (Dovecot's plugin's name), the newer row winning where an account has both, and marks the file done."""
    import sqlite3

    from harvester.sinks.sqlite import SCHEMA

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # as an earlier harvester left it: user_version 0
        db.executescript(SCHEMA)
        for user, svc, t, ip in [("a", "managesieve", 1, "192.0.2.1"), ("a", "sieve", 2, "192.0.2.2"),
                                 ("b", "managesieve", 3, "192.0.2.3"), ("c", "sieve", 1, "192.0.2.4"),
                                 ("c", "managesieve", 5, "192.0.2.5")]:
            db.execute("INSERT INTO last_login VALUES (?, ?, ?, ?, ?, 'mx1')",
                       (user, svc, f"1970-01-01T00:00:0{t}Z", t * 1_000_000, ip))
        db.execute("INSERT INTO last_event VALUES ('b', 'auth_fail', 'managesieve', '1970-01-01T00:00:04Z', "
                   "4000000, '192.0.2.6', 'mx1', 'attempts=1')")
    s = open_store(f"sqlite:///{path}")
    try:
        assert [(r.user, r.service, r.ip) for r in s.export()] == [
            ("a", "sieve", "192.0.2.2"), ("b", "sieve", "192.0.2.3"), ("c", "sieve", "192.0.2.5")]
        assert [(r.kind, r.service) for r in s.lookup("b")] == [("login", "sieve"), ("auth_fail", "sieve")]
    finally:
        s.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
