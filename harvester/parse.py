"""Blocks of log lines -> events, with the LMTP/POP3 session state that joins lines.

The parser is fed whole blocks of complete lines and runs one compiled regex
over each (see patterns.py). With the native module (native/, harvester.native)
PCRE2's JIT runs that regex and the loop over its matches, so Python runs per
block, not per line; without it, Python runs for the lines that are events.
Session state (which MTA address an LMTP process is serving, which IP a POP3
process logged in from) lives in the parser, not per file, so a rotated set
that splits a session still joins it.
"""

from __future__ import annotations

import binascii
import builtins
import ipaddress
import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harvester import native
from harvester.coalesce import SAY_AGAIN_S, Coalescer
from harvester.events import (
    DELIVERY,
    KINDS,
    LOGIN,
    OTHER_KINDS,
    PROXY,
    SERVICE_RENAMES,
    SERVICES,
    SESSION_END,
    SESSION_START,
    SESSION_USER,
    WEBMAIL,
)
from harvester.patterns import FIELDS, Compiled, Pack, compile_pack
from harvester.sessions import CUT_MARK, CUT_MIN, PID_STATE_MAX, Held, Sessions, drop_oldest, is_cut
from harvester.timeparse import Clock, FutureError, TimeError

if TYPE_CHECKING:
    from harvester.sources.rawlog import Session  # what a source hands over, for rawlog_logins

log = logging.getLogger(__name__)


# Longest user name stored (bytes): Dovecot's SQL dict schema has VARCHAR(255), an RFC 5321 path
# at most 256 octets, and Cassandra refuses keys over 64 KiB on every retry. Longer is bad input.
MAX_USER_BYTES = 255
_SAMPLES = 5
# Kinds from a pack are equal strings, not the same objects; the hot loop compares with `is`.
_CANON = {k: k for k in KINDS}
# What the native scanner does with a kind (its role): kinds kept apart from logins share one; the others are
# their own (a row kind it has no handling for is refused there, and the file is parsed in Python). Its
# "python" role hands a line to Parser.event: a mail process's full user name (rare: only names Dovecot cut)
# and events whose detail names depend on the node's Dovecot version.
_ROLE = {k: "other" for k in OTHER_KINDS} | {SESSION_USER: "python"}
# A line's service text -> the one interned name (webmail is never a line's: it is decided by the client IP).
_SERVICE = {s.encode(): s for s in SERVICES if s != WEBMAIL} | {k.encode(): v for k, v in SERVICE_RENAMES.items()}
_UNKNOWN = "unknown"  # a node whose Dovecot version no login line has shown yet (a pack's `names` key)


@dataclass
class Problem:
    """One kind of bad input seen in one file: how often, and where first."""

    count: int = 0
    first_offset: int = 0
    sample: bytes = b""


@dataclass
class Stats:
    """What a run saw; summed over files."""

    lines: int = 0
    bytes: int = 0
    events: Counter = field(default_factory=Counter)  # (kind, service) -> n
    not_understood: Counter = field(default_factory=Counter)  # watch name -> n
    not_understood_samples: list[builtins.bytes] = field(default_factory=list)  # (`bytes` is a field here)
    bad: Counter = field(default_factory=Counter)  # reason -> n

    def add(self, other: Stats) -> None:
        """Sum another part's figures into these (a backfill split across processes)."""
        self.lines += other.lines
        self.bytes += other.bytes
        for k, v in other.events.items():
            self.events[k] += v
        self.not_understood.update(other.not_understood)
        room = _SAMPLES - len(self.not_understood_samples)
        self.not_understood_samples.extend(other.not_understood_samples[:max(room, 0)])
        self.bad.update(other.bad)


