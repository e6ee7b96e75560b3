"""Log files as blocks of complete lines, for the parser: a plain file read in place (plain_texts), a
compressed one inflated by a helper process (readahead.py) so that inflating the next megabytes overlaps
with parsing the current ones on another core. Lines longer than max_line are cut out and reported."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from harvester.sources.base import Lines, Text
from harvester.sources.compression import ArchiveError, ReadProgress, compressed, raw_chunks
from harvester.sources.readahead import Make, read_ahead

log = logging.getLogger(__name__)
BLOCK = 4 << 20  # decompressed bytes handed to the parser at a time (roughly)


def line_blocks(chunks: Iterable[bytes], *, max_line: int, on_long_line: Callable[[int], None],
                block: int = BLOCK) -> Iterator[tuple[int, bytes]]:
    """Regroup raw pieces into (offset, block of complete lines); the last line may lack "\\n".

    A line longer than `max_line` is dropped (from its start to its newline)
    and reported through `on_long_line(offset)`, so one endless line cannot
    eat the memory.
    """
    pending: list[bytes] = []
    size = 0
    start = 0  # offset of pending[0] in the decompressed stream
    skipping = False
    pos = 0  # offset of the next raw byte
    pieces = iter(chunks)
    while True:
        try:
            piece = next(pieces)
        except StopIteration:
            break
        except ArchiveError:
            # Damage further on: hand over the complete lines read before it, then report.
            data = b"".join(pending)
            cut = data.rfind(b"\n") + 1
            if cut:
                yield start, drop_long_lines(data[:cut], start, max_line, on_long_line)
            raise
        piece_at = pos
        pos += len(piece)
        if skipping:
            nl = piece.find(b"\n")
            if nl < 0:
                continue
            skipping = False
            piece = piece[nl + 1:]
            piece_at += nl + 1
            if not piece:
                start = pos
                continue
        if not pending:
            start = piece_at
        pending.append(piece)
        size += len(piece)
        if size < block:
            if size > max_line and b"\n" not in piece and _no_newline(pending):
                on_long_line(start)
                pending, size, skipping = [], 0, True
            continue
        data = b"".join(pending)
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if size > max_line:
                on_long_line(start)
                pending, size, skipping = [], 0, True
            else:
                pending = [data]
            continue
        yield start, drop_long_lines(data[:cut], start, max_line, on_long_line)
        rest = data[cut:]
        start += cut
        pending = [rest] if rest else []
        size = len(rest)
    if pending:
        data = b"".join(pending)
        if data:
            yield start, drop_long_lines(data, start, max_line, on_long_line)


def drop_long_lines(block: bytes, start: int, max_line: int, report: Callable[[int], None]) -> bytes:
    """Cut out lines longer than `max_line` from a block of complete lines (found at file offset `start`),
    reporting each one's offset: the one long-line policy of backfill and the live follower."""
    kept = _kept_lines(block, 0, len(block), start, max_line, report)
    return block if kept is None else b"".join(kept)


def _kept_lines(data: bytes, begin: int, end: int, offset: int, max_line: int,
                report: Callable[[int], None]) -> list[bytes] | None:
    """The pieces of data[begin:end] (lines; data[begin] is at file offset `offset`) left when its
    lines longer than `max_line` are cut out and reported; None when there are none (the usual case).

    Jumps from newline to the last newline within the next max_line bytes, so a
    block costs about its length / max_line memrchr calls.
    """
    i = kept_from = begin
    keep: list[bytes] = []
    while end - i > max_line:
        j = data.rfind(b"\n", i, i + max_line + 1)
        if j >= 0:
            i = j + 1
            continue
        report(offset + i - begin)  # a long line runs from i to its newline (or to the end, unterminated)
        keep.append(data[kept_from:i])
        nl = data.find(b"\n", i, end)
        i = kept_from = end if nl < 0 else nl + 1
    if not keep:
        return None
    keep.append(data[kept_from:end])
    return keep


def _no_newline(parts: list[bytes]) -> bool:
    return all(b"\n" not in p for p in parts)


