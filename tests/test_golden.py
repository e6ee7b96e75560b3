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


SHARED = Path(__file__).resolve().parents[2] / "shared" / "samples"
VERSIONS = ["dovecot-2.3.19", "dovecot-2.4.1"]


@pytest.fixture(params=VERSIONS)
def real(request) -> Path:
    """Real output of one Dovecot version, with what its own last_login plugin stored (../shared/samples)."""
    path = SHARED / request.param
    assert path.is_dir(), f"{path} is missing: the golden tests need ../shared/samples"
    return path


def plugin_rows(samples: Path, dict_name: str = "last_login_plugin.dict") -> dict[tuple[str, str], tuple[str, int]]:
    """(user, service) -> (ip, epoch ms) from the plugin's file dict (key, value lines), newest per key."""
    lines = (samples / dict_name).read_text().splitlines()
    out: dict[tuple[str, str], tuple[str, int]] = {}
    for key, value in zip(lines[::2], lines[1::2], strict=True):
        _, _, service, rest = key.split("/", 3)
        user, ip = rest.rsplit("/", 1)  # an address has no "/", a user name may
        if (user, service) not in out or int(value) > out[user, service][1]:
            out[user, service] = (ip, int(value))
    return out


def stored(url: str, capsys) -> dict[tuple[str, str], tuple[str, int]]:
    from datetime import datetime

    rows = {}
    for r in export_rows(url, capsys):
        t = datetime.fromisoformat(r["last_login"].replace("Z", "+00:00"))
        rows[r["user"], r["service"]] = (r["ip"], round(t.timestamp() * 1_000_000))
    return rows


MAX_LAG_MS = 10  # how much later than the plugin's stamp the log's may be (measured on these: 0.1-5 ms)


def assert_agrees(ours: dict, ref: dict, precise: bool = False) -> None:
    """Same keys and IPs as the plugin; the time that of the plugin's stamp at the log's precision (the
    second, or with `precise` the microsecond), never earlier and at most MAX_LAG_MS later: the plugin
    stamps when the mail user is created, the log line is stamped a little later (possibly in the next
    second)."""
    assert set(ours) == set(ref)
    for key, (ip, ms) in ref.items():
        assert ours[key][0] == ip, key
        if precise:
            assert 0 <= ours[key][1] - ms * 1000 < MAX_LAG_MS * 1000, key
        else:
            assert ms // 1000 <= ours[key][1] // 1_000_000 <= (ms + MAX_LAG_MS) // 1000, key


def test_syslog_traditional_agrees_with_last_login_plugin(real, store_url, capsys):
    """Same users, services and IPs as the plugin; times equal to the second (the log's precision)."""
    assert run_cli("backfill", "--store", store_url, "--timezone", "UTC", str(real / "syslog-traditional.log")) == 0
    assert_agrees(stored(store_url, capsys), plugin_rows(real))


def test_syslog_rfc3339_agrees_with_last_login_plugin(real, store_url, capsys):
    """Microsecond log: the log line is at most MAX_LAG_MS after the plugin's stamp, never before."""
    assert run_cli("backfill", "--store", store_url, str(real / "syslog-rfc3339.log")) == 0
    assert_agrees(stored(store_url, capsys), plugin_rows(real), precise=True)


@pytest.mark.parametrize("name", ["logpath-default", "logpath-usecs"])
def test_dovecot_log_files_agree_with_the_plugin_of_their_run(real, store_url, capsys, name):
    """Dovecot's own log_path files: 2.4.1's samples come with the plugin's dict of each run; 2.3.19's are
    another run of the syslog one's traffic, so only the accounts and addresses compare."""
    assert run_cli("backfill", "--store", store_url, "--timezone", "UTC", str(real / f"{name}.log")) == 0
    ours = stored(store_url, capsys)
    own = real / f"last_login_plugin-{name}.dict"
    if own.exists():
        assert_agrees(ours, plugin_rows(real, own.name), precise=name.endswith("usecs"))
    else:
        assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in plugin_rows(real).items()}


@pytest.mark.parametrize("name", ["syslog-traditional", "syslog-rfc3339", "logpath-default", "logpath-usecs"])
def test_every_login_like_line_of_real_output_is_understood_and_every_auth_failure_counted(real, name, capsys):
    """test-patterns on real output: 0 lines not understood (exit 0), and as many auth failures as the log
    has lines saying so."""
    log = real / f"{name}.log"
    assert run_cli("test-patterns", "--timezone", "UTC", str(log)) == 0
    out = capsys.readouterr().out
    failed = sum("auth failed" in line for line in log.read_text().splitlines())
    counted = sum(int(line.split()[-1]) for line in out.splitlines()
                  if line.split()[:2] in (["auth-failed", "auth_fail"], ["login-aborted-auth-failed", "auth_fail"]))
    assert failed and counted == failed


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