class Networks:
    """Membership test for client IPs against CIDRs, cached per distinct IP text."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self._cache: dict[bytes | str, bool] = {}

    def __contains__(self, ip: bytes | str) -> bool:
        hit = self._cache.get(ip)
        if hit is None:
            text = ip.decode("ascii", "replace") if isinstance(ip, bytes) else ip
            try:
                addr = ipaddress.ip_address(text.split("%", 1)[0])
                if addr.version == 6 and addr.ipv4_mapped:
                    addr = addr.ipv4_mapped
                hit = any(addr in n for n in self.nets)
            except ValueError:
                hit = False
            if len(self._cache) > PID_STATE_MAX:
                self._cache.clear()
            self._cache[ip] = hit
        return hit


def session_host(session: bytes) -> str | None:
    """The address a login session id carries, or None. Dovecot's login processes make the id from 48 bits of
    time, the client's port and address, base64-encoded. Dovecot 2.4 makes it when the connection opens, so it
    names a trusted webmail host even after its ID x-originating-ip replaced the client's address in rip (2.3
    makes it later, with the forwarded address)."""
    try:
        raw = binascii.a2b_base64(session)
    except (binascii.Error, ValueError):
        return None
    if len(raw) == 12:
        return str(ipaddress.IPv4Address(raw[8:]))
    if len(raw) == 24:
        return str(ipaddress.IPv6Address(raw[8:]))
    return None


class Webmail:
    """Which IMAP logins are webmail (service "webmail"): those whose client address (rip, or a proxy's
    real_rip) or whose session id's host (session_host) is in `networks`, the webmail servers; or whose local
    address (lip) is in `local_networks`, addresses only the webmail servers connect to."""

    def __init__(self, networks: Iterable[str] = (), local_networks: Iterable[str] = ()) -> None:
        self.clients = Networks(networks)
        self.local = Networks(local_networks)

    def __bool__(self) -> bool:
        return bool(self.clients.nets or self.local.nets)

    def __call__(self, ip: bytes | str | None, lip: bytes | None = None, session: bytes | None = None) -> bool:
        if self.clients.nets:
            if ip is not None and ip in self.clients:
                return True
            if session:
                host = session_host(session)
                if host is not None and host in self.clients:
                    return True
        return bool(self.local.nets) and lip is not None and lip in self.local


class Parser:
    """Turns blocks of complete lines into events, coalesced straight into a Coalescer."""

    def __init__(self, pack: Pack, *, node: str | None = None, webmail: Webmail | None = None,
                 max_user: int = MAX_USER_BYTES, sessions: Sessions | None = None) -> None:
        self.pack = pack
        self.max_user = max_user
        self.node = node
        self.webmail = webmail or Webmail()
        self.stats = Stats()
        self._compiled: dict[str, tuple[Compiled, Any]] = {}  # prefix -> (regex, native scanner or None)
        self._table: list = []
        self._regex: re.Pattern[bytes] | None = None
        self._scanner: Any = None  # harvester._fastscan.Scanner
        self._clock: Clock | None = None
        self._file = "-"
        self.problems: dict[str, Problem] = {}
        # (file, reason) -> (when it may be logged again, what was seen since it last was)
        self._said: dict[tuple[str, str], tuple[float, Problem | None]] = {}
        # LMTP sessions (deliveries re-emitted if Disconnect shows another address: XCLIENT ADDR) and
        # login addresses by pid (for events whose line has none: POP3 deletions, rawlog sessions).
        # Given: a reload's new parser carries on with the old one's.
        self.sessions = sessions or Sessions()
        # Segment mode (a backfill split across processes): events whose session began in an
        # earlier segment are kept here instead of being stored without an IP, and LMTP
        # sessions that end here without having begun here in `ended`; see segments.py.
        self.orphans: list | None = None
        self.ended: dict[bytes, bytes | None] = {}
        self._join_services = {
            e.service for e in pack.events.values()
            if e.kind in OTHER_KINDS and e.service and "(?P<ip>" not in e.regex
        }

    def remember_logins(self) -> None:
        """Also remember IMAP and POP3 logins' addresses by mail-process pid (rawlog sessions join them)."""
        self._join_services |= {"imap", "pop3", WEBMAIL}

    def follow_now(self) -> None:
        """A live file's lines are never later than now: move the year-inference reference to now."""
        if self._clock is not None:
            self._clock.set_reference(time.time())

    def count_skipped(self, block: bytes) -> None:
        """Count lines read but not parsed (before a file's first Dovecot line decided its prefix)."""
        self.stats.lines += block.count(b"\n") + (0 if not block or block.endswith(b"\n") else 1)
        self.stats.bytes += len(block)

    # -- per file -----------------------------------------------------------------
    def begin(self, name: str, prefix: str, clock: Clock) -> None:
        """Start a file (or stream) whose lines use `prefix` and `clock`."""
        known = self._compiled.get(prefix)
        if known is None:
            compiled = compile_pack(self.pack, prefix)
            known = self._compiled[prefix] = (compiled, self._native(compiled))
        compiled, self._scanner = known
        size = max(compiled.specs) + 1
        table: list = [None] * size
        for idx, spec in compiled.specs.items():
            table[idx] = (_CANON.get(spec.kind or ""), spec.service, spec.fields, spec.extras, spec.name,
                          spec.dialect, spec.names)
        self._table = table
        self._regex = compiled.regex
        self._clock = clock
        self._file = name

    @property
    def engine(self) -> str:
        """"native" when the PCRE2 scanner runs the current file's hot loop, else "python"."""
        return "python" if self._scanner is None else "native"

    def _native(self, compiled: Compiled):
        """The native scanner for one compiled (pack, prefix), or None to parse in Python."""
        lmtp = self.sessions.lmtp
        if not native.enabled() or not isinstance(lmtp, native.fastscan.Sessions):  # sessions made without it
            return None
        specs = [(idx, spec.kind, "python" if spec.names else _ROLE.get(spec.kind or "", spec.kind), spec.service,
                  dict(zip(FIELDS, spec.fields, strict=True)), spec.extras,
                  None if spec.dialect is None else builtins.str(spec.dialect))
                 for idx, spec in compiled.specs.items()]
        try:
            return native.fastscan.Scanner(
                compiled.regex.pattern.decode("utf-8"), specs, _SERVICE, self.sessions.dialects, (CUT_MIN, CUT_MARK),
                WEBMAIL, lmtp, self.sessions.login_ip, self._join_services,
                self.webmail if self.webmail else None, self.node, drop_oldest, self.sessions.limit,
                self.max_user)
        except (ValueError, UnicodeDecodeError) as e:  # a regex only Python's engine takes: slower, not wrong
            log.warning("pack %s, prefix %s: parsing in Python: %s", self.pack.name, compiled.prefix.name, e)
            return None

    def name(self, name: str) -> None:
        """Name the file that problems are reported against (before its first line is parsed)."""
        self._file = name

    def end(self) -> dict[str, Problem]:
        """Finish the current file (or a live file's batch): log one clear line per kind of bad input
        (for a file that keeps having it: once, then at most once a minute), return them."""
        now = time.monotonic()
        for reason, p in self.problems.items():
            key = (self._file, reason)
            at, held = self._said.get(key, (0.0, None))
            if held is not None:  # seen since the last line said: say it with this batch's
                p = Problem(held.count + p.count, held.first_offset, held.sample)
            if now < at:
                self._said[key] = (at, p)
                continue
            self._said[key] = (now + SAY_AGAIN_S, None)
            log.warning("%s: %d %s, skipped (first at byte %d: %r)", self._file, p.count,
                        _REASONS.get(reason, reason), p.first_offset, p.sample[:160])
        problems, self.problems = self.problems, {}
        return problems

    def problem(self, reason: str, offset: int, sample: bytes, count: int = 1) -> None:
        """Count bad input of one kind; the first occurrence is kept as the example."""
        if reason != "not_understood":
            self.stats.bad[reason] += count
        p = self.problems.get(reason)
        if p is None:
            p = self.problems[reason] = Problem(first_offset=offset, sample=sample)
        p.count += count

    # -- hot path -----------------------------------------------------------------
    def feed(self, block: bytes, sink: Coalescer, offset: int = 0) -> None:
        """Parse `block` (complete lines; the last may lack its newline) found at `offset`."""
        self.feed_text(b"\n" + block, len(block) + 1, sink, offset)

    def feed_text(self, text: bytes, end: int, sink: Coalescer, offset: int = 0) -> None:
        """Parse the lines of `text[1:end]`, where text[0] is b"\n" and the first line starts at `offset`.

        This is the form readers hand over without copying: a read that starts at
        the newline ending the previous block already has it, and `end` saves the
        slice. Events go straight into the sink's tables, still as bytes:
        decoding and validating user names waits until a row survives
        coalescing. The native scanner runs the loop when it is built (not for
        traces); `event` is the definition it follows, and it hands back the
        lines it leaves to Python.
        """
        stats = self.stats
        count = text.count(b"\n", 1, end) if self._scanner is None else native.fastscan.newlines(text, 1, end)
        stats.lines += count + (0 if end <= 1 or text[end - 1] == 10 else 1)
        stats.bytes += end - 1
        if text.find(b"\x00", 1, end) >= 0:
            block = self._strip_nul(text[1:end], offset)
            text, end = b"\n" + block, len(block) + 1
        start = 0
        regex = self._regex
        assert regex is not None, "begin() names the file's prefix first"
        if self._scanner is not None and sink.trace is None:
            def slow(pos: int) -> None:
                m = regex.match(text, pos, end)
                if m is not None:
                    self.event(m, text, sink, offset)

            start = self._scanner.feed(text, end, sink.logins, sink.others, stats.events, self._clock,
                                       self.orphans is not None, slow)
            if start >= end:
                return
        for m in regex.finditer(text, start, end):
            self.event(m, text, sink, offset)

    def event(self, m: re.Match[bytes], text: bytes, sink: Coalescer, offset: int) -> None:
        """What one matched line does to the session state and the sink's tables."""
        kind, service, fields, extras, name, dialect, names = self._table[m.lastindex or 0]
        if kind is None:
            self._not_understood(text, m.start() + 1, name, offset)
            return
        ts, frac, tzs, host, user, svc, ip, pid, real_ip = m.group(*fields)
        clock = self._clock
        assert clock is not None, "begin() gives the file's clock first"
        t = clock.cache.get(ts) if tzs is None else clock.cache.get(ts + tzs)
        if t is None:
            try:
                t = clock.seconds(ts, tzs)
            except TimeError as e:
                self.problem("future" if isinstance(e, FutureError) else "timestamp", offset + m.start(),
                             _line(text, m.start() + 1))
                return
        if user is not None and len(user) > self.max_user:
            self.problem("long_user", offset + m.start(), _line(text, m.start() + 1))
            return
        if frac is None:
            digits = 0
        else:
            t += int(frac[:6].ljust(6, b"0"))
            digits = min(len(frac), 6)
        if svc is not None:
            service = _SERVICE.get(svc) or svc.decode("utf-8", "replace")
        node = self.node if host is None else host
        counts = self.stats.events
        trace = sink.trace
        if kind is LOGIN or kind is PROXY:
            if service == "imap" and self.webmail and self.webmail(real_ip or ip, *self._webmail_extras(m, extras)):
                service = WEBMAIL
            if service in self._join_services and pid is not None:
                self.sessions.remember_login(service, pid, ip)
            if dialect is not None:
                self.sessions.dialects[node] = dialect
            if pid is not None and user is not None and is_cut(user):  # completed by its mail process's lines
                counts[kind, service] = counts.get((kind, service), 0) + 1
                self._store_held(sink, self.sessions.hold(pid, Held(user, service, t, digits, ip, node,
                                                                     time.monotonic())))
                return
            table = sink.logins
            second = service
        elif kind is DELIVERY:
            if pid is not None:
                state, session_ip = self.sessions.lmtp.deliver(pid, user, t, digits, node)
                if state == "open":
                    ip = session_ip
                elif state == "absent" and self.orphans is not None:  # session began in an earlier segment
                    counts[kind, service] = counts.get((kind, service), 0) + 1
                    self.orphans.append((kind, service, user, t, digits, node, pid, None))
                    return
            table = sink.logins
            second = service
        elif kind is SESSION_USER:
            if pid is not None and user is not None:
                self._complete(pid, user, sink, t, digits, node, service)
            return
        elif kind is SESSION_START:
            self.sessions.lmtp.start(pid, None if ip == b"local" else ip)
            return
        elif kind is SESSION_END:
            session = self.sessions.lmtp.pop(pid)
            if ip == b"local":
                ip = None
            if session is None and self.orphans is not None:  # it began in an earlier segment
                self.ended.setdefault(pid, ip)
                self.sessions.lmtp.close(pid)  # later deliveries of this pid without Connect get no IP
            if session and session[0] != ip:  # XCLIENT changed the address: re-stamp deliveries
                for u, t0, d0, n0 in session[1]:
                    sink.logins.put(u, service, t0, d0, ip, n0, service)
                    if trace is not None:
                        trace.append((DELIVERY, service, u, t0, d0, ip, n0, None))
            return
        else:
            if pid is not None and user is not None and len(user) > CUT_MIN:
                self._complete(pid, user, sink, t, digits, node, service)
            if ip is None and pid is not None:
                ip = self.sessions.login_address(service, pid)
                if ip is None and self.orphans is not None and not self.sessions.knows_login(service, pid) \
                        and service in self._join_services and user:
                    counts[kind, service] = counts.get((kind, service), 0) + 1
                    # Its login (in an earlier job) also tells the node's version: the stitcher words it.
                    pairs = _pairs(m, extras)
                    self.orphans.append((kind, service, user, t, digits, node, pid,
                                         (pairs, names) if names else detail_text(pairs) or None))
                    return
            table = sink.others
            second = kind
        ck = (kind, service)
        counts[ck] = counts.get(ck, 0) + 1
        if not user:  # failures before a user name was known: counted, never stored
            return
        detail = None
        if extras and (table is sink.others or trace is not None):  # a login row keeps no detail
            detail = detail_text(_pairs(m, extras), self._names(names, node))
        table.put(user, second, t, digits, ip, node, service, detail if table is sink.others else None)
        if trace is not None:
            trace.append((kind, service, user, t, digits, ip, node, detail))

    # -- helpers ------------------------------------------------------------------
    @staticmethod
    def _webmail_extras(m: re.Match[bytes], extras) -> tuple[bytes | None, bytes | None]:
        """A login line's lip and session, where its event's regex has them."""
        found = dict(extras)
        return (m.group(found["lip"]) if "lip" in found else None,
                m.group(found["session"]) if "session" in found else None)

    def _names(self, names: dict[str, dict[str, str]], node) -> dict[str, str] | None:
        return names_for(self.sessions, names, node)

    def _complete(self, pid: bytes, full: bytes, sink: Coalescer, t: int, digits: int, node, service: str) -> None:
        """A mail process's line gave its whole user name: store its held login under it. In segment mode a
        name with no held login here may complete one of an earlier segment (the stitcher tries)."""
        held = self.sessions.complete(pid, full, node)
        if held is not None:
            self._store_held(sink, [held._replace(user=full)])
        elif self.orphans is not None and len(full) > CUT_MIN:
            self.orphans.append((SESSION_USER, service, full, t, digits, node, pid, None))

    def _store_held(self, sink: Coalescer, held: list[Held]) -> None:
        """Store held logins as they are now (completed, or under the cut name when nothing completed them)."""
        for h in held:
            sink.logins.put(h.user, h.service, h.time_us, h.digits, h.ip, h.node, h.service)
            if sink.trace is not None:
                sink.trace.append((LOGIN, h.service, h.user, h.time_us, h.digits, h.ip, h.node, None))

    def release_held(self, sink: Coalescer, before: float | None = None) -> int:
        """Store the logins held for completion (all, or those held before monotonic time `before`) under the
        name the log gave, ending in "...": no line of their mail process came to complete them."""
        held = self.sessions.release(before)
        self._store_held(sink, held)
        return len(held)

    def _not_understood(self, text: bytes, start: int, name: str, offset: int) -> None:
        watch = name.split(":", 1)[1]
        self.stats.not_understood[watch] += 1
        samples = self.stats.not_understood_samples
        line = _line(text, start)
        if len(samples) < _SAMPLES:
            samples.append(line)
        self.problem("not_understood", offset + start - 1, line)

    def _strip_nul(self, block: bytes, offset: int) -> bytes:
        """Drop what precedes the last NUL of each line (a crash or copytruncate hole)."""
        lines = block.split(b"\n")
        pos = 0
        for i, line in enumerate(lines):
            if b"\x00" in line:
                shown = _NULS.sub(lambda m: b"<%d NUL bytes>" % len(m.group()), line)
                self.problem("nul", offset + pos, shown[:160])
                lines[i] = line[line.rindex(b"\x00") + 1:]
            pos += len(line) + 1
        return b"\n".join(lines)