def texts(path: Path, lo: int = 0, hi: int | None = None, *, max_line: int,
          on_long_line: Callable[[int], None]) -> Iterator[Text]:
    """The lines of `path` that start at byte offsets in [lo, hi), for the parser.

    A plain file is read in place (plain_texts). A compressed one is inflated by
    a helper process (read_ahead) and is always read whole: nobody can start in
    the middle of a gzip stream.
    """
    if not compressed(path):
        return plain_texts(path, lo, hi, max_line=max_line, on_long_line=on_long_line)
    if lo or hi is not None:
        raise ValueError(f"{path}: a compressed file is read whole, not bytes {lo}-{hi}")
    return read_ahead(inflated(path, max_line), on_long_line)


def inflated(path: Path, max_line: int) -> Make:
    """What a read-ahead helper runs for one compressed file."""
    return lambda report: file_blocks(path, max_line=max_line, on_long_line=report)


def plain_texts(path: Path, lo: int = 0, hi: int | None = None, *, max_line: int,
                on_long_line: Callable[[int], None], block: int | None = None) -> Iterator[Text]:
    """The lines of a plain file that start at byte offsets in [lo, hi), read with one copy.

    Each read starts at the newline that ends the previous text, so it arrives
    with the b"\n" the parser wants in front, and `end` marks its last complete
    line: no joining, slicing or prefixing copies (they were a fifth of a
    backfill's time). Lines longer than `max_line` are reported and cut out.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ArchiveError(f"cannot open: {e.strerror or e}", partial=False) from None
    try:
        yield from _plain(fd, lo, hi, max_line, on_long_line, block or BLOCK)
    except OSError as e:
        raise ArchiveError(f"read error: {e.strerror or e}", partial=True) from None
    finally:
        os.close(fd)


def _plain(fd: int, lo: int, hi: int | None, max_line: int, report: Callable[[int], None],
           block: int) -> Iterator[Text]:
    # `at`: the file offset of the b"\n" before the next line; -1 is the file's start, read as if
    # a newline were there. The last line to take is the one that the first newline at or after
    # `stop` ends.
    at = -1 if lo <= 0 else _newline_from(fd, lo - 1)
    stop = None if hi is None else hi - 1
    size = block
    while at is not None and (stop is None or at < stop):
        data = b"\n" + os.pread(fd, size - 1, 0) if at < 0 else os.pread(fd, size, at)
        if len(data) <= 1:
            return
        eof = len(data) < size
        last = False
        nl = -1
        if stop is not None and stop - at < len(data):
            nl = data.find(b"\n", stop - at)
            last = nl >= 0
        if not last:
            nl = data.rfind(b"\n", 1)
        if eof and not last:
            end, last = len(data), True  # the file's last line, perhaps without its newline
        elif nl > 0:
            end = nl + 1
        elif len(data) - 1 > max_line:
            report(at + 1)
            at = _newline_from(fd, at + len(data))
            size = block
            continue
        else:
            size *= 2  # a line longer than a block but allowed: read more at once
            continue
        text, cut = _cut_long_lines(data, end, at + 1, max_line, report)
        yield Text(at + 1, text, cut, at + end)
        if last:
            return
        at += end - 1
        size = block


def _newline_from(fd: int, pos: int) -> int | None:
    """The file offset of the first newline at or after `pos`, or None."""
    while True:
        data = os.pread(fd, 64 << 10, pos)
        if not data:
            return None
        i = data.find(b"\n")
        if i >= 0:
            return pos + i
        pos += len(data)


def _cut_long_lines(data: bytes, end: int, offset: int, max_line: int,
                    report: Callable[[int], None]) -> tuple[bytes, int]:
    """(text, end) of data[1:end] without its lines longer than `max_line`: usually data as it is."""
    kept = _kept_lines(data, 1, end, offset, max_line, report)
    if kept is None:
        return data, end
    out = b"\n" + b"".join(kept)
    return out, len(out)


def file_blocks(path: Path, *, max_line: int, on_long_line: Callable[[int], None]) -> Iterator[Lines]:
    """A file as blocks of complete lines, each with how far the reader was (for progress bars)."""
    position = ReadProgress()
    for offset, block in line_blocks(raw_chunks(path, position=position), max_line=max_line,
                                     on_long_line=on_long_line):
        yield offset, block, position.read
