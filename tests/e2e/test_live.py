"""End to end: `harvester run` follows a real Dovecot's maillog, written by a real rsyslogd and rotated by the
real logrotate, and ends with the rows Dovecot's own last_login plugin stored for the same traffic.

The reference is the plugin's dict (tests/e2e/dovecot.py reads it): per (user, service) the newest entry's
IP, and its time in ms. Every session comes from a source address of its own, so an IP that agrees proves
the row came from the right session; the time must agree at the log's precision (traditional syslog: the
second), allowing that rsyslogd stamps the line a few ms after the plugin, possibly in the next second.
Every test runs once against the host's Dovecot 2.3 and once against Debian 13's Dovecot 2.4.1 (chrooted, from the
root file system scripts/dovecot24-root caches), with the same traffic: each version's own plugin is the reference.
These tests need root, the Debian packages scripts/e2e-deps installs and that root file system; without them they
fail, never skip.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.dovecot import (
    FAILED_ONLY,
    JANE,
    NOSUCH,
    OBRIEN,
    TEST1,
    USERS,
    VERSIONS,
    WEB,
    WEBMAIL_HOST,
    WEBMAIL_SERVER,
    LastLogin,
    MailStack,
    MissingDependency,
    check_dependencies,
    die_with_parent,
    free_port,
    stop_process,
)

ROOT = Path(__file__).resolve().parents[2]
SETTLE_S = 10.0  # a login is stored within about a second; this is the most a test waits for the store
MAX_LAG_MS = 1000  # how much later than the plugin's stamp rsyslogd's may be (measured: 0.1-25 ms)

StoredRows = dict[tuple[str, str], tuple[int, str]]  # (user, service) -> (epoch us, ip)


@pytest.fixture(params=VERSIONS, ids=[f"dovecot{v}" for v in VERSIONS])
def stack(request: pytest.FixtureRequest) -> Iterator[MailStack]:
    """A fresh stack per test, of each Dovecot version in turn."""
    missing = None
    try:
        check_dependencies(request.param)
    except MissingDependency as e:
        missing = str(e)
    if missing:
        pytest.fail(missing, pytrace=False)  # never a skip: a suite that silently skips proves nothing
    with MailStack(version=request.param) as s:
        yield s


class Daemon:
    """`python -m harvester run` as a subprocess, the way a service manager runs it: store, state and stderr
    in the test's directory; restartable with the same state directory."""

    def __init__(self, tmp_path: Path, maillog: Path, *extra: str) -> None:
        self.db = tmp_path / "h.db"
        self.store = "sqlite:///" + str(self.db)
        self.state_dir = tmp_path / "state"
        self.maillog = maillog
        self.extra = extra
        self.port = free_port()
        self.logs: list[Path] = []
        self.tmp_path = tmp_path
        # an empty config file, so that neither $HARVESTER_CONFIG nor the machine's /etc/harvester leaks in
        self.config = tmp_path / "harvester.toml"
        self.config.touch()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.tmp_path / f"daemon-{len(self.logs) + 1}.stderr"
        self.logs.append(log)
        env = {k: v for k, v in os.environ.items() if k != "HARVESTER_CONFIG"}
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harvester", "run", "--config", str(self.config), "--store", self.store,
                 "--state-dir", str(self.state_dir),
                 "--metrics-listen", f"127.0.0.1:{self.port}", "--start-at", "beginning", "--timezone", "UTC",
                 *self.extra, str(self.maillog)],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"harvester run exited with {self.proc.returncode} at start:\n{self.output()}")
            try:
                self.scrape()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"harvester run served no /metrics within 30 s:\n{self.output()}")
                time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM: the daemon flushes, saves its checkpoints and exits 0."""
        return stop_process(self.proc, timeout=30)

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "the daemon died before it was killed"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def output(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-6000:]}" for p in self.logs if p.exists())

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def rows(self) -> StoredRows:
        """The store's last_login table, read directly (the daemon may be writing: a read-only connection)."""
        if not self.db.exists():
            return {}
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            return {(u, s): (us, ip) for u, s, us, ip in
                    db.execute("SELECT user, service, last_login_us, last_ip FROM last_login")}
        except sqlite3.OperationalError as e:  # the table does not exist yet
            if "no such table" in str(e):
                return {}
            raise
        finally:
            db.close()

    def export(self) -> list[dict]:
        """The rows as the public command prints them."""
        proc = subprocess.run([sys.executable, "-m", "harvester", "export", "--config", str(self.config),
                               "--store", self.store], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture
def daemon(stack: MailStack, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, stack.maillog)
    yield d
    stop_process(d.proc)


def disagreements(ours: StoredRows, ref: dict[tuple[str, str], LastLogin]) -> list[str]:
    """Why the store is not (yet) what the plugin stored; empty when it is."""
    problems = [f"missing {key}: plugin has {ref[key]}" for key in sorted(ref.keys() - ours.keys())]
    problems += [f"extra {key}: {ours[key]} (the plugin has no such row)" for key in sorted(ours.keys() - ref.keys())]
    for key in sorted(ref.keys() & ours.keys()):
        (us, ip), want = ours[key], ref[key]
        second = us // 1_000_000
        if ip != want.ip:
            problems.append(f"{key}: IP {ip}, plugin {want.ip}")
        elif not want.time_ms // 1000 <= second <= (want.time_ms + MAX_LAG_MS) // 1000:
            problems.append(f"{key}: time {us} us, plugin {want.time_ms} ms")
    return problems


def assert_settles(daemon: Daemon, stack: MailStack, timeout: float = SETTLE_S,
                   ours_as_plugin=lambda rows: rows) -> StoredRows:
    """Wait until the store agrees with the plugin on two polls in a row (the plugin writes its dict
    asynchronously: one agreement could be a moment when both lack the same last login); fail with every
    difference and the daemon's output."""
    deadline = time.monotonic() + timeout
    agreed_on = None
    while True:
        ours, ref = daemon.rows(), stack.last_logins()
        problems = disagreements(ours_as_plugin(ours), ref)
        if not problems and ref:
            if ref == agreed_on:
                return ours
            agreed_on = ref
        else:
            agreed_on = None
        if daemon.proc is not None and daemon.proc.poll() is not None:
            pytest.fail(f"harvester run exited with {daemon.proc.returncode}:\n{daemon.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout:.0f} s the store still differs from the last_login plugin:\n  "
                        + "\n  ".join(problems or ["the plugin stored nothing"])
                        + f"\nlog files: {[p.name for p in stack.log_files()]}\n{daemon.output()}\n"
                        + stack.diagnostics())
        time.sleep(0.2)


def assert_no_failed_only_rows(rows: StoredRows) -> None:
    assert not FAILED_ONLY & rows.keys(), "failed logins were stored as logins"
    assert not any(user == NOSUCH.name for user, _ in rows)


def assert_clean_exit(daemon: Daemon) -> None:
    assert daemon.stop() == 0, f"SIGTERM should flush and exit 0:\n{daemon.output()}"
    assert "Traceback" not in daemon.output(), daemon.output()


def assert_ends_agreeing(daemon: Daemon, stack: MailStack, must_have: set[tuple[str, str]]) -> None:
    """The end of a crash scenario: the store agrees with the plugin, holds the keys only the lines written
    while the daemon was down give, no failed login became a row, and SIGTERM exits cleanly."""
    rows = assert_settles(daemon, stack)
    assert must_have <= rows.keys()
    assert_no_failed_only_rows(rows)
    assert_clean_exit(daemon)


def test_live_traffic_through_rename_copytruncate_and_delaycompress_rotations_agrees_with_last_login_plugin(
        stack: MailStack, daemon: Daemon) -> None:
    daemon.start()
    rounds = iter(range(100))
    for _ in range(2):
        stack.traffic_round(next(rounds))
    # rename + create + HUP right after traffic: the daemon may still be reading the renamed file
    stack.rotate("create")
    for _ in range(2):
        stack.traffic_round(next(rounds))
    # copytruncate drops what nobody read before the truncation (logrotate's own race), so let the daemon
    # catch up first; what is proved is that it notices the truncation and reads the file again from 0
    assert_settles(daemon, stack)
    stack.rotate("copytruncate")
    for _ in range(2):
        stack.traffic_round(next(rounds))
    stack.rotate("delaycompress")  # rename + create + HUP, the previous maillog.1 is compressed
    stack.traffic_round(next(rounds))
    stack.rotate("delaycompress")  # now the file the daemon has just left (or is still draining) becomes .gz
    stack.traffic_round(next(rounds))
    assert any(p.suffix == ".gz" for p in stack.log_files()), stack.log_files()

    rows = assert_settles(daemon, stack)
    assert_no_failed_only_rows(rows)
    exported = {(r["user"], r["service"]): r for r in daemon.export()}
    assert exported.keys() == rows.keys()
    assert {user for user, _ in exported} == {u.name for u in USERS}
    for (user, service), r in exported.items():
        assert r["last_login"].endswith("Z") and r["ip"] == rows[user, service][1], r
    assert_clean_exit(daemon)


def test_metrics_scrape_counts_lines_events_and_rows_and_no_label_names_a_user(
        stack: MailStack, tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, stack.maillog, "--log-format", "json")
    try:
        daemon.start()
        for n in range(2):
            stack.traffic_round(n)
        assert_settles(daemon, stack)
        text = daemon.scrape()
    finally:
        rc = daemon.stop()
    assert rc == 0, daemon.output()

    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def total(name: str) -> float:
        found = [s.value for s in samples if s.name == name]
        assert found, f"{name} is not exported:\n{text}"
        return sum(found)

    assert total("harvester_lines_read_total") > 0
    assert total("harvester_store_rows_written_total") > 0
    events = {(s.labels.get("kind"), s.labels.get("service")): s.value for s in samples
              if s.name == "harvester_events_total"}
    assert events, f"harvester_events_total is not exported:\n{text}"
    assert all(kind and service for kind, service in events), f"events need labels kind and service: {events}"
    for key in (("login", "imap"), ("login", "pop3"), ("delivery", "lmtp")):
        assert events.get(key, 0) > 0, f"no {key} events counted: {events}"
    assert sum(v for (kind, _), v in events.items() if kind not in ("login", "delivery")) > 0, \
        f"the failed logins were not counted as events of their own: {events}"

    names = [u.name for u in (*USERS, NOSUCH)]
    leaks = {(s.name, k, v) for s in samples for k, v in s.labels.items() if any(n in v for n in names)}
    assert not leaks, f"label values name users (unbounded cardinality, personal data): {leaks}"

    lines = [line for p in daemon.logs for line in p.read_text().splitlines() if line.strip()]
    assert lines, "the daemon logged nothing"
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_kill_9_in_the_middle_of_traffic_then_restart_with_the_same_state_agrees_with_last_login_plugin(
        stack: MailStack, daemon: Daemon) -> None:
    done = threading.Event()
    rounds_run: list[int] = []
    errors: list[BaseException] = []

    def traffic() -> None:
        try:
            n = 0
            while not done.is_set():
                stack.traffic_round(n)
                rounds_run.append(n)
                n += 1
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    def wait_rounds(count: int) -> None:
        deadline = time.monotonic() + 60
        while len(rounds_run) < count:
            assert not errors, errors
            assert time.monotonic() < deadline, f"traffic stalled after {len(rounds_run)} rounds"
            time.sleep(0.1)

    daemon.start()
    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SETTLE_S
        while len(daemon.rows()) < 5 or len(rounds_run) < 2:
            assert time.monotonic() < deadline, f"nothing stored while traffic ran:\n{daemon.output()}"
            assert not errors, errors
            time.sleep(0.1)
        daemon.kill9()  # mid-round: Dovecot keeps logging while the daemon is dead
        # keys no round produces: only the lines written while the daemon was dead can give them
        assert stack.imap(OBRIEN, stack.next_ip())
        assert stack.pop3(TEST1, stack.next_ip(), delete=False)
        wait_rounds(len(rounds_run) + 2)
        daemon.start()
        wait_rounds(len(rounds_run) + 2)
    finally:
        done.set()
        thread.join(60)
    assert not errors, errors

    assert_ends_agreeing(daemon, stack, {(OBRIEN.name, "imap"), (TEST1.name, "pop3")})


def test_restart_after_the_log_was_rotated_and_compressed_meanwhile_reads_the_rest_from_the_gz(
        stack: MailStack, daemon: Daemon) -> None:
    """The README's promise: a checkpointed file rotated while the daemon was down is found again among
    maillog.1, maillog.1.gz... by its fingerprint, and its unread rest is read, also from a .gz."""
    daemon.start()
    stack.traffic_round(0)
    assert_settles(daemon, stack)
    daemon.kill9()
    # Each phase logs in to a key of its own, so no later login can hide a lost one.
    stack.traffic_round(1)
    assert stack.pop3(TEST1, stack.next_ip(), delete=False)  # after the checkpoint's offset
    stack.rotate("compress")  # the checkpointed file is now maillog.1.gz
    stack.traffic_round(2)
    assert stack.imap(OBRIEN, stack.next_ip())  # in the new live maillog
    assert [p.name for p in stack.log_files()] == ["maillog", "maillog.1.gz"]
    daemon.start()
    assert_ends_agreeing(daemon, stack, {(TEST1.name, "pop3"), (OBRIEN.name, "imap")})


def test_restart_after_two_rotations_meanwhile_also_reads_the_file_born_and_rotated_while_down(
        stack: MailStack, daemon: Daemon) -> None:
    """Never loses, also when logrotate ran twice during the outage (a size-triggered rotation under load, or a
    daemon down over two daily runs): the file created and rotated while the daemon was down (maillog.1 here,
    never seen, never checkpointed) holds logins too."""
    daemon.start()
    stack.traffic_round(0)
    assert_settles(daemon, stack)
    daemon.kill9()
    stack.traffic_round(1)
    assert stack.pop3(TEST1, stack.next_ip(), delete=False)  # after the checkpoint's offset, in that file
    stack.rotate("delaycompress")  # that file becomes maillog.1 ...
    stack.traffic_round(2)
    assert stack.pop3(JANE, stack.next_ip(), delete=False)  # only in the next file, which becomes maillog.1
    stack.rotate("delaycompress")  # ... and the checkpointed one maillog.2.gz
    stack.traffic_round(3)
    assert stack.imap(OBRIEN, stack.next_ip())  # in the live maillog
    assert [p.name for p in stack.log_files()] == ["maillog", "maillog.1", "maillog.2.gz"]
    daemon.start()
    assert_ends_agreeing(daemon, stack, {(TEST1.name, "pop3"), (JANE.name, "pop3"), (OBRIEN.name, "imap")})


@pytest.mark.parametrize("how", ["session-id", "lip"])
def test_webmail_forwarding_its_users_address_is_stored_as_webmail_without_a_dovecot_change(
        stack: MailStack, tmp_path: Path, how: str) -> None:
    """The webmail host sends ID x-originating-ip: the login line's rip is its user's address. Two ways to tell
    it is webmail with no Dovecot change, each with the forwarded address the plugin stored under imap:
    - session-id: webmail_networks names the webmail host, which Dovecot 2.4's session id carries (it is made
      when the connection opens). Dovecot 2.3.19 makes it after the ID command: it carries the forwarded
      address, so there the login stays imap (README, "Webmail");
    - lip: webmail_local_networks names the address Dovecot listens on for the webmail host alone."""
    flag = ("--webmail-networks", f"{WEBMAIL_HOST}/32") if how == "session-id" else (
        "--webmail-local-networks", f"{WEBMAIL_SERVER}/32")
    told = how == "lip" or stack.version != "2.3"
    daemon = Daemon(tmp_path, stack.maillog, *flag)
    try:
        daemon.start()
        stack.traffic_round(0)

        def as_plugin(rows: StoredRows) -> StoredRows:  # the plugin knows no webmail: it stores imap
            return {(u, "imap" if s == "webmail" else s): v for (u, s), v in rows.items()}

        rows = assert_settles(daemon, stack, ours_as_plugin=as_plugin)
        assert ((WEB.name, "webmail") in rows) is told and ((WEB.name, "imap") in rows) is not told
        assert not any(s == "webmail" for u, s in rows if u != WEB.name)
    finally:
        rc = daemon.stop()
    assert rc == 0, daemon.output()
