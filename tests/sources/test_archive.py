"""Reading plain and compressed files: same lines whatever the compression, damage reported."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import random
from pathlib import Path

import pytest
import zstandard

from harvester.sources.archive import line_blocks, plain_texts
from harvester.sources.compression import ArchiveError, raw_chunks
from harvester.sources.readahead import read_ahead
from harvester.sources.rotation import expand, rotation_key

BODY = b"".join(b"line %d " % i + b"x" * (i % 50) + b"\n" for i in range(20000))
COMPRESS = {"": bytes, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}


def blocks(path: Path, max_line: int = 1 << 20, block: int = 64 << 10) -> tuple[bytes, list[int]]:
    long: list[int] = []
    out = b"".join(b for _, b in line_blocks(raw_chunks(path, 4096), max_line=max_line, on_long_line=long.append,
                                             block=block))
    return out, long


@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_every_compression_gives_the_same_lines(tmp_path, suffix):
    p = tmp_path / f"maillog.1{suffix}"
    p.write_bytes(COMPRESS[suffix](BODY))
    assert blocks(p)[0] == BODY


def test_blocks_end_on_line_boundaries_and_keep_a_last_line_without_newline(tmp_path):
    p = tmp_path / "maillog"
    p.write_bytes(BODY + b"tail without newline")
    parts = list(line_blocks(raw_chunks(p, 1000), max_line=1 << 20, on_long_line=print, block=10_000))
    assert all(b.endswith(b"\n") for _, b in parts[:-1])
    assert parts[-1][1].endswith(b"tail without newline")
    assert all(off == sum(len(b) for _, b in parts[:i]) for i, (off, _) in enumerate(parts))


def test_concatenated_gzip_members_are_read_through(tmp_path):
    p = tmp_path / "maillog.gz"
    p.write_bytes(gzip.compress(BODY[:1000]) + gzip.compress(BODY[1000:]))
    assert blocks(p)[0] == BODY


def test_truncated_gzip_yields_the_lines_before_the_damage_then_raises(tmp_path):
    data = gzip.compress(BODY)
    p = tmp_path / "maillog.gz"
    p.write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(ArchiveError) as e:
        for _, b in line_blocks(raw_chunks(p, 4096), max_line=1 << 20, on_long_line=print, block=64 << 10):
            got.append(b)
    assert e.value.partial and "truncated" in str(e.value)
    text = b"".join(got)
    assert text and BODY.startswith(text) and text.endswith(b"\n")


def test_missing_file_is_an_archive_error_with_nothing_read(tmp_path):
    with pytest.raises(ArchiveError) as e:
        list(raw_chunks(tmp_path / "nope"))
    assert not e.value.partial


def test_line_longer_than_max_line_is_dropped_and_reported(tmp_path):
    p = tmp_path / "maillog"
    p.write_bytes(b"a\n" + b"x" * 300_000 + b"\nb\n" + b"y" * 50_000 + b"\nc\n")
    out, long = blocks(p, max_line=100_000, block=64 << 10)
    assert out == b"a\nb\n" + b"y" * 50_000 + b"\nc\n"
    assert long == [2]


def test_rotated_set_is_ordered_oldest_first():
    names = ["maillog", "maillog.1", "maillog.2.gz", "maillog-20250108.xz", "maillog-20250101.bz2"]
    assert [p.name for p in sorted(map(Path, names), key=rotation_key)] == [
        "maillog-20250101.bz2", "maillog-20250108.xz", "maillog.2.gz", "maillog.1", "maillog"]


def test_expand_reports_missing_files_and_directories_without_raising(tmp_path):
    (tmp_path / "maillog").write_bytes(b"x\n")
    files, problems = expand([str(tmp_path / "mail*"), str(tmp_path / "nope"), str(tmp_path)])
    assert files == [tmp_path / "maillog"]
    assert {why for _, why in problems} == {"no such file", "is a directory (give files or a glob such as "
                                                               "DIR/maillog*)"}


@pytest.mark.parametrize("slot", [8 << 20, 1 << 20], ids=["through-the-ring", "too-big-for-a-slot"])
def test_read_ahead_hands_blocks_long_lines_and_damage_to_the_parser_in_order(tmp_path, monkeypatch, slot):
    """The helper process's blocks, long-line reports and the error after them arrive as produced, each
    block with the parser's newline in front, whether it came through the shared ring or the pipe."""
    from harvester.sources import readahead

    monkeypatch.setattr(readahead, "SLOT", slot)

    def produce(report):
        yield 0, b"a\n", 10
        report(2)
        yield 2, b"b" * (3 << 20) + b"\n", 20
        raise ArchiveError("gzip data ends early", partial=True)

    longs: list[int] = []
    it = read_ahead(produce, on_long_line=longs.append)
    assert next(it) == (0, b"\na\n", 3, 10)
    assert next(it) == (2, b"\n" + b"b" * (3 << 20) + b"\n", (3 << 20) + 2, 20) and longs == [2]
    with pytest.raises(ArchiveError, match="ends early") as e:
        next(it)
    assert e.value.partial


def test_read_ahead_reuses_its_ring_slots_without_overwriting_a_block_not_yet_taken():
    blocks = [bytes([65 + i % 26]) * (i * 40_000 + 1) + b"\n" for i in range(40)]

    def produce(report):
        for i, b in enumerate(blocks):
            yield i, b, i

    got = [(t.offset, t.data, t.end) for t in read_ahead(produce, on_long_line=print)]
    assert got == [(i, b"\n" + b, len(b) + 1) for i, b in enumerate(blocks)]


