"""Hostile lines under `harvester run` (issue 13, items 6 and 7): a line must not pin an account or
reach a store that cannot keep it; it is counted, named once in the log, and the rest flows."""

from __future__ import annotations

import pytest

from harvester import native
from tests import daemon_kit as kit

ISO = b"%s vm dovecot[812]: imap-login: Login: user=<%s>, method=PLAIN, rip=192.0.2.%d, lip=10.0.0.1, " \
      b"mpid=%d, session=<s%d>\n"


def iso_login(when: bytes, user: bytes, i: int) -> bytes:
    return ISO % (when, user, i, 100 + i, i)


@pytest.fixture(params=["python", "native"])
def engine(request, monkeypatch) -> str:
    """The daemon process in each engine (HARVESTER_ENGINE is inherited by `harvester run`)."""
    if request.param == "native" and native.fastscan is None:
        pytest.skip("the native module is not built")
    monkeypatch.setenv("HARVESTER_ENGINE", "python" if request.param == "python" else "auto")
    return request.param


def run_lines(tmp_path, lines: list[bytes], want: list[tuple], *extra: str) -> tuple[list[tuple], str]:
    """`harvester run` over a log that gets `lines`; the rows once they equal `want` (or time runs out)."""
    (tmp_path / "log").mkdir()
    log = tmp_path / "log" / "maillog"
    log.touch()
    db = tmp_path / "h.db"
    proc = kit.start(tmp_path, f"sqlite:///{db}", *extra)
    try:
        writer = kit.Writer(log, lines)
        writer.write(len(lines))
        writer.close()
        got = kit.settle(db, want, proc)
    finally:
        err = kit.stop(proc)
    return got, err


def test_a_login_dated_2099_does_not_pin_the_account_under_run(tmp_path, engine):
    lines = [iso_login(b"2026-11-22T01:52:03+0000", b"jane", 1),
             iso_login(b"2099-01-01T00:00:00+0000", b"jane", 2),
             iso_login(b"2026-11-22T01:52:04+0000", b"bob", 3),
             iso_login(b"2026-11-23T08:00:00+0000", b"jane", 4)]  # her next real login is her newest
    want = [("bob", "imap", "2026-11-22T01:52:04Z", "192.0.2.3", "vm"),
            ("jane", "imap", "2026-11-23T08:00:00Z", "192.0.2.4", "vm")]
    got, err = run_lines(tmp_path, lines, want)
    assert got == want, err
    assert "1 line(s) dated further ahead than future_tolerance_s" in err and "2099-01-01" in err


def test_a_300_byte_user_name_under_run_is_counted_and_skipped(tmp_path, engine):
    lines = [iso_login(b"2026-11-22T01:52:03+0000", b"x" * 300, 1),
             iso_login(b"2026-11-22T01:52:04+0000", b"bob", 2)]
    want = [("bob", "imap", "2026-11-22T01:52:04Z", "192.0.2.2", "vm")]
    got, err = run_lines(tmp_path, lines, want)
    assert got == want, err
    assert "1 line(s) whose user name is longer than max_user_bytes, skipped" in err
