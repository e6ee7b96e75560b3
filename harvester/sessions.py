"""Session state: what joins one log line to another.

An LMTP delivery line has no client address: its session's Connect line, by pid, has the MTA's. A POP3
deletion, and a rawlog session, have none either: the Login line with the same mail-process pid has it.
`Sessions` holds both for one stream of lines. The parser (and the native scanner, sharing its objects)
fills it; the daemon saves it with each checkpoint and restores it on start; a backfill's stitcher
carries it from one worker's segment to the next; rawlog sessions are joined against it.
"""

from __future__ import annotations

from itertools import islice

from harvester import native

PID_STATE_MAX = 100_000  # remembered LMTP sessions / logins before the oldest half is dropped


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
        return {"lmtp": lmtp, "lmtp_deliveries": deliveries, "login_ip": login}

    def restore(self, d: dict) -> None:
        """Take back what `snapshot` gave (a restart from a checkpoint; one of an earlier version has no
        deliveries)."""
        deliveries = d.get("lmtp_deliveries", {})
        open_sessions = {bytes.fromhex(pid): [_unhex(ip), [_delivery(*done) for done in deliveries.get(pid, [])]]
                         for pid, ip in d.get("lmtp", {}).items()}
        self.absorb(open_sessions, {(svc, bytes.fromhex(pid)): _unhex(ip) for svc, pid, ip in d.get("login_ip", [])})

    # -- a backfill's workers ------------------------------------------------------------------
    def part(self) -> tuple[dict[bytes, list], dict[tuple[str, bytes], bytes | None]]:
        """What a worker hands on to the next segment: its open LMTP sessions (with their deliveries) and
        its login addresses (picklable)."""
        return self.lmtp.open(), self.login_ip

    def absorb(self, open_sessions: dict[bytes, list], login_ip: dict[tuple[str, bytes], bytes | None]) -> None:
        """Carry on from a later segment's `part` (or a checkpoint's): its sessions are the newest."""
        for pid, (ip, deliveries) in open_sessions.items():
            self.lmtp.start(pid, ip)
            for user, t, digits, node in deliveries:
                self.lmtp.deliver(pid, user, t, digits, node)
        for (service, pid), ip in login_ip.items():
            self.remember_login(service, pid, ip)


def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _unhex(s: str | None) -> bytes | None:
    return None if s is None else bytes.fromhex(s)


def _delivery(user: str | None, t: int, digits: int, node_hex: str | None, node_text: str | None) -> tuple:
    """A checkpoint's delivery back as the sessions keep it (see snapshot and _node)."""
    return _unhex(user), t, digits, node_text if node_hex is None else bytes.fromhex(node_hex)


def _node(node: bytes | str | None) -> tuple[str | None, str | None]:
    """A delivery's node as (hex of the line's host, or None; else the configured name): either type back."""
    return (node.hex(), None) if isinstance(node, bytes) else (None, node)