_REASONS = {
    "nul": "line(s) with NUL bytes (the text before the NULs)",
    "utf8": "row(s) whose user name is not valid UTF-8",
    "timestamp": "line(s) with an impossible timestamp",
    "future": "line(s) dated further ahead than future_tolerance_s (they would win over every real login)",
    "long_user": "line(s) whose user name is longer than max_user_bytes",
    "long_line": "line(s) longer than max_line_bytes",
    "not_understood": "line(s) that look like logins or deliveries but match no pattern",
}


_NULS = re.compile(rb"\x00+")


def _line(text: bytes, start: int) -> bytes:
    end = text.find(b"\n", start)
    return text[start:end if end >= 0 else len(text)][:300]


def _pairs(m: re.Match[bytes], extras: list[tuple[str, int]]) -> list[tuple[str, str]]:
    """A pack's other named groups and their values (an optional group that did not take part: empty)."""
    return [(k, (m.group(i) or b"").decode("utf-8", "replace")) for k, i in extras]


def detail_text(pairs: list[tuple[str, str]], names: dict[str, str] | None = None) -> str:
    """An event's detail, "name=value ...", each group under its name for the writer's Dovecot version
    (`names`). The one place both the row's detail and a segment's orphan events are made from."""
    names = names or {}
    return " ".join(f"{names.get(k, k)}={v}" for k, v in pairs)


