"""Session state: what joins one log line to another.

An LMTP delivery line has no client address: its session's Connect line, by pid, has the MTA's. A POP3
deletion, and a rawlog session, have none either: the Login line with the same mail-process pid has it.
A login line cuts a user name longer than 80 bytes; the same mail process's own lines have it whole, so
such a login is held (by mail-process pid) until one of them completes it. And a POP3 logout's del=N/M
means messages or bytes depending on the Dovecot version, which the node's login lines tell.
`Sessions` holds all of that for one stream of lines. The parser (and the native scanner, sharing its objects)
fills it; the daemon saves it with each checkpoint and restores it on start; a backfill's stitcher
carries it from one worker's segment to the next; rawlog sessions are joined against it.
"""

from __future__ import annotations

import time
from itertools import islice
from typing import NamedTuple

from harvester import native

PID_STATE_MAX = 100_000  # remembered LMTP sessions / logins before the oldest half is dropped

# Dovecot's login processes print a user name through str_sanitize(name, 80): a longer one becomes its
# first whole characters of at most 77 bytes and "...". A name printed so is held for completion.
CUT_MARK = b"..."
CUT_MIN = 77 - 3 + len(CUT_MARK)  # the shortest such name: 74 bytes (a 4-byte character cut off) + mark
CUT_HELD_MAX = 10_000  # held logins; past it the oldest are stored under the cut name
# How long `run` holds such a login for its mail process's first line (usually its logout, or a mail_log
# line) before storing it under the cut name; a backfill holds it to the end of its input.
CUT_WAIT_S = 3600.0


def is_cut(user: bytes) -> bool:
    """Whether a login line's user name is one Dovecot cut (see CUT_MARK)."""
    return len(user) >= CUT_MIN and user.endswith(CUT_MARK)


class Held(NamedTuple):
    """A login whose user name the log cut, waiting for its mail process to give the whole name."""

    user: bytes  # as printed, ending in CUT_MARK
    service: str
    time_us: int
    digits: int
    ip: bytes | None
    node: bytes | str | None
    since: float  # time.monotonic() when it was held (a restored one: when it was restored)

    def completed_by(self, full: bytes) -> bool:
        return len(full) > len(self.user) and full.startswith(self.user[:-len(CUT_MARK)])


