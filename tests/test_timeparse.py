"""Time: UTC microseconds, year inference across New Year, zones, precision."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from harvester.timeparse import Clock, FutureError, TimeError, resolve_timezone, rfc3339


def ts(y, mo, d, h=0, mi=0, s=0, tz=UTC) -> int:
    return int(datetime(y, mo, d, h, mi, s, tzinfo=tz).timestamp()) * 1_000_000


def test_dec31_line_in_a_file_written_on_jan1_is_last_year():
    clock = Clock("bsd", UTC, reference=ts(2026, 1, 1, 0, 0, 5) / 1e6)
    assert clock.to_us(b"Dec 31 23:59:59", None, None) == (ts(2025, 12, 31, 23, 59, 59), 0)
    assert clock.to_us(b"Jan  1 00:00:01", None, None) == (ts(2026, 1, 1, 0, 0, 1), 0)


def test_explicit_year_wins_over_the_file_mtime():
    clock = Clock("bsd", UTC, year=2019, reference=ts(2026, 1, 1) / 1e6)
    assert clock.to_us(b"Dec 31 23:59:59", None, None)[0] == ts(2019, 12, 31, 23, 59, 59)


def test_feb29_in_a_non_leap_reference_year_walks_back_to_a_leap_year():
    clock = Clock("bsd", UTC, reference=ts(2026, 3, 1) / 1e6)
    assert clock.to_us(b"Feb 29 12:00:00", None, None)[0] == ts(2024, 2, 29, 12)


def test_local_zone_with_and_without_daylight_saving():
    berlin = resolve_timezone("Europe/Berlin")
    clock = Clock("bsd", berlin, year=2026)
    assert clock.to_us(b"Jan 10 12:00:00", None, None)[0] == ts(2026, 1, 10, 11)  # +01:00
    assert clock.to_us(b"Jul 10 12:00:00", None, None)[0] == ts(2026, 7, 10, 10)  # +02:00
    fixed = Clock("bsd", resolve_timezone("+02:00"), year=2026)
    assert fixed.to_us(b"Jan 10 12:00:00", None, None)[0] == ts(2026, 1, 10, 10)


def test_iso_with_fraction_and_offset_keeps_microseconds():
    clock = Clock("iso", UTC)
    t, digits = clock.to_us(b"2026-11-22T01:52:03", b"242533", b"+01:00")
    assert (t, digits) == (ts(2026, 11, 22, 0, 52, 3) + 242533, 6)
    t, digits = clock.to_us(b"2026-11-22T01:52:03", b"5", None)
    assert (t, digits) == (ts(2026, 11, 22, 1, 52, 3) + 500000, 1)


def test_rfc3339_text_keeps_the_logs_precision():
    t = ts(2026, 11, 22, 1, 52, 3) + 242533
    assert rfc3339(t, 0) == "2026-11-22T01:52:03Z"
    assert rfc3339(t, 3) == "2026-11-22T01:52:03.242Z"
    assert rfc3339(t, 6) == "2026-11-22T01:52:03.242533Z"


def test_unknown_zone_and_impossible_timestamp_are_clear_errors():
    with pytest.raises(TimeError, match="unknown time zone 'Nowhere/City'"):
        resolve_timezone("Nowhere/City")
    with pytest.raises(TimeError, match="bad timestamp"):
        Clock("bsd", UTC, year=2026).to_us(b"Foo 31 25:61:61", None, None)


def test_a_line_further_ahead_of_its_file_than_the_tolerance_is_refused_and_not_cached():
    clock = Clock("iso", UTC, reference=ts(2026, 11, 22, 1, 0) / 1e6, tolerance=300)
    assert clock.to_us(b"2026-11-22T01:05:00", None, b"+00:00")[0] == ts(2026, 11, 22, 1, 5)
    with pytest.raises(FutureError, match="future_tolerance_s"):
        clock.to_us(b"2026-11-22T01:05:01", None, b"+00:00")
    with pytest.raises(FutureError):
        clock.to_us(b"2099-01-01T00:00:00", None, b"+00:00")
    assert not any(k.startswith(b"2099") for k in clock.cache)
    clock.set_reference(ts(2099, 1, 1) / 1e6)  # the next file, written later
    assert clock.to_us(b"2099-01-01T00:00:00", None, b"+00:00")[0] == ts(2099, 1, 1)


def test_a_year_less_line_less_than_a_day_ahead_is_refused_more_is_last_year():
    clock = Clock("bsd", UTC, reference=ts(2026, 11, 29, 19, 0) / 1e6)
    with pytest.raises(FutureError):  # 23 h ahead: a skewed clock or a wrong zone, it must not pin
        clock.to_us(b"Nov 30 18:00:00", None, None)
    assert clock.to_us(b"Dec  1 18:00:00", None, None)[0] == ts(2025, 12, 1, 18)  # a year-old line
    assert clock.to_us(b"Nov 29 19:04:59", None, None)[0] == ts(2026, 11, 29, 19, 4, 59)
    fixed = Clock("bsd", UTC, year=2026, reference=ts(2026, 11, 29, 19, 0) / 1e6)
    with pytest.raises(FutureError):  # a fixed year is not inferred: the date is what it says
        fixed.to_us(b"Dec  1 18:00:00", None, None)


def test_a_live_clock_follows_the_wall_clock(monkeypatch):
    now = [ts(2026, 11, 29, 19, 0) / 1e6]
    monkeypatch.setattr(time, "time", lambda: now[0])
    clock = Clock("bsd", UTC, year=2026)  # no reference: live lines, never later than now
    with pytest.raises(FutureError):
        clock.to_us(b"Nov 29 19:10:00", None, None)
    now[0] += 600
    assert clock.to_us(b"Nov 29 19:10:00", None, None)[0] == ts(2026, 11, 29, 19, 10)


def test_a_clock_set_to_now_follows_the_wall_clock_as_the_daemon_sets_it(monkeypatch):
    """The daemon gives live files reference=now and may not move it (with a fixed year): the limit
    must follow the wall clock, or every line would be "future" five minutes after the start."""
    now = [ts(2026, 11, 29, 19, 0) / 1e6]
    monkeypatch.setattr(time, "time", lambda: now[0])
    clock = Clock("bsd", UTC, year=2026, reference=now[0])
    now[0] += 3600
    assert clock.to_us(b"Nov 29 19:59:00", None, None)[0] == ts(2026, 11, 29, 19, 59)
    rotated = Clock("bsd", UTC, year=2026, reference=now[0] - 3600)  # a file last written an hour ago
    with pytest.raises(FutureError):
        rotated.to_us(b"Nov 29 19:59:00", None, None)