def test_read_ahead_stopped_early_leaves_no_helper_behind():
    def produce(report):
        for i in range(1000):
            yield i, b"x" * (1 << 20), 0

    it = read_ahead(produce, on_long_line=print)
    next(it)
    it.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


@pytest.mark.parametrize("suffix", [".bz2", ".xz", ".zst"])
def test_concatenated_members_of_every_compression_are_read_through(tmp_path, suffix):
    p = tmp_path / f"maillog{suffix}"
    p.write_bytes(COMPRESS[suffix](BODY[:5000]) + COMPRESS[suffix](BODY[5000:]))
    assert blocks(p)[0] == BODY


def test_nul_padding_and_trailing_garbage_after_the_last_member_are_not_damage(tmp_path, caplog):
    p = tmp_path / "maillog.gz"
    p.write_bytes(gzip.compress(BODY) + b"\x00" * 512)
    assert blocks(p)[0] == BODY
    p.write_bytes(gzip.compress(BODY) + b"not a gzip member at all")
    assert blocks(p)[0] == BODY
    assert "trailing garbage" in caplog.text


def guarded(calls: list[int]):
    """on_long_line that fails the test instead of looping forever."""
    def report(offset: int) -> None:
        calls.append(offset)
        assert len(calls) < 50, "on_long_line called again and again for one line"
    return report


def test_a_final_unterminated_long_line_is_dropped_once():
    calls: list[int] = []
    out = list(line_blocks(iter([b"a\n" + b"x" * 2000]), max_line=1024, on_long_line=guarded(calls)))
    assert b"".join(b for _, b in out) == b"a\n" and calls == [2]


def test_lines_before_damage_still_drop_an_over_long_line():
    def chunks():
        yield b"a\n" + b"x" * 2000 + b"\nb\n"
        raise ArchiveError("gzip data ends early (truncated archive?)", partial=True)

    calls: list[int] = []
    got: list[bytes] = []
    with pytest.raises(ArchiveError):
        for _, block in line_blocks(chunks(), max_line=1024, on_long_line=guarded(calls)):
            got.append(block)
    assert b"".join(got) == b"a\nb\n" and calls == [2]


def test_a_plain_file_read_in_place_gives_the_lines_and_long_line_reports_of_the_general_reader(tmp_path):
    """plain_texts (one copy, reads that begin at the previous newline) against line_blocks, over
    random files with long lines anywhere, block sizes smaller and larger than the lines, and
    with and without a last newline."""
    rng = random.Random(11)
    p = tmp_path / "maillog"
    for trial in range(60):
        max_line = rng.choice([16, 100, 1024])
        lines = [b"y" * rng.choice([0, 3, max_line - 1, max_line, max_line + 1, 3 * max_line, 5000])
                 for _ in range(rng.randint(0, 40))]
        data = b"\n".join(lines) + (b"\n" if trial % 4 else b"")
        p.write_bytes(data)
        want_long: list[int] = []
        want = b"".join(b for _, b in line_blocks(raw_chunks(p, 4096), max_line=max_line,
                                                  on_long_line=want_long.append))
        for block in (8, 64, 4096):
            long: list[int] = []
            texts = list(plain_texts(p, max_line=max_line, on_long_line=guarded(long), block=block))
            assert all(t.data[:1] == b"\n" for t in texts)
            assert b"".join(t.data[1:t.end] for t in texts) == want, (trial, block)
            assert long == want_long, (trial, block)


def test_a_plain_file_that_cannot_be_opened_is_damage_with_nothing_used(tmp_path):
    with pytest.raises(ArchiveError, match="cannot open") as e:
        list(plain_texts(tmp_path / "gone", max_line=1024, on_long_line=print))
    assert not e.value.partial


@pytest.mark.parametrize("slot", [1 << 20, 64])
def test_one_read_ahead_for_several_files_skips_a_file_nobody_reads_and_hands_on_the_next(tmp_path, monkeypatch,
                                                                                          slot):
    """A backfill's one helper reads every compressed file in turn; a file the backfill skips (deleted by
    logrotate after it was listed, unreadable) must not hold the helper up nor leak into the next file: its
    blocks (through the ring or, larger than a slot, the pipe), long-line reports and errors are dropped."""
    from harvester.sources import readahead

    monkeypatch.setattr(readahead, "SLOT", slot)

    def make(tag: bytes, blocks: int, fail: bool = False):
        def produce(report):
            for i in range(blocks):
                report(i)
                yield i * 100, tag * 150, i
            if fail:
                raise ArchiveError(f"{tag.decode()} ends early", partial=True)
        return produce

    helper = readahead.ReadAhead([make(b"a", 2), make(b"b", 6, fail=True), make(b"c", 2)])
    longs: list[int] = []
    try:
        first = [t.data[1:t.end] for t in helper.texts(0, longs.append)]
        last = [t.data[1:t.end] for t in helper.texts(2, longs.append)]  # file 1 skipped
    finally:
        helper.close()
    assert first == [b"a" * 150] * 2 and last == [b"c" * 150] * 2
    assert longs == [0, 1, 0, 1]  # a's and c's, none of b's
