"""Synthetic Dovecot 2.3.19 maillog corpus with an independent oracle of the expected rows.

The generator writes syslog-traditional lines (``Mon DD HH:MM:SS host dovecot: <message>``, local
time of ``tz``) mixed with realistic Postfix/amavis/opendkim noise, and records, as it writes each
line, which (user, service) rows a correct harvester must end up with.  It never parses its own
output.  Usage from the command line::

    python -m tests.corpus DIR --lines 20000 --users 2000 --rotate-every 5000

writes the maillog files and ``DIR/expected.jsonl``.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import gzip
import heapq
import ipaddress
import json
import lzma
import os
import pathlib
import random
from base64 import b64encode
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

__all__ = [
    "COMPRESSIONS",
    "EVENT_KINDS",
    "ODD_USERS",
    "Corpus",
    "Row",
    "generate",
    "main",
    "write_expected",
    "write_maillog",
]

# Usernames that real Dovecot prints raw (no escaping) and that must each log in at least once.
ODD_USERS: tuple[str, ...] = (
    "a>b,c d",
    "o'brien@example.com",
    "ÄÖÜ@exämple.de",
    "user+tag@example.com",
    "x=y<z",
    "longname." + "x" * 59 + "@example.com",  # exactly 80 characters: str_sanitize keeps it whole
)
assert len(ODD_USERS[-1]) == 80

EVENT_KINDS: tuple[str, ...] = (
    "login",
    "proxy",
    "delivery",
    "auth_fail",
    "aborted",
    "refused",
    "pop3_delete",
)
COMPRESSIONS: tuple[str, ...] = ("", ".gz", ".bz2", ".xz", ".zst")
FORBIDDEN_IN_NOISE: tuple[str, ...] = (
    "imap-login:",
    "pop3-login:",
    "submission-login:",
    "managesieve-login:",
    "lmtp(",
    "pop3(",
    "dovecot:",
)

_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_LIP4 = "10.0.0.1"
_LIP6 = "2001:db8::1"
_BACKENDS = ("10.0.0.5", "10.0.0.6")
_PROXY_PORT = {"imap": 143, "pop3": 110}
_CHUNK = 65536  # lines per write block
_TIE_SERVICES = ("imap", "lmtp", "pop3", "webmail", "imap", "submission", "managesieve", "lmtp")

# Dovecot mix: (kind, share of Dovecot "starts", lines each start writes on average).
_LMTP_DELIVERIES = ((1, 0.55), (2, 0.25), (3, 0.12), (4, 0.08))
_MIX: tuple[tuple[str, float, float], ...] = (
    ("imap", 0.40, 2.0),
    ("pop3", 0.07, 2.0),
    ("submission", 0.05, 2.0),
    ("managesieve", 0.02, 2.0),
    ("lmtp", 0.24, 2.0 + sum(n * w for n, w in _LMTP_DELIVERIES)),
    ("auth_fail", 0.10, 1.0),
    ("aborted", 0.07, 1.0),
    ("refused", 0.02, 1.0),
    ("proxy", 0.03, 1.5),
)

# Actions carried by queued lines (last element of a heap entry), applied when the line is written.
_ACT_DELIVERY = 0
_ACT_RELEASE = 1
_ACT_POP3_DELETE = 2

_Ip = tuple[str, bytes, str, bool]  # (text, packed, lip, in a webmail network)


@dataclass(frozen=True)
class Row:
    """One expected store row: the newest login/proxy/delivery of a (user, service)."""

    user: str
    service: str
    last_login_us: int  # UTC epoch microseconds (whole seconds: syslog timestamps have no fraction)
    ip: str | None


@dataclass
class Corpus:
    """What was written and what a correct harvester must find in it."""

    files: list[pathlib.Path]  # oldest first, the order a reader must process them
    rows: dict[tuple[str, str], Row]  # (user, service) -> expected row
    lines: int  # total lines written
    events: dict[str, int]  # counts by kind (EVENT_KINDS)
    ties: list[tuple[str, str]] = field(default_factory=list)  # keys whose row came from a same-second tie


# --------------------------------------------------------------------------- small helpers


def _login_session(usecs: int, port: int, packed: bytes) -> str:
    """Dovecot's login session id: base64(low 48 bits of usecs LE, port LE, IP bytes)."""
    return b64encode(
        (usecs & 0xFFFFFFFFFFFF).to_bytes(6, "little") + port.to_bytes(2, "little") + packed
    ).decode()


