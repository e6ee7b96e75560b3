"""The live daemon: follow the maillog, keep the store current, never lose or invent a login.

One loop: read new complete lines of every followed file, parse them into the
coalescer, flush to the store every `flush_interval_ms` (or `flush_events`
rows), and only after the store acknowledged a flush save the checkpoints (the
offsets and the parser's open sessions at that moment). A crash therefore
replays from the last acknowledged point, and the store's newest-wins writes
make the replay harmless. When the store fails, the rows stay queued, the
checkpoints stay put, reading pauses at `max_waiting_rows`, and the flush is
retried with backoff until the store is back.
"""

from __future__ import annotations

import glob
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from harvester import metrics, native, patterns
from harvester.checkpoint import Checkpoints, State
from harvester.coalesce import Coalescer
from harvester.config import Settings, state_dir
from harvester.parse import Networks, Parser
from harvester.sinks.base import Store, StoreError, flush
from harvester.sources import rawlog
from harvester.sources.tail import Block, Follower
from harvester.timeparse import Clock, resolve_timezone

log = logging.getLogger(__name__)
BACKOFF_MAX = 30.0
OUTAGE_REPEAT = 60.0  # while the store is down, say so again this often
GLOB_RESCAN = 10.0  # seconds between looks for new files matching the followed globs
SESSIONS_KEPT = 5000  # POP3 logins saved with a checkpoint, for deletions logged after a restart
MIN_CYCLE = 0.1  # seconds: file notifications arrive per write; reading in bursts is cheaper
RAWLOG_RIPE = timedelta(seconds=3)  # a rawlog session is taken this long after its start


