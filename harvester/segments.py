"""Split a backfill across processes: each parses one run of consecutive lines, the parent stitches.

Parsing is CPU-bound, so one process is one core. The files, in backfill
order, are cut into one job per worker of about equal work: a job is a run of
consecutive lines, whole files and at most a part of a plain file at each
end (a compressed file is never cut: a worker cannot start inside a gzip
stream). One Parser reads a job's files in order, so LMTP sessions and POP3
logins carry across the rotations inside it as in a sequential pass, and the
parent has as few tables to merge as there are workers. Each worker ships its
coalesced rows as one bytes object (Table.dumps), which the parent merges at
memcpy speed, plus what it could not know: deliveries whose LMTP Connect line
was in an earlier job, LMTP sessions that ended here but began before, and
the sessions still open at its end. The parent applies jobs in order, so the
result is the same as one sequential pass (one exception: two events of the
same account and service in the same microsecond on both sides of a cut,
where the sequential pass would pick by line order and this one picks the
non-orphan).
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
from harvester.parse import PID_STATE_MAX, Parser, Stats, drop_oldest
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
MIN_SEGMENT = 16 << 20  # bytes of work; less input than this is one job
COMPRESSED_WEIGHT = 5  # a compressed byte costs about this many plain bytes' work (inflate, then parse)


@dataclass(frozen=True)
class Segment:
    """The lines of one file that start at byte offsets in [lo, hi) (hi None: to its end)."""

    path: str
    lo: int
    hi: int | None
    prefix: str
    style: str
    mtime: float

    @property
    def label(self) -> str:
        """The file's name in log lines, with the byte range when it is a part."""
        if self.lo == 0 and self.hi is None:
            return self.path
        return f"{self.path} (bytes {self.lo}-{'' if self.hi is None else self.hi})"


@dataclass(frozen=True)
class Source:
    """A file to plan: where it is, how big, whether compressed, how its lines begin."""

    path: str
    size: int
    compressed: bool
    prefix: str
    style: str
    mtime: float


@dataclass
class Result:
    """What one worker found in one job."""

    job: list[Segment]
    logins: bytes  # Table.dumps(): the job's rows, to be applied after those of earlier jobs
    others: bytes
    orphans: list
    ended: dict
    open_sessions: dict
    login_ip: dict
    stats: Stats
    bad_users: list[bytes]
    errors: list[tuple[str, str, bool]]  # (path, what went wrong, whether the lines before it were used)


def source(path: Path, prefix: str, style: str, mtime: float) -> Source:
    with open(path, "rb") as f:
        compressed = sniff(f.read(8)).new is not None
    return Source(str(path), path.stat().st_size, compressed, prefix, style, mtime)


def plan(files: list[Source], workers: int) -> list[list[Segment]]:
    """Cut `files` (in backfill order) into up to `workers` jobs of about equal work, each at least
    MIN_SEGMENT: consecutive runs of lines, plain files cut at the job boundaries, compressed ones whole."""
    weight = [f.size * (COMPRESSED_WEIGHT if f.compressed else 1) for f in files]
    total = sum(weight)
    n = max(1, min(workers, total // MIN_SEGMENT))
    cuts = [total * k / n for k in range(1, n)]  # job k ends at cumulative work cuts[k]
    jobs: list[list[Segment]] = [[] for _ in range(n)]
    job, at = 0, 0
    for f, w in zip(files, weight, strict=True):
        while job < n - 1 and cuts[job] <= at:
            job += 1
        lo = 0
        if not f.compressed:
            while job < n - 1 and cuts[job] < at + w:
                hi = int(cuts[job] - at)
                if hi > lo:
                    jobs[job].append(Segment(f.path, lo, hi, f.prefix, f.style, f.mtime))
                    lo = hi
                job += 1
        jobs[job].append(Segment(f.path, lo, None, f.prefix, f.style, f.mtime))
        at += w
    return [j for j in jobs if j]


def _bounded_pieces(seg: Segment) -> Iterator[tuple[int, bytes]]:
    """(decompressed offset, bytes) of exactly the lines this segment owns: those that start at
    byte offsets in [lo, hi) of a plain file; all of a compressed file."""
    path = Path(seg.path)
    with open(path, "rb") as f:
        plain = sniff(f.read(8)).new is None
    if plain:
        stream = ((at, piece, seg.lo, seg.hi) for at, piece in _plain_from(path, max(seg.lo - 1, 0)))
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


def parse_job(job: list[Segment]) -> Result:
    """Worker entry point: parse one job's segments in order with one Parser; return what the parent
    needs to stitch."""
    s = _STATE
    parser = Parser(s["pack"], node=s["node"], webmail=s["webmail"])
    parser.orphans = []
    sink = Coalescer()
    errors: list[tuple[str, str, bool]] = []
    for seg in job:
        parser.begin(seg.label, seg.prefix, Clock(seg.style, s["zone"], year=s["year"], reference=seg.mtime))
        try:
            blocks = read_ahead(lambda report, seg=seg: _segment_blocks(seg, s["max_line"], report),
                                on_long_line=lambda at: parser.problem("long_line", at, b"(not shown)"))
            for offset, block, _ in blocks:
                parser.feed(block, sink, offset)
        except ArchiveError as e:
            errors.append((seg.path, str(e), e.partial))
        except OSError as e:
            errors.append((seg.path, f"read error: {e.strerror or e}", True))
        parser.end()
    return Result(job, sink.logins.dumps(), sink.others.dumps(), parser.orphans, parser.ended,
                  parser._lmtp.open(), parser._login_ip, parser.stats, sink.bad_users, errors)


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
