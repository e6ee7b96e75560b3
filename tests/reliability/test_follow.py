"""Following the maillog across restarts, rotations and a botched path: a real `harvester run`, real logrotate,
and a final store that must equal a one-shot backfill of every line written (issue 13, items 2, 3, 5, 11, 13,
15)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.daemon_kit import Writer, logrotate, reference, rows, settle, start, stop


@pytest.fixture(scope="module")
def big_lines(tmp_path_factory) -> list[bytes]:
    """240,000 generated lines (36 MB): files larger than one read of the follower."""
    from tests import corpus

    src = tmp_path_factory.mktemp("big") / "maillog"
    corpus.write_maillog(src, lines=240_000, users=2000, tz="UTC")
    return src.read_bytes().splitlines(keepends=True)


def daemon(tmp_path: Path) -> tuple[Path, subprocess.Popen]:
    db = tmp_path / "h.db"
    return db, start(tmp_path, f"sqlite:///{db}")


def caught_up(tmp_path: Path, db: Path, proc: subprocess.Popen, written: list[bytes], timeout: float = 60) -> None:
    want = reference(tmp_path, written)
    assert settle(db, want, proc, timeout) == want


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def spanning_session(before: bytes, pid: int, user: str, ip: str) -> tuple[list[bytes], list[bytes]]:
    """An LMTP session as tests/corpus.py writes them, opened by the last lines of one file and delivering in
    the first lines of the next: (lines ending a file, lines starting the next)."""
    head = before[:16].decode() + "mx1 dovecot: "  # "Dec 31 21:55:00 ": the time of the line before
    return ([f"{head}lmtp({pid}): Connect from {ip}\n".encode()],
            [f"{head}lmtp({user})<{pid}><Sp4nS3ss{pid}>: msgid=<span{pid}@example.org>: saved mail to INBOX\n"
             .encode(), f"{head}lmtp({pid}): Disconnect from {ip}: Logged out (state=READY)\n".encode()])


def test_copytruncate_while_stopped_reads_the_unread_tail_from_the_copy(tmp_path, log_lines):
    (tmp_path / "log").mkdir()
    w = Writer(tmp_path / "log" / "maillog", log_lines)
    try:
        db, proc = daemon(tmp_path)
        w.write(3000)
        caught_up(tmp_path, db, proc, log_lines[:3000])
        stop(proc)
        w.write(3000)  # written while stopped: copied by logrotate, then truncated away
        logrotate(tmp_path, "copytruncate")
        assert (tmp_path / "log" / "maillog.1").exists()
        w.write(len(log_lines))
        db, proc = daemon(tmp_path)
        caught_up(tmp_path, db, proc, log_lines)
    finally:
        w.close()
        err = stop(proc)
    assert "is gone" not in err and "lost" not in err


def test_two_rename_rotations_while_stopped_keep_the_ips_of_lmtp_sessions_across_files(tmp_path, big_lines):
    """Three files of 6 MB each (more than one read), each ending inside an LMTP session whose deliveries are
    at the start of the next file: read in order, every delivery has its MTA's address."""
    lines = list(big_lines[:120_000])
    opened_b, closed_b = spanning_session(lines[39_999], 99001, "span-a-b@example.com", "10.0.0.77")
    opened_c, closed_c = spanning_session(lines[79_999], 99002, "span-b-c@example.com", "10.0.0.78")
    lines[40_000:40_000] = [*opened_b, *closed_b]
    lines[80_003:80_003] = [*opened_c, *closed_c]
    (tmp_path / "log").mkdir()
    w = Writer(tmp_path / "log" / "maillog", lines)
    try:
        db, proc = daemon(tmp_path)
        w.write(2000)
        caught_up(tmp_path, db, proc, lines[:2000])
        stop(proc)
        w.write(40_001 - 2000)  # ... the Connect of the first spanning session ends the file
        logrotate(tmp_path, "create")
        w.reopen()
        w.write(40_000 + 2)  # its delivery starts the next file, whose end opens the second session
        logrotate(tmp_path, "create")
        w.reopen()
        w.write(len(lines))
        assert (tmp_path / "log" / "maillog.2").stat().st_size > 5 << 20
        db, proc = daemon(tmp_path)
        caught_up(tmp_path, db, proc, lines, timeout=120)
    finally:
        w.close()
        stop(proc)
    lmtp = {user: ip for user, service, _, ip, _ in rows(db) if service == "lmtp"}
    assert lmtp["span-a-b@example.com"] is not None and lmtp["span-b-c@example.com"] is not None


