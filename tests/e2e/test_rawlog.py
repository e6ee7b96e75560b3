"""Rawlogs written by a real Dovecot 2.3 (Debian's), read by harvester and compared with the rows the maillog
gives for the same traffic, and with what Dovecot's last_login plugin stored.

Two layouts: `rawlog_dir = .../%u` (the mail process's pid in the name, the address joined from the maillog's
Login line with that mpid) and the rawlog binary as a post-login script with -t -I (the address in the name).
The pre-login rawlog (`imap-login -R`) holds the passwords clients sent; the privacy test points harvester at
it and looks for those passwords in everything harvester wrote.
"""

from __future__ import annotations

import base64
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.dovecot import USERS, MailStack, MissingDependency, check_dependencies, stop_process, wait_until
from tests.e2e.test_live import ROOT, Daemon, StoredRows, assert_clean_exit

SERVICES = ("imap", "pop3")  # what a rawlog can tell; LMTP deliveries are only in the maillog
SETTLE_S = 20.0  # the daemon takes a rawlog session 3 s after it began, at its next poll


def _stack(mode: str) -> MailStack:
    try:
        check_dependencies()
    except MissingDependency as e:
        pytest.fail(str(e), pytrace=False)  # never a skip
    return MailStack(rawlog=mode)


@pytest.fixture
def dir_stack() -> Iterator[MailStack]:
    with _stack("dir") as s:
        yield s


@pytest.fixture
def binary_stack() -> Iterator[MailStack]:
    with _stack("binary") as s:
        yield s


