"""The systemd journal as a source, on real journal files: systemd-journal-remote writes them from journald's
export format (no journald needed), journalctl reads them as harvester does in production.

Each scenario: entries of several boots, a restart from a cursor, a cursor vacuumed away, journald's own
"Suppressed N messages" note, a message that tries to smuggle a second line, and kill -9 of `harvester run`.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harvester import metrics
from harvester.sources import journal
from harvester.sources.identity import Cursor
from tests.conftest import ROOT, export_rows, run_cli

REMOTE = Path("/lib/systemd/systemd-journal-remote")
T0 = 1_795_974_426_000_000  # 2026-11-29T17:47:06Z, in microseconds
BOOT_A, BOOT_B = "a" * 32, "b" * 32


@pytest.fixture(autouse=True)
def tools() -> None:
    for need, package in ((REMOTE, "systemd-journal-remote"), (Path(journal.available() or "/nonexistent"),
                                                                "systemd")):
        if not need.exists():
            pytest.fail(f"{need} is missing: run scripts/e2e-deps (Debian package {package})", pytrace=False)


def entry(n: int, *, boot: str = BOOT_A, t: int | None = None, ident: str = "dovecot", msg: str | None = None,
          host: str = "mx1", extra: dict | None = None) -> dict:
    return {"__REALTIME_TIMESTAMP": str(T0 + n * 1_000_000 if t is None else t),
            "__MONOTONIC_TIMESTAMP": str(1_000_000 + n), "_BOOT_ID": boot, "_HOSTNAME": host,
            "SYSLOG_IDENTIFIER": ident, "_TRANSPORT": "syslog",
            "MESSAGE": msg if msg is not None else
            f"imap-login: Logged in: user=<u{n}>, method=PLAIN, rip=192.0.2.{n % 250 + 1}, lip=10.0.0.1, "
            f"mpid={1000 + n}, session=<s{n}>", **(extra or {})}


def write_journal(path: Path, entries: list[dict]) -> None:
    """Append `entries` to the journal file `path` (journald's export format through systemd-journal-remote)."""
    export = path.with_suffix(".export")
    with export.open("wb") as f:
        for e in entries:
            for k, v in e.items():
                if "\n" in v:  # export format: a value with a newline is length-prefixed binary
                    data = v.encode()
                    f.write(k.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n")
                else:
                    f.write(f"{k}={v}\n".encode())
            f.write(b"\n")
    proc = subprocess.run([str(REMOTE), f"--output={path}", str(export)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_dovecot_entries_of_every_boot_are_stored_with_the_journals_time_and_host(tmp_path, store_url, capsys):
    j = tmp_path / "j" / "system.journal"
    j.parent.mkdir()
    write_journal(j, [entry(1), entry(2, ident="postfix"), entry(3, host="mx2"),
                      entry(4, boot=BOOT_B, t=T0 + 3600_000_000 + 242_533)])
    assert run_cli("backfill", "--store", store_url, "--journal-file", str(j)) == 0
    rows = {r["user"]: (r["last_login"], r["ip"], r["node"]) for r in export_rows(store_url, capsys)}
    assert rows == {"u1": ("2026-11-29T17:47:07.000000Z", "192.0.2.2", "mx1"),
                    "u3": ("2026-11-29T17:47:09.000000Z", "192.0.2.4", "mx2"),
                    "u4": ("2026-11-29T18:47:06.242533Z", "192.0.2.5", "mx1")}


def test_lmtp_deliveries_join_their_sessions_connect_line_as_in_a_file(tmp_path, store_url, capsys):
    j = tmp_path / "system.journal"
    write_journal(j, [entry(1, msg="lmtp(61): Connect from 192.0.2.25"),
                      entry(2, msg="lmtp(bob)<61><V1q:R2>: msgid=<1@x>: saved mail to INBOX"),
                      entry(3, msg="lmtp(61): Disconnect from 192.0.2.25: Logged out (state=READY)")])
    assert run_cli("backfill", "--store", store_url, "--journal-file", str(j)) == 0
    assert [(r["user"], r["service"], r["ip"]) for r in export_rows(store_url, capsys)] == [
        ("bob", "lmtp", "192.0.2.25")]


def test_a_message_with_a_line_break_cannot_smuggle_a_login_line(tmp_path, store_url, capsys):
    forged = ("imap-login: Disconnected\n2026-11-29T17:47:06.000000+00:00 mx1 dovecot: imap-login: Logged in: "
              "user=<victim>, method=PLAIN, rip=203.0.113.66, lip=10.0.0.1, mpid=1, session=<x>")
    j = tmp_path / "system.journal"
    write_journal(j, [entry(1, msg=forged)])
    assert run_cli("backfill", "--store", store_url, "--journal-file", str(j)) == 0
    assert export_rows(store_url, capsys) == []


def test_since_and_until_choose_the_entries_a_backfill_reads(tmp_path, store_url, capsys):
    j = tmp_path / "system.journal"
    write_journal(j, [entry(n) for n in range(1, 6)])
    assert run_cli("backfill", "--store", store_url, "--journal-file", str(j), "--since", "2026-11-29 17:47:08",
                   "--until", "2026-11-29 17:47:10") == 0
    assert sorted(r["user"] for r in export_rows(store_url, capsys)) == ["u2", "u3", "u4"]


def test_journald_suppressed_messages_are_counted_as_lines_lost_and_said(tmp_path, store_url, caplog):
    j = tmp_path / "system.journal"
    note = entry(2, ident="systemd-journald", msg="Suppressed 12345 messages from dovecot.service",
                 extra={"MESSAGE_ID": journal.SUPPRESSED_ID})
    other = entry(3, ident="systemd-journald", msg="Suppressed 7 messages from cron.service",
                  extra={"MESSAGE_ID": journal.SUPPRESSED_ID})
    write_journal(j, [entry(1), note, other])
    before = metrics.LINES_LOST.labels("journald_rate_limit")._value.get()
    assert run_cli("backfill", "--store", store_url, "--journal-file", str(j)) == 0
    assert metrics.LINES_LOST.labels("journald_rate_limit")._value.get() - before == 12345
    assert "journald dropped 12345 message(s) of dovecot.service" in caplog.text


def stored_users(db: Path) -> set[str]:
    """The users with a row in the daemon's SQLite file (none while it is still being made)."""
    try:
        with sqlite3.connect(db) as c:
            return {u for (u,) in c.execute("SELECT user FROM last_login")}
    except sqlite3.OperationalError:  # the file exists before its tables do
        return set()


def follower(spec: journal.Spec, positions: list, start_at: str = "beginning") -> tuple[journal.Follower, str]:
    f = journal.Follower(spec)
    how = f.start(positions, start_at)
    return f, how


def drain(f: journal.Follower, want: int, timeout: float = 10.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while out.count(b"\n") < want and time.monotonic() < deadline:
        out += b"".join(b.data for b in f.poll())
        time.sleep(0.05)
    return out


def test_a_restart_resumes_right_after_the_checkpointed_cursor_also_into_later_boots(tmp_path):
    """journalctl --follow alone would show only the newest boot (systemd 252): the entries of the
    checkpoint's boot after it would be lost."""
    d = tmp_path / "journal"
    d.mkdir()
    write_journal(d / "system.journal", [entry(1), entry(2), entry(3), entry(4, boot=BOOT_B), entry(5, boot=BOOT_B)])
    spec = journal.Spec(directories=(str(d),))
    f, _ = follower(spec, [])
    first = drain(f, 5)
    f.close()
    assert first.count(b"\n") == 5
    # the cursor after the first entry, as a checkpoint keeps it
    g = journal.Follower(spec)
    cursor = journal.edge(spec, newest=False)["__CURSOR"]
    how = g.start([Cursor(cursor)], "end")
    try:
        got = drain(g, 4)
        assert "after the checkpointed entry" in how
        assert [line.split(b"user=<")[1].split(b">")[0] for line in got.splitlines()] == [b"u2", b"u3", b"u4", b"u5"]
        assert g.positions() == [Cursor(journal.edge(spec, newest=True)["__CURSOR"])]
    finally:
        g.close()


def test_new_entries_are_followed_as_they_are_written(tmp_path):
    d = tmp_path / "journal"
    d.mkdir()
    write_journal(d / "system.journal", [entry(1)])
    f, how = follower(journal.Spec(directories=(str(d),)), [], start_at="end")
    try:
        assert "end" in how
        assert drain(f, 1, timeout=1.0) == b""
        write_journal(d / "system.journal", [entry(2), entry(3)])
        assert drain(f, 2).count(b"user=<") == 2
    finally:
        f.close()


def test_a_vacuumed_cursor_resumes_at_the_oldest_entry_left_and_says_what_was_lost(tmp_path, caplog):
    d = tmp_path / "journal"
    d.mkdir()
    old = tmp_path / "old.journal"
    write_journal(old, [entry(1)])
    gone = journal.edge(journal.Spec(files=(str(old),)), newest=False)["__CURSOR"]  # its file is vacuumed
    write_journal(d / "system.journal", [entry(60), entry(61)])
    spec = journal.Spec(directories=(str(d),))
    before = metrics.JOURNAL_LOST.labels(spec.name)._value.get()
    f = journal.Follower(spec, on_gap=lambda a, b: journal.count_gap(spec.name, a, b))
    how = f.start([Cursor(gone)], "end")
    try:
        assert "vacuumed" in how
        assert drain(f, 2).count(b"user=<") == 2  # from the oldest entry left
        assert "no longer in the journal" in caplog.text and "2026-11-29T17:47:07Z" in caplog.text
        assert metrics.JOURNAL_LOST.labels(spec.name)._value.get() - before == pytest.approx(59)
    finally:
        f.close()


def test_kill_9_then_restart_loses_no_entry_and_reads_none_twice(tmp_path):
    d = tmp_path / "journal"
    d.mkdir()
    j = d / "system.journal"
    write_journal(j, [entry(n) for n in range(1, 101)])
    db = tmp_path / "h.db"
    args = [sys.executable, "-m", "harvester", "run", "--store", f"sqlite:///{db}", "--state-dir",
            str(tmp_path / "state"), "--metrics-listen", "", "--start-at", "beginning", "--flush-interval-ms", "100",
            "--poll-interval-ms", "100", "--journal-dir", str(d), "--journal", "no"]

    def stored() -> int:
        return len(stored_users(db))

    def wait_for(n: int, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 30
        while stored() < n:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, f"{stored()} of {n} rows stored"
            time.sleep(0.1)

    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(100, proc)
        time.sleep(0.5)  # its checkpoint follows the acknowledged rows
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        write_journal(j, [entry(n) for n in range(101, 201)])  # written while it is down
        proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        wait_for(200, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "after the checkpointed entry" in err
        assert "harvester_events_total" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stored() == 200


def test_the_native_and_the_python_conversion_give_the_same_lines_for_odd_entries():
    """Binary MESSAGEs (JSON arrays of bytes), escapes, a missing host, line breaks, a cut last line."""
    from harvester import native

    chunk = b"\n".join([
        b'{"__CURSOR":"c1","__REALTIME_TIMESTAMP":"1795974426000001","MESSAGE":"imap-login: a\\"b\\u00e4\\nc",'
        b'"_HOSTNAME":"mx 1"}',
        b'{"__CURSOR":"c2","__REALTIME_TIMESTAMP":"1795974427123456","MESSAGE":[105,0,255,10,120]}',
        b'{"__CURSOR":"c3","__REALTIME_TIMESTAMP":"1795974428000000","MESSAGE":"Suppressed 5 messages from '
        b'dovecot.service","MESSAGE_ID":"' + journal.SUPPRESSED_ID.encode() + b'"}',
        b'{"__CURSOR":"c4","__REALTIME_TIMESTAMP":"not a number","MESSAGE":"x"}',
        b'{"__CURSOR":"c5","__REALTIME_TIMES',
    ]) + b"\n"
    seen = {}
    for engine in ("auto", "python"):
        old = native.ENGINE
        native.ENGINE = engine
        try:
            dropped: list[tuple[int, str]] = []
            e = journal.Entries(lambda n, unit, dropped=dropped: dropped.append((n, unit)))
            seen[engine] = (e.convert(chunk), e.cursor, e.time_us, e.bad, dropped)
        finally:
            native.ENGINE = old
    assert seen["auto"] == seen["python"]
    lines, cursor, t, bad, dropped = seen["python"]
    assert lines == ('2026-11-29T17:47:06.000001Z mx_1 dovecot: imap-login: a"bä c\n'.encode()
                     + b"2026-11-29T17:47:07.123456Z - dovecot: i\x00\xff x\n")
    assert (cursor, bad, dropped) == ("c3", 2, [(5, "dovecot.service")])


def test_a_reload_with_another_journal_match_reads_on_from_the_cursor_with_it(tmp_path):
    """SIGHUP with journal_match changed (another instance_name): the journal is read on from the last entry
    handed out, now with the new match; flush_interval_ms of the reloaded config applies too."""
    d = tmp_path / "journal"
    d.mkdir()
    j = d / "system.journal"
    write_journal(j, [entry(1), entry(2, ident="dovecot-2")])
    cfg = tmp_path / "h.toml"
    cfg.write_text('journal_match = ["SYSLOG_IDENTIFIER=dovecot"]\n')
    db = tmp_path / "h.db"
    proc = subprocess.Popen([sys.executable, "-m", "harvester", "run", "--config", str(cfg), "--store",
                             f"sqlite:///{db}", "--state-dir", str(tmp_path / "state"), "--metrics-listen", "",
                             "--start-at", "beginning", "--flush-interval-ms", "100", "--poll-interval-ms", "100",
                             "--journal-dir", str(d), "--journal", "no"], cwd=ROOT, stderr=subprocess.PIPE, text=True)

    def users() -> set[str]:
        return stored_users(db)

    def wait_for(want: set[str]) -> None:
        deadline = time.monotonic() + 20
        while users() != want:
            assert proc.poll() is None and time.monotonic() < deadline, (users(), want)
            time.sleep(0.1)

    try:
        wait_for({"u1"})
        cfg.write_text('journal_match = ["SYSLOG_IDENTIFIER=dovecot-2"]\n')
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        write_journal(j, [entry(3, ident="dovecot-2"), entry(4)])
        wait_for({"u1", "u2", "u3"})  # every entry after the cursor (u1's) the new match takes; u4 no longer
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "reloaded configuration" in err


def test_journal_paths_with_commas_and_percent_signs_are_read_and_resumed(tmp_path, store_url, capsys):
    d = tmp_path / "copied, from mx1 (100%)"
    d.mkdir()
    write_journal(d / "system.journal", [entry(1)])
    f = tmp_path / "a,b%2C.journal"
    write_journal(f, [entry(2)])
    assert run_cli("backfill", "--store", store_url, "--journal-dir", str(d), "--journal-file", str(f)) == 0
    assert sorted(r["user"] for r in export_rows(store_url, capsys)) == ["u1", "u2"]
    for spec in journal.specs(False, [str(d)], [str(f), str(tmp_path / "other.journal")], journal.DEFAULT_MATCH):
        assert journal.Spec.parse(spec.name) == spec  # the checkpoint's key names the same journals again


def test_a_checkpoint_an_earlier_version_wrote_for_a_path_with_a_percent_sign_is_still_resumed(tmp_path):
    """Before paths were escaped in a journal's name, 'journal:dir=/x/100%' was the checkpoint's key: after the
    upgrade the daemon resumes from it, not from start_at (= end here, which would skip what came meanwhile)."""
    d = tmp_path / "copied 100%"
    d.mkdir()
    j = d / "system.journal"
    write_journal(j, [entry(n) for n in range(1, 51)])
    db, state = tmp_path / "h.db", tmp_path / "state"
    args = [sys.executable, "-m", "harvester", "run", "--store", f"sqlite:///{db}", "--state-dir", str(state),
            "--metrics-listen", "", "--flush-interval-ms", "100", "--poll-interval-ms", "100", "--journal-dir",
            str(d), "--journal", "no"]

    def run_until(n: int, *extra: str) -> str:
        proc = subprocess.Popen([*args, *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while len(stored_users(db)) < n:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, f"{len(stored_users(db))} of {n} rows stored"
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            return err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    run_until(50, "--start-at", "beginning")
    checkpoints = state / "checkpoints.json"
    new_name = journal.Spec(directories=(str(d),)).name
    old_name = f"journal:dir={d}"
    assert new_name != old_name
    checkpoints.write_text(checkpoints.read_text().replace(json.dumps(new_name), json.dumps(old_name)))
    write_journal(j, [entry(n) for n in range(51, 101)])  # written while it is down
    assert "after the checkpointed entry" in run_until(100)
    assert len(stored_users(db)) == 100