def drop_oldest(d: dict) -> None:
    """Bound session state: forget the older half (dicts keep insertion order)."""
    for k in list(islice(d, len(d) // 2)):
        del d[k]


class PySessions:
    """LMTP sessions by pid, the contract of the native Sessions (native/src/sessions.rs).

    pid -> [MTA address, [(user, time_us, digits, node), ...]] while open, None once closed
    (segment mode). start and close make a pid the newest; past `limit` pids the older half goes.
    """

    def __init__(self, limit: int) -> None:
        self._d: dict[bytes, list | None] = {}
        self._limit = limit

    def __len__(self) -> int:
        return len(self._d)

    def start(self, pid: bytes, ip: bytes | None) -> None:
        self._d.pop(pid, None)
        self._d[pid] = [ip, []]
        if len(self._d) > self._limit:
            drop_oldest(self._d)

    def deliver(self, pid: bytes, user: bytes | None, t: int, digits: int, node) -> tuple[str, bytes | None]:
        """Record a delivery of an open session: ("open", ip), else ("closed" | "absent", None)."""
        if pid not in self._d:
            return "absent", None
        session = self._d[pid]
        if session is None:
            return "closed", None
        if len(session[1]) < 1000:
            session[1].append((user, t, digits, node))
        return "open", session[0]

    def pop(self, pid: bytes) -> tuple[bytes | None, list] | None:
        session = self._d.pop(pid, None)
        return None if session is None else (session[0], session[1])

    def close(self, pid: bytes) -> None:
        self._d.pop(pid, None)
        self._d[pid] = None

    def open(self) -> dict[bytes, list]:
        return {k: v for k, v in self._d.items() if v is not None}

    def state(self) -> dict[bytes, tuple | None]:
        return {k: None if v is None else (v[0], v[1]) for k, v in self._d.items()}


class Sessions:
    """The state that joins the lines of one stream (see the module's docstring).

    `lmtp`: LMTP sessions by pid (native/src/sessions.rs when built, else PySessions, the same contract).
    `login_ip`: (service, pid) -> the address a login came from, newest last, at most `limit`."""

    def __init__(self, limit: int = PID_STATE_MAX) -> None:
        self.limit = limit
        self.lmtp = native.fastscan.Sessions(limit) if native.enabled() else PySessions(limit)
        self.login_ip: dict[tuple[str, bytes], bytes | None] = {}
        # (node, mail-process pid) -> its login, held (see Held); those released as cut, for a late completion
        self.cut: dict[tuple, Held] = {}
        self.released: dict[tuple, Held] = {}
        # node (a line's host, or the configured name) -> the Dovecot version its login lines show
        self.dialects: dict[bytes | str | None, str] = {}

    def hold(self, pid: bytes, held: Held) -> list[Held]:
        """Hold a login with a cut name; returns the held ones it pushed out, to store under the cut name:
        one of the same node and pid (its process ended without a line naming it), or the oldest past
        CUT_HELD_MAX."""
        out = []
        old = self.cut.pop((held.node, pid), None)
        if old is not None:
            out.append(old)
        self.cut[held.node, pid] = held
        if len(self.cut) > CUT_HELD_MAX:
            out += [self.cut.pop(k) for k in list(islice(self.cut, len(self.cut) // 2))]
        return out

    def complete(self, pid: bytes, full: bytes, node) -> Held | None:
        """The login of mail process `pid` of `node` that `full` (a name its own line gave) completes, taken:
        a held one, or one already stored under its cut name (a session longer than the wait)."""
        for table in (self.cut, self.released):
            held = table.get((node, pid))
            if held is not None and held.completed_by(full):
                return table.pop((node, pid))
        return None

    def release(self, before: float | None = None) -> list[Held]:
        """Take the held logins (only those held before monotonic time `before`, if given): no line
        completed them, so they are stored under the cut name; a later completion still stores the whole."""
        keys = [k for k, h in self.cut.items() if before is None or h.since < before]
        out = [self.cut.pop(k) for k in keys]
        for k, h in zip(keys, out, strict=True):
            self.released[k] = h
        if len(self.released) > CUT_HELD_MAX:
            drop_oldest(self.released)
        return out

    def remember_login(self, service: str, pid: bytes, ip: bytes | None) -> None:
        self.login_ip[service, pid] = ip
        if len(self.login_ip) > self.limit:
            drop_oldest(self.login_ip)

    def login_address(self, service: str, pid: bytes) -> bytes | None:
        """The address of the login of `service` by mail process `pid`, if it is known."""
        return self.login_ip.get((service, pid))

    def knows_login(self, service: str, pid: bytes) -> bool:
        return (service, pid) in self.login_ip

    # -- checkpoints ---------------------------------------------------------------------
    def snapshot(self, login_ips: int) -> dict:
        """Open LMTP sessions (address, and in "lmtp_deliveries" the deliveries so far: a Disconnect read
        after a restart may re-stamp them) and the newest `login_ips` login addresses by pid, JSON-friendly
        (a checkpoint's). "lmtp" keeps the earlier versions' form, so a downgrade still reads it."""
        open_ = self.lmtp.open().items()
        lmtp = {pid.hex(): _hex(ip) for pid, (ip, _) in open_}
        deliveries = {pid.hex(): [[_hex(user), t, digits, *_node(node)] for user, t, digits, node in done]
                      for pid, (_, done) in open_ if done}
        recent = list(self.login_ip.items())[-login_ips:]
        login = [[svc, pid.hex(), _hex(ip)] for (svc, pid), ip in recent]
        cut = [[pid.hex(), h.user.hex(), h.service, h.time_us, h.digits, _hex(h.ip), *_node(h.node)]
               for (_, pid), h in self.cut.items()]
        dialects = [[*_node(node), d] for node, d in self.dialects.items()]
        return {"lmtp": lmtp, "lmtp_deliveries": deliveries, "login_ip": login, "cut": cut, "dialects": dialects}

    def restore(self, d: dict) -> None:
        """Take back what `snapshot` gave (a restart from a checkpoint; one of an earlier version has no
        deliveries)."""
        deliveries = d.get("lmtp_deliveries", {})
        open_sessions = {bytes.fromhex(pid): [_unhex(ip), [_delivery(*done) for done in deliveries.get(pid, [])]]
                         for pid, ip in d.get("lmtp", {}).items()}
        self.absorb(open_sessions, {(svc, bytes.fromhex(pid)): _unhex(ip) for svc, pid, ip in d.get("login_ip", [])})
        now = time.monotonic()
        for pid, user, service, t, digits, ip, node_hex, node_text in d.get("cut", []):
            self.hold(bytes.fromhex(pid), Held(bytes.fromhex(user), service, t, digits, _unhex(ip),
                                               _unnode(node_hex, node_text), now))
        self.dialects.update((_unnode(node_hex, node_text), dialect)
                             for node_hex, node_text, dialect in d.get("dialects", []))

    # -- a backfill's workers ------------------------------------------------------------------
    def part(self) -> tuple[dict[bytes, list], dict[tuple[str, bytes], bytes | None], dict[tuple, Held], dict]:
        """What a worker hands on to the next segment: its open LMTP sessions (with their deliveries), its
        login addresses, its held logins and its nodes' Dovecot versions (picklable)."""
        return self.lmtp.open(), self.login_ip, self.cut, self.dialects

    def absorb(self, open_sessions: dict[bytes, list], login_ip: dict[tuple[str, bytes], bytes | None],
               cut: dict[tuple, Held] | None = None, dialects: dict | None = None) -> list[Held]:
        """Carry on from a later segment's `part` (or a checkpoint's): its sessions are the newest. Returns
        the held logins its own pushed out (to store under their cut name)."""
        for pid, (ip, deliveries) in open_sessions.items():
            self.lmtp.start(pid, ip)
            for user, t, digits, node in deliveries:
                self.lmtp.deliver(pid, user, t, digits, node)
        for (service, pid), ip in login_ip.items():
            self.remember_login(service, pid, ip)
        pushed = [old for (_, pid), held in (cut or {}).items() for old in self.hold(pid, held)]
        self.dialects.update(dialects or {})
        return pushed


def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _unhex(s: str | None) -> bytes | None:
    return None if s is None else bytes.fromhex(s)


def _delivery(user: str | None, t: int, digits: int, node_hex: str | None, node_text: str | None) -> tuple:
    """A checkpoint's delivery back as the sessions keep it (see snapshot and _node)."""
    return _unhex(user), t, digits, _unnode(node_hex, node_text)


def _node(node: bytes | str | None) -> tuple[str | None, str | None]:
    """A delivery's node as (hex of the line's host, or None; else the configured name): either type back."""
    return (node.hex(), None) if isinstance(node, bytes) else (None, node)


def _unnode(node_hex: str | None, node_text: str | None) -> bytes | str | None:
    return node_text if node_hex is None else bytes.fromhex(node_hex)