def _make_ip(text: str, webnets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> _Ip:
    """Canonical IP entry (inet_ntop form, packed bytes, matching lip, webmail flag)."""
    addr = ipaddress.ip_address(text)
    web = any(addr.version == net.version and addr in net for net in webnets)
    if addr.version == 6:
        canon = addr.compressed
        lip = "::1" if canon == "::1" else _LIP6
    else:
        canon = str(addr)
        lip = "127.0.0.1" if canon.startswith("127.") else _LIP4
    return (canon, addr.packed, lip, web)


def _rfc3339(usecs: int) -> str:
    """UTC RFC 3339 text of epoch microseconds, fraction only when there is one."""
    dt = datetime.fromtimestamp(usecs // 1_000_000, UTC)
    frac = usecs % 1_000_000
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac:06d}" if frac else "") + "Z"


_PUBLIC_V4_FIRST = (
    5,
    24,
    31,
    37,
    46,
    62,
    67,
    68,
    71,
    73,
    77,
    78,
    79,
    80,
    81,
    82,
    83,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
    91,
    92,
    93,
    94,
    95,
    98,
    99,
    109,
    151,
    176,
    178,
    185,
    188,
    193,
    194,
    195,
    212,
    213,
    217,
)
_V6_PREFIXES = ("2001:db8", "2a02:8108", "2a01:4f8", "2003:e5", "2600:1700", "2a00:1450")


def _noise_pool(rng: random.Random, size: int, users: Sequence[str]) -> list[str]:
    """Realistic non-Dovecot mail-system messages ('prog[pid]: text'), without the syslog prefix."""
    rnd = rng.random
    b52 = "BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz0123456789"
    senders = (
        "newsletter@shop.example.net",
        "noreply@github.com",
        "billing@provider.example",
        "alice@example.org",
        "bounce-1234@mailer.example.net",
        "calendar-notification@google.com",
        "bob@example.co.uk",
    )
    relays = (
        ("mail-ej1-f54.google.com", "209.85.218.54"),
        ("mail-wm1-f48.google.com", "209.85.128.48"),
        ("mout.gmx.net", "212.227.15.15"),
        ("mail.example.net", "198.51.100.23"),
        ("unknown", "185.220.101.7"),
        ("out1.mailer.example", "203.0.113.77"),
        ("unknown", "45.125.66.10"),
        ("mx.example.org", "192.0.2.44"),
    )
    spam_ips = ("185.234.219.12", "45.125.66.10", "141.98.10.60", "80.94.95.81", "193.32.162.74")

    def qid() -> str:
        if rnd() < 0.7:  # long queue ids (enable_long_queue_ids = yes)
            return "4" + "".join(rng.choice(b52) for _ in range(rng.randint(11, 14)))
        return "".join(rng.choice("0123456789ABCDEF") for _ in range(rng.randint(9, 11)))

    def msgid() -> str:
        r = rnd()
        if r < 0.4:
            return f"<CA{''.join(rng.choice(b52) for _ in range(40))}@mail.gmail.com>"
        if r < 0.7:
            return f"<{rng.randint(10**13, 10**14)}.{rng.randint(1000, 99999)}@{rng.choice(relays)[0]}>"
        return f"<{rng.getrandbits(128):032x}@example.net>"

    def user() -> str:
        return users[int(rnd() ** 2 * len(users))]

    out: list[str] = []
    smtpd_pids = [rng.randint(2000, 60000) for _ in range(12)]
    qmgr, pickup, anvil = rng.randint(900, 1500), rng.randint(1500, 3000), rng.randint(3000, 5000)
    amavis_pids = [rng.randint(5000, 9000) for _ in range(4)]
    dkim = rng.randint(600, 900)
    while len(out) < size:
        q = qid()
        host, hip = rng.choice(relays)
        sp = rng.choice(smtpd_pids)
        r = rnd()
        if r < 0.09:
            s = f"postfix/smtpd[{sp}]: connect from {host}[{hip}]"
        elif r < 0.18:
            s = f"postfix/smtpd[{sp}]: {q}: client={host}[{hip}]"
        elif r < 0.25:
            s = (
                f"postfix/smtpd[{sp}]: disconnect from {host}[{hip}] ehlo=2 starttls=1 mail=1 rcpt=1 "
                f"{rng.choice(('data=1', 'bdat=1'))} quit=1 commands={rng.choice((7, 8))}"
            )
        elif r < 0.29:
            ip = rng.choice(spam_ips)
            s = (
                f"postfix/smtpd[{sp}]: NOQUEUE: reject: RCPT from unknown[{ip}]: 554 5.7.1 "
                f"<spam{rng.randint(1, 999)}@example.biz>: Relay access denied; from=<x@example.biz> "
                f"to=<{user()}> proto=ESMTP helo=<WIN-{rng.getrandbits(32):08X}>"
            )
        elif r < 0.33:
            ip = rng.choice(spam_ips)
            s = f"postfix/smtpd[{sp}]: warning: unknown[{ip}]: SASL LOGIN authentication failed: UGFzc3dvcmQ6"
        elif r < 0.36:
            s = (
                f"postfix/submission/smtpd[{sp}]: {q}: client=unknown[{rng.choice(relays)[1]}], "
                f"sasl_method=PLAIN, sasl_username={user()}"
            )
        elif r < 0.38:
            s = f"postfix/smtpd[{sp}]: lost connection after AUTH from unknown[{rng.choice(spam_ips)}]"
        elif r < 0.48:
            s = (
                f"postfix/qmgr[{qmgr}]: {q}: from=<{rng.choice(senders)}>, size={rng.randint(900, 250000)}, "
                f"nrcpt={rng.choice((1, 1, 1, 2))} (queue active)"
            )
        elif r < 0.57:
            s = f"postfix/qmgr[{qmgr}]: {q}: removed"
        elif r < 0.66:
            s = f"postfix/cleanup[{rng.randint(3000, 60000)}]: {q}: message-id={msgid()}"
        elif r < 0.68:
            s = f"postfix/pickup[{pickup}]: {q}: uid=33 from=<www-data>"
        elif r < 0.79:
            u = user()
            lid = b64encode(rng.randbytes(16)).decode()[:22]
            d1, d2, d3 = rnd() * 0.05, rnd() * 0.01, rnd() * 0.02
            d4 = rnd() * 0.08
            s = (
                f"postfix/lmtp[{rng.randint(3000, 60000)}]: {q}: to=<{u}>, "
                f"relay=mail.example.com[private/dovecot-lmtp], delay={d1 + d2 + d3 + d4:.2f}, "
                f"delays={d1:.2g}/{d2:.2g}/{d3:.2g}/{d4:.2g}, dsn=2.0.0, "
                f"status=sent (250 2.0.0 <{u}> {lid} Saved)"
            )
        elif r < 0.87:
            ap = rng.choice(amavis_pids)
            s = (
                f"amavis[{ap}]: ({ap:05d}-{rng.randint(1, 99):02d}) Passed CLEAN {{RelayedInbound}}, "
                f"[{hip}]:{rng.randint(1024, 65535)} [{hip}] <{rng.choice(senders)}> -> <{user()}>, "
                f"Queue-ID: {q}, Message-ID: {msgid()}, "
                f"mail_id: {''.join(rng.choice(b52) for _ in range(12))}, "
                f"Hits: {rnd() * 4 - 1.5:.3f}, size: {rng.randint(900, 250000)}, queued_as: {qid()}, "
                f"{rng.randint(80, 2500)} ms"
            )
        elif r < 0.93:
            s = f"opendkim[{dkim}]: {q}: DKIM verification successful"
        elif r < 0.97:
            selector = rng.choice(("20230601", "google", "selector1", "mail"))
            domain = rng.choice(("gmail.com", "gmx.net", "example.net", "github.com", "example.org"))
            s = f"opendkim[{dkim}]: {q}: s={selector} d={domain} SSL"
        else:
            s = (
                f"postfix/anvil[{anvil}]: statistics: max connection rate {rng.randint(1, 20)}/60s "
                f"for (smtp:{rng.choice(spam_ips)}) at Dec 31 "
                f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00"
            )
        if any(bad in s for bad in FORBIDDEN_IN_NOISE):  # pragma: no cover - guards the templates above
            raise AssertionError(f"noise line contains a Dovecot marker: {s}")
        out.append(s)
    return out


# --------------------------------------------------------------------------- the generator


class _Gen:
    """Builds lines in order and tracks, per emitted line, the expected rows and event counts."""

    def __init__(
        self,
        *,
        lines: int,
        users: int,
        seed: int,
        tz: str,
        start: str | None,
        seconds_per_line: float,
        webmail_networks: Sequence[str],
        noise_ratio: float,
        host: str,
        skew: float = 2.0,
    ) -> None:
        if lines < 1:
            raise ValueError("lines must be >= 1")
        if users < 1:
            raise ValueError("users must be >= 1")
        if seconds_per_line < 0:
            raise ValueError("seconds_per_line must be >= 0")
        if not 0.0 <= noise_ratio <= 1.0:
            raise ValueError("noise_ratio must be within [0, 1]")
        self.n = lines
        self.skew = skew  # 2: a few accounts are busy, many rare; 1: every account alike
        self.tz = ZoneInfo(tz)
        self.host = host
        self.spl = float(seconds_per_line)
        self.t0 = self._start_epoch(start)
        self.rng = random.Random(seed)
        prng = random.Random(f"corpus-pools-{seed}")
        self.webnets = [ipaddress.ip_network(net, strict=False) for net in webmail_networks]

        # users: the top `ties` names of the pool only ever log in once, in their same-second tie
        n_ties = min(max(4, lines // 2500), 40, users // 2)
        names = [f"user{k}@example.com" for k in range(1, users + 1)]
        self.tie_users = names[users - n_ties :]
        self.pool = names[: users - n_ties]
        fail_names = [
            "admin",
            "test",
            "info@example.com",
            "root",
            "support@example.com",
            "bad?user",
            "u" * 77 + "...",
        ] + [f"nosuch{k}@example.com" for k in range(1, 50)]
        self.fail_names = fail_names

        # addresses
        self.clients = self._client_pool(prng, 4000)
        self.webmail_ips = self._webmail_pool(prng)
        mta_texts = (
            ["127.0.0.1"] * 5 + ["10.0.0.25"] * 6 + ["10.0.0.26"] * 6 + ["::1"] * 2 + ["2001:db8:0:25::25"]
        )
        self.mtas = [t for t in (_make_ip(x, self.webnets) for x in mta_texts) if not t[3]] or [
            _make_ip("127.0.0.1", [])
        ]
        self.noise = _noise_pool(prng, 16384, self.pool or names)
        self.msgids = (
            [
                f"<{prng.getrandbits(64):016x}.{prng.randint(1000, 99999)}"
                f"@{prng.choice(('example.org', 'mail.example.net', 'list.example.com'))}>"
                for _ in range(1500)
            ]
            + [f"<CA{prng.getrandbits(160):040x}@mail.gmail.com>" for _ in range(500)]
            + ["unspecified"] * 40
        )

        # noise share per step so that about `noise_ratio` of all lines are noise
        mean_lines = sum(w * m for _, w, m in _MIX)
        r = noise_ratio
        self.p_noise = 1.0 if r >= 1.0 else r * mean_lines / (1.0 - r + r * mean_lines)
        self.noise_ratio = r

        # state
        self.heap: list[tuple[int, int, str, tuple[int, ...] | tuple[int, str, str | None] | None]] = []
        self.seq = 0
        self.next_pid = prng.randint(10000, 30000)
        self.lmtp_free: list[int] = []
        self.last: dict[tuple[str, str], tuple[int, str | None]] = {}
        self.events = dict.fromkeys(EVENT_KINDS, 0)
        self.ties: list[tuple[str, str]] = []
        self.specials = self._plan_specials()

    # ---- setup

    def _start_epoch(self, start: str | None) -> float:
        if start is None:  # centre the corpus on local New Year 2026 so it always crosses it
            new_year = datetime(2026, 1, 1, tzinfo=self.tz).timestamp()
            return float(int(new_year - self.n * self.spl / 2))
        dt = datetime.fromisoformat(start)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=self.tz)
        return dt.timestamp()

    def _client_pool(self, rng: random.Random, size: int) -> list[_Ip]:
        out: list[_Ip] = []
        fixed = ["2001:db8::5", "::1", "127.0.0.1", "203.0.113.9", "198.51.100.7"]
        for text in fixed:
            ip = _make_ip(text, self.webnets)
            if not ip[3]:
                out.append(ip)
        while len(out) < size:
            if rng.random() < 0.165:
                prefix = rng.choice(_V6_PREFIXES)
                r = rng.random()
                if r < 0.4:
                    text = f"{prefix}::{rng.randint(1, 0xFFFF):x}"
                elif r < 0.7:
                    a, b, c = rng.randint(0, 0xFFFF), rng.randint(1, 0xFFFF), rng.randint(1, 0xFFFF)
                    text = f"{prefix}:{a:x}::{b:x}:{c:x}"
                else:
                    groups = ":".join(
                        f"{rng.choice((0, rng.randint(0, 0xFFFF))):x}" for _ in range(6 - prefix.count(":"))
                    )
                    text = f"{prefix}:{rng.randint(0, 0xFFFF):x}:{groups}"
            else:
                a, b, c = rng.randint(0, 255), rng.randint(0, 255), rng.randint(1, 254)
                text = f"{rng.choice(_PUBLIC_V4_FIRST)}.{a}.{b}.{c}"
            ip = _make_ip(text, self.webnets)
            if not ip[3]:
                out.append(ip)
        return out

    def _webmail_pool(self, rng: random.Random) -> list[_Ip]:
        out: list[_Ip] = []
        for net in self.webnets:
            span = net.num_addresses
            for _ in range(min(32, span)):
                off = rng.randint(1, span - 2) if span > 2 else 0
                out.append(_make_ip(str(net.network_address + off), self.webnets))
        return out

    def _plan_specials(self) -> list[tuple[int, str, str, str]]:
        """Line positions of guaranteed events: odd-user logins and same-second ties."""
        plan: list[tuple[str, str, str]] = [("odd", "imap", u) for u in ODD_USERS]
        web_ok = len({ip[0] for ip in self.webmail_ips}) >= 2
        services = [s for s in _TIE_SERVICES if s != "webmail" or web_ok]
        for k, u in enumerate(self.tie_users):
            plan.append(("tie", services[k % len(services)], u))
        # interleave odd logins and ties, spread over the first 90% of the corpus
        order = sorted(range(len(plan)), key=lambda j: (j * 7919) % len(plan)) if plan else []
        total = len(plan)
        return [(int((slot + 0.5) / total * self.n * 0.9), *plan[j]) for slot, j in enumerate(order)][
            ::-1
        ]  # popped from the end

    # ---- primitives

    def _pid(self) -> int:
        self.next_pid += 1 + int(self.rng.random() * 9)
        if self.next_pid > 4194000:
            self.next_pid = 1000
        return self.next_pid

    def _push(self, due: int, msg: str, act: tuple | None = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, msg, act))

    def _user(self) -> str:
        rnd = self.rng.random
        if rnd() < 0.004 or not self.pool:
            return ODD_USERS[int(rnd() * len(ODD_USERS))]
        return self.pool[int(rnd() ** self.skew * len(self.pool))]

    def _client(self) -> _Ip:
        return self.clients[int(self.rng.random() * len(self.clients))]

    def _tls(self, ip: _Ip) -> str:
        if ip[3] or ip[0] == ip[2]:
            return ", secured"
        r = self.rng.random()
        return ", TLS" if r < 0.82 else ""

    def _sid(self, sec: int, ip: _Ip) -> str:
        rnd = self.rng.random
        return _login_session(sec * 1_000_000 + int(rnd() * 1_000_000), 1024 + int(rnd() * 64000), ip[1])

    def _login(self, svc: str, user: str, ip: _Ip, sec: int, prefix: str, out: list[str], after: int) -> None:
        """Write a successful login line now and queue its logout line."""
        rnd = self.rng.random
        text, _, lip, web = ip
        pid = self._pid()
        sid = self._sid(sec, ip)
        method = "LOGIN" if svc != "managesieve" and rnd() < 0.15 else "PLAIN"
        out.append(
            f"{prefix}{svc}-login: Login: user=<{user}>, method={method}, rip={text}, lip={lip}, "
            f"mpid={pid}{self._tls(ip)}, session=<{sid}>"
        )
        # Dovecot's last_login plugin stores ManageSieve logins under its mail process's name, "sieve".
        service = "webmail" if web and svc == "imap" else {"managesieve": "sieve"}.get(svc, svc)
        self.last[(user, service)] = (sec, text)
        self.events["login"] += 1
        due = after + 1 + int(rnd() ** 3 * 400)
        act = None
        if svc == "imap":
            if rnd() < 0.9:
                reason = "Logged out"
            else:
                reason = (
                    f"Connection closed (IDLE running for {rnd() * 1800:.3f} + waiting input for "
                    f"{rnd() * 30:.3f} secs, 2 B in + 10+10 B out, state=wait-input)"
                )
            ex = int(rnd() * 3) if rnd() < 0.2 else 0
            hc = int(rnd() * 40) if rnd() < 0.4 else 0
            bc = int(rnd() * 5) if rnd() < 0.3 else 0
            msg = (
                f"imap({user})<{pid}><{sid}>: Disconnected: {reason} in={int(rnd() * 3000) + 12} "
                f"out={int(rnd() * 90000) + 470} deleted={ex} expunged={ex} trashed=0 hdr_count={hc} "
                f"hdr_bytes={hc * 431} body_count={bc} body_bytes={bc * 5120}"
            )
        elif svc == "pop3":
            m = int(rnd() * 30)
            retr = int(rnd() * (m + 1))
            dele = (retr if rnd() < 0.7 else int(rnd() * (m + 1))) if rnd() < 0.3 else 0
            size = m * (2000 + int(rnd() * 30000))
            msg = (
                f"pop3({user})<{pid}><{sid}>: Disconnected: Logged out top=0/0, "
                f"retr={retr}/{retr * 4012 + int(rnd() * 900) if retr else 0}, del={dele}/{m}, size={size}"
            )
            if dele:
                act = (_ACT_POP3_DELETE,)
        elif svc == "submission":
            msg = (
                f"submission({user})<{pid}><{sid}>: Disconnected: Client has quit the connection "
                f"in={int(rnd() * 90000) + 80} out={int(rnd() * 900) + 300}"
            )
        else:
            msg = (
                f"{svc}({user})<{pid}><{sid}>: Disconnected: Logged out "
                f"bytes={int(rnd() * 900) + 40}/{int(rnd() * 4000) + 300}"
            )
        self._push(due, msg, act)

    def _lmtp_pid(self) -> int:
        free = self.lmtp_free
        if free and self.rng.random() < 0.97:
            return free.pop(int(self.rng.random() * len(free)))
        return self._pid()

    def _release(self, pid: int) -> None:
        if len(self.lmtp_free) < 12:
            self.lmtp_free.append(pid)

    def _lmtp_id(self) -> str:
        return b64encode(self.rng.randbytes(16)).decode()[:22]

    def _folder(self) -> str:
        r = self.rng.random()
        return "INBOX" if r < 0.94 else ("Junk" if r < 0.98 else "INBOX/Lists")

    # ---- steps (each returns the number of lines written now; 0 = did not fit)

    def _step(self, i: int, sec: int, prefix: str, out: list[str], room: int) -> int:
        rnd = self.rng.random
        r = rnd()
        if r < 0.54:
            if r < 0.40:
                svc = "imap"
            elif r < 0.47:
                svc = "pop3"
            elif r < 0.52:
                svc = "submission"
            else:
                svc = "managesieve"
            if room < 2:
                return 0
            ip = (
                self.webmail_ips[int(rnd() * len(self.webmail_ips))]
                if (svc == "imap" and self.webmail_ips and rnd() < 0.12)
                else self._client()
            )
            self._login(svc, self._user(), ip, sec, prefix, out, i + 1)
            return 1
        if r < 0.78:
            return self._lmtp(i, prefix, out, room)
        svc = (
            "imap"
            if rnd() < 0.6
            else ("pop3" if rnd() < 0.5 else ("submission" if rnd() < 0.6 else "managesieve"))
        )
        ip = self._client()
        sid = self._sid(sec, ip)
        tls = self._tls(ip)
        text, lip = ip[0], ip[2]
        if r < 0.88:
            x = rnd()
            user = self._user() if x < 0.6 else self.fail_names[int(rnd() * len(self.fail_names))]
            n = 1 if rnd() < 0.7 else 2 + int(rnd() * 3)
            secs = n * 2 + int(rnd() * 8)
            y = rnd()
            how = (
                "Connection closed"
                if y < 0.85
                else ("Aborted login by logging out" if y < 0.95 else "Inactivity")
            )
            out.append(
                f"{prefix}{svc}-login: Disconnected: {how} (auth failed, {n} attempts in {secs} secs): "
                f"user=<{user}>, method=PLAIN, rip={text}, lip={lip}{tls}, session=<{sid}>"
            )
            self.events["auth_fail"] += 1
            return 1
        if r < 0.95:
            y = rnd()
            if y < 0.7:
                how = f"Connection closed (no auth attempts in {int(rnd() ** 3 * 20)} secs)"
            elif y < 0.85:
                how = "Aborted login by logging out (no auth attempts in 0 secs)"
            else:
                how = "Inactivity (no auth attempts in 180 secs)"
            if tls == ", TLS" and rnd() < 0.2:
                tls = ", TLS handshaking"
            out.append(
                f"{prefix}{svc}-login: Disconnected: {how}: "
                f"user=<>, rip={text}, lip={lip}{tls}, session=<{sid}>"
            )
            self.events["aborted"] += 1
            return 1
        if r < 0.97:
            if svc in ("imap", "submission", "managesieve") and self.webmail_ips and rnd() < 0.5:
                svc, ip = "imap", self.webmail_ips[int(rnd() * len(self.webmail_ips))]
                text, lip, tls, sid = ip[0], ip[2], ", secured", self._sid(sec, ip)
            out.append(
                f"{prefix}{svc}-login: Disconnected: Maximum number of connections from user+IP exceeded "
                f"(mail_max_userip_connections=10): user=<{self._user()}>, method=PLAIN, rip={text}, "
                f"lip={lip}{tls}, session=<{sid}>"
            )
            self.events["refused"] += 1
            return 1
        # proxy
        if room < 2:
            return 0
        svc = "imap" if rnd() < 0.8 else "pop3"
        user = self._user()
        be = _BACKENDS[int(rnd() * 2)]
        head = f"{svc}-login: proxy({user},{be}:{_PROXY_PORT[svc]})"
        tail = f"user=<{user}>, method=PLAIN, rip={text}, lip={lip}{tls}, session=<{sid}>"
        out.append(f"{prefix}{head}: Started proxying to <{be}> ({0.004 + rnd() * 0.05:.3f} secs): {tail}")
        self.last[(user, svc)] = (sec, text)
        self.events["proxy"] += 1
        if rnd() < 0.5:
            side = "client" if rnd() < 0.7 else "server"
            self._push(
                i + 2 + int(rnd() ** 2 * 300),
                f"{head}: Disconnected by {side} ({int(rnd() * 60)}s idle, in={int(rnd() * 5000) + 40}, "
                f"out={int(rnd() * 90000) + 400}): {tail}",
            )
        return 1

    def _lmtp(self, i: int, prefix: str, out: list[str], room: int) -> int:
        rnd = self.rng.random
        x, n_del = rnd(), 4
        for n, w in _LMTP_DELIVERIES:
            x -= w
            if x < 0:
                n_del = n
                break
        if room < n_del + 2:
            return 0
        pid = self._lmtp_pid()
        if rnd() < 0.10:
            shown, final_shown, final_ip = "local", "local", None
        else:
            mta = self.mtas[int(rnd() * len(self.mtas))]
            shown = mta[0]
            final_ip = self._client()[0] if rnd() < 0.05 else shown  # XCLIENT ADDR= changes the address
            final_shown = final_ip
        out.append(f"{prefix}lmtp({pid}): Connect from {shown}")
        lid = self._lmtp_id()
        per_recipient = (
            rnd() < 0.4
        )  # one transaction, several RCPT TO (:R<n>) vs several transactions (:T<n>)
        mid = self.msgids[int(rnd() * len(self.msgids))]
        due = i
        for k in range(n_del):
            due += 1 + int(rnd() ** 2 * 8)
            if k and not per_recipient:
                mid = self.msgids[int(rnd() * len(self.msgids))]
            suffix = "" if k == 0 else (f":R{k + 1}" if per_recipient else f":T{k + 1}")
            user = self._user()
            self._push(
                due,
                f"lmtp({user})<{pid}><{lid}{suffix}>: msgid={mid}: saved mail to {self._folder()}",
                (_ACT_DELIVERY, user, final_ip),
            )
        self._push(
            due + 1 + int(rnd() * 4),
            f"lmtp({pid}): Disconnect from {final_shown}: Logged out (state=READY)",
            (_ACT_RELEASE, pid),
        )
        return 1

    def _special(
        self, kind: str, svc: str, user: str, i: int, sec: int, hp: str, dp: str, out: list[str], room: int
    ) -> int:
        """Guaranteed events; a tie writes all its lines with the same timestamp."""
        if kind == "odd":
            if room < 2:
                return 0
            self._login(svc, user, self._client(), sec, dp, out, i + 1)
            return 1
        if svc == "lmtp":
            if room < 6:
                return 0
            p1 = self._lmtp_pid()
            p2 = self._lmtp_pid()
            while p2 == p1:
                p2 = self._pid()
            mtas = sorted({m[0] for m in self.mtas} | {"10.0.0.25", "10.0.0.26"})
            m1 = mtas[int(self.rng.random() * len(mtas))]
            m2 = m1
            while m2 == m1:
                m2 = mtas[int(self.rng.random() * len(mtas))]
            l1, l2 = self._lmtp_id(), self._lmtp_id()
            mid1 = self.msgids[int(self.rng.random() * len(self.msgids))]
            mid2 = self.msgids[int(self.rng.random() * len(self.msgids))]
            out.extend(
                (
                    f"{dp}lmtp({p1}): Connect from {m1}",
                    f"{dp}lmtp({p2}): Connect from {m2}",
                    f"{dp}lmtp({user})<{p1}><{l1}>: msgid={mid1}: saved mail to INBOX",
                    f"{dp}lmtp({user})<{p2}><{l2}>: msgid={mid2}: saved mail to INBOX",
                    f"{dp}lmtp({p1}): Disconnect from {m1}: Logged out (state=READY)",
                    f"{dp}lmtp({p2}): Disconnect from {m2}: Logged out (state=READY)",
                )
            )
            self.last[(user, "lmtp")] = (sec, m2)
            self.events["delivery"] += 2
            self._release(p1)
            self._release(p2)
            self.ties.append((user, "lmtp"))
            return 6
        gap = self.rng.random() < 0.5
        if room < 4 + gap:
            return 0
        pool = self.webmail_ips if svc == "webmail" else self.clients
        ip1 = pool[int(self.rng.random() * len(pool))]
        ip2 = ip1
        while ip2[0] == ip1[0]:
            ip2 = pool[int(self.rng.random() * len(pool))]
        real = "imap" if svc == "webmail" else svc
        self._login(real, user, ip1, sec, dp, out, i + 2 + gap)
        if gap:
            out.append(hp + self.noise[int(self.rng.random() * len(self.noise))])
        self._login(real, user, ip2, sec, dp, out, i + 2 + gap)
        self.ties.append((user, svc))
        return 2 + gap

    # ---- main loop

    def _stamp(self, sec: int) -> str:
        dt = datetime.fromtimestamp(sec, self.tz)
        return f"{_MONTHS[dt.month]} {dt.day:2d} {dt.hour:02d}:{dt.minute:02d}:{dt.second:02d} {self.host} "

    def run(self, part_lines: int) -> Iterator[tuple[list[str], int, bool]]:
        """Yield (lines, epoch second of the last line, ends a part) blocks, `part_lines` per part."""
        n, t0, spl = self.n, self.t0, self.spl
        rnd = self.rng.random
        heap, last, events = self.heap, self.last, self.events
        noise, n_noise, p_noise = self.noise, len(self.noise), self.p_noise
        specials = self.specials
        next_special = specials[-1][0] if specials else n
        pop = heapq.heappop
        out: list[str] = []
        i = 0
        cut = min(part_lines, n)
        cur = -1
        hp = dp = ""
        while i < n:
            sec = int(t0 + i * spl)
            if sec != cur:
                cur = sec
                hp = self._stamp(sec)
                dp = hp + "dovecot: "
            if heap and (heap[0][0] <= i or n - i <= len(heap)):
                _, _, msg, act = pop(heap)
                out.append(dp + msg)
                if act is not None:
                    tag = act[0]
                    if tag == _ACT_DELIVERY:
                        last[(act[1], "lmtp")] = (sec, act[2])
                        events["delivery"] += 1
                    elif tag == _ACT_RELEASE:
                        self._release(act[1])
                    else:
                        events["pop3_delete"] += 1
                k = 1
            else:
                k = 0
                room = n - i - len(heap)
                if i >= next_special:
                    _, kind, svc, user = specials.pop()
                    next_special = specials[-1][0] if specials else n
                    k = self._special(kind, svc, user, i, sec, hp, dp, out, room)
                elif rnd() >= p_noise:
                    k = self._step(i, sec, dp, out, room)
                if not k:
                    if self.noise_ratio > 0:
                        out.append(hp + noise[int(rnd() * n_noise)])
                    else:
                        out.append(
                            f"{dp}imap-login: Disconnected: Connection closed (no auth attempts in 0 secs): "
                            f"user=<>, rip=198.51.100.7, lip={_LIP4}, "
                            f"session=<{self._sid(sec, self.clients[0])}>"
                        )
                        events["aborted"] += 1
                    k = 1
            i += k
            while i >= cut:  # a part ends inside what was just written
                extra = i - cut
                keep = out[len(out) - extra :] if extra else []
                if extra:
                    del out[len(out) - extra :]
                yield out, sec, True
                out = keep
                if cut >= n:
                    break
                cut = min(cut + part_lines, n)
            if len(out) >= _CHUNK:
                yield out, sec, False
                out = []

    def rows(self) -> dict[tuple[str, str], Row]:
        """Expected rows, as a correct harvester must leave them."""
        return {key: Row(key[0], key[1], sec * 1_000_000, ip) for key, (sec, ip) in self.last.items()}


# --------------------------------------------------------------------------- writing files


@contextlib.contextmanager
def _open_part(path: pathlib.Path, suffix: str) -> Iterator[Callable[[bytes], object]]:
    """Open `path` for writing, compressed according to `suffix`; yield its write function."""
    with open(path, "wb") as raw:
        if suffix == "":
            yield raw.write
        elif suffix == ".gz":
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
                yield gz.write
        elif suffix == ".bz2":
            with bz2.BZ2File(raw, "wb") as bz:
                yield bz.write
        elif suffix == ".xz":
            with lzma.LZMAFile(raw, "wb") as xz:
                yield xz.write
        elif suffix == ".zst":
            import zstandard  # lazily: only needed for .zst parts

            with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as zw:
                yield zw.write
        else:
            raise ValueError(f"unknown compression suffix {suffix!r}; use one of {COMPRESSIONS}")


def _corpus(gen: _Gen, files: list[pathlib.Path]) -> Corpus:
    return Corpus(files=files, rows=gen.rows(), lines=gen.n, events=dict(gen.events), ties=list(gen.ties))


def generate(
    directory: str | os.PathLike[str],
    *,
    lines: int = 20000,
    users: int = 2000,
    seed: int = 1,
    tz: str = "UTC",
    start: str | None = None,
    seconds_per_line: float = 0.05,
    rotate_every: int | None = None,
    compress: Sequence[str] = ("", ".gz"),
    webmail_networks: Sequence[str] = ("10.99.0.0/16",),
    noise_ratio: float = 0.5,
    host: str = "mx1",
) -> Corpus:
    """Write a maillog (rotated logrotate-style if `rotate_every`) into `directory`; return the oracle.

    `start` is local time in `tz` (ISO 8601, an explicit offset wins); None centres the corpus on
    local 2026-01-01T00:00:00 so it always crosses New Year.  Rotated parts are named
    ``maillog-YYYYMMDD`` (date of their last line; ``maillog-YYYYMMDD-EPOCH`` when a day has several
    parts) plus a suffix from `compress`, cycled from the newest rotated part backwards; the newest
    part is plain ``maillog``.  Each file's mtime is its last line's time + 1 s.
    """
    suffixes = tuple(compress) or ("",)
    for s in suffixes:
        if s not in COMPRESSIONS:
            raise ValueError(f"unknown compression suffix {s!r}; use one of {COMPRESSIONS}")
    if rotate_every is not None and rotate_every < 1:
        raise ValueError("rotate_every must be >= 1")
    gen = _Gen(
        lines=lines,
        users=users,
        seed=seed,
        tz=tz,
        start=start,
        seconds_per_line=seconds_per_line,
        webmail_networks=webmail_networks,
        noise_ratio=noise_ratio,
        host=host,
    )
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    per_part = rotate_every or lines
    n_parts = -(-lines // per_part)
    rotated = n_parts - 1

    def suffix_of(k: int) -> str:
        return "" if k == rotated else suffixes[(rotated - 1 - k) % len(suffixes)]

    temps: list[tuple[pathlib.Path, str, int]] = []  # (temporary path, suffix, last second)
    blocks = gen.run(per_part)
    for k in range(n_parts):
        sfx = suffix_of(k)
        tmp = d / f".maillog-part{k}.tmp"
        last_sec = 0
        with _open_part(tmp, sfx) as write:
            for block, sec, ends in blocks:
                if block:
                    write(("\n".join(block) + "\n").encode())
                last_sec = sec
                if ends:
                    break
        temps.append((tmp, sfx, last_sec))

    days = [datetime.fromtimestamp(sec, gen.tz).strftime("%Y%m%d") for _, _, sec in temps[:rotated]]
    files: list[pathlib.Path] = []
    prev_epoch = 0
    for k, (tmp, sfx, sec) in enumerate(temps):
        if k == rotated:
            name = "maillog"
        elif days.count(days[k]) > 1:
            prev_epoch = max(sec + 1, prev_epoch + 1)
            name = f"maillog-{days[k]}-{prev_epoch}{sfx}"
        else:
            name = f"maillog-{days[k]}{sfx}"
        final = d / name
        os.replace(tmp, final)
        os.utime(final, (sec + 1, sec + 1))
        files.append(final)
    return _corpus(gen, files)


def write_maillog(
    path: str | os.PathLike[str],
    *,
    lines: int,
    users: int = 2000,
    seed: int = 1,
    tz: str = "UTC",
    start: str | None = None,
    seconds_per_line: float = 0.05,
    webmail_networks: Sequence[str] = ("10.99.0.0/16",),
    noise_ratio: float = 0.5,
    skew: float = 2.0,
    host: str = "mx1",
) -> Corpus:
    """Fast path for benchmarks: write `lines` lines (same mix as generate) to one plain file.

    The bytes equal those of ``generate(..., rotate_every=None)``'s ``maillog`` for the same arguments.
    """
    gen = _Gen(
        lines=lines,
        users=users,
        seed=seed,
        tz=tz,
        start=start,
        seconds_per_line=seconds_per_line,
        webmail_networks=webmail_networks,
        noise_ratio=noise_ratio,
        skew=skew,
        host=host,
    )
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    last_sec = 0
    with open(p, "wb") as fh:
        for block, sec, _ in gen.run(lines):
            if block:
                fh.write(("\n".join(block) + "\n").encode())
            last_sec = sec
    os.utime(p, (last_sec + 1, last_sec + 1))
    return _corpus(gen, [p])


def write_expected(corpus: Corpus, path: str | os.PathLike[str]) -> None:
    """Write the expected rows as JSON lines: user, service, last_login (RFC 3339 UTC), ip."""
    with open(path, "w", encoding="utf-8") as fh:
        for key in sorted(corpus.rows):
            row = corpus.rows[key]
            rec = {
                "user": row.user,
                "service": row.service,
                "last_login": _rfc3339(row.last_login_us),
                "ip": row.ip,
            }
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write a corpus and DIR/expected.jsonl."""
    ap = argparse.ArgumentParser(prog="python -m tests.corpus", description=__doc__.splitlines()[0])
    ap.add_argument("directory")
    ap.add_argument("--lines", type=int, default=20000)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tz", default="UTC")
    ap.add_argument("--start", default=None, help="local start time (default: centred on New Year 2026)")
    ap.add_argument("--seconds-per-line", type=float, default=0.05)
    ap.add_argument("--rotate-every", type=int, default=None)
    ap.add_argument(
        "--compress",
        default=",.gz",
        help="comma-separated suffixes cycled over rotated parts, e.g. ',.gz,.bz2,.xz,.zst'",
    )
    ap.add_argument(
        "--webmail-network",
        action="append",
        default=None,
        help="network whose imap logins count as webmail (repeatable; default 10.99.0.0/16)",
    )
    ap.add_argument("--noise-ratio", type=float, default=0.5)
    ap.add_argument("--host", default="mx1")
    a = ap.parse_args(argv)
    corpus = generate(
        a.directory,
        lines=a.lines,
        users=a.users,
        seed=a.seed,
        tz=a.tz,
        start=a.start,
        seconds_per_line=a.seconds_per_line,
        rotate_every=a.rotate_every,
        compress=tuple(a.compress.split(",")),
        webmail_networks=tuple(a.webmail_network) if a.webmail_network is not None else ("10.99.0.0/16",),
        noise_ratio=a.noise_ratio,
        host=a.host,
    )
    write_expected(corpus, pathlib.Path(a.directory) / "expected.jsonl")
    print(
        f"{corpus.lines} lines in {len(corpus.files)} file(s), {len(corpus.rows)} expected rows, "
        f"events {corpus.events}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
