"""Following one path through rotations: every line once, none lost, partial lines wait."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

from harvester.checkpoint import Checkpoints, State
from harvester.sources import tail
from harvester.sources.identity import FileId, Position
from harvester.sources.tail import Follower


def lines(f: Follower) -> list[bytes]:
    return [line for b in f.poll() for line in b.data.splitlines()]


def append(path, *text: str) -> None:
    with open(path, "ab") as f:
        f.write("".join(text).encode())


def follow(log, saved: list[Position] | None = None, start_at: str = "beginning", **kw) -> Follower:
    f = Follower(log, **kw)
    f.start(saved or [], start_at)
    return f


def stopped_at(log, offset: int) -> list[Position]:
    """Read `log` to its end and stop, checkpointed at `offset` (what the store acknowledged)."""
    f = follow(log)
    f.poll()
    saved = [Position(f.positions()[0].id, offset)]
    f.close()
    return saved


def gzip_to(src, dst) -> None:
    """What logrotate's compress does (the original is deleted by the caller)."""
    with open(src, "rb") as i, gzip.open(dst, "wb") as o:
        shutil.copyfileobj(i, o)


@pytest.fixture(autouse=True)
def no_grace(monkeypatch):
    monkeypatch.setattr(tail, "DRAIN_GRACE", 0.0)


def test_a_partial_line_waits_for_its_newline(tmp_path):
    log = tmp_path / "maillog"
    append(log, "one\ntw")
    f = follow(log)
    assert lines(f) == [b"one"]
    append(log, "o\n")
    assert lines(f) == [b"two"]
    assert f.positions()[0].offset == 8


def test_start_at_end_skips_what_was_there_and_beginning_reads_it(tmp_path):
    log = tmp_path / "maillog"
    append(log, "old\n")
    f = follow(log, start_at="end")
    append(log, "new\n")
    assert lines(f) == [b"new"]


def test_rename_and_create_drains_the_old_file_including_late_writes(tmp_path):
    log = tmp_path / "maillog"
    append(log, "a\n")
    f = follow(log)
    assert lines(f) == [b"a"]
    with open(log, "ab") as old:  # the writer keeps its descriptor until it is told to reopen
        os.rename(log, tmp_path / "maillog.1")
        append(log, "c\n")
        old.write(b"b\n")  # written to the renamed file after the rotation
    got = lines(f)
    assert sorted(got) == [b"b", b"c"]
    assert len(f.queue) == 0 and f.cur is not None


def test_a_rotated_file_compressed_and_deleted_is_still_read_to_its_end(tmp_path):
    log = tmp_path / "maillog"
    append(log, "a\n")
    f = follow(log)
    lines(f)
    append(log, "b\nlast line without newline")
    os.rename(log, tmp_path / "maillog.1")
    gzip_to(tmp_path / "maillog.1", tmp_path / "maillog.1.gz")
    os.unlink(tmp_path / "maillog.1")
    assert lines(f) == [b"b", b"last line without newline"]


def test_copytruncate_takes_the_unread_rest_from_the_copy(tmp_path):
    log = tmp_path / "maillog"
    append(log, "a\n")
    f = follow(log)
    lines(f)
    append(log, "b\n")  # not read yet when logrotate copies and truncates
    shutil.copy(log, tmp_path / "maillog.1")
    os.truncate(log, 0)
    append(log, "c\n")
    assert lines(f) == [b"b", b"c"]


def test_a_file_regrown_past_the_offset_after_copytruncate_is_noticed_by_its_first_bytes(tmp_path):
    log = tmp_path / "maillog"
    append(log, "first line\n")
    f = follow(log)
    lines(f)
    shutil.copy(log, tmp_path / "maillog.1")
    os.truncate(log, 0)
    append(log, "other first line, longer\n")
    assert lines(f) == [b"other first line, longer"]


def test_restart_resumes_in_a_rotated_file_then_reads_the_new_one(tmp_path):
    log = tmp_path / "maillog"
    append(log, "a\nb\n")
    saved = stopped_at(log, 2)  # acknowledged up to "a" only
    os.rename(log, tmp_path / "maillog.1")
    append(log, "c\n")
    g = follow(log, saved, "end")
    assert lines(g) == [b"b", b"c"]


