"""Rawlog sessions: who, over what, when, from where, reading nothing a session said after its first line."""

from __future__ import annotations

import builtins
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from harvester.coalesce import Coalescer
from harvester.parse import Parser, rawlog_logins
from harvester.patterns import load
from harvester.sources import rawlog
from harvester.timeparse import Clock
from tests.conftest import SAMPLES


def test_rawlog_dir_sessions_of_the_real_samples(monkeypatch):
    opened = []
    real_open = builtins.open

    def spy(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    got = sorted(rawlog.Tree(SAMPLES / "rawlog", UTC).sessions(), key=lambda s: (s.user, s.time_us))
    assert {(s.user, s.service) for s in got} == {
        ("test1", "imap"), ("test2", "pop3"), ("test3", "imap"), ("jane.doe@example.com", "imap")}
    first = [s for s in got if s.user == "test1"][0]
    assert (first.time_us, first.digits, first.pid, first.ip) == (1_795_312_058_951_126, 6, "6426", None)
    assert opened and not [p for p in opened if p.endswith(".in")]  # commands and credentials are never read


def test_rawlog_binary_layout_takes_the_ip_from_the_name_and_the_time_from_it_without_t(tmp_path):
    d = tmp_path / "homes" / "bob@example.org" / "dovecot.rawlog"
    d.mkdir(parents=True)
    (d / "127.0.0.18-20261122-015638-19011.out").write_bytes(b"+OK Logged in.\r\n")
    (d / "127.0.0.18-20261122-015638-19011.in").write_bytes(b"PASS do-not-read-me\r\n")
    (d / "2001:db8::5-20261122-015700-19020.out").write_bytes(
        b"1795312620.000001 a1 OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    (s1, s2) = rawlog.Tree(tmp_path / "homes", ZoneInfo("Europe/Berlin")).sessions()
    assert (s1.user, s1.service, s1.ip, s1.digits) == ("bob@example.org", "pop3", "127.0.0.18", 0)
    assert s1.time_us == 1_795_308_998_000_000  # 01:56:38 in Berlin is 00:56:38 UTC
    assert (s2.service, s2.ip, s2.time_us) == ("imap", "2001:db8::5", 1_795_312_620_000_001)


def test_a_user_regex_maps_paths_to_accounts_and_unknown_files_are_ignored(tmp_path):
    d = tmp_path / "example.org" / "alice"
    d.mkdir(parents=True)
    (d / "20261122-014738.6426.1.out").write_bytes(b"1795312058.951126 * CAPABILITY IMAP4rev1\r\n")
    (d / "notes.txt").write_text("x")
    (d / "20261122-014739.6427.1.out").write_bytes(b"1795312058.951126 garbage\r\n")
    tree = rawlog.Tree(tmp_path, UTC)
    tree.root = tmp_path / "example.org"
    tree.user_regex = __import__("re").compile(r"(?P<dom>[^/]+)/(?P<user>[^/]+)$")
    assert [(s.user, s.service) for s in tree.sessions()] == [("alice", "imap")]


def test_sessions_join_the_maillog_login_with_the_same_pid_for_their_address():
    parser = Parser(load("dovecot"), node="n")
    parser.remember_logins()
    parser.begin("syslog", "syslog", Clock("bsd", UTC, year=2026))
    sink = Coalescer()
    parser.feed((SAMPLES / "syslog-traditional.log").read_bytes(), sink)
    sessions = list(rawlog.Tree(SAMPLES / "rawlog", UTC).sessions(after=1_795_312_200))  # 01:50 UTC
    n, no_ip = rawlog_logins(iter(sessions), sink, parser, "n")
    assert n == 4 and no_ip == 0
    rows = {(r.user, r.service): r for r in sink.take() if r.kind == "login"}
    assert rows[("test1", "imap")].ip == "127.0.0.2" and rows[("test1", "imap")].time_us % 1_000_000 == 245_108


def test_a_pre_login_rawlog_is_not_a_session_and_its_credentials_are_never_read(tmp_path, monkeypatch):
    d = tmp_path / "rawlogs"  # imap-login -R rawlogs: one directory for everybody, before authentication
    d.mkdir()
    (d / "20261122-015611.17832.1.out").write_bytes(b"1795312571.950100 * OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n")
    (d / "20261122-015611.17832.1.in").write_bytes(b'1795312571.950726 a1 LOGIN "test2" "secret"\r\n')
    (d / "20261122-015612.17833.1.out").write_bytes(b"1795312572.000001 +OK Dovecot (Debian) ready.\r\n")
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    assert list(rawlog.Tree(tmp_path, UTC).sessions()) == []
    assert len(opened) == 2 and not [p for p in opened if p.endswith(".in")]


def test_after_and_until_select_by_the_name_time_and_the_repeated_dst_hour_counts_twice(tmp_path):
    berlin = ZoneInfo("Europe/Berlin")
    d = tmp_path / "alice"
    d.mkdir()
    for name in ("20261025-015959", "20261025-023000", "20261025-030000"):
        (d / f"{name}.100.1.out").write_bytes(b"+OK Logged in.\r\n")
    tree = rawlog.Tree(tmp_path, berlin)
    first_0230 = datetime(2026, 10, 25, 2, 30, tzinfo=berlin).timestamp()  # summer time, before the change
    # A mark at the first 02:30 still lets the second 02:30 (an hour later, winter time) through.
    assert [s.name for s in tree.sessions(after=first_0230)] == ["20261025-023000", "20261025-030000"]
    assert [s.name for s in tree.sessions(after=first_0230 + 3600)] == ["20261025-030000"]
    assert [s.name for s in tree.sessions(until=first_0230)] == ["20261025-015959", "20261025-023000"]


def test_a_tree_of_many_user_directories_is_walked_one_directory_at_a_time(tmp_path, monkeypatch):
    for i in range(300):
        d = tmp_path / f"user{i}"
        d.mkdir()
        (d / "20261122-014738.6426.1.out").write_bytes(b"1795312058.951126 +OK Logged in.\r\n")
    listed = []
    real_scandir = rawlog.os.scandir
    monkeypatch.setattr(rawlog.os, "scandir", lambda p: listed.append(p) or real_scandir(p))
    sessions = rawlog.Tree(tmp_path, UTC).sessions()
    next(sessions)
    assert len(listed) == 2  # the root, and the first user's directory: nothing else was read yet
    assert sum(1 for _ in sessions) == 299