def test_a_fifo_then_a_directory_at_the_path_neither_wedge_nor_leak_and_the_restored_file_is_read(
        tmp_path, log_lines):
    log = tmp_path / "log" / "maillog"
    (tmp_path / "log").mkdir()
    w = Writer(log, log_lines)
    try:
        db, proc = daemon(tmp_path)
        w.write(3000)
        caught_up(tmp_path, db, proc, log_lines[:3000])
        os.rename(log, tmp_path / "log" / "maillog.keep")  # a botched symlink swap
        os.mkfifo(log)
        time.sleep(1)
        before = fds(proc.pid)
        w.write(1000)  # rsyslog still writes to the file it has open
        time.sleep(2)  # ten polls
        assert fds(proc.pid) <= before
        os.unlink(log)
        os.mkdir(log)
        w.write(1000)
        time.sleep(2)
        assert fds(proc.pid) <= before
        os.rmdir(log)
        os.rename(tmp_path / "log" / "maillog.keep", log)
        w.write(len(log_lines))
        caught_up(tmp_path, db, proc, log_lines)
    finally:
        w.close()
        err = stop(proc)
    assert err.count("cannot read it") == 1, err  # said once, not per poll
    assert "Traceback" not in err


def test_a_compressed_catch_up_after_two_rotations_while_stopped_stays_in_bounded_memory(tmp_path, big_lines):
    """36 MB written and rotated with compress twice while stopped: read at restart in blocks of a few MiB, not
    as one block per archive (which took about three times the archive's text)."""
    (tmp_path / "log").mkdir()
    w = Writer(tmp_path / "log" / "maillog", big_lines)
    try:
        db, proc = daemon(tmp_path)
        w.write(2000)
        caught_up(tmp_path, db, proc, big_lines[:2000])
        base = peak_rss_mb(proc.pid)
        stop(proc)
        w.write(120_000 - 2000)
        logrotate(tmp_path, "create\n    compress")
        w.reopen()
        w.write(len(big_lines) - 1000)
        logrotate(tmp_path, "create\n    compress")
        w.reopen()
        w.write(len(big_lines))
        assert (tmp_path / "log" / "maillog.2.gz").exists()
        db, proc = daemon(tmp_path)
        caught_up(tmp_path, db, proc, big_lines, timeout=120)
        grown = peak_rss_mb(proc.pid) - base
    finally:
        w.close()
        stop(proc)
    assert grown < 55, f"peak RSS grew by {grown:.0f} MB over a daemon that read 2,000 lines"


def test_an_empty_file_at_stop_then_written_and_rotated_while_stopped_is_read(tmp_path, log_lines):
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "maillog").touch()
    db, proc = daemon(tmp_path)
    time.sleep(2)  # following the empty file
    stop(proc)
    w = Writer(tmp_path / "log" / "maillog", log_lines)
    try:
        w.write(4000)
        logrotate(tmp_path, "create")
        w.reopen()
        w.write(len(log_lines))
        db, proc = daemon(tmp_path)
        caught_up(tmp_path, db, proc, log_lines)
    finally:
        w.close()
        stop(proc)


def test_a_line_over_max_line_bytes_in_run_is_skipped_and_counted_as_backfill_does(tmp_path, log_lines):
    """A 2 MB login line (over the 1 MiB max_line_bytes, under one 4 MiB read): not stored, reported once with
    its offset, in `run` as in `backfill`."""
    long = (log_lines[100][:16] + b"mx1 dovecot: imap-login: Login: user=<toolong@example.com>, method=PLAIN, "
            b"rip=192.0.2.9, lip=10.0.0.1, mpid=4242, session=<" + b"A" * (2 << 20) + b">\n")
    lines = [*log_lines[:2000], long, *log_lines[2000:]]
    at = len(b"".join(lines[:2000]))
    (tmp_path / "log").mkdir()
    w = Writer(tmp_path / "log" / "maillog", lines)
    try:
        db, proc = daemon(tmp_path)
        w.write(len(lines), chunk=1000)
        caught_up(tmp_path, db, proc, lines)
    finally:
        w.close()
        err = stop(proc)
    assert not any(user == "toolong@example.com" for user, *_ in rows(db))
    said = f"1 line(s) longer than max_line_bytes, skipped (first at byte {at}:"
    backfill = subprocess.run([sys.executable, "-m", "harvester", "backfill", "--store",
                               f"sqlite:///{tmp_path / 'b.db'}", "--timezone", "UTC", "--year", "2026",
                               str(tmp_path / "log" / "maillog")], cwd=ROOT, capture_output=True, text=True)
    assert said in backfill.stderr, backfill.stderr
    assert said in err and err.count("longer than max_line_bytes") == 1, err
