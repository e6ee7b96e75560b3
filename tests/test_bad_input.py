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
from pathlib import Path

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
    from harvester.sources import archive

    locked = tmp_path / "maillog.1"
    locked.write_bytes(login(2))
    good = tmp_path / "maillog"
    good.write_bytes(login(1))
    real_open = open

    def guarded(path, *a, **k):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(archive, "open", guarded, raising=False)
    assert run_cli("backfill", "--store", store_url, "--year", "2026", "--workers", "1", str(locked), str(good)) == 1
    assert f"{locked}: cannot open: Permission denied" in capsys.readouterr().err
    assert users(store_url, capsys) == {"u1"}
