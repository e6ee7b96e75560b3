"""The native scanner (native/, harvester._fastscan): built, used, and equal to Python's loop.

Parser.event is the definition; the scanner runs the same loop in Rust over
PCRE2's JIT. Every test here parses the same bytes with both engines and
compares everything the rest of the program sees: the coalescing tables, the
counts, the problems, the session state, and the orphans of segment mode.
"""

from __future__ import annotations

import logging
from datetime import UTC
from pathlib import Path

import pytest

from harvester import native, patterns
from harvester.coalesce import Coalescer
from harvester.parse import Parser, Webmail
from harvester.timeparse import Clock
from tests import corpus

PACK = patterns.load("dovecot")


def test_the_native_crate_stays_buildable_by_debian_12s_own_cargo():
    """Debian 12's cargo 1.65 reads lock format 3 only, and its rustc is 1.63: the lock's crate versions were
    chosen for that (cargo's MSRV-aware resolver reads rust-version). A newer cargo rewriting the lock, or a
    raised rust-version, would send a Debian 12 install back to the Python engine without a word."""
    native_dir = Path(__file__).resolve().parent.parent / "native"
    assert "\nversion = 3\n" in (native_dir / "Cargo.lock").read_text()
    assert '\nrust-version = "1.63"\n' in (native_dir / "Cargo.toml").read_text()


def test_the_native_scanner_is_built_and_used():
    assert native.fastscan is not None, (
        "harvester._fastscan was not built: `pip install -e .` builds it with cargo (setuptools-rust); "
        "without it every backfill parses in Python, several times slower")
    parser = Parser(PACK)
    parser.begin("f", "syslog", Clock("bsd", UTC, year=2025))
    assert parser.engine == ("python" if native.ENGINE == "python" else "native")


def both(blocks: list[bytes], *, webmail=("10.99.0.0/16",), orphans: bool = False, block_prefix="syslog",
         style="bsd", year: int | None = 2026, reference: float | None = None) -> dict[str, tuple]:
    """Everything observable after parsing `blocks` with each engine."""
    seen = {}
    for engine in ("python", "native"):
        old = native.ENGINE
        native.ENGINE = "python" if engine == "python" else "auto"
        try:
            parser = Parser(PACK, node="n1", webmail=Webmail(webmail))
            parser.begin("f", block_prefix, Clock(style, UTC, year=year, reference=reference))
            sink = Coalescer()
        finally:
            native.ENGINE = old
        assert parser.engine == engine
        if orphans:
            parser.orphans = []
        offset = 0
        for block in blocks:
            parser.feed(block, sink, offset)
            offset += len(block)
        problems = {k: (p.count, p.first_offset, p.sample) for k, p in parser.end().items()}
        st = parser.stats
        seen[engine] = (dict(sink.logins.items()), dict(sink.others.items()), dict(st.events),
                        dict(st.not_understood), dict(st.bad), st.lines, problems, parser.sessions.lmtp.state(),
                        parser.sessions.login_ip, parser.orphans, parser.ended)
    return seen


def assert_same(seen: dict[str, tuple]) -> None:
    names = ("logins", "others", "events", "not_understood", "bad", "lines", "problems", "lmtp", "login_ip",
             "orphans", "ended")
    for name, p, n in zip(names, seen["python"], seen["native"], strict=True):
        assert n == p, f"{name} differs between the engines"


def blocks_of(data: bytes, size: int) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        end = data.rfind(b"\n", pos, pos + size) + 1
        if end <= pos:
            end = len(data)
        out.append(data[pos:end])
        pos = end
    return out


@pytest.fixture(scope="module")
def maillog(tmp_path_factory) -> bytes:
    c = corpus.generate(tmp_path_factory.mktemp("corpus"), lines=30_000, users=2000, compress=("",))
    return b"".join(f.read_bytes() for f in c.files)


