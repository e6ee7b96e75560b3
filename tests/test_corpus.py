"""The generated corpus (tests/corpus.py knows the answer it generated) through the real CLI.

Thousands of users, IPv6, odd user names, webmail, LMTP sessions and XCLIENT,
equal-time ties, and a rotated set in five compressions that crosses a New Year.
"""

from __future__ import annotations

import random
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from tests import corpus
from tests.conftest import export_rows, run_cli


def as_rows(url: str, capsys) -> dict[tuple[str, str], tuple[int, str | None]]:
    out = {}
    for r in export_rows(url, capsys):
        t = datetime.fromisoformat(r["last_login"].replace("Z", "+00:00"))
        out[r["user"], r["service"]] = (round(t.timestamp() * 1_000_000), r["ip"])
    return out


def expected(c: corpus.Corpus) -> dict[tuple[str, str], tuple[int, str | None]]:
    return {k: (r.last_login_us, r.ip) for k, r in c.rows.items()}


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin"])
def test_rotated_set_across_new_year_gives_exactly_the_oracle_rows(tmp_path, store_url, capsys, tz):
    c = corpus.generate(tmp_path / "logs", lines=30_000, users=3000, tz=tz, rotate_every=5000,
                        compress=("", ".gz", ".bz2", ".xz", ".zst"))
    assert len(c.files) >= 6 and c.ties
    files = [str(f) for f in c.files]
    random.Random(4).shuffle(files)  # order on the command line must not matter
    assert run_cli("backfill", "--store", store_url, "--timezone", tz,
                   "--webmail-networks", "10.99.0.0/16", *files) == 0
    got = as_rows(store_url, capsys)
    want = expected(c)
    assert got.keys() == want.keys()
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, list(wrong.items())[:5]
    local_years = {datetime.fromtimestamp(t / 1e6, ZoneInfo(tz)).year for t, _ in got.values()}
    assert local_years == {2025, 2026}  # the year of "Dec 31"/"Jan  1" lines came from file mtimes
    assert any(s == "webmail" for _, s in got) and any(":" in (ip or "") for _, ip in got.values())


def test_backfilling_the_same_logs_twice_gives_the_same_table(tmp_path, store_url, capsys):
    c = corpus.generate(tmp_path / "logs", lines=8000, users=500, rotate_every=3000)
    args = ["backfill", "--store", store_url, "--timezone", "UTC", *map(str, c.files)]
    assert run_cli(*args) == 0
    first = export_rows(store_url, capsys)
    assert run_cli(*args) == 0
    assert export_rows(store_url, capsys) == first


def test_an_older_file_backfilled_later_moves_nothing_backwards(tmp_path, store_url, capsys):
    c = corpus.generate(tmp_path / "logs", lines=8000, users=300, rotate_every=4000)
    newest, older = c.files[-1], c.files[:-1]
    assert run_cli("backfill", "--store", store_url, "--timezone", "UTC", str(newest)) == 0
    after_newest = as_rows(store_url, capsys)
    assert run_cli("backfill", "--store", store_url, "--timezone", "UTC", *map(str, older)) == 0
    final = as_rows(store_url, capsys)
    for key, (t, _) in after_newest.items():
        assert final[key][0] >= t


@pytest.mark.parametrize("compress", [("",), (".gz", ".xz", ".zst", ".bz2")])
def test_backfill_split_across_processes_gives_the_same_rows(tmp_path, store_url, capsys, monkeypatch,
                                                             compress):
    """Files cut into segments parsed by 3 worker processes: LMTP sessions, POP3 joins and
    equal-time ties that straddle the cuts still give exactly the oracle's rows."""
    from harvester import segments

    monkeypatch.setattr(segments, "MIN_SEGMENT", 64 << 10)
    c = corpus.generate(tmp_path / "logs", lines=40_000, users=400, rotate_every=15_000,
                        compress=compress, seconds_per_line=0.2)
    assert run_cli("backfill", "--store", store_url, "--timezone", "UTC", "--workers", "3",
                   "--webmail-networks", "10.99.0.0/16", *map(str, c.files)) == 0
    got = as_rows(store_url, capsys)
    want = expected(c)
    assert got.keys() == want.keys()
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not wrong, list(wrong.items())[:5]
