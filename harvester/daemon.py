"""The live daemon: follow the maillog, keep the store current, never lose or invent a login.

The loop reads new complete lines of every followed file and parses them into
the coalescer. Every `flush_interval_ms` (or `flush_events` rows) it cuts a
batch: the rows gathered so far plus the checkpoint (offsets and the parser's
open sessions at that moment) that becomes true once they are stored. A writer
thread writes the batch and, only after the store acknowledged it, saves that
checkpoint; a crash therefore replays from the last acknowledged point, and the
store's newest-wins writes make the replay harmless. A store that is slow,
locked or down holds up only the writer: the loop goes on reading (up to
`max_waiting_rows`), pinging systemd's watchdog and answering /metrics, and the
writer retries the same batch with backoff until the store takes it.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from harvester import metrics, native, patterns, systemd
from harvester.backfill import make_parser
from harvester.checkpoint import Checkpoints, State, StateInUse, lock_state_dir
from harvester.coalesce import Coalescer, SetAside
from harvester.config import Settings, state_dir
from harvester.parse import Parser, rawlog_logins
from harvester.sessions import CUT_WAIT_S, Sessions
from harvester.sinks.base import Store
from harvester.sources import Block, LineSource, former_names, journal, open_source, rawlog
from harvester.sources.base import AnyPosition
from harvester.timeparse import Clock, resolve_timezone
from harvester.writer import WriteJob, Writer

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

log = logging.getLogger(__name__)
STOP_DEADLINE = 8.0  # seconds SIGTERM waits for the last write (systemd's TimeoutStopSec is longer)
GLOB_RESCAN = 10.0  # seconds between looks for new files matching the followed globs
SESSIONS_KEPT = 5000  # POP3 logins saved with a checkpoint, for deletions logged after a restart
CATCHUP_CUT = 5.0  # seconds: while catching up, a batch is cut at least this often
MIN_CYCLE = 0.1  # seconds: file notifications arrive per write; reading in bursts is cheaper
RAWLOG_RIPE = timedelta(seconds=3)  # a rawlog session is taken this long after its start


@dataclass
class Followed:
    """One followed path: its follower, its own parser (LMTP sessions are per log stream) and stats."""

    path: str
    follower: LineSource
    parser: Parser
    prefix: str | None = None
    undecided_said: bool = False  # "no Dovecot line yet" was logged
    ref_minute: int = 0
    seen: dict = field(default_factory=dict)  # last stats pushed to the metrics


class Daemon:
    def __init__(self, settings: Settings, store: Store, paths: list[str], reload=None) -> None:
        self.settings = settings
        self.store = store
        self.patterns_given = paths
        self.reload_settings = reload  # () -> Settings, for SIGHUP
        self.set_aside = SetAside()  # rows no store can take, over every batch
        self.bad_pushed: Counter[str] = Counter()  # of those, what the metrics have
        self.sink = Coalescer(set_aside=self.set_aside)
        self.checkpoints = Checkpoints(state_dir(settings))
        self.wake = threading.Event()  # file changes, signals and a finished write end the loop's wait
        self.writer = Writer(store, self.checkpoints, self.wake)
        self.sources: dict[str, Followed] = {}
        self.stopping = False
        self.reloading = False
        self.read_at: list[float] = []  # monotonic read times of the blocks in self.sink
        self.dirty = True  # offsets moved since the last checkpoint handed to the writer (at start: maybe)
        self.cut_positions: dict[str, list[AnyPosition]] = {}  # what that checkpoint says
        self.lock_fd = -1
        self._observer: BaseObserver | None = None
        self.rawlog_trees: list[rawlog.Tree] = []
        # (root, user, name, pid) -> latest reading of the name: sessions harvested after the mark
        self.rawlog_done: dict[tuple[str, str, str, str], float] = {}
        self.rawlog_parser: Parser | None = None
        self.last_rawlog_scan = 0.0
        self.journal_only = False  # journal = auto chose the local journal (see _choose_journal)
        self.nothing_said = -journal.SAID_AGAIN_S

    # -- setup -----------------------------------------------------------------------
    def _parser(self, sessions: Sessions | None = None) -> Parser:
        return make_parser(self.settings, sessions)

    def _long_line(self, path: str, at: int) -> None:
        """A line over max_line_bytes in a followed file: its (current) parser counts it."""
        self.sources[path].parser.problem("long_line", at, b"(not shown)")

    def _expand(self) -> list[str]:
        """The names of the sources to read: the files (globs expanded) and the journals."""
        if self.journal_only:
            return [journal.Spec().name]
        out = []
        for pat in [*self.settings.follow, *self.patterns_given]:
            hits = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
            out += [h for h in hits if h not in out]
        s = self.settings
        return out + [j.name for j in journal.specs(s.journal == "yes", s.journal_dir, s.journal_file, ())]

    def _choose_journal(self) -> bool:
        """journal = auto: the local journal alone when none of the files to follow exists and the journal
        holds Dovecot's entries (Debian 12 without rsyslog has no /var/log/mail.log); the files alone
        otherwise. Decided at start, and again while nothing is read (Dovecot installed after harvester), so
        a line is never read from both. Returns whether it chose the journal now."""
        s = self.settings
        if self.journal_only or s.journal != "auto" or s.journal_dir or s.journal_file:
            return False
        files = [p for p in self._expand() if not journal.is_journal(p)]
        if any(os.path.exists(p) for p in files):
            return False
        if not journal.local_journal_exists() or not journal.available():
            return False
        if journal.edge(journal.Spec(match=tuple(s.journal_match)), newest=True) is None:
            return False  # no Dovecot entry (yet): a file may still be the way its lines come
        self.journal_only = True
        for name in [n for n in self.sources if not journal.is_journal(n)]:
            self.sources.pop(name).follower.close()  # files that do not exist: never both
        log.info("reading Dovecot's lines from the systemd journal: %s (journal = auto; "
                 "restart harvester to follow a file that appears later)",
                 f"{', '.join(files)} does not exist" if files else "no file to follow")
        return True

    def _reading(self) -> int:
        """How many sources have something to read (a journal; a file that exists); 0 is said in the log
        and in the harvester_sources_read gauge, every minute."""
        n = sum(1 for name in self.sources if journal.is_journal(name) or os.path.exists(name))
        metrics.SOURCES_READ.set(n)
        now = time.monotonic()
        if n == 0 and now - self.nothing_said >= journal.SAID_AGAIN_S:
            self.nothing_said = now
            names = [*self.settings.follow, *self.patterns_given]
            log.warning("reading nothing: %s; no systemd journal to read either (journal = %s)",
                        f"{', '.join(names)} does not exist" if names else "no file to follow",
                        self.settings.journal)
        return n

    def _add_sources(self, state: State | None, start_at: str, journal_start_at: str | None = None) -> None:
        """Open the sources not open yet (checkpointed positions from `state`); a new one starts at
        `start_at` (a journal at `journal_start_at`, if given)."""
        for path in self._expand():
            if path in self.sources:
                continue
            begin = journal_start_at if journal_start_at and journal.is_journal(path) else start_at
            f = open_source(path, max_line=self.settings.max_line_bytes,
                            on_long_line=functools.partial(self._long_line, path),
                            on_rotation=functools.partial(_rotated, path), match=tuple(self.settings.journal_match))
            src = Followed(path, f, self._parser())
            key = path
            if state and path not in state.positions:  # checkpointed under the name an earlier version gave it?
                key = next((n for n in former_names(path) if n in state.positions), path)
            positions = state.positions.get(key, []) if state else []  # a new path has none
            if state and key in state.sessions:
                src.parser.sessions.restore(state.sessions[key])
            how = f.start(positions, begin)
            self.sources[path] = src
            log.info("following %s: %s", path, how)
        if not self.sources and [*self.settings.follow, *self.patterns_given]:
            log.warning("no file to follow yet (%s); waiting for one to appear",
                        ", ".join([*self.settings.follow, *self.patterns_given]) or "none given")

    def _watch(self) -> None:
        """File change notifications (inotify through watchdog) wake the loop; polling stays as the fallback."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            return
        wake = self.wake

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                wake.set()

        try:
            obs = Observer()
            for d in {str(Path(p).parent) for p in [*self.settings.follow, *self.patterns_given]}:
                if os.path.isdir(d):
                    obs.schedule(Wake(), d, recursive=False)
            for d in self.settings.rawlog:  # new session files anywhere below
                if os.path.isdir(d):
                    obs.schedule(Wake(), d, recursive=True)
            obs.daemon = True
            obs.start()
            self._observer = obs
        except Exception as e:  # no inotify (limits, filesystems): the poll interval still reads
            log.warning("file change notifications unavailable (%s); polling every %d ms", e,
                        self.settings.poll_interval_ms)

    # -- the loop --------------------------------------------------------------------
    def run(self) -> int:
        try:
            self.lock_fd = lock_state_dir(self.checkpoints.dir)
        except StateInUse as e:
            log.error("%s", e)
            return 2
        except OSError as e:
            log.error("state directory %s: %s", self.checkpoints.dir, e.strerror or e)
            return 2
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        state = self.checkpoints.load()
        self._choose_journal()
        self._add_sources(state, self.settings.start_at)
        zone = resolve_timezone(self.settings.timezone)
        for root in self.settings.rawlog:
            tree = rawlog.Tree(Path(root), zone, self.settings.rawlog_user_regex)
            mark = state.rawlog.get(root)
            if isinstance(mark, int | float):
                tree.mark = int(mark)
            elif self.settings.start_at == "end":  # as for log files: only what begins from now on
                tree.mark = int(time.time()) - 1
            self.rawlog_trees.append(tree)
            log.info("watching rawlog sessions under %s%s", root,
                     f" named after {datetime.fromtimestamp(tree.mark, zone):%Y-%m-%d %H:%M:%S %Z}"
                     if tree.mark else " (all of them)")
        try:
            metrics.serve(self.settings.metrics_listen, "native" if native.enabled() else "python")
        except OSError as e:
            log.error("metrics_listen %s: cannot listen: %s (another harvester on this port? give each "
                      "instance its own metrics_listen, or an empty one for none)", self.settings.metrics_listen,
                      e.strerror or e)
            return 2
        self._watch()
        self.writer.start()
        systemd.notify("READY=1\nSTATUS=following " + ", ".join(self.sources))
        watchdog_every = systemd.watchdog_interval()
        last_cut = last_scan = last_ping = time.monotonic()
        try:
            while not self.stopping:
                started = time.monotonic()
                if self.reloading:
                    self._reload()
                poll = self.settings.poll_interval_ms / 1000  # (after a reload: the new ones)
                interval = self.settings.flush_interval_ms / 1000
                if started - last_scan >= GLOB_RESCAN:
                    if not self._reading():
                        self._choose_journal()  # Dovecot's first entries since harvester started: read them all
                    self._add_sources(None, "beginning")  # a file (or that journal) appearing later: new all through
                    last_scan = started
                behind = False
                if self._waiting() < self.settings.max_waiting_rows:
                    behind = self._read_all()
                    if self.rawlog_trees and started - self.last_rawlog_scan >= poll:
                        self._read_rawlogs()
                        self.last_rawlog_scan = started
                now = time.monotonic()
                if not self.dirty and self._positions() != self.cut_positions:
                    self.dirty = True  # a rotated file was finished (and leaves the checkpoint) with nothing read
                due = now - last_cut >= interval or len(self.sink) >= self.settings.flush_events
                if behind and len(self.sink) < self.settings.max_waiting_rows // 2 and now - last_cut < CATCHUP_CUT:
                    # Catching up: large batches rather than many small ones, each rewriting the keys of the
                    # one before (a 2M-line backlog wrote 4x the rows of its backfill, 2.9x the time); still
                    # one every CATCHUP_CUT, so that a long backlog is stored and checkpointed as it goes.
                    due = False
                if due and self.writer.idle() and (len(self.sink) or self.dirty):
                    self._cut()
                    last_cut = now
                if watchdog_every and now - last_ping >= watchdog_every and self.writer.is_alive():
                    systemd.notify("WATCHDOG=1")
                    last_ping = now
                self._gauges()
                if behind and self._waiting() < self.settings.max_waiting_rows:
                    continue  # catching up: more is readable already, read it without waiting
                # Sleep until a file changes (or the poll interval / next cut), but read in bursts.
                spent = time.monotonic() - started
                if spent < MIN_CYCLE:
                    time.sleep(MIN_CYCLE - spent)
                timeout = max(min(poll, interval - (time.monotonic() - last_cut)), 0.01)
                if watchdog_every:
                    timeout = min(timeout, watchdog_every)
                self.wake.wait(timeout)
                self.wake.clear()
        finally:
            systemd.notify("STOPPING=1")
            self._shutdown()
        return 0

    def _positions(self) -> dict[str, list[AnyPosition]]:
        return {p: s.follower.positions() for p, s in self.sources.items()}

    def _waiting(self) -> int:
        """Rows read and not yet acknowledged: what memory holds for the store."""
        return len(self.sink) + self.writer.in_flight()

    def _read_all(self) -> bool:
        """Read what every followed file has; returns whether some file has more readable already."""
        behind = False
        for src in list(self.sources.values()):
            try:
                blocks = src.follower.poll()
            except OSError as e:
                log.error("%s: read failed: %s", src.path, e)
                continue
            for b in blocks:
                self._parse(src, b)
            behind = behind or src.follower.backlog()
        return behind

    def _parse(self, src: Followed, b: Block) -> None:
        p = src.parser
        self.dirty = True
        if src.prefix is None:
            src.prefix = self._prefix(src, b.data)
            if src.prefix is None:  # no Dovecot line yet: nothing in this block is an event under any prefix
                p.count_skipped(b.data)
                self._count(src)
                return
            style = p.pack.prefixes[src.prefix].style
            p.begin(src.path, src.prefix, Clock(style, resolve_timezone(self.settings.timezone),
                                                year=self.settings.year, tolerance=self.settings.future_tolerance_s))
        elif not self.settings.year and int(time.time()) // 60 != src.ref_minute:
            p.follow_now()  # the year of "Dec 31" lines read on Jan 1
            src.ref_minute = int(time.time()) // 60
        p.feed(b.data, self.sink, b.offset)
        self.read_at.append(time.monotonic())
        self._count(src)

    def _read_rawlogs(self) -> None:
        """New rawlog sessions, a few seconds after they began (so that the maillog's Login line with the
        same pid, their address, has been read). Every session named at or before that moment is present by
        then (the file is made as the session starts), so the moment becomes the root's mark, which the next
        checkpoint saves: a restart skips exactly what was harvested."""
        ripe = time.time() - RAWLOG_RIPE.total_seconds()
        parser = next(iter(self.sources.values())).parser if self.sources else self._rawlog_parser()
        joins = [src.parser.sessions for src in self.sources.values()]  # its Login line may be in any file
        for tree in self.rawlog_trees:
            root = str(tree.root)
            new = []
            for s in tree.sessions(tree.mark, until=ripe):
                key = (root, s.user, s.name, s.pid)
                if key in self.rawlog_done:
                    continue
                self.rawlog_done[key] = rawlog.name_epochs(s.name, tree.zone)[1]
                new.append(s)
            if new:
                n, no_ip = rawlog_logins(iter(new), self.sink, parser, self.settings.node_name, joins)
                for s in new:
                    metrics.RAWLOG.labels(s.service).inc()
                log.debug("%s: %d new rawlog session(s), %d without a known address", root, n, no_ip)
                self.dirty = True
            if int(ripe) > tree.mark:
                tree.mark = int(ripe)
                self.rawlog_done = {k: t for k, t in self.rawlog_done.items() if k[0] != root or t > tree.mark}

    def _rawlog_parser(self) -> Parser:
        if self.rawlog_parser is None:
            self.rawlog_parser = self._parser()
        return self.rawlog_parser

    def _prefix(self, src: Followed, data: bytes) -> str | None:
        """The configured prefix, or the one the file's first Dovecot line decides (None: not yet seen). A
        journal's lines have the shape the journal source writes: always detected, whatever `prefix` says."""
        s = self.settings
        if s.prefix != "auto" and not journal.is_journal(src.path):
            return s.prefix
        name, _ = patterns.detect_prefix(src.parser.pack, data)
        if name is None and not src.undecided_said:
            log.info("%s: no Dovecot line yet; its line format is decided by the first one", src.path)
            src.undecided_said = True
        elif name is not None:
            log.info("%s: line format %s", src.path, name)
        return name

    def _count(self, src: Followed) -> None:
        st, seen = src.parser.stats, src.seen
        metrics.LINES.labels(src.path).inc(st.lines - seen.get("lines", 0))
        metrics.BYTES.labels(src.path).inc(st.bytes - seen.get("bytes", 0))
        for (kind, service), n in st.events.items():
            d = n - seen.get((kind, service), 0)
            if d:
                metrics.EVENTS.labels(kind, service).inc(d)
                seen[(kind, service)] = n
        nu = sum(st.not_understood.values())
        if nu - seen.get("nu", 0):
            metrics.NOT_UNDERSTOOD.labels(src.parser.pack.name).inc(nu - seen.get("nu", 0))
        for reason, n in st.bad.items():
            if n - seen.get(("bad", reason), 0):
                metrics.BAD_INPUT.labels(reason).inc(n - seen.get(("bad", reason), 0))
                seen[("bad", reason)] = n
        seen.update(lines=st.lines, bytes=st.bytes, nu=nu)
        src.parser.end()  # one log line per kind of bad input in this batch

    def _cut(self) -> None:
        """Hand what was gathered, with the checkpoint it makes true, to the writer; gather anew."""
        self.cut_positions = self._positions()
        before = time.monotonic() - CUT_WAIT_S  # logins held this long for their whole user name: stored as cut
        for s in self.sources.values():
            s.parser.release_held(self.sink, before)
        state = State(dict(self.cut_positions),
                      {p: s.parser.sessions.snapshot(SESSIONS_KEPT) for p, s in self.sources.items()},
                      {str(t.root): t.mark for t in self.rawlog_trees})
        self.writer.submit(WriteJob(self.sink, state, self.read_at))
        self.sink, self.read_at, self.dirty = Coalescer(set_aside=self.set_aside), [], False

    def _gauges(self) -> None:
        for reason, n in self.set_aside.counts.items():  # the writer sets rows aside as it writes them
            if n > self.bad_pushed[reason]:
                metrics.BAD_INPUT.labels(reason).inc(n - self.bad_pushed[reason])
                self.bad_pushed[reason] = n
        metrics.WAITING.set(self._waiting())
        for p, s in self.sources.items():
            metrics.LAG.labels(p).set(s.follower.lag_bytes())
        self._reading()

    # -- signals ---------------------------------------------------------------------
    def _on_stop(self, signum, frame) -> None:
        self.stopping = True
        self.wake.set()

    def _on_reload(self, signum, frame) -> None:
        self.reloading = True
        self.wake.set()

    def _reload(self) -> None:
        """SIGHUP: re-read the config file and pattern packs; positions and open sessions carry over."""
        self.reloading = False
        systemd.notify("RELOADING=1")
        try:
            new = self.reload_settings() if self.reload_settings else self.settings
            if new.store != self.settings.store:
                log.warning("reload: a new store takes a restart; keeping %s", self.store.url)
            old, self.settings = self.settings, new
            if new.journal != "auto":
                self.journal_only = False
            wanted = set(self._expand())
            for name in [n for n in self.sources if journal.is_journal(n)]:
                if name not in wanted:  # journal = no, a directory taken out: no longer read
                    self.sources.pop(name).follower.close()
                elif new.journal_match != old.journal_match:  # the same journal, other entries: from its cursor
                    src = self.sources[name]
                    positions = src.follower.positions()
                    src.follower.close()
                    src.follower = open_source(name, max_line=new.max_line_bytes, match=tuple(new.journal_match))
                    src.follower.start(positions, "end")
            for src in self.sources.values():
                parser = self._parser(sessions=src.parser.sessions)  # the stream goes on: its sessions too
                parser.stats = src.parser.stats
                src.parser, src.prefix = parser, None
            self._add_sources(None, "beginning", self.settings.start_at)  # a journal named now is not new all through
            log.info("reloaded configuration and pattern packs")
            metrics.RELOADS.labels("ok").inc()
            systemd.notify("READY=1\nSTATUS=reloaded")
        except Exception as e:  # a bad config on reload must not stop a running daemon
            # `systemctl reload` has returned success already (it only sends SIGHUP): the journal, the
            # unit's status line and harvester_reloads_total{result="failed"} say it failed.
            log.error("reload failed, keeping the previous configuration: %s", e)
            metrics.RELOADS.labels("failed").inc()
            systemd.notify(f"READY=1\nSTATUS=reload failed, running with the previous configuration: {e}"[:400])

    def _shutdown(self) -> None:
        """SIGTERM: a last write and checkpoint if the store takes them within STOP_DEADLINE, then close.
        A store that is down is not waited for: what it did not acknowledge is read again at the next start."""
        if self._observer is not None:
            self._observer.stop()
        deadline = time.monotonic() + STOP_DEADLINE
        if self.writer.is_alive() and self.writer.store_up and self._waiting() < self.settings.max_waiting_rows:
            # What was written just before the stop is stored with it (else only at the next start).
            try:
                self._read_all()
            except Exception as e:  # a last read must not keep the rest of the shutdown from running
                log.warning("last read before stopping failed: %s", e)
        if self.writer.is_alive():
            while not self.writer.idle() and self.writer.store_up and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.writer.idle() and (len(self.sink) or self.dirty):
                self._cut()
            stored = self.writer.finish(max(deadline - time.monotonic(), 0.0))
            if not stored or len(self.sink):
                log.warning("stopping with %d rows not stored; they are read again from the checkpoints "
                            "at the next start", self._waiting())
        for s in self.sources.values():
            s.follower.close()
        log.info("stopped")


def _rotated(path: str, how: str) -> None:
    metrics.ROTATIONS.labels(path, how).inc()
    log.info("%s: rotated (%s)", path, how)
