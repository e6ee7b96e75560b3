"""Bad input through the real CLI: counted, named once per file, skipped; the run goes on.

Each test is one scenario an operator meets: a copytruncate/crash hole of NUL
bytes, invalid UTF-8, an endless line, a truncated or corrupt archive, binary
junk, a missing file, a file the service user may not read.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from harvester import native
from harvester.coalesce import Coalescer
from harvester.sinks import open_store
from tests.conftest import ROOT, export_rows, run_cli

LOGIN = b"Nov 22 01:53:%02d vm dovecot: imap-login: Login: user=<%s>, method=PLAIN, rip=192.0.2.%d, " \
        b"lip=10.0.0.1, mpid=1%02d, session=<abc>\n"


def login(i: int, user: bytes = b"") -> bytes:
    return LOGIN % (i, user or b"u%d" % i, i, i)


def backfill(url: str, *paths: Path) -> int:
    return run_cli("backfill", "--store", url, "--timezone", "UTC", "--year", "2026", *map(str, paths))


def users(url: str, capsys) -> set[str]:
    return {r["user"] for r in export_rows(url, capsys)}


def test_nul_hole_is_counted_and_the_text_after_it_is_kept(tmp_path, store_url, capsys, caplog):
    f = tmp_path / "maillog"
    f.write_bytes(login(1) + b"\x00" * 4096 + login(2) + login(3))
    assert backfill(store_url, f) == 0
    err = capsys.readouterr().err
    assert "nul: 1" in err
    assert "NUL bytes" in caplog.text and str(f) in caplog.text
    assert users(store_url, capsys) == {"u1", "u2", "u3"}


def test_invalid_utf8_user_is_skipped_others_are_stored(tmp_path, store_url, capsys, caplog):
    f = tmp_path / "maillog"
    f.write_bytes(login(1, b"bad\xff\xfe") + login(2))
    assert backfill(store_url, f) == 0
    assert "utf8: 1" in capsys.readouterr().err
    assert "not valid UTF-8" in caplog.text
    assert users(store_url, capsys) == {"u2"}


def test_endless_line_is_skipped_without_eating_memory(tmp_path, store_url, capsys, caplog):
    f = tmp_path / "maillog"
    f.write_bytes(login(1) + b"x" * (3 << 20) + b"\n" + login(2))
    assert run_cli("backfill", "--store", store_url, "--year", "2026", "--max-line-bytes", "1048576",
                   "--workers", "1", str(f)) == 0
    assert "long_line: 1" in capsys.readouterr().err
    assert "longer than max_line_bytes" in caplog.text
    assert users(store_url, capsys) == {"u1", "u2"}


def test_truncated_gzip_keeps_the_lines_before_the_damage(tmp_path, store_url, capsys):
    body = b"".join(login(i % 60, b"user%d" % i) for i in range(5000))
    data = gzip.compress(body)
    f = tmp_path / "maillog.1.gz"
    f.write_bytes(data[: len(data) * 2 // 3])
    assert backfill(store_url, f) == 1  # a damaged file is a problem the exit status reports
    err = capsys.readouterr().err
    assert "truncated" in err and str(f) in err
    got = users(store_url, capsys)
    assert 100 < len(got) < 5000 and "user0" in got


def test_corrupt_archive_and_binary_junk_are_skipped_and_named(tmp_path, store_url, capsys):
    junk = tmp_path / "junk.gz"
    junk.write_bytes(b"\x1f\x8b" + os.urandom(4000))
    binary = tmp_path / "binary.log"
    binary.write_bytes(os.urandom(20000).replace(b"\n", b"x"))
    good = tmp_path / "maillog"
    good.write_bytes(login(1))
    assert backfill(store_url, junk, binary, good) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{junk}: corrupt gzip data" in err and f"{binary}: no line in a known format" in err
    assert users(store_url, capsys) == {"u1"}


def test_missing_file_does_not_stop_the_others(tmp_path, store_url, capsys):
    good = tmp_path / "maillog"
    good.write_bytes(login(1))
    assert backfill(store_url, tmp_path / "nope.log", good) == 1
    assert f"{tmp_path / 'nope.log'}: no such file" in capsys.readouterr().err
    assert users(store_url, capsys) == {"u1"}


def test_permission_denied_is_named_and_skipped(tmp_path, store_url, capsys):
    """A real EACCES from the kernel. Root reads any file, so as root (CI) the backfill runs without the
    capabilities that let it: CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (setpriv, util-linux)."""
    locked = tmp_path / "maillog.1"
    locked.write_bytes(login(2))
    locked.chmod(0)
    good = tmp_path / "maillog"
    good.write_bytes(login(1))
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    config = tmp_path / "empty.toml"
    config.touch()
    proc = subprocess.run([*drop, sys.executable, "-m", "harvester", "backfill", "--config", str(config),
                           "--store", store_url, "--year", "2026", "--workers", "1", str(locked), str(good)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "permission denied" in proc.stderr
    assert users(store_url, capsys) == {"u1"}


def test_unknown_login_shape_is_counted_as_not_understood(tmp_path, store_url, capsys):
    f = tmp_path / "maillog"
    f.write_bytes(login(1) + b"Nov 22 01:54:00 vm dovecot: imap-login: Login: usr=<x> from 1.2.3.4\n")
    assert backfill(store_url, f) == 0
    assert "lines not understood: 1" in capsys.readouterr().err


def test_permission_denied_even_as_root_via_the_open_seam(tmp_path, store_url, capsys, monkeypatch):
    """The same scenario where tests run as root: the file opens with EACCES."""
    from harvester.sources import compression

    locked = tmp_path / "maillog.1"
    locked.write_bytes(login(2))
    good = tmp_path / "maillog"
    good.write_bytes(login(1))
    real_open = open

    def guarded(path, *a, **k):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(compression, "open", guarded, raising=False)
    assert run_cli("backfill", "--store", store_url, "--year", "2026", "--workers", "1", str(locked), str(good)) == 1
    assert f"{locked}: cannot open: Permission denied" in capsys.readouterr().err
    assert users(store_url, capsys) == {"u1"}


# --- Lines that would pin an account or poison a store (issue 13, items 6 and 7) -----------------
ISO = b"%s vm dovecot[812]: imap-login: Login: user=<%s>, method=PLAIN, rip=192.0.2.%d, lip=10.0.0.1, " \
      b"mpid=%d, session=<s%d>\n"


@pytest.fixture(params=["python", "native"])
def engine(request, monkeypatch) -> str:
    """Each scenario in both engines (HARVESTER_ENGINE=python, or the native scanner when built)."""
    if request.param == "native" and native.fastscan is None:
        pytest.skip("the native module is not built")
    monkeypatch.setattr(native, "ENGINE", "python" if request.param == "python" else "auto")
    return request.param


def written_at(f: Path, when: str) -> None:
    t = datetime.fromisoformat(when).timestamp()
    os.utime(f, (t, t))


def logins(url: str, capsys) -> dict[str, str]:
    return {r["user"]: r["last_login"] for r in export_rows(url, capsys)}


def test_a_login_dated_2099_does_not_pin_the_account(tmp_path, store_url, capsys, caplog, engine):
    f = tmp_path / "maillog"
    future = ISO % (b"2099-01-01T00:00:00+0000", b"jane", 9, 9, 9)
    real = ISO % (b"2026-11-22T01:52:03+0000", b"jane", 1, 1, 1)
    f.write_bytes(real + future + ISO % (b"2026-11-22T01:52:04+0000", b"bob", 2, 2, 2))
    written_at(f, "2026-11-22T01:53:00+00:00")
    assert run_cli("backfill", "--store", store_url, "--workers", "1", str(f)) == 0
    assert "future: 1" in capsys.readouterr().err
    assert f"{f}: 1 line(s) dated further ahead than future_tolerance_s" in caplog.text
    assert f"first at byte {len(real)}" in caplog.text and "2099-01-01" in caplog.text
    assert logins(store_url, capsys) == {"jane": "2026-11-22T01:52:03Z", "bob": "2026-11-22T01:52:04Z"}
    # The next real login is the account's newest: nothing dated 2099 sits in the store to beat it.
    later = tmp_path / "maillog.next"
    later.write_bytes(ISO % (b"2026-11-23T08:00:00+0000", b"jane", 3, 3, 3))
    written_at(later, "2026-11-23T08:00:01+00:00")
    assert run_cli("backfill", "--store", store_url, "--workers", "1", str(later)) == 0
    assert logins(store_url, capsys)["jane"] == "2026-11-23T08:00:00Z"


def test_syslog_dec31_line_read_on_jan1_lands_in_the_old_year_and_one_a_day_ahead_is_refused(
        tmp_path, store_url, capsys, engine):
    f = tmp_path / "maillog"
    f.write_bytes(LOGIN.replace(b"Nov 22 01:53", b"Dec 31 23:59") % (50, b"old", 1, 1)
                  + LOGIN.replace(b"Nov 22 01:53", b"Jan  1 00:00") % (20, b"new", 2, 2)
                  # 18 h after the file was last written: a wrong clock or zone, not last year's line
                  + LOGIN.replace(b"Nov 22 01:53", b"Jan  1 18:00") % (0, b"ahead", 3, 3))
    written_at(f, "2026-01-01T00:00:30+00:00")
    assert run_cli("backfill", "--store", store_url, "--timezone", "UTC", "--workers", "1", str(f)) == 0
    assert "future: 1" in capsys.readouterr().err
    assert logins(store_url, capsys) == {"old": "2025-12-31T23:59:50Z", "new": "2026-01-01T00:00:20Z"}


def test_a_300_byte_user_name_is_counted_and_skipped(tmp_path, store_url, capsys, caplog, engine):
    f = tmp_path / "maillog"
    f.write_bytes(login(1, b"x" * 300) + login(2) + login(3, b"y" * 255))
    assert backfill(store_url, f) == 0
    assert "long_user: 1" in capsys.readouterr().err
    assert f"{f}: 1 line(s) whose user name is longer than max_user_bytes, skipped (first at byte 0" in caplog.text
    assert users(store_url, capsys) == {"u2", "y" * 255}
    assert run_cli("backfill", "--store", store_url, "--year", "2026", "--max-user-bytes", "400", str(f)) == 0
    assert "x" * 300 in users(store_url, capsys)


def test_a_spray_of_200000_distinct_non_utf8_names_is_counted_not_kept(tmp_path):
    """A password spray with broken names, as the daemon's sink meets it flush after flush: the counts
    and one example stay, the names do not (they once grew the daemon by 134 MB per 2 M lines)."""
    sink = Coalescer()
    store = open_store(f"sqlite:///{tmp_path}/h.db")
    try:
        for batch in range(4):
            for i in range(50_000):
                sink.logins.put(b"\xff%d-%d" % (batch, i), "imap", 1_795_308_723_000_000, 0, b"192.0.2.1", None,
                                "imap")
            sink.logins.put(b"jane", "imap", 1_795_308_723_000_000, 0, b"192.0.2.1", None, "imap")
            if batch % 2:
                store.flush(sink)  # the SQLite store's native writer skips them
            else:
                store.write(sink.take())  # any store: the rows Coalescer.take decodes
        assert sink.bad_input() == {"utf8": 200_000}
        assert sink.bad_sample("utf8") == b"\xff0-0"
        held = [k for k, v in vars(sink).items() if isinstance(v, list | dict | set | tuple) and len(v) > 100]
        assert not held, f"the Coalescer keeps {held} growing with the bad names"
        assert [r.user for r in store.export()] == ["jane"]
    finally:
        store.close()


@pytest.mark.skipif(native.fastscan is None, reason="the native module is not built")
def test_future_and_long_user_lines_are_reported_alike_by_both_engines():
    """The same counts, first places and samples, and the same rows, whichever engine runs the loop."""
    from datetime import UTC

    from harvester import patterns
    from harvester.parse import Parser
    from harvester.timeparse import Clock

    block = (login(1) + login(2, b"x" * 256) + login(3).replace(b"Nov 22", b"Nov 23") + login(4)
             + login(5, b"y" * 255) + login(6).replace(b"Nov 22", b"Dec 24"))
    reference = datetime(2026, 11, 22, 2, 0, tzinfo=UTC).timestamp()
    seen = {}
    for engine in ("python", "auto"):
        old, native.ENGINE = native.ENGINE, engine
        try:
            parser = Parser(patterns.load("dovecot"))
            parser.begin("f", "syslog", Clock("bsd", UTC, reference=reference))
            sink = Coalescer()
        finally:
            native.ENGINE = old
        parser.feed(block, sink)
        problems = {k: (p.count, p.first_offset, p.sample) for k, p in parser.end().items()}
        seen[engine] = (problems, dict(parser.stats.bad), sorted(sink.logins.items()))
    assert seen["python"] == seen["auto"]
    problems, bad, rows = seen["auto"]
    assert bad == {"future": 1, "long_user": 1}
    assert problems["long_user"][1] == len(login(1)) and problems["future"][2].startswith(b"Nov 23 01:53:03")
    assert {k[0] for k, _ in rows} == {b"u1", b"u4", b"y" * 255, b"u6"}  # "Dec 24" is last year's