def names_for(sessions: Sessions, names: dict[str, dict[str, str]], node) -> dict[str, str] | None:
    """An event's detail names (a pack's `names`) for the Dovecot version its node's login lines show."""
    return names.get(sessions.dialects.get(node, _UNKNOWN)) if names else None


def rawlog_logins(sessions: Iterable[Session], sink: Coalescer, parser: Parser, node: str,
                  joins: Sequence[Sessions] | None = None) -> tuple[int, int]:
    """Put rawlog sessions (sources/rawlog.py) into the coalescer as logins. A session without an address
    takes the one of the maillog's Login line with the same mail-process pid, from `joins` (default: what
    `parser` read).
    Returns (sessions, of which without an address)."""
    n = no_ip = 0
    joins = [parser.sessions] if joins is None else joins
    for s in sessions:
        ip = s.ip.encode() if s.ip else None
        service = s.service
        if ip is None:
            pid = s.pid.encode()
            ip, service = _joined(joins, service, pid)
        elif service == "imap" and parser.webmail(ip):
            service = WEBMAIL
        if ip is None:
            no_ip += 1
        sink.logins.put(s.user.encode("utf-8", "surrogateescape"), service, s.time_us, s.digits, ip, node, service)
        parser.stats.events[("login", service)] += 1
        n += 1
    return n, no_ip


def _joined(joins: Sequence[Sessions], service: str, pid: bytes) -> tuple[bytes | None, str]:
    """The address of the Login line of `pid` (an IMAP session may have logged in as webmail), and its service."""
    for sessions in joins:
        for svc in (WEBMAIL, service) if service == "imap" else (service,):
            hit = sessions.login_address(svc, pid)
            if hit is not None:
                return hit, svc
    return None, service