def compressed_while_stopped(tmp_path: Path) -> tuple[Path, list]:
    """A maillog read up to "a" when the daemon stopped, then rotated and compressed (the rest, "b", unread) and
    a new maillog begun ("c"): the path and the checkpoint."""
    log = tmp_path / "maillog"
    append(log, "a\nb\n")
    saved = stopped_at(log, 2)
    gzip_to(log, tmp_path / "maillog.1.gz")
    os.unlink(log)
    append(log, "c\n")
    return log, saved


def test_restart_after_the_unread_file_was_compressed_reads_its_rest_from_the_archive(tmp_path):
    log, saved = compressed_while_stopped(tmp_path)
    g = follow(log, saved, "end")
    assert lines(g) == [b"b", b"c"]


def test_a_reused_inode_with_other_content_is_a_new_file(tmp_path):
    log = tmp_path / "maillog"
    append(log, "old content\n")
    f = follow(log)
    f.poll()
    st = os.stat(log)
    # same dev/ino (as after delete + create reusing the inode), other first bytes
    fake = Position(FileId(st.st_dev, st.st_ino, "0" * 40, 12), 12)
    f.close()
    g = follow(log, [fake], "end")
    assert lines(g) == [b"old content"]  # read from the start: it is not the checkpointed file


def test_an_endless_line_is_skipped_and_reported(tmp_path):
    log = tmp_path / "maillog"
    append(log, "x" * 5000)
    seen = []
    f = follow(log, max_line=1024, on_long_line=seen.append)
    assert lines(f) == []
    append(log, "y" * 100 + "\nnext\n")
    assert lines(f) == [b"next"] and seen == [0]


def test_checkpoints_survive_a_round_trip_and_a_damaged_file_starts_over(tmp_path, caplog):
    cp = Checkpoints(tmp_path / "state")
    state = State({"/var/log/mail.log": [Position(FileId(1, 2, "ab" * 20, 256), 1234)]},
                  {"/var/log/mail.log": {"lmtp": {"3132": None}, "login_ip": []}})
    cp.save(state)
    assert cp.load() == state
    cp.path.write_text("{not json")
    assert cp.load() == State()
    assert "cannot read checkpoints" in caplog.text


def test_restart_after_two_rotations_reads_the_file_born_and_rotated_while_stopped(tmp_path):
    log = tmp_path / "maillog"
    append(log, "a\nb\n")
    saved = stopped_at(log, 2)
    os.rename(log, tmp_path / "maillog.1")
    append(log, "c\n")  # born and rotated while the daemon is stopped
    gzip_to(tmp_path / "maillog.1", tmp_path / "maillog.2.gz")
    os.unlink(tmp_path / "maillog.1")
    os.rename(log, tmp_path / "maillog.1")
    append(log, "d\n")
    g = Follower(log)
    how = g.start(saved, "end")
    assert lines(g) == [b"b", b"c", b"d"]
    assert "maillog.2.gz" in how and "maillog.1 (rotated while stopped)" in how


def blocks_in_order(f: Follower, polls: int = 50) -> list[bytes]:
    """Every line handed out over several polls, in the order the parser would see them."""
    got = []
    for _ in range(polls):
        got += lines(f)
        if not f.backlog():
            break
    return got


def test_copytruncate_while_stopped_reads_the_unread_tail_from_the_plain_copy(tmp_path):
    log = tmp_path / "maillog"
    append(log, "a\nb\n")
    saved = stopped_at(log, 2)  # "b" not acknowledged
    shutil.copy(log, tmp_path / "maillog.1")  # logrotate copytruncate, plain copy (a new inode)
    os.truncate(log, 0)
    append(log, "c\n")
    g = Follower(log)
    how = g.start(saved, "end")
    assert lines(g) == [b"b", b"c"]
    assert "maillog.1 from byte 2" in how


