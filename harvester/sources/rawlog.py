"""Dovecot rawlog directories as a second source of logins.

Two layouts:
- `rawlog_dir = /var/log/dovecot/rawlog/%u`: ROOT/USER/YYYYMMDD-HHMMSS.PID.N.in|out, PID = the mail
  process (the maillog's mpid), every line starting with "<unix secs>.<usecs> ";
- the rawlog binary as a post-login script: HOME/dovecot.rawlog/[IP-]YYYYMMDD-HHMMSS-PID.in|out, the
  user being the directory that holds dovecot.rawlog (or what `rawlog_user_regex` takes from the path).

Privacy: rawlogs hold mail and, before login, credentials. Only the first
line of each session's `.out` file (the server's greeting or "Logged in"
reply, at most FIRST_BYTES) is read, to learn the protocol and the login time;
`.in` files, where clients' commands and passwords are, are never opened.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path

log = logging.getLogger(__name__)
FIRST_BYTES = 512
# rawlog_dir: 20261122-014738.6426.1.out; rawlog binary: [127.0.0.18-]20261122-015638-19011.out
_DIR_NAME = re.compile(rb"(?P<ts>\d{8}-\d{6})\.(?P<pid>\d+)\.\d+\.out\Z")
_BIN_NAME = re.compile(rb"(?:(?P<ip>[0-9A-Fa-f.:]+)-)?(?P<ts>\d{8}-\d{6})-(?P<pid>\d+)\.out\Z")
_STAMP = re.compile(rb"(?P<s>\d{9,11})\.(?P<us>\d{6}) ")


@dataclass(frozen=True)
class Session:
    """One login seen in a rawlog: who, over what, when (UTC microseconds), from where if known."""

    user: str
    service: str
    time_us: int
    digits: int
    ip: str | None
    pid: str
    name: str  # the file's name time, YYYYMMDD-HHMMSS (what restarts skip by)


def service_of(first: bytes) -> str | None:
    """imap or pop3, from the server's first line after login; None for anything else, notably the
    greeting ("* OK ... ready.", "+OK ... ready.") a pre-login rawlog (`imap-login -R`) starts with:
    such a session may never have logged in, and its user is not known."""
    line = _STAMP.sub(b"", first, count=1) if _STAMP.match(first) else first
    if line.startswith(b"+OK Logged in") or line.startswith(b"-ERR"):
        return "pop3"
    if line.startswith((b"* CAPABILITY ", b"* PREAUTH ")) or re.match(rb"[A-Za-z0-9.]+ OK ", line):
        return "imap"
    return None


def name_epochs(ts: str, zone: tzinfo) -> tuple[float, float]:
    """A file name's local time (YYYYMMDD-HHMMSS) as Unix seconds: (earliest, latest) reading, which differ
    in the hour repeated when daylight saving time ends."""
    d = datetime(int(ts[0:4]), int(ts[4:6]), int(ts[6:8]), int(ts[9:11]), int(ts[11:13]), int(ts[13:15]),
                 tzinfo=zone)
    a, b = d.timestamp(), d.replace(fold=1).timestamp()
    return min(a, b), max(a, b)


def read_session(out: Path, user: str, zone: tzinfo) -> Session | None:
    """The session of one `.out` file, or None (not a session file, or an unknown protocol)."""
    name = out.name.encode("utf-8", "surrogateescape")
    m = _DIR_NAME.match(name) or _BIN_NAME.match(name)
    if m is None:
        return None
    try:
        with open(out, "rb") as f:
            first = f.read(FIRST_BYTES).split(b"\n", 1)[0]
    except OSError as e:
        log.warning("%s: cannot read: %s", out, e.strerror)
        return None
    service = service_of(first)
    if service is None:
        return None
    stamp = _STAMP.match(first)
    ts = m["ts"].decode()
    if stamp:
        t, digits = int(stamp["s"]) * 1_000_000 + int(stamp["us"]), 6
    else:  # the rawlog binary without -t: the file name's local time, to the second
        try:
            t, digits = int(name_epochs(ts, zone)[0]) * 1_000_000, 0
        except ValueError:  # 20261399-...: not a time
            return None
    ip = m.groupdict().get("ip")
    return Session(user, service, t, digits, ip.decode() if ip else None, m["pid"].decode(), ts)


class Tree:
    """One configured rawlog root, walked lazily (thousands of user directories, never all in memory)."""

    def __init__(self, root: Path, zone: tzinfo, user_regex: str = "") -> None:
        self.root = root
        self.zone = zone
        self.user_regex = re.compile(user_regex) if user_regex else None
        self.mark = 0  # Unix second: every session named at or before it was harvested (checkpointed)

    def sessions(self, after: float = 0, until: float | None = None) -> Iterator[Session]:
        """Every session named after `after` and not after `until` (Unix seconds; a name in the repeated
        DST hour counts as both of its readings), user directory by directory."""
        try:
            users = os.scandir(self.root)
        except OSError as e:
            log.error("%s: cannot read the rawlog directory: %s", self.root, e.strerror)
            return
        floor = after - 60 if after else 0.0  # a directory not modified since then has no newer session file
        with users:
            for entry in users:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                if floor and entry.stat(follow_symlinks=False).st_mtime < floor and not \
                        os.path.isdir(os.path.join(entry.path, "dovecot.rawlog")):
                    continue
                d = Path(entry.path)
                if (d / "dovecot.rawlog").is_dir():  # a home directory with the rawlog binary's files
                    d = d / "dovecot.rawlog"
                yield from self._dir(d, self._user(d, entry.name), after, until)

    def _user(self, d: Path, default: str) -> str | None:
        if self.user_regex is None:
            return default
        m = self.user_regex.search(str(d))
        return m.group("user") if m else None

    def _dir(self, d: Path, user: str | None, after: float, until: float | None) -> Iterator[Session]:
        if user is None:
            return
        try:
            names = sorted(e.name for e in os.scandir(d) if e.name.endswith(".out"))
        except OSError as e:
            log.warning("%s: cannot read: %s", d, e.strerror)
            return
        for n in names:
            m = _DIR_NAME.match(n.encode()) or _BIN_NAME.match(n.encode())
            if m is None:
                continue
            if after or until is not None:
                try:
                    earliest, latest = name_epochs(m["ts"].decode(), self.zone)
                except ValueError:  # 20261399-...: not a time
                    continue
                if latest <= after or (until is not None and earliest > until):
                    continue
            s = read_session(d / n, user, self.zone)
            if s is not None:
                yield s
