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
# A line may be up to this much "ahead" of its file's mtime (clock skew, late syslog writes)
# before we decide it belongs to the previous year.
FUTURE_SLACK = timedelta(days=1)
_OFFSET = re.compile(r"^(?:UTC|GMT)?([+-])(\d\d):?(\d\d)$")
_CACHE_MAX = 200_000


class TimeError(ValueError):
    """A timestamp that cannot be turned into a time."""


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

    `year` fixes the year of year-less ("bsd") timestamps; otherwise it is taken
    from `reference` (the file's mtime): a line is never later than the moment
    its file was last written, so a "Dec 31" line in a file written on Jan 1
    belongs to the previous year.
    """

    def __init__(self, style: str, zone: tzinfo, *, year: int | None = None,
                 reference: float | None = None) -> None:
        self.style = style
        self.zone = zone
        self.year = year
        self.cache: dict[bytes, int] = {}  # timestamp text (+ offset) -> UTC epoch microseconds
        self._minutes: dict[bytes, int] = {}
        self.set_reference(time.time() if reference is None else reference)

    def set_reference(self, reference: float) -> None:
        """Latest time a line can have (file mtime, or now when following a live file)."""
        self._ref = datetime.fromtimestamp(reference, self.zone) + FUTURE_SLACK
        self.cache.clear()
        self._minutes.clear()

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
        """
        if len(self.cache) > _CACHE_MAX:
            self.cache.clear()
            self._minutes.clear()
        head, sec = ts[:-3], ts[-2:]
        if ts[-3:-2] == b":" and sec.isdigit():
            us = self.minute(head, tzs) + min(int(sec), 59) * 1_000_000
        else:
            us = self._parse(ts, tzs)
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
        year = self._ref.year
        for _ in range(9):  # Feb 29 only exists in leap years: walk back until it does
            try:
                dt = datetime(year, month, day, hh, mm, ss, tzinfo=self.zone)
            except ValueError:
                year -= 1
                continue
            if dt <= self._ref:
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