def test_two_rename_rotations_while_stopped_read_each_file_whole_and_in_order(tmp_path, monkeypatch):
    """Small reads: the checkpointed file's rest, then maillog.1, then the live file, never interleaved,
    and no file twice although the checkpoint names two of them."""
    monkeypatch.setattr(tail, "READ_BYTES", 64)
    monkeypatch.setattr(tail, "POLL_BYTES", 150)
    log = tmp_path / "maillog"
    first = [f"first {i:03}\n" for i in range(40)]
    append(log, *first)
    f = follow(log, max_line=60)
    blocks_in_order(f)
    first_id = f.positions()[0].id
    os.rename(log, tmp_path / "maillog.1")
    append(log, "second 000\n")
    f.poll()  # the rotation is seen: the old file is drained, the new one current
    # what a checkpoint taken while the first file was drained says: 12 lines of it acknowledged, then the
    # second file, read to its first line
    saved = [Position(first_id, 12 * 10), *f.positions()]
    f.close()
    second = [f"second {i:03}\n" for i in range(1, 40)]
    append(log, *second)
    os.rename(tmp_path / "maillog.1", tmp_path / "maillog.2")
    gzip_to(tmp_path / "maillog.2", tmp_path / "maillog.2.gz")
    os.unlink(tmp_path / "maillog.2")
    os.rename(log, tmp_path / "maillog.1")
    append(log, "third\n")
    g = Follower(log, max_line=60)
    g.start(saved, "end")
    want = [x.encode().rstrip() for x in [*first[12:], *second, "third\n"]]
    assert blocks_in_order(g) == want


def test_a_rotated_file_is_read_to_its_current_end_before_the_new_one(tmp_path, monkeypatch):
    monkeypatch.setattr(tail, "READ_BYTES", 64)
    monkeypatch.setattr(tail, "POLL_BYTES", 100)
    monkeypatch.setattr(tail, "DRAIN_GRACE", 3600.0)  # the old file is not finished: only read to its end
    log = tmp_path / "maillog"
    append(log, "start\n")
    f = follow(log, max_line=60)
    lines(f)
    old = [f"old {i:03}\n" for i in range(30)]
    append(log, *old)
    os.rename(log, tmp_path / "maillog.1")
    append(log, "new\n")
    assert blocks_in_order(f) == [x.encode().rstrip() for x in [*old, "new\n"]]
    assert len(f.queue) == 1  # still drained: the writer may append until it reopens
    append(tmp_path / "maillog.1", "late\n")
    assert lines(f) == [b"late"]


def test_a_compressed_archive_is_streamed_in_bounded_blocks_and_resumed_mid_way(tmp_path, monkeypatch):
    from harvester.sources import archive

    monkeypatch.setattr(archive, "BLOCK", 4096)
    monkeypatch.setattr(tail, "ARCHIVE_CHUNK", 512)
    monkeypatch.setattr(tail, "POLL_BYTES", 8192)
    log = tmp_path / "maillog"
    text = [f"line {i:06} {'x' * 40}\n".encode() for i in range(5000)]  # 250 KB
    log.write_bytes(b"".join(text[:1]))
    saved = stopped_at(log, 0)
    log.write_bytes(b"".join(text))
    gzip_to(log, tmp_path / "maillog.1.gz")
    os.unlink(log)
    append(log, "live\n")
    g = follow(log, saved, "end")
    got: list[bytes] = []
    for _ in range(5):
        polled = g.poll()
        assert sum(len(b.data) for b in polled) <= 8192 + 2 * 4096
        got += [x for b in polled for x in b.data.splitlines(keepends=True)]
        assert g.backlog()
    mid = g.positions()
    g.close()
    assert mid[0].offset == sum(map(len, got))  # decompressed bytes, at a line boundary
    h = follow(log, mid, "end")
    got += [x + b"\n" for x in blocks_in_order(h, polls=1000)]
    assert got == [*text, b"live\n"]
    assert not h.backlog()


def test_a_line_longer_than_max_line_but_within_one_read_is_skipped_and_reported(tmp_path):
    log = tmp_path / "maillog"
    append(log, "a\n", "L" * 3000 + "\n", "b\n")
    seen = []
    f = follow(log, max_line=1024, on_long_line=seen.append)
    assert lines(f) == [b"a", b"b"]
    assert seen == [2]


