"""Split a backfill across processes: each parses one segment of a file, the parent stitches.

Parsing is CPU-bound, so one process is one core. A plain file is cut into
segments by byte range; a compressed file is one segment (a worker cannot
start inside a gzip stream), so several of them go to several workers. On
worker ships its coalesced rows as one bytes object (Table.dumps), which the
parent merges at memcpy speed. Each worker parses its
segment with a fresh Parser and returns the coalesced rows, plus what it could
not know: deliveries whose LMTP Connect line was in an earlier segment, LMTP
sessions that ended here but began before, and the sessions still open at its
end. The parent applies segments in file order, so the result is the same as
one sequential pass (one exception: two events of the same account and
service in the same microsecond on both sides of a cut, where the sequential
pass would pick by line order and this one picks the non-orphan).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harvester.coalesce import Coalescer
from harvester.events import DELIVERY
from harvester.parse import PID_STATE_MAX, Parser, Problem, Stats, drop_oldest
from harvester.sources.archive import (
    CHUNK,
    ArchiveError,
    line_blocks,
    raw_chunks,
    read_ahead,
    sniff,
)
from harvester.timeparse import Clock

log = logging.getLogger(__name__)
MIN_SEGMENT = 16 << 20  # compressed or plain bytes; smaller files are one segment


@dataclass(frozen=True)
class Segment:
    path: str
    index: int  # k of `count`
    count: int
    prefix: str
    style: str
    mtime: float


@dataclass
class Result:
    """What one worker found in one segment."""

    segment: Segment
    logins: bytes  # Table.dumps(): a segment's rows, to be applied after those of earlier segments
    others: bytes
    orphans: list
    ended: dict
    open_sessions: dict
    login_ip: dict
    stats: Stats
    problems: dict[str, Problem]
    bad_users: list[bytes]
    error: str | None = None
    partial: bool = True


def plan(path: Path, prefix: str, style: str, mtime: float, workers: int) -> list[Segment]:
    """Cut a plain file into up to `workers` segments of at least MIN_SEGMENT bytes.

    A compressed file is one segment: a worker cannot start in the middle of a
    gzip stream, so each would inflate everything before its part again.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        compressed = sniff(f.read(8)).new is not None
    count = 1 if compressed else max(1, min(workers, size // MIN_SEGMENT))
    return [Segment(str(path), k, count, prefix, style, mtime) for k in range(count)]


def _bounded_pieces(seg: Segment) -> Iterator[tuple[int, bytes]]:
    """(decompressed offset, bytes) of exactly the lines this segment owns.

    A segment of a plain file owns the lines that start at byte offsets in
    [k/n, (k+1)/n) of the file; a compressed file is one segment.
    """
    path = Path(seg.path)
    size = path.stat().st_size
    lo_c, hi_c = seg.index * size // seg.count, (seg.index + 1) * size // seg.count
    last = seg.index + 1 == seg.count
    with open(path, "rb") as f:
        plain = sniff(f.read(8)).new is None
    if plain:
        hi = None if last else hi_c
        start = max(lo_c - 1, 0)
        stream = ((at, piece, lo_c, hi) for at, piece in _plain_from(path, start))
    else:
        stream = _compressed(path)
    return _owned(stream)


def _compressed(path: Path) -> Iterator[tuple[int, bytes, int | None, int | None]]:
    """A compressed file is always one whole segment (see plan)."""
    at = 0
    for piece in raw_chunks(path, CHUNK):
        yield at, piece, 0, None
        at += len(piece)


def _owned(stream: Iterator[tuple[int, bytes, int | None, int | None]]) -> Iterator[tuple[int, bytes]]:
    state = "seek"  # seek -> (skip to newline) -> in -> done
    last = b"\n"  # the byte before the current piece
    lo_at = 0
    for at, piece, lo, hi in stream:
        i = 0
        if state == "seek":
            if lo is None or at + len(piece) <= lo:
                last = piece[-1:] or last
                continue
            lo_at = lo
            i = lo - at
            before = piece[i - 1:i] if i > 0 else last
            state = "in" if before == b"\n" else "skip"
        if state == "skip":
            nl = piece.find(b"\n", i)
            if nl < 0:
                last = piece[-1:] or last
                continue
            i, state = nl + 1, "in"
        if hi is not None:
            if hi <= lo_at or at + i >= hi and (i > 0 or last == b"\n"):
                return  # nothing (more) starts before hi
            j = hi - 1 - at
            if j < i:
                if last == b"\n":
                    return
                j = i
            nl = piece.find(b"\n", j)
            if nl >= 0:
                yield at + i, piece[i:nl + 1]
                return
        if i < len(piece):
            yield at + i, piece[i:]
        last = piece[-1:] or last


def _plain_from(path: Path, start: int) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        f.seek(start)
        at = start
        while True:
            data = f.read(CHUNK)
            if not data:
                return
            yield at, data
            at += len(data)


def _segment_blocks(seg: Segment, max_line: int, on_long_line) -> Iterator[tuple[int, bytes, int]]:
    """The segment's lines as (offset in the decompressed file, block, 0)."""
    first: list[int] = []

    def pieces() -> Iterator[bytes]:
        for at, piece in _bounded_pieces(seg):
            if not first:
                first.append(at)
            yield piece

    for offset, block in line_blocks(pieces(), max_line=max_line,
                                     on_long_line=lambda at: on_long_line(at + first[0])):
        yield offset + first[0], block, 0


# --- the worker --------------------------------------------------------------------------

_STATE: dict = {}


def _init(pack, node, webmail, zone, year, max_line) -> None:
    _STATE.update(pack=pack, node=node, webmail=webmail, zone=zone, year=year, max_line=max_line)


def parse_segment(seg: Segment) -> Result:
    """Worker entry point: parse one segment, return what the parent needs to stitch."""
    s = _STATE
    parser = Parser(s["pack"], node=s["node"], webmail=s["webmail"])
    parser.orphans = []
    sink = Coalescer()
    parser.begin(f"{seg.path} (part {seg.index + 1}/{seg.count})" if seg.count > 1 else seg.path,
                 seg.prefix, Clock(seg.style, s["zone"], year=s["year"], reference=seg.mtime))
    error, partial = None, True
    try:
        blocks = read_ahead(lambda report: _segment_blocks(seg, s["max_line"], report),
                            on_long_line=lambda at: parser.problem("long_line", at, b"(not shown)"))
        for offset, block, _ in blocks:
            parser.feed(block, sink, offset)
    except ArchiveError as e:
        error, partial = str(e), e.partial
    except OSError as e:
        error, partial = f"read error: {e.strerror or e}", True
    problems = parser.end()
    return Result(seg, sink.logins.dumps(), sink.others.dumps(), parser.orphans, parser.ended,
                  parser._lmtp.open(), parser._login_ip,
                  parser.stats, problems, sink.bad_users, error, partial)


# --- the parent --------------------------------------------------------------------------

@dataclass
class Stitcher:
    """Carries LMTP and POP3 session state from one segment (and file) to the next."""

    open_sessions: dict = field(default_factory=dict)
    login_ip: dict = field(default_factory=dict)

    def apply(self, r: Result, sink: Coalescer) -> None:
        logins, others = sink.logins, sink.others
        for kind, service, user, t, digits, node, pid, detail in r.orphans:
            if kind == DELIVERY:
                session = self.open_sessions.get(pid)
                ip = session[0] if session else None
                if pid in r.ended:
                    ip = r.ended[pid] if session else None
                elif session is not None:
                    session[1].append((user, t, digits, node))
                logins.put(user, service, t, digits, ip, node, service)
            else:
                ip = self.login_ip.get((service, pid))
                others.put(user, kind, t, digits, ip, node, service, detail)
        for pid, ip in r.ended.items():
            session = self.open_sessions.pop(pid, None)
            if session and session[0] != ip:
                for user, t, digits, node in session[1]:
                    logins.put(user, "lmtp", t, digits, ip, node, "lmtp")
        logins.merge(r.logins)
        others.merge(r.others)
        sink.bad_users.extend(r.bad_users)
        self.open_sessions.update(r.open_sessions)
        self.login_ip.update(r.login_ip)
        for d in (self.open_sessions, self.login_ip):
            if len(d) > PID_STATE_MAX:
                drop_oldest(d)


def pool(workers: int, pack, node, webmail, zone, year, max_line):
    """A process pool whose workers hold the pack (forked, so nothing is pickled per task)."""
    ctx = multiprocessing.get_context("fork")
    return ctx.Pool(workers, initializer=_init, initargs=(pack, node, webmail, zone, year, max_line))


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
