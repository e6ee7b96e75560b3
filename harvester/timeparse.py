"""Timestamps: styles, year inference for year-less dates, time zones, UTC microseconds.

Logs repeat the same second on many lines, so each distinct timestamp text is
parsed once and cached; the fraction (when the log has one) is added after.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil import tz as dateutil_tz

MONTHS = {m.encode(): i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
# How far a line may lie after its reference (file mtime, or now for live lines: clock skew between
# hosts, late syslog writes) before it is refused: a future time would win over every real login.
FUTURE_TOLERANCE_S = 300
# A year-less date more than this after the reference is last year's line (a "Dec 31" line in a file
# written on Jan 1); less, it is this year's from a skewed clock or a wrong time zone, and refused.
LAST_YEAR_AFTER = timedelta(days=1)
_OFFSET = re.compile(r"^(?:UTC|GMT)?([+-])(\d\d):?(\d\d)$")
_CACHE_MAX = 200_000


class TimeError(ValueError):
    """A timestamp that cannot be turned into a time."""


class FutureError(TimeError):
    """A timestamp further ahead of the reference than the tolerance (bad input "future")."""


def resolve_timezone(name: str | None) -> tzinfo:
    """'Europe/Berlin', 'UTC', '+02:00' or None for the system zone (DST-aware)."""
    if not name or name == "local":
        return dateutil_tz.tzlocal()
    if name.upper() in ("UTC", "Z", "GMT"):
        return UTC
    m = _OFFSET.match(name)
    if m:
        sign = 1 if m.group(1) == "+" else -1
        return timezone(sign * timedelta(hours=int(m.group(2)), minutes=int(m.group(3))))
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise TimeError(f"unknown time zone {name!r} (use an IANA name like Europe/Berlin, UTC or +02:00)") \
            from None


class Clock:
    """Turns (ts, frac, tz) fields of one file's lines into UTC epoch microseconds.

    `reference` is the latest time a line can have: the file's mtime. None, or a time within the
    tolerance (at least a minute) of now, means lines being written now (a followed or busy file): then the wall clock,
    read as lines come, moves it on. A line more than `tolerance` seconds after it is refused
    (FutureError): one far-future time would win over every real login. `year` fixes the year of
    year-less ("bsd") timestamps; otherwise it is the reference's, or the previous one for a date
    more than LAST_YEAR_AFTER after the reference: a "Dec 31" line in a file written on Jan 1
    belongs to the previous year.
    """

    def __init__(self, style: str, zone: tzinfo, *, year: int | None = None,
                 reference: float | None = None, tolerance: float = FUTURE_TOLERANCE_S) -> None:
        self.style = style
        self.zone = zone
        self.year = year
        self.tolerance = tolerance
        self._follow = reference is None
        self.live = True
        self.cache: dict[bytes, int] = {}  # accepted timestamp text (+ offset) -> UTC epoch microseconds
        self._minutes: dict[bytes, int] = {}
        self.set_reference(time.time() if reference is None else reference)

    def set_reference(self, reference: float) -> None:
        """Latest time a line can have (file mtime, or now when following a live file)."""
        self._reference = reference
        self.live = self._follow or reference >= time.time() - max(self.tolerance, 60)
        self.cache.clear()
        self._minutes.clear()

    @property
    def limit_us(self) -> int:
        """The latest whole-second time accepted, UTC epoch microseconds (the native scanner hands
        later lines back to `seconds`, which refuses them)."""
        ref = max(self._reference, time.time()) if self.live else self._reference
        return int((ref + self.tolerance) * 1_000_000)

    def to_us(self, ts: bytes, frac: bytes | None, tzs: bytes | None) -> tuple[int, int]:
        """(UTC epoch microseconds, fractional digits shown by the log)."""
        sec = self.cache.get(ts if tzs is None else ts + tzs)
        if sec is None:
            sec = self.seconds(ts, tzs)
        if frac is None:
            return sec, 0
        return sec + int(frac[:6].ljust(6, b"0")), min(len(frac), 6)

    def seconds(self, ts: bytes, tzs: bytes | None) -> int:
        """Parse one timestamp text (whole seconds, as microseconds) and cache it.

        Zone offsets only change on minute boundaries, so the expensive part
        (date, zone, year) is done once per minute; the seconds are added.
        A time after `limit_us` raises FutureError and is not cached: a live
        clock may accept it later, and only set_reference moves a reference back.
        """
        if len(self.cache) > _CACHE_MAX:
            self.cache.clear()
            self._minutes.clear()
        head, sec = ts[:-3], ts[-2:]
        if ts[-3:-2] == b":" and sec.isdigit():
            us = self.minute(head, tzs) + min(int(sec), 59) * 1_000_000
        else:
            us = self._parse(ts, tzs)
        limit = self.limit_us
        if us > limit:
            ahead = (us - limit) / 1e6 + self.tolerance
            raise FutureError(f"timestamp {ts.decode('ascii', 'replace')!r} is {ahead:,.0f} s after "
                              f"{'now' if self.live else 'its file was last written'} "
                              f"(more than future_tolerance_s = {self.tolerance:g})")
        self.cache[ts if tzs is None else ts + tzs] = us
        return us

    def minute(self, head: bytes, tzs: bytes | None) -> int:
        """UTC epoch microseconds of the minute `head` ("Nov 22 01:52"), cached (the native scanner asks too)."""
        mkey = head if tzs is None else head + tzs
        base = self._minutes.get(mkey)
        if base is None:
            if len(self._minutes) > _CACHE_MAX:
                self._minutes.clear()
            base = self._minutes[mkey] = self._parse(head + b":00", tzs)
        return base

    def _parse(self, ts: bytes, tzs: bytes | None) -> int:
        try:
            dt = self._bsd(ts) if self.style == "bsd" else self._iso(ts, tzs)
        except (ValueError, KeyError, OverflowError) as e:
            raise TimeError(f"bad timestamp {ts!r}: {e}") from None
        return int(dt.timestamp()) * 1_000_000

    def _bsd(self, ts: bytes) -> datetime:
        month = MONTHS[ts[:3]]
        day, hh, mm, ss = int(ts[4:6]), int(ts[7:9]), int(ts[10:12]), min(int(ts[13:15]), 59)
        if self.year is not None:
            return datetime(self.year, month, day, hh, mm, ss, tzinfo=self.zone)
        limit = self.limit_us / 1e6
        year = datetime.fromtimestamp(limit, self.zone).year
        for _ in range(9):  # Feb 29 only exists in leap years: walk back until it does
            try:
                dt = datetime(year, month, day, hh, mm, ss, tzinfo=self.zone)
            except ValueError:
                year -= 1
                continue
            if dt.timestamp() - limit <= LAST_YEAR_AFTER.total_seconds():  # else refused by seconds()
                return dt
            year -= 1
        raise ValueError("no year fits")

    def _iso(self, ts: bytes, tzs: bytes | None) -> datetime:
        text = ts.decode("ascii")
        if tzs:
            return datetime.fromisoformat(text + tzs.decode("ascii"))
        return datetime.fromisoformat(text).replace(tzinfo=self.zone)


def rfc3339(time_us: int, digits: int = 0) -> str:
    """UTC RFC 3339 text at the log's precision: 2026-11-22T01:52:03Z or ...03.242533Z."""
    sec, us = divmod(time_us, 1_000_000)
    base = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if digits <= 0:
        return base + "Z"
    return f"{base}.{us:06d}"[: len(base) + 1 + digits] + "Z"