def test_an_empty_file_at_stop_is_found_after_a_rotation_by_its_inode(tmp_path):
    log = tmp_path / "maillog"
    log.touch()
    f = follow(log)
    f.poll()
    saved = f.positions()
    f.close()
    assert len(saved) == 1 and saved[0].id.n == 0 and saved[0].offset == 0
    append(log, "written while stopped\n")
    os.rename(log, tmp_path / "maillog.1")
    append(log, "new\n")
    g = follow(log, saved, "end")
    assert lines(g) == [b"written while stopped", b"new"]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_fifo_or_directory_at_the_path_is_refused_without_leaks_and_the_file_is_read_again(tmp_path, caplog):
    log = tmp_path / "maillog"
    append(log, "a\n")
    f = follow(log)
    assert lines(f) == [b"a"]
    with open(log, "ab") as writer:  # rsyslog keeps writing to the file it has open
        os.rename(log, tmp_path / "maillog.keep")
        os.mkfifo(log)
        f.poll()
        fds = open_fds()
        for _ in range(20):
            f.poll()
        assert open_fds() == fds
        os.unlink(log)
        os.mkdir(log)
        writer.write(b"b\n")
        got = [x for _ in range(20) for x in lines(f)]
        assert open_fds() == fds
        os.rmdir(log)
        os.rename(tmp_path / "maillog.keep", log)
        writer.write(b"c\n")
    got += lines(f) + lines(f)
    assert got == [b"b", b"c"]  # nothing lost, nothing twice
    errors = [r for r in caplog.records if "cannot read it" in r.getMessage()]
    assert len(errors) == 1 and "FIFO" in errors[0].getMessage()
    append(log, "d\n")
    assert lines(f) == [b"d"]


def test_backlog_says_when_more_is_readable_than_one_poll_gave(tmp_path, monkeypatch):
    monkeypatch.setattr(tail, "READ_BYTES", 64)
    monkeypatch.setattr(tail, "POLL_BYTES", 128)
    log = tmp_path / "maillog"
    append(log, *[f"line {i:03}\n" for i in range(100)])
    f = follow(log, max_line=60)
    got = lines(f)
    assert f.backlog() and len(got) < 100
    got += blocks_in_order(f, polls=100)
    assert len(got) == 100 and not f.backlog()
    append(log, "partial")
    f.poll()
    assert not f.backlog()  # a partial line is not a backlog


def test_a_path_missing_for_long_is_said_once_then_once_a_minute_and_read_when_back(tmp_path, caplog,
                                                                                       monkeypatch):
    monkeypatch.setattr(tail, "MISSING_GRACE", 0.0)
    log = tmp_path / "maillog"
    append(log, "a\n")
    f = follow(log)
    assert lines(f) == [b"a"]
    os.unlink(log)  # deleted, not re-created
    for _ in range(50):
        assert lines(f) == []
    said = [r for r in caplog.records if "cannot read it" in r.getMessage()]
    assert len(said) == 1
    append(log, "b\n")
    assert lines(f) == [b"b"]
    assert "readable again" in caplog.text


def test_a_copy_read_behind_a_draining_renamed_file_stays_checkpointed_so_a_restart_reads_nothing_twice(
        tmp_path, monkeypatch):
    """The trial's NULL IP after a kill (plain family): a rename, then a copytruncate while the renamed file
    was still draining. The copy was finished at once and left the positions, the renamed file did not; the
    restart read every file between two checkpointed ones whole as "rotated while stopped", so it read the
    copy again, with the sessions of the checkpoint (an LMTP session that had ended by then): its deliveries
    got no IP and, at an equal time, overwrote the stored ones. Files leave the positions in order only."""
    monkeypatch.setattr(tail, "DRAIN_GRACE", 3600.0)  # the renamed file drains while the copy is read
    log = tmp_path / "maillog"
    append(log, "first file\n", "lmtp(31332): Connect from 10.0.0.25\n")
    f = follow(log)
    lines(f)
    os.rename(log, tmp_path / "maillog.1")  # rename + create
    append(log, "lmtp(user344)<31332>: saved mail to INBOX\n", "lmtp(31332): Disconnect from 10.0.0.25\n")
    lines(f)
    os.rename(tmp_path / "maillog.1", tmp_path / "maillog.2")  # then copytruncate
    shutil.copy(log, tmp_path / "maillog.1")
    os.truncate(log, 0)
    append(log, "third file\n")
    assert lines(f) == [b"third file"]
    saved = f.positions()  # a checkpoint now: the next read is what comes after "third file"
    f.close()
    assert [p.id.ino for p in saved] == [os.stat(p).st_ino for p in
                                         (tmp_path / "maillog.2", tmp_path / "maillog.1", log)]
    append(log, "after the kill\n")
    g = Follower(log)
    how = g.start(saved, "end")
    assert blocks_in_order(g) == [b"after the kill"]
    assert "rotated while stopped" not in how


