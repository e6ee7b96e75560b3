"""The daemon's own loop under operator mistakes and store trouble: a combined mail log, two daemons on
one state directory, a busy metrics port, a SQLite store locked by a support tool, SIGTERM while the store
is down. Each scenario runs a real `harvester run` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, PrivateNode
from tests.daemon_kit import COMMON, Writer, reference, rows, settle, start, stop

POSTFIX = b"Nov 29 10:00:00 mx1 postfix/smtpd[123]: connect from unknown[192.0.2.1]\n"
LOGIN = (b"Nov 29 10:00:01 mx1 dovecot: imap-login: Login: user=<jane@example.com>, method=PLAIN, "
         b"rip=192.0.2.7, lip=192.0.2.1, mpid=4242, TLS, session=<abc>\n")


def wait_for(predicate, timeout: float = 20.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def test_combined_mail_log_starting_with_postfix_lines_stores_the_dovecot_login(tmp_path):
    """Debian's /var/log/mail.log: a postfix line arrives first. It must not fix the line format (it
    would pass for Dovecot's bare log-file prefix and every later syslog line would be skipped)."""
    (tmp_path / "log").mkdir()
    maillog = tmp_path / "log" / "maillog"
    maillog.write_bytes(b"")
    db = tmp_path / "h.db"
    proc = start(tmp_path, f"sqlite:///{db}", "--year", "2025")
    try:
        assert wait_for(lambda: (tmp_path / "state" / "checkpoints.json").exists())
        with open(maillog, "ab") as f:
            f.write(POSTFIX)
            f.flush()
            time.sleep(2)
            f.write(LOGIN)
        assert wait_for(lambda: rows(db) != [])
    finally:
        err = stop(proc)
    assert rows(db) == [("jane@example.com", "imap", "2025-11-29T10:00:01Z", "192.0.2.7", "mx1")]
    assert "no Dovecot line yet" in err and "line format syslog" in err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_backfill_of_a_combined_log_whose_first_blocks_are_postfix_lines_stores_its_logins(tmp_path, workers):
    log = tmp_path / "mail.log"
    log.write_bytes(POSTFIX * 20_000 + LOGIN)  # 1.5 MB of postfix first: past any sniffed head
    db = tmp_path / "h.db"
    proc = subprocess.run([sys.executable, "-m", "harvester", "backfill", "--store", f"sqlite:///{db}",
                           "--workers", workers, "--timezone", "UTC", "--year", "2025", str(log)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert rows(db) == [("jane@example.com", "imap", "2025-11-29T10:00:01Z", "192.0.2.7", "mx1")]


def test_a_second_daemon_on_the_same_state_dir_exits_clearly_and_the_first_loses_nothing(tmp_path, log_lines):
    """Two units (or a manual run beside the service) on one state directory would overwrite each other's
    checkpoints; the second must refuse to start, saying why, and the first go on unharmed."""
    (tmp_path / "log").mkdir()
    w = Writer(tmp_path / "log" / "maillog", log_lines)
    db = tmp_path / "h.db"
    first = start(tmp_path, f"sqlite:///{db}")
    try:
        w.write(len(log_lines) // 2)
        assert wait_for(lambda: (tmp_path / "state" / "checkpoints.json").exists())
        second = start(tmp_path, f"sqlite:///{tmp_path / 'other.db'}")
        _, err2 = second.communicate(timeout=30)
        assert second.returncode == 2
        assert f"state directory {tmp_path / 'state'} is in use by another harvester (pid {first.pid})" in err2
        assert "Traceback" not in err2
        w.write(len(log_lines))
        want = reference(tmp_path, log_lines)
        assert settle(db, want, first) == want
    finally:
        w.close()
        stop(first)


def test_a_busy_metrics_port_is_a_clear_error_not_a_traceback(tmp_path):
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "maillog").write_bytes(b"")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "harvester", "run", "--store", f"sqlite:///{tmp_path / 'h.db'}",
                               "--state-dir", str(tmp_path / "state"), "--metrics-listen", f"127.0.0.1:{port}",
                               *COMMON, str(tmp_path / "log" / "maillog")], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
    assert proc.returncode == 2
    assert f"metrics_listen 127.0.0.1:{port}: cannot listen" in proc.stderr
    assert "Traceback" not in proc.stderr


class Notifications:
    """systemd's side of sd_notify: a datagram socket that records when each message arrived."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.5)
        self.got: list[tuple[float, bytes]] = []
        self.done = False
        self.thread = threading.Thread(target=self._recv, daemon=True)
        self.thread.start()

    def _recv(self) -> None:
        while not self.done:
            try:
                self.got.append((time.monotonic(), self.sock.recv(4096)))
            except TimeoutError:
                continue

    def pings(self) -> list[float]:
        return [t for t, m in self.got if m == b"WATCHDOG=1"]

    def close(self) -> None:
        self.done = True
        self.thread.join()
        self.sock.close()


def test_sqlite_locked_by_a_support_tool_keeps_the_watchdog_fed_and_metrics_answered(tmp_path, log_lines):
    """A support tool holds BEGIN EXCLUSIVE on the store for 12 s while lines keep coming. The daemon
    must go on pinging systemd's watchdog (WatchdogSec=4 here) and answering /metrics, then store
    everything once the lock is gone."""
    (tmp_path / "log").mkdir()
    w = Writer(tmp_path / "log" / "maillog", log_lines)
    db = tmp_path / "h.db"
    note = Notifications(tmp_path / "notify.sock")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="4000000")
    proc = subprocess.Popen([sys.executable, "-m", "harvester", "run", "--store", f"sqlite:///{db}", "--state-dir",
                             str(tmp_path / "state"), "--metrics-listen", f"127.0.0.1:{port}", "--start-at",
                             "beginning", *COMMON, str(tmp_path / "log" / "maillog")],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    try:
        w.write(len(log_lines) // 3)
        assert wait_for(lambda: rows(db) != [])
        holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                                   f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
                                   "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(12)\n"
                                   "c.execute('ROLLBACK')"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "locked\n"
        locked_at = time.monotonic()
        answered = 0
        while holder.poll() is None:
            w.write(200)
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
            answered += "harvester_store_up" in body
            time.sleep(1)
        w.write(len(log_lines))
        want = reference(tmp_path, log_lines)
        assert settle(db, want, proc) == want
    finally:
        w.close()
        err = stop(proc)
        note.close()
    pings = [t for t in note.pings() if t >= locked_at - 2]
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert answered >= 8  # every scrape while the lock was held got an answer
    assert pings and max(gaps) < 4.0, gaps  # systemd would have killed it at WatchdogSec
    assert "locked" in err  # the operator is told why rows wait


def test_sigterm_during_a_cassandra_outage_exits_promptly_and_the_restart_loses_nothing(tmp_path, log_lines):
    """The node is down and rows wait; systemd stops the service. It must exit well within its stop
    timeout (no endless retries on the way out), leave the checkpoint where the store last acknowledged,
    and a restart after the node is back must store every line."""
    node = PrivateNode(tmp_path / "node")
    contact = node.start()
    (tmp_path / "log").mkdir()
    w = Writer(tmp_path / "log" / "maillog", log_lines)
    url = f"cassandra://{contact}/stopping"
    subprocess.run([sys.executable, "-m", "harvester", "schema", "--store", url, "--apply",
                    "--cassandra-replication", "{'class': 'SimpleStrategy', 'replication_factor': 1}"],
                   cwd=ROOT, check=True, capture_output=True)
    checkpoint = tmp_path / "state" / "checkpoints.json"
    try:
        proc = start(tmp_path, url, "--cassandra-request-timeout", "2")
        w.write(len(log_lines) // 3)
        assert wait_for(lambda: checkpoint.exists() and json.loads(checkpoint.read_text())["positions"])
        time.sleep(1)
        node.stop()
        w.write(len(log_lines) // 3)
        time.sleep(3)
        held = checkpoint.read_bytes()
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t
        assert proc.returncode == 0, err
        assert took < 10, f"took {took:.1f} s to stop"
        assert checkpoint.read_bytes() == held  # nothing unacknowledged was checkpointed
        assert "rows not stored; they are read again" in err
        node.start()
        proc = start(tmp_path, url)
        w.write(len(log_lines))
        want = {(u, s, t) for u, s, t, *_ in reference(tmp_path, log_lines)}
        got: set = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and got != want:
            out = subprocess.run([sys.executable, "-m", "harvester", "export", "--store", url], cwd=ROOT,
                                 capture_output=True, text=True)
            got = {(d["user"], d["service"], d["last_login"]) for d in map(json.loads, out.stdout.splitlines())}
            time.sleep(1)
        assert got == want
        stop(proc)
    finally:
        w.close()
        node.stop(check=False)