def harvester(tmp_path: Path, command: str, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "harvester.toml"
    config.touch()  # neither $HARVESTER_CONFIG nor /etc/harvester leaks in
    env = {k: v for k, v in os.environ.items() if k != "HARVESTER_CONFIG"}
    proc = subprocess.run([sys.executable, "-m", "harvester", command, "--config", str(config), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"harvester {command} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc


def rows_of(db: Path) -> StoredRows:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {(u, s): (us, ip) for u, s, us, ip in
                con.execute("SELECT user, service, last_login_us, last_ip FROM last_login")}
    finally:
        con.close()


def backfill(tmp_path: Path, name: str, *args: str) -> tuple[StoredRows, str]:
    """A backfill into a store of its own; its rows and what it printed (the summary, and its log)."""
    db = tmp_path / f"{name}.db"
    proc = harvester(tmp_path, "backfill", "--store", f"sqlite:///{db}", "--timezone", "UTC", *args)
    return rows_of(db), proc.stdout + proc.stderr


def session_files(root: Path) -> list[Path]:
    """The post-login sessions' .out files (rawlog_dir: ROOT/USER/*.out; binary: ROOT/USER/dovecot.rawlog/*.out)."""
    return [p for p in root.glob("*/*.out")] + [p for p in root.glob("*/dovecot.rawlog/*.out")]


def newest_sessions(root: Path) -> dict[tuple[str, str], int]:
    """The test's own reading of the rawlogs: per (user, service), the newest session's first stamp in us."""
    newest: dict[tuple[str, str], int] = {}
    for out in session_files(root):
        user = out.parent.parent.name if out.parent.name == "dovecot.rawlog" else out.parent.name
        stamp, reply = out.read_bytes().split(b"\n", 1)[0].split(b" ", 1)
        service = "pop3" if reply.startswith(b"+OK") else "imap"
        secs, usecs = stamp.split(b".")
        us = int(secs) * 1_000_000 + int(usecs)
        newest[user, service] = max(newest.get((user, service), 0), us)
    return newest


def wait_for_sessions(stack: MailStack, root: Path) -> int:
    """Wait until every IMAP/POP3 Login line in the maillog has its rawlog session with a first line; their count."""
    def logins() -> int:
        text = stack.log_text()
        return text.count("imap-login: Login: ") + text.count("pop3-login: Login: ")

    def ready() -> bool:
        files = session_files(root)
        return len(files) == logins() > 0 and all(b"\n" in p.read_bytes() for p in files)

    wait_until(ready, 10, "a rawlog session for every Login line")
    return logins()


def assert_close_to_plugin(stack: MailStack, rows: StoredRows) -> None:
    """A session's first line is written after the plugin stamped the login (mail user creation), within 1 s."""
    ref = stack.last_logins()
    for key, (us, _) in rows.items():
        assert ref[key].time_ms * 1000 <= us < ref[key].time_ms * 1000 + 1_000_000, (key, us, ref[key])


def rawlog_counter(text: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "harvester_rawlog_sessions_total")


def test_rawlog_dir_sessions_give_the_maillog_rows_and_take_their_address_from_its_login_line(
        dir_stack: MailStack, tmp_path: Path) -> None:
    stack, root = dir_stack, dir_stack.dovecot.rawlog_dir
    for n in range(3):
        stack.traffic_round(n)
    sessions = wait_for_sessions(stack, root)

    from_maillog, _ = backfill(tmp_path, "maillog", str(stack.maillog))
    from_rawlog, summary = backfill(tmp_path, "rawlog", "--rawlog", str(root))
    from_both, summary_both = backfill(tmp_path, "both", "--rawlog", str(root), str(stack.maillog))

    newest = newest_sessions(root)
    login_keys = {key for key in from_maillog if key[1] in SERVICES}
    assert from_rawlog.keys() == newest.keys() == login_keys
    assert {user for user, _ in login_keys} == {u.name for u in USERS}  # "a>b,c d" too
    assert f"rawlog sessions: {sessions:,} ({sessions:,} without a known address)" in summary, summary
    assert f"rawlog sessions: {sessions:,} (0 without a known address)" in summary_both, summary_both
    for key in login_keys:
        us, ip = from_rawlog[key]
        maillog_us, maillog_ip = from_maillog[key]
        assert us == newest[key] and not ip, (key, from_rawlog[key])
        # the same login: its Login line (syslog: whole seconds) in the same second, or the one before
        assert 0 <= us // 1_000_000 - maillog_us // 1_000_000 <= 1, (key, us, maillog_us)
        assert from_both[key] == (max(us, maillog_us), maillog_ip), (key, from_both[key], from_maillog[key])
    for key in from_maillog.keys() - login_keys:  # deliveries: only the maillog knows them
        assert from_both[key] == from_maillog[key]
    assert_close_to_plugin(stack, from_rawlog)


def test_rawlog_binary_sessions_carry_their_address_in_the_name_and_agree_with_the_maillog(
        binary_stack: MailStack, tmp_path: Path) -> None:
    stack, homes = binary_stack, binary_stack.dovecot.homes
    for n in range(2):  # jane logs in over ::1 in round 0: an IPv6 address in a file name
        stack.traffic_round(n)
    sessions = wait_for_sessions(stack, homes)
    assert any(p.name.startswith("::1-") for p in session_files(homes))

    from_maillog, _ = backfill(tmp_path, "maillog", str(stack.maillog))
    from_rawlog, summary = backfill(tmp_path, "rawlog", "--rawlog", str(homes))

    newest = newest_sessions(homes)
    assert from_rawlog.keys() == newest.keys() == {key for key in from_maillog if key[1] in SERVICES}
    assert f"rawlog sessions: {sessions:,} (0 without a known address)" in summary, summary
    for key, (us, ip) in from_rawlog.items():
        assert us == newest[key], key
        assert ip == from_maillog[key][1] == stack.last_logins()[key].ip, (key, ip, from_maillog[key])
    assert_close_to_plugin(stack, from_rawlog)


def test_run_picks_up_new_rawlog_sessions_and_after_a_restart_skips_those_it_harvested(
        dir_stack: MailStack, tmp_path: Path) -> None:
    stack, root = dir_stack, dir_stack.dovecot.rawlog_dir
    daemon = Daemon(tmp_path, stack.maillog, "--rawlog", str(root))
    try:
        daemon.start()
        stack.traffic_round(0)
        first = wait_for_sessions(stack, root)

        def stored_newest() -> bool:
            rows, newest = daemon.rows(), newest_sessions(root)
            return all(rows.get(key, (0, ""))[0] == us for key, us in newest.items())

        wait_until(lambda: rawlog_counter(daemon.scrape()) == first and stored_newest(), SETTLE_S,
                   f"{first} rawlog sessions taken and their times stored")
        ref = stack.last_logins()
        assert all(ip == ref[key].ip for key, (_, ip) in daemon.rows().items()), "the address joined by mpid"
        assert_clean_exit(daemon)

        daemon.start()
        time.sleep(5)  # more than the 3 s a session ripens and a poll
        assert rawlog_counter(daemon.scrape()) == 0, f"sessions taken again after the restart:\n{daemon.output()}"
        stack.traffic_round(1)
        second = wait_for_sessions(stack, root) - first
        wait_until(lambda: rawlog_counter(daemon.scrape()) == second and stored_newest(), SETTLE_S,
                   f"exactly the {second} new rawlog sessions taken")
        assert_clean_exit(daemon)
    finally:
        stop_process(daemon.proc)


def test_a_password_in_a_pre_login_rawlog_appears_nowhere_in_output_logs_metrics_state_or_store(
        dir_stack: MailStack, tmp_path: Path) -> None:
    stack = dir_stack
    stack.traffic_round(0)  # LOGIN, AUTHENTICATE PLAIN, USER/PASS and AUTH PLAIN, and failures
    sessions = wait_for_sessions(stack, stack.dovecot.rawlog_dir)
    secrets = {u.password.encode() for u in USERS}
    secrets |= {base64.b64encode(f"\0{u.name}\0{u.password}".encode()) for u in USERS}
    prelogin = stack.dovecot.prelogin_rawlog_dir
    held = b"".join(p.read_bytes() for p in prelogin.glob("*.in"))
    assert b'"pw-test1"' in held and base64.b64encode(b"\0test3\0pw-test3") in held, \
        "precondition: the pre-login rawlog should hold the credentials"

    # An operator who points harvester at the login directory as well: "rawlogs" looks like a user's directory.
    roots = ("--rawlog", str(stack.dovecot.rawlog_dir), "--rawlog", str(prelogin.parent))
    rows, summary = backfill(tmp_path, "backfill", "--log-level", "debug", *roots, str(stack.maillog))
    assert f"rawlog sessions: {sessions:,} (0 without a known address)" in summary, summary
    assert "rawlogs" not in {user for user, _ in rows}
    exported = harvester(tmp_path, "export", "--store", f"sqlite:///{tmp_path / 'backfill.db'}")
    looked_up = harvester(tmp_path, "lookup", "--store", f"sqlite:///{tmp_path / 'backfill.db'}", "test1")

    daemon = Daemon(tmp_path, stack.maillog, "--log-level", "debug", *roots)
    try:
        daemon.start()
        wait_until(lambda: rawlog_counter(daemon.scrape()) == sessions, SETTLE_S, "the daemon took every session")
        metrics = daemon.scrape()
        assert "rawlogs" not in {user for user, _ in daemon.rows()}
        assert_clean_exit(daemon)
    finally:
        stop_process(daemon.proc)

    evidence = {"backfill output": summary.encode(), "export": exported.stdout.encode(),
                "export stderr": exported.stderr.encode(), "lookup": looked_up.stdout.encode(),
                "metrics": metrics.encode()}
    # every file harvester wrote: its stores (with -wal/-shm), the daemon's state and its logs
    evidence |= {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    leaks = [(where, secret) for where, blob in evidence.items() for secret in secrets if secret in blob]
    assert not leaks, f"credentials from the pre-login rawlog leaked: {leaks}"