@pytest.mark.parametrize("moment", ["copy only", "copy and a partial gz", "copy gone before it is peeked",
                                    "copy gone before it is opened", "only the gz"])
def test_copytruncate_compress_reads_the_unread_tail_once_from_whichever_form_of_the_copy_is_complete(
        tmp_path, monkeypatch, moment):
    """logrotate copytruncate + compress: copy maillog to maillog.1, truncate maillog, gzip maillog.1 into
    maillog.1.gz (written a piece at a time), remove maillog.1. The follower may look at any moment; the
    unread tail must come once, from the plain copy while it is there, else from the finished archive. The
    trial's lost first lines of such a copy: the copy listed, then gone (gzip done) when it was peeked or
    opened, and the search gave up."""
    log, copy, gz = tmp_path / "maillog", tmp_path / "maillog.1", tmp_path / "maillog.1.gz"
    head = [f"read {i:03} {'x' * 40}\n" for i in range(20)]  # past HEAD_BYTES: found by its first bytes
    tail_lines = [f"unread {i:03}\n" for i in range(50)]
    append(log, *head)
    f = follow(log)
    assert len(lines(f)) == 20
    append(log, *tail_lines)  # written, not read yet, when logrotate runs
    shutil.copy(log, copy)
    os.truncate(log, 0)
    append(log, "new\n")
    whole = gzip.compress(copy.read_bytes())

    def gzip_done() -> None:
        gz.write_bytes(whole)
        os.unlink(copy)

    if moment == "copy and a partial gz":
        gz.write_bytes(whole[:len(whole) // 2])
    elif moment == "only the gz":
        gzip_done()
    elif moment == "copy gone before it is peeked":
        peek = tail._peek

        def peek_late(p):
            if p == copy and copy.exists():
                gzip_done()
            return peek(p)
        monkeypatch.setattr(tail, "_peek", peek_late)
    elif moment == "copy gone before it is opened":
        peek = tail._peek

        def peeked_then_gone(p):
            sib = peek(p)
            if p == copy and copy.exists():
                gzip_done()
            return sib
        monkeypatch.setattr(tail, "_peek", peeked_then_gone)
    got = blocks_in_order(f)
    if copy.exists():
        gzip_done()  # logrotate finishes: the archive must not be read again
    got += blocks_in_order(f)
    assert got == [x.encode().rstrip() for x in [*tail_lines, "new\n"]]
    assert not f.queue


def test_an_archive_queued_at_a_restart_is_read_from_the_file_recognised_even_if_a_rotation_renames_it(tmp_path):
    """An archive found by its first bytes is held open from then on: a rotation during the catch-up shifts
    maillog.1.gz to maillog.2.gz and puts another file at its name, which must not be read in its place."""
    log, saved = compressed_while_stopped(tmp_path)
    g = Follower(log)
    assert "maillog.1.gz from byte 2" in g.start(saved, "end")
    os.rename(tmp_path / "maillog.1.gz", tmp_path / "maillog.2.gz")  # logrotate again, before the first poll
    os.rename(log, tmp_path / "maillog.1")
    gzip_to(tmp_path / "maillog.1", tmp_path / "maillog.1.gz")
    os.unlink(tmp_path / "maillog.1")
    append(log, "d\n")
    assert blocks_in_order(g) == [b"b", b"c", b"d"]
