"""Cutting files into segments: every line belongs to exactly one segment, whatever the cut."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

from harvester import segments
from harvester.sources import archive


@pytest.mark.parametrize("compressed", [False, True])
def test_segments_reassemble_the_file_exactly(tmp_path, monkeypatch, compressed):
    rng = random.Random(5)
    for trial in range(25):
        lines = [b"x" * rng.randint(0, 300) + str(i).encode() for i in range(rng.randint(1, 2000))]
        data = b"\n".join(lines) + (b"\n" if trial % 3 else b"")
        path = tmp_path / ("f.gz" if compressed else "f")
        path.write_bytes(gzip.compress(data, 1) if compressed else data)
        monkeypatch.setattr(archive, "BLOCK", rng.choice([7, 100, 4096]))
        size = path.stat().st_size
        for count in (1,) if compressed else (1, 2, 3, 5):
            cuts = [k * size // count for k in range(count)] + [None]
            parts = [b"".join(t.data[1:t.end] for t in archive.texts(path, lo, hi, max_line=1 << 20,
                                                                      on_long_line=print))
                     for lo, hi in zip(cuts, cuts[1:], strict=False)]
            assert b"".join(parts) == data, (trial, count)


def source(path, compressed=False):
    return segments.LogFile(str(path), path.stat().st_size, compressed, "syslog", "bsd", 0)


def test_a_compressed_file_is_never_cut_a_plain_one_is_cut_into_one_job_per_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "MIN_SEGMENT", 1)
    path = tmp_path / "maillog.1.gz"
    path.write_bytes(gzip.compress(b"line\n" * 1000))
    plain = tmp_path / "maillog"
    plain.write_bytes(b"line\n" * 1000)
    assert [[(s.lo, s.hi) for s in job] for job in segments.plan([source(path, True)], workers=4)] == [[(0, None)]]
    jobs = segments.plan([source(plain)], workers=4)
    assert [[(s.lo, s.hi) for s in job] for job in jobs] == [[(0, 1250)], [(1250, 2500)], [(2500, 3750)],
                                                             [(3750, None)]]


def test_rotated_files_become_one_run_of_consecutive_lines_per_worker(tmp_path, monkeypatch):
    """Jobs are consecutive: every byte of every file in exactly one job, in backfill order, so each worker's
    parser reads its files one after the other as a sequential backfill would."""
    monkeypatch.setattr(segments, "MIN_SEGMENT", 1)
    rng = random.Random(3)
    files = []
    for k in range(6, 0, -1):
        compressed = k % 3 == 0
        path = tmp_path / (f"maillog.{k}.gz" if compressed else f"maillog.{k}")
        data = b"x" * rng.randint(100, 5000)
        path.write_bytes(gzip.compress(data) if compressed else data)
        files.append(source(path, compressed))
    for workers in (1, 2, 3, 7):
        jobs = segments.plan(files, workers)
        assert 1 <= len(jobs) <= workers
        flat = [s for job in jobs for s in job]
        for f in files:
            mine = [(s.lo, s.hi) for s in flat if s.path == f.path]
            bounds = [lo for lo, _ in mine] + [None]
            assert mine[0][0] == 0 and [hi for _, hi in mine] == bounds[1:], (workers, f.path, mine)
            if f.compressed:
                assert mine == [(0, None)]
        assert [s.path for s in flat] == sorted([s.path for s in flat], key=[f.path for f in files].index)


def test_an_operator_pack_with_an_optional_group_on_a_pid_joined_event_backfills_alike_with_two_workers(
        tmp_path, monkeypatch, capsys):
    """A POP3 deletion whose login is in the other worker's segment, in a pack whose deletion regex has an
    optional group that did not take part: the workers' join must give the sequential run's rows (it
    crashed with AttributeError, decoding the missing group)."""
    import sqlite3

    from harvester import patterns
    from tests.conftest import run_cli

    builtin = (Path(patterns.__file__).parent.parent / "patterns" / "dovecot.toml").read_text()
    old = r"del=(?P<deleted>[1-9]\d*)/(?P<messages>\d+)'"
    assert old in builtin
    pack = tmp_path / "mine.toml"
    pack.write_text(builtin.replace(old, old[:-1] + r"(?:, quota=(?P<quota>\d+)|)'"))
    log = tmp_path / "maillog"
    filler = b"".join(b"Nov 22 10:00:%02d mx1 postfix/smtpd[77]: connect from unknown[192.0.2.9] %05d\n" % (i % 60, i)
                      for i in range(400))
    log.write_bytes(
        b"Nov 22 10:00:04 mx1 dovecot: pop3-login: Logged in: user=<u24>, method=PLAIN, rip=192.0.2.27, "
        b"lip=10.0.0.1, mpid=4243, session=<g8+xydNg/5V/AAAT>\n" + filler
        + b"Nov 22 10:09:05 mx1 dovecot: pop3(u24)<4243><g8+xydNg/5V/AAAT>: Disconnected: Logged out "
        b"top=0/0, retr=3/900, del=3/3, size=900\n")
    monkeypatch.setattr(segments, "MIN_SEGMENT", 1024)  # so that two workers cut this small file in two
    assert len(segments.plan([source(log)], workers=2)) == 2
    got = {}
    for workers in ("1", "2"):
        db = tmp_path / f"w{workers}.db"
        assert run_cli("backfill", "--store", f"sqlite:///{db}", "--timezone", "UTC", "--year", "2026",
                       "--pattern-pack", str(pack), "--workers", workers, str(log)) == 0
        with sqlite3.connect(db) as c:
            got[workers] = sorted(c.execute("SELECT * FROM last_event").fetchall()) + sorted(
                c.execute("SELECT * FROM last_login").fetchall())
    assert got["2"] == got["1"]
    assert any("192.0.2.27" in row and any("quota=" in str(v) for v in row) for row in got["2"])


def test_rawlog_sessions_take_their_address_from_the_login_lines_whatever_the_worker_count(tmp_path, monkeypatch):
    """A rawlog session names its mail process, not its client: its address is the Login line's with the same
    pid. With two workers the logins are parsed in worker processes; the stitched session state must give
    the same rows as one process (the real 2.3.19 samples: four sessions, each with its address)."""
    import sqlite3

    from tests.conftest import SAMPLES, run_cli

    log = SAMPLES / "syslog-traditional.log"
    monkeypatch.setattr(segments, "MIN_SEGMENT", max(1, log.stat().st_size // 3))
    got = {}
    for workers in ("1", "2"):
        db = tmp_path / f"w{workers}.db"
        assert run_cli("backfill", "--store", f"sqlite:///{db}", "--timezone", "UTC", "--year", "2026",
                       "--rawlog", str(SAMPLES / "rawlog"), "--workers", workers, str(log)) == 0
        with sqlite3.connect(db) as c:
            got[workers] = sorted(c.execute("SELECT * FROM last_login").fetchall())
    assert got["2"] == got["1"]
    by_user = {(row[0], row[1]): row for row in got["2"]}
    assert by_user[("test1", "imap")][4] == "127.0.0.2"


def test_a_cut_user_name_and_a_2_4_deletion_whose_login_is_in_the_other_workers_job_backfill_alike(
        tmp_path, monkeypatch, capsys):
    """The login line (user name cut at 80 bytes, 2.4's 'Logged in') in one job, the mail process's lines
    that complete the name and word del= in the next: two workers store what one does."""
    import sqlite3

    from tests.conftest import run_cli

    full = "long-" + "0123456789" * 7 + "012@example.com"
    log = tmp_path / "maillog"
    filler = b"".join(b"Nov 22 10:00:%02d mx1 postfix/smtpd[77]: connect from unknown[192.0.2.9] %05d\n" % (i % 60, i)
                      for i in range(400))
    log.write_bytes(
        b"Nov 22 10:00:04 mx1 dovecot: pop3-login: Logged in: user=<%s...>, method=PLAIN, rip=192.0.2.27, "
        b"lip=10.0.0.1, mpid=4243, session=<g8+xydNg/5V/AAAT>\n" % full[:77].encode() + filler
        + b"Nov 22 10:09:05 mx1 dovecot: pop3(%s)<4243><g8+xydNg/5V/AAAT>: Disconnected: Logged out "
        b"top=0/0, retr=3/900, del=3/900, size=900\n" % full.encode())
    monkeypatch.setattr(segments, "MIN_SEGMENT", 1024)
    assert len(segments.plan([source(log)], workers=2)) == 2
    got = {}
    for workers in ("1", "2"):
        db = tmp_path / f"w{workers}.db"
        assert run_cli("backfill", "--store", f"sqlite:///{db}", "--timezone", "UTC", "--year", "2026",
                       "--workers", workers, str(log)) == 0
        with sqlite3.connect(db) as c:
            got[workers] = (c.execute("SELECT user, service, last_ip FROM last_login").fetchall(),
                            c.execute("SELECT user, kind, ip, detail FROM last_event").fetchall())
    assert got["2"] == got["1"] == ([(full, "pop3", "192.0.2.27")],
                                    [(full, "pop3_delete", "192.0.2.27", "deleted=3 bytes=900")])