def notify(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET (nothing outside systemd)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
    except OSError as e:
        log.debug("sd_notify %r: %s", message, e)


@dataclass
class Source:
    """One followed path: its follower, its own parser (LMTP sessions are per log stream) and stats."""

    path: str
    follower: Follower
    parser: Parser
    prefix: str | None = None
    ref_minute: int = 0
    seen: dict = field(default_factory=dict)  # last stats pushed to the metrics


class Daemon:
    def __init__(self, settings: Settings, store: Store, paths: list[str], reload=None) -> None:
        self.settings = settings
        self.store = store
        self.patterns_given = paths
        self.reload_settings = reload  # () -> Settings, for SIGHUP
        self.sink = Coalescer()
        self.checkpoints = Checkpoints(state_dir(settings))
        self.sources: dict[str, Source] = {}
        self.wake = threading.Event()
        self.stopping = False
        self.reloading = False
        self.store_up = True
        self.down_since: float | None = None
        self.last_outage_log = 0.0
        self.retry_at = 0.0
        self.backoff = 0.0
        self.unflushed_blocks: list[tuple[float, int]] = []  # (monotonic read time, lines) of queued blocks
        self.dirty = False  # offsets moved since the last saved checkpoint
        self.newest_us = 0
        self._observer = None
        self.rawlog_trees: list[rawlog.Tree] = []
        # (root, user, name, pid) -> latest reading of the name: sessions harvested after the mark
        self.rawlog_done: dict[tuple[str, str, str, str], float] = {}
        self.rawlog_parser: Parser | None = None
        self.last_rawlog_scan = 0.0

    # -- setup -----------------------------------------------------------------------
    def _parser(self) -> Parser:
        s = self.settings
        pack = patterns.load(s.pattern_pack, [Path(d) for d in s.patterns_dir])
        return Parser(pack, node=s.node_name, webmail=Networks(s.webmail_networks))

    def _expand(self) -> list[str]:
        out = []
        for pat in [*self.settings.follow, *self.patterns_given]:
            hits = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
            out += [h for h in hits if h not in out]
        return out

    def _add_sources(self, state: State | None, start_at: str) -> None:
        for path in self._expand():
            if path in self.sources:
                continue
            f = Follower(Path(path), max_line=self.settings.max_line_bytes,
                         on_rotation=lambda how, p=path: _rotated(p, how))
            src = Source(path, f, self._parser())
            f.on_long_line = lambda at, s=src: s.parser.problem("long_line", at, b"(not shown)")
            positions = state.positions.get(path, []) if state else []  # a new path has none
            if state and path in state.sessions:
                _restore_sessions(src.parser, state.sessions[path])
            how = f.start(positions, start_at)
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
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        state = self.checkpoints.load()
        self._add_sources(state, self.settings.start_at)
        zone = resolve_timezone(self.settings.timezone)
        for root in self.settings.rawlog:
            tree = rawlog.Tree(Path(root), zone, self.settings.rawlog_user_regex)
            mark = state.rawlog.get(root)
            if isinstance(mark, int | float):
                tree.mark = mark
            elif self.settings.start_at == "end":  # as for log files: only what begins from now on
                tree.mark = int(time.time()) - 1
            self.rawlog_trees.append(tree)
            log.info("watching rawlog sessions under %s%s", root,
                     f" named after {datetime.fromtimestamp(tree.mark, zone):%Y-%m-%d %H:%M:%S %Z}"
                     if tree.mark else " (all of them)")
        for src in self.sources.values():
            src.parser.remember_logins()
        self._watch()
        metrics.serve(self.settings.metrics_listen, "native" if native.enabled() else "python")
        notify("READY=1\nSTATUS=following " + ", ".join(self.sources))
        watchdog_every = _watchdog_interval()
        last_flush = last_scan = last_ping = time.monotonic()
        poll = self.settings.poll_interval_ms / 1000
        try:
            while not self.stopping:
                started = time.monotonic()
                if self.reloading:
                    self._reload()
                if started - last_scan >= GLOB_RESCAN:
                    self._add_sources(None, "beginning")  # a file that appears later is new all through
                    last_scan = started
                if len(self.sink) < self.settings.max_waiting_rows:
                    self._read_all()
                    if self.rawlog_trees and started - self.last_rawlog_scan >= poll:
                        self._read_rawlogs()
                        self.last_rawlog_scan = started
                now = time.monotonic()
                due = now - last_flush >= self.settings.flush_interval_ms / 1000
                if (due or len(self.sink) >= self.settings.flush_events) and now >= self.retry_at:
                    self._flush()
                    last_flush = now
                if watchdog_every and now - last_ping >= watchdog_every:
                    notify("WATCHDOG=1")
                    last_ping = now
                self._gauges()
                # Sleep until a file changes (or the poll interval / next flush), but read in bursts.
                spent = time.monotonic() - started
                if spent < MIN_CYCLE:
                    time.sleep(MIN_CYCLE - spent)
                until_flush = self.settings.flush_interval_ms / 1000 - (time.monotonic() - last_flush)
                timeout = max(min(poll, until_flush), 0.01)
                if watchdog_every:
                    timeout = min(timeout, watchdog_every)
                self.wake.wait(timeout)
                self.wake.clear()
        finally:
            notify("STOPPING=1")
            self._shutdown()
        return 0

    def _read_all(self) -> None:
        for src in list(self.sources.values()):
            try:
                blocks = src.follower.poll()
            except OSError as e:
                log.error("%s: read failed: %s", src.path, e)
                continue
            for b in blocks:
                self._parse(src, b)

    def _parse(self, src: Source, b: Block) -> None:
        p = src.parser
        if src.prefix is None:
            src.prefix = self._prefix(src, b.data)
            if src.prefix is None:
                return
            style = p.pack.prefixes[src.prefix].style
            p.begin(src.path, src.prefix, Clock(style, resolve_timezone(self.settings.timezone),
                                                year=self.settings.year, reference=time.time()))
        elif p._clock is not None and not self.settings.year and int(time.time()) // 60 != src.ref_minute:
            # a live file's lines are never later than now: the year of "Dec 31" lines read on Jan 1
            p._clock.set_reference(time.time())
            src.ref_minute = int(time.time()) // 60
        p.feed(b.data, self.sink, b.offset)
        self.unflushed_blocks.append((time.monotonic(), b.data.count(b"\n")))
        self.dirty = True
        self._count(src)

    def _read_rawlogs(self) -> None:
        """New rawlog sessions, a few seconds after they began (so that the maillog's Login line with the
        same pid, their address, has been read). Every session named at or before that moment is present by
        then (the file is made as the session starts), so the moment becomes the root's mark, which the next
        checkpoint saves: a restart skips exactly what was harvested."""
        ripe = time.time() - RAWLOG_RIPE.total_seconds()
        parser = next(iter(self.sources.values())).parser if self.sources else self._rawlog_parser()
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
                n, no_ip = rawlog.harvest(iter(new), self.sink, parser, self.settings.node_name)
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

    def _prefix(self, src: Source, data: bytes) -> str | None:
        s = self.settings
        if s.prefix != "auto":
            return s.prefix
        name, _ = patterns.detect_prefix(src.parser.pack, data[:64 << 10])
        if name is None:
            log.error("%s: no line looks like any prefix of pack %r; these lines are skipped",
                      src.path, src.parser.pack.name)
        return name

    def _count(self, src: Source) -> None:
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

    def _flush(self) -> None:
        """Write what is waiting; on success save the checkpoints, on failure keep both and back off."""
        waiting = len(self.sink)
        if waiting == 0 and not self.dirty:
            return
        positions = {p: s.follower.positions() for p, s in self.sources.items()}
        sessions = {p: _sessions(s.parser) for p, s in self.sources.items()}
        blocks, self.unflushed_blocks = self.unflushed_blocks, []
        newest = _newest(self.sink)
        if waiting:
            t = time.monotonic()
            try:
                written = flush(self.sink, self.store)
            except Exception as e:  # StoreError, or anything unexpected: the rows stay, the daemon goes on
                if not isinstance(e, StoreError):
                    log.exception("unexpected error while writing to %s", self.store.url)
                self.unflushed_blocks = blocks + self.unflushed_blocks
                self._failed(e)
                return
            metrics.WRITE_SECONDS.observe(time.monotonic() - t)
            metrics.ROWS_WRITTEN.inc(written)
            self.newest_us = max(self.newest_us, newest)
            metrics.NEWEST.set(self.newest_us / 1e6)
        now = time.monotonic()
        for read_at, _ in blocks:
            metrics.DELAY.observe(now - read_at)
        if not self.store_up:
            log.warning("store %s is back after %.0f s; caught up %d rows", self.store.url,
                        now - (self.down_since or now), waiting)
        self.store_up, self.down_since, self.backoff, self.retry_at = True, None, 0.0, 0.0
        metrics.STORE_UP.set(1)
        try:
            self.checkpoints.save(State(positions, sessions, {str(t.root): t.mark for t in self.rawlog_trees}))
            self.dirty = False
        except OSError as e:
            log.error("%s: cannot save checkpoints: %s (they are saved again after the next write)",
                      self.checkpoints.path, e)

    def _failed(self, e: Exception) -> None:
        now = time.monotonic()
        metrics.WRITE_ERRORS.inc()
        metrics.STORE_UP.set(0)
        if self.store_up:
            log.error("store %s: %s; %d rows kept, checkpoints held, retrying with backoff", self.store.url, e,
                      len(self.sink))
            self.store_up, self.down_since, self.last_outage_log = False, now, now
        elif now - self.last_outage_log >= OUTAGE_REPEAT:
            log.error("store %s still failing after %.0f s (%d rows waiting): %s", self.store.url,
                      now - (self.down_since or now), len(self.sink), e)
            self.last_outage_log = now
        metrics.RETRIES.inc()
        self.backoff = min(max(self.backoff * 2, 0.5), BACKOFF_MAX)
        self.retry_at = now + self.backoff

    def _gauges(self) -> None:
        metrics.WAITING.set(len(self.sink))
        for p, s in self.sources.items():
            metrics.LAG.labels(p).set(s.follower.lag_bytes())

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
        notify("RELOADING=1")
        try:
            new = self.reload_settings() if self.reload_settings else self.settings
            if new.store != self.settings.store:
                log.warning("reload: a new store takes a restart; keeping %s", self.store.url)
            self.settings = new
            for src in self.sources.values():
                parser = self._parser()
                parser._lmtp, parser._login_ip, parser.stats = src.parser._lmtp, src.parser._login_ip, \
                    src.parser.stats
                src.parser, src.prefix = parser, None
            self._add_sources(None, "beginning")
            log.info("reloaded configuration and pattern packs")
        except Exception as e:  # a bad config on reload must not stop a running daemon
            log.error("reload failed, keeping the previous configuration: %s", e)
        notify("READY=1")

    def _shutdown(self) -> None:
        """SIGTERM: a last flush and checkpoint (if the store takes it), then close everything."""
        if self._observer is not None:
            self._observer.stop()
        try:
            self.retry_at = 0.0
            self._flush()
        except Exception as e:  # the stop must finish within systemd's timeout whatever happens
            log.error("final flush failed: %s", e)
        if len(self.sink):
            log.warning("stopping with %d rows not stored; they are read again from the checkpoints "
                        "at the next start", len(self.sink))
        for s in self.sources.values():
            s.follower.close()
        log.info("stopped")


def _rotated(path: str, how: str) -> None:
    metrics.ROTATIONS.labels(path, how).inc()
    log.info("%s: rotated (%s)", path, how)


def _watchdog_interval() -> float:
    """Half of systemd's WatchdogSec (WATCHDOG_USEC), or 0 when the watchdog is off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 2e6


def _newest(sink: Coalescer) -> int:
    """Newest event time waiting in the coalescer (for the newest-stored-event gauge)."""
    best = 0
    for table in (sink.logins, sink.others):
        for _, value in table.items():
            best = max(best, value[0])
    return best


def _sessions(parser: Parser) -> dict:
    """The parser's open LMTP sessions and POP3 login IPs, JSON-friendly, for the checkpoint."""
    lmtp = {pid.hex(): (None if v[0] is None else v[0].hex()) for pid, v in parser._lmtp.open().items()}
    recent = list(parser._login_ip.items())[-SESSIONS_KEPT:]  # the newest: POP3 sessions last minutes
    login = [[svc, pid.hex(), None if ip is None else ip.hex()] for (svc, pid), ip in recent]
    return {"lmtp": lmtp, "login_ip": login}


def _restore_sessions(parser: Parser, d: dict) -> None:
    for pid, ip in d.get("lmtp", {}).items():
        parser._lmtp.start(bytes.fromhex(pid), None if ip is None else bytes.fromhex(ip))
    for svc, pid, ip in d.get("login_ip", []):
        parser._login_ip[(svc, bytes.fromhex(pid))] = None if ip is None else bytes.fromhex(ip)