@pytest.mark.skipif(native.fastscan is None, reason="covered by test_the_native_scanner_is_built_and_used")
class TestSameAsPython:
    def test_generated_corpus_in_small_blocks(self, maillog):
        seen = both(blocks_of(maillog, 16 << 10))
        assert_same(seen)
        logins = seen["native"][0]
        assert len(logins) > 1000 and any(s == "webmail" for _, s in logins)

    def test_segment_mode_keeps_the_same_orphans(self, maillog):
        """A segment that starts mid-file: deliveries and POP3 deletions whose session began
        earlier become orphans, and Disconnects without Connect end up in `ended`."""
        orphans = ended = 0
        for k in range(1, 8):
            middle = maillog[len(maillog) * k // 8:]
            middle = middle[middle.index(b"\n") + 1:]
            seen = both(blocks_of(middle, 64 << 10), orphans=True)
            assert_same(seen)
            orphans += len(seen["native"][9])
            ended += len(seen["native"][10])
        assert orphans and ended

    def test_bad_input_is_reported_alike(self):
        L = b"Nov 22 01:00:%02d mx1 dovecot: %s\n"
        lines = [
            L % (1, b"imap-login: Login: user=<ok>, method=PLAIN, rip=192.0.2.1, lip=10.0.0.1, mpid=5, session=<s>"),
            b"Feb 30 01:00:02 mx1 dovecot: imap-login: Login: user=<feb30>, method=PLAIN, rip=192.0.2.2\n",
            L % (3, b"imap-login: Login: user=<\xff\xfebad>, method=PLAIN, rip=192.0.2.3"),
            L % (4, b"imap-login: Login: " + b"x" * 50),  # login-like, understood by no event
            b"\x00" * 100 + L % (5, b"pop3-login: Login: user=<afternul>, method=PLAIN, rip=::1, lip=::1, "
                                    b"mpid=9, session=<s>"),
            L % (6, b"lmtp(42): Connect from 192.0.2.9"),
            L % (7, b"lmtp(dave)<42><sid>: msgid=<m@x>: saved mail to INBOX"),
            L % (8, b"lmtp(42): Disconnect from 10.1.1.1: Successful quit"),  # XCLIENT: re-stamped
            L % (9, b"pop3(afternul)<9><s>: Disconnected: Logged out top=0/0, retr=1/10, del=2/3, size=9"),
            L % (9, b"imap-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<eve>, method=PLAIN, "
                    b"rip=192.0.2.66, lip=10.0.0.1, TLS, session=<x>"),
            b"Nov 22 01:00:10.123 mx1 dovecot: imap-login: Login: user=<frac>, method=PLAIN, rip=192.0.2.7\n",
            L % (11, b"imap-login: Login: user=<web>, method=PLAIN, rip=10.99.1.1, lip=10.0.0.1, mpid=77, "
                     b"session=<w>"),
        ]
        seen = both([b"".join(lines)])
        assert_same(seen)
        logins, others, *_ = seen["native"]
        assert logins[b"dave", "lmtp"][2] == b"10.1.1.1"
        assert others[b"afternul", "pop3_delete"][2] == b"::1"
        assert (b"web", "webmail") in logins and (b"\xff\xfebad", "imap") in logins

    def test_mangled_lines_give_the_same_result_and_never_an_exception(self, maillog):
        """Real lines with bytes flipped, cut, doubled or replaced by NUL, 0xff or newlines."""
        import random

        rng = random.Random(11)
        lines = maillog.splitlines(keepends=True)[:6000]
        junk = [b"\x00", b"\xff", b"\n", b">", b"<", b", rip=", b"lmtp(", b"(", b")", b":", b" ", b"9" * 30]
        out = []
        for line in lines:
            r = rng.random()
            if r < 0.15:
                i = rng.randrange(len(line))
                line = line[:i] + rng.choice(junk) + line[i + 1:]
            elif r < 0.2:
                line = line[: rng.randrange(len(line))]
            elif r < 0.22:
                line = line * 2
            out.append(line)
        data = b"".join(out)
        for size in (4 << 10, 1 << 20):
            assert_same(both(blocks_of(data, size)))
            assert_same(both(blocks_of(data, size), orphans=True))

    def test_iso_prefix_with_offsets_and_microseconds(self):
        data = (b"2026-11-22T01:52:03.242533+01:00 mx1 dovecot: imap-login: Login: user=<a>, method=PLAIN, "
                b"rip=192.0.2.1, lip=10.0.0.1, mpid=1, session=<s>\n"
                b"2026-11-22T01:52:03.9+01:00 mx1 dovecot: imap-login: Login: user=<a>, method=PLAIN, "
                b"rip=192.0.2.2, lip=10.0.0.1, mpid=2, session=<s>\n"
                b"2026-11-22T01:52:04Z mx1 dovecot: pop3-login: Login: user=<b>, method=PLAIN, rip=::1\n")
        seen = both([data], block_prefix="syslog-rfc3339", style="iso")
        assert_same(seen)
        assert seen["native"][0][b"a", "imap"][:3] == (1795308723900000, 1, b"192.0.2.2")


@pytest.mark.skipif(native.fastscan is None, reason="covered by test_the_native_scanner_is_built_and_used")
def test_native_rfc3339_text_is_the_python_one():
    from harvester.timeparse import rfc3339

    for t in (0, 1, 999_999, 1_795_308_723_242_533, -1, -86_400_000_001, 253_402_300_799_999_999, 951_782_400 * 10**6):
        for digits in range(7):
            assert native.fastscan.rfc3339(t, digits) == rfc3339(t, digits)


@pytest.mark.skipif(native.fastscan is None, reason="covered by test_the_native_scanner_is_built_and_used")
def test_native_sqlite_parameters_are_the_python_ones():
    from harvester.coalesce import Row
    from harvester.sinks import sqlite

    rows = [Row("jane", "imap", "login", 1_795_308_723_242_533, 6, "::1", "mx1"),
            Row("jäne", "webmail", "login", 1_795_308_723_000_000, 0, None, None),
            Row("bob", "pop3", "pop3_delete", 1_795_308_724_000_000, 3, "192.0.2.1", "mx2", "deleted=2 messages=3")]
    assert native.fastscan.sqlite_params(rows) == sqlite.params(rows)


def test_a_pack_pcre2_cannot_compile_is_parsed_in_python(tmp_path, caplog):
    """PCRE2 allows group names of at most 128 characters; Python's engine takes longer ones."""
    long = "a" * 140
    (tmp_path / "site.toml").write_text(f'''
name = "site"
extends = "dovecot"
[events.login]
kind = "login"
regex = '(?P<service>imap|pop3)-login: Login: user=<(?P<user>[^>]*)>, method=(?P<{long}>\\w+), rip=(?P<ip>[0-9a-f.:]+)'
''')
    pack = patterns.load(str(tmp_path / "site.toml"))
    parser = Parser(pack)
    with caplog.at_level(logging.WARNING):
        parser.begin("f", "syslog", Clock("bsd", UTC, year=2025))
    assert parser.engine == "python"
    if native.enabled():
        assert "parsing in Python" in caplog.text
    sink = Coalescer()
    parser.feed(b"Nov 22 01:00:00 mx1 dovecot: imap-login: Login: user=<u>, method=PLAIN, rip=192.0.2.1\n", sink)
    assert [k for k, _ in sink.logins.items()] == [(b"u", "imap")]


@pytest.mark.parametrize("native_table", [True, False], ids=["native", "python"])
def test_a_segment_table_shipped_as_bytes_merges_as_a_later_part(native_table):
    from harvester.coalesce import PyTable

    if native_table and native.fastscan is None:
        pytest.fail("the native module is not built")
    make = native.fastscan.Table if native_table else PyTable
    earlier, later = make(), make()
    earlier.put(b"a", "imap", 10, 0, b"192.0.2.1", "mx1", "imap")
    earlier.put(b"b", "pop3", 50, 6, b"2001:db8::5", None, "pop3")
    earlier.put(b"\xff\xfeodd", "auth_fail", 5, 0, None, b"mx1", "imap", "detail=1")
    later.put(b"a", "imap", 10, 3, b"192.0.2.2", b"mx2", "imap")  # same time: the later part wins
    later.put(b"b", "pop3", 40, 0, b"192.0.2.9", "mx2", "pop3")  # older: the earlier part's row stays
    later.put(b"c d>e", "lmtp", 7, 0, None, "mx2", "lmtp", "deleted=3 messages=3")
    earlier.merge(later.dumps())
    assert sorted(earlier.items()) == [
        ((b"a", "imap"), (10, 3, b"192.0.2.2", b"mx2", "imap", None)),
        ((b"b", "pop3"), (50, 6, b"2001:db8::5", None, "pop3", None)),
        ((b"c d>e", "lmtp"), (7, 0, None, "mx2", "lmtp", "deleted=3 messages=3")),
        ((b"\xff\xfeodd", "auth_fail"), (5, 0, None, b"mx1", "imap", "detail=1")),
    ]
    if native_table:
        with pytest.raises(ValueError):
            earlier.merge(later.dumps()[:-3])


@pytest.mark.parametrize("native_table", [True, False], ids=["native", "python"])
def test_a_limited_take_hands_out_slices_in_key_order_and_keeps_the_rest_undecoded_and_counted(native_table):
    """Table.take(row_type, kind, limit): the first `limit` entries in (user, second) order, undecodable user
    names among them (they count); what is left still counts (len, newest), shows (items, dumps) and
    takes its puts (newest wins) until the next take goes on from where the last one stopped."""
    from harvester.coalesce import PyTable, Row

    if native_table and native.fastscan is None:
        pytest.fail("the native module is not built")
    make = native.fastscan.Table if native_table else PyTable
    t = make()
    for i in reversed(range(10)):
        t.put(b"u%d" % i, "imap", 100 + i, 0, b"192.0.2.1", b"mx1", "imap")
    t.put(b"u3", "pop3", 50, 6, None, "mx2", "pop3")
    t.put(b"u5\xff", "imap", 7, 0, None, None, "imap")  # not UTF-8: between u5 and u6
    assert len(t) == 12

    rows, bad = t.take(Row, "login", 3)
    assert [(r.user, r.service) for r in rows] == [("u0", "imap"), ("u1", "imap"), ("u2", "imap")]
    assert bad == [] and len(t) == 9 and t.newest() == 109
    rows, bad = t.take(Row, None, 0)
    assert rows == [] and bad == [] and len(t) == 9
    rows, bad = t.take(Row, "login", 5)
    assert [(r.user, r.service, r.kind, r.time_us, r.digits, r.ip, r.node) for r in rows] == [
        ("u3", "imap", "login", 103, 0, "192.0.2.1", "mx1"), ("u3", "pop3", "login", 50, 6, None, "mx2"),
        ("u4", "imap", "login", 104, 0, "192.0.2.1", "mx1"), ("u5", "imap", "login", 105, 0, "192.0.2.1", "mx1")]
    assert bad == [b"u5\xff"] and len(t) == 4

    left = sorted(t.items())
    assert [k for k, _ in left] == [(b"u6", "imap"), (b"u7", "imap"), (b"u8", "imap"), (b"u9", "imap")]
    copy = make()
    copy.merge(t.dumps())
    assert sorted(copy.items()) == left

    t.put(b"u7", "imap", 99, 0, b"192.0.2.9", b"mx9", "imap")  # older: the entry left stays
    t.put(b"u8", "imap", 300, 0, b"192.0.2.8", b"mx8", "imap")  # newer: it wins
    t.put(b"a", "imap", 1, 0, None, None, "imap")  # a new key before every one left
    assert len(t) == 5 and t.newest() == 300
    rows, _ = t.take(Row, "login", 2)
    assert [(r.user, r.time_us) for r in rows] == [("a", 1), ("u6", 106)]
    rows, _ = t.take(Row, "login")  # no limit: everything left
    assert [(r.user, r.time_us, r.ip) for r in rows] == [("u7", 107, "192.0.2.1"), ("u8", 300, "192.0.2.8"),
                                                         ("u9", 109, "192.0.2.1")]
    assert len(t) == 0 and t.newest() == 0 and t.items() == [] and t.take(Row, "login", 5) == ([], [])


def test_a_kind_the_native_loop_has_no_handling_for_is_parsed_in_python_not_guessed(monkeypatch, caplog):
    """The native scanner gets each kind's role by name and refuses one it does not know (say a row kind added
    to events.py and not to lib.rs): the file is then parsed by Python's loop, with a warning."""
    from zoneinfo import ZoneInfo

    from harvester import parse, patterns
    from harvester.timeparse import Clock

    if not native.enabled():
        pytest.skip("native module not built")
    monkeypatch.setitem(parse._ROLE, "auth_fail", "brand_new_role")
    parser = parse.Parser(patterns.load("dovecot"), node="n")
    parser.begin("f", "syslog", Clock("bsd", ZoneInfo("UTC"), year=2026))
    assert parser.engine == "python"
    assert "brand_new_role" in caplog.text
