"""Split a backfill across processes: each parses one run of consecutive lines, the parent stitches.

Parsing is CPU-bound, so one process is one core. The files, in backfill
order, are cut into one job per worker of about equal work: a job is a run of
consecutive lines, whole files and at most a part of a plain file at each
end (a compressed file is never cut: a worker cannot start inside a gzip
stream). One Parser reads a job's files in order, so LMTP sessions and POP3
logins carry across the rotations inside it as in a sequential pass, and the
parent has as few tables to merge as there are workers. Each worker ships its
coalesced rows as one bytes object in key order (Table.dumps), plus what it
could not know: deliveries whose LMTP Connect line was in an earlier job,
LMTP sessions that ended here but began before, and the sessions still open
at its end. The parent keeps the rows as runs, which the SQLite writer merges
while it writes (no table of every key in the parent; other stores merge them
first), and applies the rest in job order, so the result is the same as one
sequential pass (one exception: two events of the same account and service
in the same microsecond on both sides of a cut, where the sequential pass
would pick by line order and this one picks the non-orphan).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harvester.coalesce import Coalescer
from harvester.events import DELIVERY, SESSION_USER
from harvester.parse import MAX_USER_BYTES, Parser, Stats, detail_text, names_for
from harvester.sessions import Sessions
from harvester.sources.archive import texts
from harvester.sources.compression import ArchiveError, sniff
from harvester.timeparse import FUTURE_TOLERANCE_S, Clock

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
class LogFile:
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
    rows_file: str  # the job's rows, to be applied after those of earlier jobs: Table.dumps() of
    logins_size: int  # its logins (this many bytes), then of its other events
    entries: int  # how many rows the two hold
    orphans: list
    ended: dict
    open_sessions: dict
    login_ip: dict
    cut: dict  # logins held for completion at the job's end (sessions.Held by mail-process pid)
    dialects: dict  # node -> the Dovecot version its login lines showed
    stats: Stats
    errors: list[tuple[str, str, bool]]  # (path, what went wrong, whether the lines before it were used)

    def take_rows(self) -> tuple[bytes, bytes]:
        """The job's (logins, others) dumps, read once; the file is removed."""
        with open(self.rows_file, "rb") as f:
            logins, others = f.read(self.logins_size), f.read()
        os.unlink(self.rows_file)
        return logins, others


def source(path: Path, prefix: str, style: str, mtime: float) -> LogFile:
    with open(path, "rb") as f:
        compressed = sniff(f.read(8)).new is not None
    return LogFile(str(path), path.stat().st_size, compressed, prefix, style, mtime)


def plan(files: list[LogFile], workers: int) -> list[list[Segment]]:
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


# --- the worker --------------------------------------------------------------------------

_STATE: dict = {}


def _init(pack, node, webmail, zone, year, max_line, spill, max_user, tolerance, join_logins) -> None:
    _STATE.update(pack=pack, node=node, webmail=webmail, zone=zone, year=year, max_line=max_line, spill=spill,
                  max_user=max_user, tolerance=tolerance, join_logins=join_logins)


def parse_job(job: list[Segment]) -> Result:
    """Worker entry point: parse one job's segments in order with one Parser; return what the parent
    needs to stitch."""
    s = _STATE
    parser = Parser(s["pack"], node=s["node"], webmail=s["webmail"], max_user=s["max_user"])
    parser.orphans = []
    if s["join_logins"]:
        parser.remember_logins()  # as the parent's parser: rawlog sessions join these logins
    sink = Coalescer()
    errors: list[tuple[str, str, bool]] = []
    for seg in job:
        parser.begin(seg.label, seg.prefix, Clock(seg.style, s["zone"], year=s["year"], reference=seg.mtime,
                                                  tolerance=s["tolerance"]))
        try:
            for text in texts(Path(seg.path), seg.lo, seg.hi, max_line=s["max_line"],
                              on_long_line=lambda at: parser.problem("long_line", at, b"(not shown)")):
                parser.feed_text(text.data, text.end, sink, text.offset)
        except ArchiveError as e:
            errors.append((seg.path, str(e), e.partial))
        except OSError as e:
            errors.append((seg.path, f"read error: {e.strerror or e}", True))
        parser.end()
    # The rows go through a file: the pool's one result pipe took 0.2 s per worker for the same
    # bytes, one worker after the other, while the parent waited.
    logins = sink.logins.dumps()
    fd, rows_file = tempfile.mkstemp(prefix="rows-", dir=s["spill"])
    with os.fdopen(fd, "wb") as f:
        f.write(logins)
        f.write(sink.others.dumps())
    return Result(job, rows_file, len(logins), len(sink), parser.orphans, parser.ended,
                  *parser.sessions.part(), parser.stats, errors)


# --- the parent --------------------------------------------------------------------------

class Stitcher:
    """Carries LMTP and POP3 session state from one segment (and file) to the next, in `sessions` (the
    backfill's parser's: rawlog sessions read after the logs join against it)."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def apply(self, r: Result, sink: Coalescer) -> None:
        logins, others, lmtp = sink.logins, sink.others, self.sessions.lmtp
        for kind, service, user, t, digits, node, pid, detail in r.orphans:
            if kind == SESSION_USER:  # a whole user name for a login held in an earlier job
                held = self.sessions.complete(pid, user, node)
                if held is not None:
                    logins.put(user, held.service, held.time_us, held.digits, held.ip, held.node, held.service)
            elif kind == DELIVERY:
                state, ip = lmtp.deliver(pid, user, t, digits, node)
                if pid in r.ended:
                    ip = r.ended[pid] if state == "open" else None
                logins.put(user, service, t, digits, ip, node, service)
            else:
                if isinstance(detail, tuple):  # worded by the node's version, which earlier jobs told
                    pairs, names = detail
                    detail = detail_text(pairs, names_for(self.sessions, names, node)) or None
                others.put(user, kind, t, digits, self.sessions.login_address(service, pid), node, service, detail)
        for pid, ip in r.ended.items():
            session = lmtp.pop(pid)
            if session and session[0] != ip:
                for user, t, digits, node in session[1]:
                    logins.put(user, "lmtp", t, digits, ip, node, "lmtp")
        sink.add_run(*r.take_rows(), r.entries)  # user names are checked as the runs are written
        for h in self.sessions.absorb(r.open_sessions, r.login_ip, r.cut, r.dialects):  # stored as logged
            logins.put(h.user, h.service, h.time_us, h.digits, h.ip, h.node, h.service)


def pool(workers: int, pack, node, webmail, zone, year, max_line, spill: str, *, max_user: int = MAX_USER_BYTES,
         tolerance: float = FUTURE_TOLERANCE_S, join_logins: bool = False):
    """A process pool whose workers hold the pack (forked, so nothing is pickled per task) and write
    their rows into files in the directory `spill`."""
    ctx = multiprocessing.get_context("fork")
    return ctx.Pool(workers, initializer=_init,
                    initargs=(pack, node, webmail, zone, year, max_line, spill, max_user, tolerance, join_logins))


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
