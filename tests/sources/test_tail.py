"""Following one path through rotations: every line once, none lost, partial lines wait."""

from __future__ import annotations

import gzip
import os
import shutil

import pytest

from harvester.checkpoint import Checkpoints, FileId, Position, State
from harvester.sources import tail
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


def test_restart_after_the_unread_file_was_compressed_reads_its_rest_from_the_archive(tmp_path):
    log = tmp_path / "maillog"
    append(log, "a\nb\n")
    saved = stopped_at(log, 2)
    gzip_to(log, tmp_path / "maillog.1.gz")
    os.unlink(log)
    append(log, "c\n")
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
