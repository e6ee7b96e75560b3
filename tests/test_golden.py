"""Golden pairs: a log and the rows it must give.

1. The real Dovecot 2.3.19 samples, checked against what Dovecot's own
   last_login plugin stored for the same traffic (the reference answer).
2. Small hand-written logs under tests/golden/: NAME.log gives the last-login
   rows in NAME.rows.jsonl (as `harvester export` prints them) and the other
   events (failures, refusals, POP3 deletions) in NAME.events.jsonl. Each log
   is one family of line shapes; regenerate an expectation only after reading it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import export_rows, run_cli

GOLDEN = Path(__file__).parent / "golden"


def plugin_rows(samples: Path) -> dict[tuple[str, str], tuple[str, int]]:
    """(user, service) -> (ip, epoch ms) from the plugin's file dict (key, value lines)."""
    lines = (samples / "last_login_plugin.dict").read_text().splitlines()
    out = {}
    for key, value in zip(lines[::2], lines[1::2], strict=True):
        _, _, service, user, ip = key.split("/", 4)
        out[user, service] = (ip, int(value))
    return out


def stored(url: str, capsys) -> dict[tuple[str, str], tuple[str, int]]:
    from datetime import datetime

    rows = {}
    for r in export_rows(url, capsys):
        t = datetime.fromisoformat(r["last_login"].replace("Z", "+00:00"))
        rows[r["user"], r["service"]] = (r["ip"], round(t.timestamp() * 1_000_000))
    return rows


def test_syslog_traditional_agrees_with_last_login_plugin(samples, store_url, capsys):
    """Same users, services and IPs as the plugin; times equal to the second (the log's precision)."""
    assert run_cli("backfill", "--store", store_url, "--timezone", "UTC",
                   str(samples / "syslog-traditional.log")) == 0
    assert_agrees(stored(store_url, capsys), plugin_rows(samples))


def assert_agrees(ours: dict, ref: dict, max_lag_us: int | None = None) -> None:
    """Same keys and IPs as the plugin, same second; optionally at most max_lag_us after its stamp."""
    assert set(ours) == set(ref)
    for key, (ip, ms) in ref.items():
        assert ours[key][0] == ip, key
        assert ours[key][1] // 1_000_000 == ms // 1000, key
        if max_lag_us is not None:
            assert 0 <= ours[key][1] - ms * 1000 < max_lag_us, key


def test_syslog_rfc3339_agrees_with_last_login_plugin(samples, store_url, capsys):
    """Microsecond log: equal to the second, and the log line is at most 10 ms after the plugin's stamp.

    The plugin stamps when the mail user is created; the syslog daemon stamps the
    line when it receives it, a few milliseconds later - never earlier.
    """
    assert run_cli("backfill", "--store", store_url, str(samples / "syslog-rfc3339.log")) == 0
    assert_agrees(stored(store_url, capsys), plugin_rows(samples), max_lag_us=10_000)


@pytest.mark.parametrize("name", ["logpath-default.log", "logpath-usecs.log"])
def test_dovecot_log_files_give_the_same_accounts_as_syslog(samples, store_url, capsys, name):
    """Dovecot's own log_path files (another run of the same traffic) give the same rows but times."""
    assert run_cli("backfill", "--store", store_url, "--timezone", "UTC", str(samples / name)) == 0
    ours = stored(store_url, capsys)
    ref = plugin_rows(samples)
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in ref.items()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("log", sorted(GOLDEN.glob("*.log")), ids=lambda p: p.stem)
def test_golden_pair(log: Path, store_url, capsys):
    assert run_cli("backfill", "--store", store_url, "--timezone", "UTC", "--year", "2026",
                   "--webmail-networks", "10.99.0.0/16", "--node", "golden", "--event-rows", "all", str(log)) == 0
    assert export_rows(store_url, capsys) == _jsonl(log.with_suffix(".rows.jsonl"))
    db = sqlite3.connect(store_url.removeprefix("sqlite:///"))
    events = [dict(user=u, kind=k, service=s, time=t, ip=ip, detail=d) for u, k, s, t, ip, d in db.execute(
        "SELECT user, kind, service, time, ip, detail FROM last_event ORDER BY user, kind")]
    assert events == _jsonl(log.with_suffix(".events.jsonl"))
