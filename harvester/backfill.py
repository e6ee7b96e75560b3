"""One-shot backfill: rotated and live files, oldest first, into the store.

Files are read in rotation order through one Parser, so LMTP sessions split
by a rotation still join, and equal-time events keep their line order.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import TypeVar

from harvester import patterns, segments
from harvester.coalesce import Coalescer
from harvester.config import Settings
from harvester.parse import Parser, Webmail, rawlog_logins
from harvester.sessions import Sessions
from harvester.sinks.base import Store, flush
from harvester.sources import archive, compression, journal, rawlog, readahead
from harvester.sources.archive import line_blocks
from harvester.sources.base import Text
from harvester.sources.compression import ArchiveError, raw_chunks
from harvester.sources.rotation import expand
from harvester.timeparse import Clock, resolve_timezone

log = logging.getLogger(__name__)
T = TypeVar("T")
SNIFF_BYTES = 64 << 10


@dataclass
class Summary:
    """What a backfill did, for the closing report."""

    files: list[tuple[str, str]] = field(default_factory=list)  # (path, "ok" or what went wrong)
    lines: int = 0
    bytes: int = 0
    events: Counter = field(default_factory=Counter)
    not_understood: int = 0
    bad: Counter = field(default_factory=Counter)
    rows_written: int = 0
    seconds: float = 0.0
    rawlog_sessions: int = 0
    rawlog_without_ip: int = 0
    store_url: str = ""
    skipped: Counter = field(default_factory=Counter)  # rows the store's layout has no column for

    @property
    def failed_files(self) -> list[tuple[str, str]]:
        return [(p, s) for p, s in self.files if s != "ok"]


def make_parser(settings: Settings, sessions: Sessions | None = None) -> Parser:
    """The parser `settings` describe (backfill's, and each file's of `run`, carrying on with `sessions`)."""
    pack = patterns.load(settings.pattern_pack, [Path(d) for d in settings.patterns_dir])
    parser = Parser(pack, node=settings.node_name,
                    webmail=Webmail(settings.webmail_networks, settings.webmail_local_networks),
                    max_user=settings.max_user_bytes, sessions=sessions)
    if settings.rawlog:  # rawlog sessions without an address take the one of the Login line with their pid
        parser.remember_logins()
    return parser


def run(paths: list[str], settings: Settings, open_store: Callable[[], Store], *,
        progress: bool | None = None, since: str | None = None, until: str | None = None) -> Summary:
    """Backfill `paths` (files or globs) into the store `open_store` opens; never raises for bad input.

    The store is opened once the helper processes (the compressed files' reader, the workers) are
    forked: a fork copies the store driver's lock of a thread that does not exist in the child."""
    started = time.monotonic()
    summary = Summary()
    files, problems = expand(paths)
    for pat, why in problems:
        log.error("%s: %s, skipped", pat, why)
        summary.files.append((pat, why))
    parser = make_parser(settings)
    zone = resolve_timezone(settings.timezone)
    sink = Coalescer()
    total = sum(_size(f) for f in files)
    bar = _progress(total, progress)
    workers = settings.workers or segments.default_workers()
    gc_was = gc.isenabled()
    gc.disable()  # the coalescing dicts hold many small tuples; cyclic GC would rescan them all
    store: Store | None = None
    try:
        if workers > 1 and total >= segments.MIN_SEGMENT:
            store = _in_parallel(files, parser, sink, settings, zone, open_store, summary, bar, workers)
        else:
            store = _in_sequence(files, parser, sink, settings, zone, open_store, summary, bar)
        for spec in journal.specs(settings.journal == "yes", settings.journal_dir, settings.journal_file,
                                  tuple(settings.journal_match)):
            summary.files.append((spec.name, _one_journal(spec, parser, sink, settings, store, summary, since, until,
                                                          progress)))
        for root in settings.rawlog:  # after the maillog: its Login lines give sessions their address
            n, no_ip = rawlog_logins(rawlog.Tree(Path(root), zone, settings.rawlog_user_regex).sessions(), sink,
                                      parser, settings.node_name)
            summary.rawlog_sessions += n
            summary.rawlog_without_ip += no_ip
            log.info("%s: %d rawlog session(s), %d without a known address", root, n, no_ip)
            if len(sink) >= settings.flush_rows:
                summary.rows_written += flush(sink, store)
        cut = parser.release_held(sink)
        if cut:
            log.info("%d login(s) stored under the cut user name Dovecot logged (ending in \"...\"): no line "
                     "of their mail process gave the whole name", cut)
        summary.rows_written += flush(sink, store)
        summary.store_url = store.url
        summary.skipped = Counter(store.skipped())
    finally:
        if store is not None:
            store.close()
        if gc_was:
            gc.enable()
        if bar is not None:
            bar.close()
    st = parser.stats
    summary.lines, summary.bytes, summary.events = st.lines, st.bytes, Counter(st.events)
    summary.not_understood = sum(st.not_understood.values())
    summary.bad = Counter(st.bad) + sink.bad_input()  # the sink logged its own (rows it set aside)
    summary.seconds = time.monotonic() - started
    return summary


def _in_sequence(files: list[Path], parser: Parser, sink: Coalescer, settings: Settings, zone,
                 open_store: Callable[[], Store], summary: Summary, bar) -> Store:
    """One file after another through one parser; compressed ones inflated by one helper, forked first."""
    kinds: list[bool | str] = []
    for path in files:
        try:
            kinds.append(compression.compressed(path))
        except ArchiveError as e:
            kinds.append(str(e))
    makes = [archive.inflated(p, settings.max_line_bytes) for p, k in zip(files, kinds, strict=True) if k is True]
    reader = readahead.ReadAhead(makes) if makes else None
    try:
        store = open_store()

        def long_line(at: int) -> None:
            parser.problem("long_line", at, b"(not shown)")

        n = 0
        for path, kind in _closing_on_error(store, zip(files, kinds, strict=True)):
            if isinstance(kind, str):
                log.error("%s: %s, skipped", path, kind)
                summary.files.append((str(path), kind))
                continue
            if kind:
                assert reader is not None
                texts = reader.texts(n, long_line)
                n += 1
            else:
                texts = archive.plain_texts(path, max_line=settings.max_line_bytes, on_long_line=long_line)
            summary.files.append((str(path), _one_file(path, texts, parser, sink, settings, zone, store, summary,
                                                       bar)))
    finally:
        if reader is not None:
            reader.close()
    return store


def _one_file(path: Path, texts: Iterable[Text], parser: Parser, sink: Coalescer, settings: Settings, zone,
              store: Store, summary: Summary, bar) -> str:
    try:
        mtime = path.stat().st_mtime
    except OSError as e:
        log.error("%s: cannot read: %s, skipped", path, e.strerror)
        return f"cannot read: {e.strerror}"
    status, done = _feed(str(path), texts, parser, sink, settings, zone, store, summary, bar, mtime)
    if bar is not None:
        bar.update(max(_size(path) - done, 0))
    return status


def _one_journal(spec: journal.Spec, parser: Parser, sink: Coalescer, settings: Settings, store: Store,
                 summary: Summary, since: str | None, until: str | None, progress: bool | None) -> str:
    """A journal's entries (journalctl's, between since and until) through the same parser as files."""
    first, last = journal.edge(spec, newest=False), journal.edge(spec, newest=True)
    if first is None or last is None:
        log.warning("%s: no entry matches %s", spec.name, " ".join(spec.match))
        return "ok"
    start = int(first["__REALTIME_TIMESTAMP"]) // 1_000_000
    bar = _progress(int(last["__REALTIME_TIMESTAMP"]) // 1_000_000 - start + 1, progress, unit="s", scale=False)
    texts = journal.history(spec, since=since, until=until, max_line=settings.max_line_bytes,
                            on_dropped=journal.count_dropped,
                            on_long_line=lambda at: parser.problem("long_line", at, b"(not shown)"))
    shifted = (t._replace(read=t.read - start) for t in texts)  # the bar counts the journal's seconds
    try:
        status, _ = _feed(spec.name, shifted, parser, sink, settings, UTC, store, summary, bar, time.time())
    except OSError as e:
        log.error("%s: %s", spec.name, e)
        status = str(e)
    finally:
        if bar is not None:
            bar.close()
    return status


def _feed(name: str, texts: Iterable[Text], parser: Parser, sink: Coalescer, settings: Settings, zone,
          store: Store, summary: Summary, bar, reference: float) -> tuple[str, int]:
    """One file's (or journal's) texts into the sink, flushed as it fills; (status, progress units done)."""
    status = "ok"
    done = 0
    prefix = None
    head = b""
    parser.name(name)
    try:
        # Each text carries how far the reader was when it was cut, so the bar follows the parser.
        for text in texts:
            if prefix is None:
                # Decided by the first Dovecot line (a combined mail log may begin with other daemons'
                # lines); texts before it hold no event under any prefix, so skipping them loses nothing.
                sample = text.data[1:text.end]
                head = head or sample[:SNIFF_BYTES]
                prefix = _prefix_for(parser, settings, sample, detect=journal.is_journal(name))
                if prefix is None:
                    parser.count_skipped(sample)
                    continue
                style = parser.pack.prefixes[prefix].style
                parser.begin(name, prefix, Clock(style, zone, year=settings.year, reference=reference,
                                                 tolerance=settings.future_tolerance_s))
            parser.feed_text(text.data, text.end, sink, text.offset)
            if len(sink) >= settings.flush_rows:
                summary.rows_written += flush(sink, store)
            if bar is not None and text.read > done:
                bar.update(text.read - done)
                bar.set_postfix_str(Path(name).name, refresh=False)
                done = text.read
    except ArchiveError as e:
        log.error("%s: %s; %s", name, e,
                  "the lines before the damage were used" if e.partial else "file skipped")
        status = str(e)
    if prefix is None and status == "ok":
        status = _undecided(parser, Path(name), head)
    parser.end()
    return status, done


def _in_parallel(files: list[Path], parser: Parser, sink: Coalescer, settings: Settings, zone,
                 open_store: Callable[[], Store], summary: Summary, bar, workers: int) -> Store:
    """Parse runs of the files in worker processes (forked first); stitch and write them in file order."""
    sources: list[segments.LogFile] = []
    for path in files:
        try:
            mtime = path.stat().st_mtime
            prefix, head = None, b""
            for _, block in line_blocks(raw_chunks(path), max_line=settings.max_line_bytes,
                                        on_long_line=lambda at: None, block=SNIFF_BYTES):
                head = head or block
                prefix = _prefix_for(parser, settings, block)
                if prefix is not None:  # the first Dovecot line decides, however far in
                    break
            if prefix is None:
                summary.files.append((str(path), _undecided(parser, path, head)))
                continue
            sources.append(segments.source(path, prefix, parser.pack.prefixes[prefix].style, mtime))
        except ArchiveError as e:
            log.error("%s: %s; file skipped", path, e)
            summary.files.append((str(path), str(e)))
        except OSError as e:
            log.error("%s: cannot read: %s, skipped", path, e.strerror)
            summary.files.append((str(path), f"cannot read: {e.strerror}"))
    sizes = {f.path: f.size for f in sources}
    status: dict[str, str] = {}
    stitcher = segments.Stitcher(parser.sessions)
    jobs = segments.plan(sources, workers)
    with tempfile.TemporaryDirectory(prefix="harvester-backfill-") as spill, \
            segments.pool(len(jobs), parser.pack, parser.node, parser.webmail, zone, settings.year,
                          settings.max_line_bytes, spill, max_user=settings.max_user_bytes,
                          tolerance=settings.future_tolerance_s, join_logins=bool(settings.rawlog)) as pool:
        store = open_store()
        for result in _closing_on_error(store, pool.imap(segments.parse_job, jobs)):
            stitcher.apply(result, sink)
            parser.stats.add(result.stats)
            for path, error, partial in result.errors:
                if path not in status:
                    log.error("%s: %s; %s", path, error,
                              "the lines before the damage were used" if partial else "file skipped")
                    status[path] = error
            if len(sink) >= settings.flush_rows:
                summary.rows_written += flush(sink, store)
            if bar is not None:
                bar.update(sum((seg.hi or sizes[seg.path]) - seg.lo for seg in result.job))
                bar.set_postfix_str(Path(result.job[-1].path).name, refresh=False)
    summary.files.extend((f.path, status.get(f.path, "ok")) for f in sources)
    return store


def _closing_on_error(store: Store, items: Iterable[T]) -> Iterator[T]:
    """`items`, closing `store` if they (or the loop over them) end in an exception: the caller only
    gets the store to close when this returns."""
    try:
        yield from items
    except BaseException:
        store.close()
        raise


def _prefix_for(parser: Parser, settings: Settings, block: bytes, detect: bool = False) -> str | None:
    """The configured prefix, or the one the first Dovecot line of `block` decides (None: not yet); `detect`:
    always decided by the lines (a journal's, whose shape the journal source writes)."""
    if settings.prefix != "auto" and not detect:
        if settings.prefix not in parser.pack.prefixes:
            raise SystemExit(f"prefix {settings.prefix!r} is not in pack {parser.pack.name!r} "
                             f"(it has: {', '.join(parser.pack.prefixes)})")
        return settings.prefix
    name, scores = patterns.detect_prefix(parser.pack, block)
    if name is not None:
        log.debug("prefix %s (matches per prefix: %s)", name, scores)
    return name


def _undecided(parser: Parser, path: Path, head: bytes) -> str:
    """A whole file without one Dovecot event: fine if it looks like a log of a known format (a quiet
    one), a problem to report if no line does."""
    if patterns.closest_prefix(parser.pack, head)[0] is not None:
        log.info("%s: no Dovecot login or delivery in it", path)
        return "ok"
    log.error("%s: no line looks like any prefix of pack %r, skipped", path, parser.pack.name)
    return "no line in a known format"


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _progress(total: int, wanted: bool | None, unit: str = "B", scale: bool = True):
    """A progress bar on a terminal (by compressed bytes read; a journal's: by its seconds), nothing otherwise."""
    if wanted is False or (wanted is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=scale, unit_divisor=1024, file=sys.stderr,
                desc="backfill", dynamic_ncols=True)
