"""The live daemon as operators run it: a real process following a real file that real logrotate
rotates, killed with -9, reloaded, and cut off from its store. The final store must equal a one-shot
backfill of every line written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, PrivateNode
from tests.daemon_kit import COMMON, Writer, logrotate, reference, rows, settle, start, stop


@pytest.mark.parametrize("options", ["create", "copytruncate", "create\n    compress",
                                     "create\n    compress\n    delaycompress"],
                         ids=["rename_create", "copytruncate", "compress", "delaycompress"])
def test_rotation_by_real_logrotate_mid_traffic_loses_and_repeats_no_line(tmp_path, log_lines, options):
    (tmp_path / "log").mkdir()
    w = Writer(tmp_path / "log" / "maillog", log_lines)
    db = tmp_path / "h.db"
    proc = start(tmp_path, f"sqlite:///{db}")
    try:
        for _ in range(3):
            w.write(len(log_lines) // 4)
            time.sleep(0.3)
            logrotate(tmp_path, options)
            w.write(50)  # the writer has not reopened yet: these go to the rotated file (or after the truncation)
            w.reopen()
        w.write(len(log_lines))
        want = reference(tmp_path, log_lines)
        assert len(want) > 500
        assert settle(db, want, proc) == want
    finally:
        w.close()
        err = stop(proc)
    assert "rotated" in err and "Traceback" not in err


def test_kill_9_at_any_moment_and_a_restart_give_the_same_store(tmp_path, log_lines):
    (tmp_path / "log").mkdir()
    w = Writer(tmp_path / "log" / "maillog", log_lines)
    db = tmp_path / "h.db"
    try:
        for i in range(4):
            proc = start(tmp_path, f"sqlite:///{db}")
            w.write(len(log_lines) // 5)
            if i == 0:  # a daemon that has run a while: its first checkpoint exists (a first start ever
                # begins at the live file, so a rotation before any checkpoint would be a backfill's job)
                deadline = time.monotonic() + 20
                while not (tmp_path / "state" / "checkpoints.json").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            time.sleep(0.15 + 0.2 * i)  # sometimes mid-flush, sometimes between flushes
            proc.kill()
            proc.wait()
            if i == 1:
                logrotate(tmp_path, "create\n    compress")  # rotated and compressed while the daemon is down
                w.reopen()
        proc = start(tmp_path, f"sqlite:///{db}")
        w.write(len(log_lines))
        want = reference(tmp_path, log_lines)
        assert settle(db, want, proc) == want
        stop(proc)
    finally:
        w.close()


def test_sighup_reloads_the_config_without_losing_the_position(tmp_path, log_lines):
    (tmp_path / "log").mkdir()
    cfg = tmp_path / "h.toml"
    cfg.write_text('log_level = "info"\n')
    w = Writer(tmp_path / "log" / "maillog", log_lines)
    db = tmp_path / "h.db"
    proc = start(tmp_path, f"sqlite:///{db}", "--config", str(cfg))
    try:
        w.write(len(log_lines) // 2)
        time.sleep(0.5)
        cfg.write_text('log_level = "info"\nwebmail_networks = ["10.99.0.0/16"]\n')
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        w.write(len(log_lines))
        time.sleep(1)
    finally:
        w.close()
        err = stop(proc)
    assert "reloaded configuration" in err
    services = {s for _, s, *_ in rows(db)}
    assert {"imap", "pop3", "lmtp"} <= services
    assert "webmail" in services  # after the reload, IMAP logins from 10.99.0.0/16 count as webmail


def test_a_cassandra_outage_mid_traffic_holds_the_checkpoints_and_catches_up(tmp_path, log_lines):
    """The store's node is stopped while lines keep coming and started again: the daemon keeps the rows,
    retries with backoff, and ends with every login stored (times never older than a backfill's)."""
    node = PrivateNode(tmp_path / "node")
    contact = node.start()
    (tmp_path / "log").mkdir()
    w = Writer(tmp_path / "log" / "maillog", log_lines)
    url = f"cassandra://{contact}/outage"
    repl = ["--cassandra-replication", "{'class': 'SimpleStrategy', 'replication_factor': 1}"]
    subprocess.run([sys.executable, "-m", "harvester", "schema", "--store", url, "--apply", *repl], cwd=ROOT,
                   check=True, capture_output=True)
    proc = start(tmp_path, url, "--cassandra-retries", "1", "--cassandra-request-timeout", "2")
    try:
        w.write(len(log_lines) // 3)
        time.sleep(1.5)
        node.stop()
        w.write(len(log_lines) // 3)
        time.sleep(3)
        node.start()
        w.write(len(log_lines))
        want = {(u, s, t) for u, s, t, *_ in reference(tmp_path, log_lines)}
        deadline, got = time.monotonic() + 90, set()
        while time.monotonic() < deadline:
            out = subprocess.run([sys.executable, "-m", "harvester", "export", "--store", url], cwd=ROOT,
                                 capture_output=True, text=True)
            got = {(d["user"], d["service"], d["last_login"]) for d in map(json.loads, out.stdout.splitlines())}
            if got == want:
                break
            time.sleep(2)
        assert got == want
    finally:
        w.close()
        err = stop(proc)
        node.stop(check=False)
    assert "rows kept, checkpoints held" in err and "is back after" in err


def test_systemd_notify_watchdog_metrics_and_json_logs(tmp_path, log_lines):
    """What systemd and Prometheus see: READY=1 once following, WATCHDOG=1 pings at half of
    WatchdogSec, STOPPING=1 on SIGTERM; /metrics parses with prometheus-client's own parser and holds no
    user name; --log-format json writes one JSON object per line."""
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    (tmp_path / "log").mkdir()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = Writer(tmp_path / "log" / "maillog", log_lines)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="1000000")
    db = tmp_path / "h.db"
    proc = subprocess.Popen([sys.executable, "-m", "harvester", "run", "--store", f"sqlite:///{db}", "--state-dir",
                             str(tmp_path / "state"), "--metrics-listen", f"127.0.0.1:{port}", "--log-format",
                             "json", *COMMON, str(tmp_path / "log" / "maillog")],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert sock.recv(4096).startswith(b"READY=1")
        w.write(len(log_lines))
        assert sock.recv(4096) == b"WATCHDOG=1"
        time.sleep(1.5)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert sum(s.value for s in families["harvester_lines_read"].samples) == len(log_lines)
        assert {s.labels["kind"] for s in families["harvester_events"].samples} >= {"login", "delivery"}
        assert sum(s.value for s in families["harvester_store_rows_written"].samples) > 500
        assert "process_resident_memory_bytes" in body and "@example.com" not in body
    finally:
        w.close()
        err = stop(proc)
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096))
        except TimeoutError:
            break
        if messages[-1] == b"STOPPING=1":
            break
    sock.close()
    assert messages[-1] == b"STOPPING=1"
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert records and {"time", "level", "message"} <= set(records[0])


@pytest.mark.parametrize("how", ["after_sighup", "file_a_glob_matches_later"])
def test_rawlog_sessions_keep_joining_the_login_lines_for_their_address(tmp_path, how):
    """A rawlog session has its mail process's pid, not its client's address: the maillog's Login line with
    that pid gives it. After SIGHUP (new parsers) and for a file a followed glob matches only later, the
    join must still hold, or the session's row (its microsecond time beats the Login line's second) would
    overwrite the good address with none."""
    from tests.conftest import SAMPLES

    login = next(line for line in (SAMPLES / "syslog-traditional.log").read_bytes().splitlines(keepends=True)
                 if b"mpid=13321" in line)
    session = SAMPLES / "rawlog" / "test1" / "20261122-015203.13321.1.out"
    (tmp_path / "log").mkdir()
    (tmp_path / "rawlog" / "test1").mkdir(parents=True)
    cfg = tmp_path / "h.toml"
    cfg.write_text('log_level = "info"\n')
    db = tmp_path / "h.db"
    extra = ["--config", str(cfg), "--rawlog", str(tmp_path / "rawlog")]
    if how == "after_sighup":
        (tmp_path / "log" / "maillog").write_bytes(b"")
        proc = start(tmp_path, f"sqlite:///{db}", *extra)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        target = tmp_path / "log" / "maillog"
    else:
        proc = subprocess.Popen([sys.executable, "-m", "harvester", "run", "--store", f"sqlite:///{db}",
                                 "--state-dir", str(tmp_path / "state"), "--metrics-listen", "", "--start-at",
                                 "beginning", *COMMON, *extra, "--follow", str(tmp_path / "log" / "*.log")],
                                cwd=ROOT, stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        target = tmp_path / "log" / "mail.log"
    try:
        with open(target, "ab") as f:
            f.write(login)
        deadline = time.monotonic() + 30  # a glob is looked at again every 10 s
        while time.monotonic() < deadline and not any(u == "test1" for u, *_ in rows(db)):
            time.sleep(0.2)
        # The session begins now (a rawlog is named and stamped as it begins), by the Login line's process.
        began = f"{time.time() - 1:.6f}"
        whole, frac = int(began.split(".")[0]), began.split(".")[1]
        first = session.read_bytes().split(b" ", 1)[1]
        name = time.strftime("%Y%m%d-%H%M%S", time.gmtime(whole)) + ".13321.1.out"
        (tmp_path / "rawlog" / "test1" / name).write_bytes(began.encode() + b" " + first)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{frac}Z"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(t == stamp for _, _, t, *_ in rows(db)):
            time.sleep(0.2)
    finally:
        err = stop(proc)
    assert ("reloaded configuration" in err) == (how == "after_sighup")
    assert [(s, t, ip) for u, s, t, ip, _ in rows(db) if u == "test1"] == [("imap", stamp, "127.0.0.2")]


def test_rows_a_write_has_taken_out_of_its_batch_count_as_waiting_until_their_slice_is_stored(tmp_path,
                                                                                            monkeypatch):
    """The gauge and the read bound (max_waiting_rows) see a batch being written slice by slice: the rows of
    the slice under way still count, each stored slice leaves the count, none reads 0 before the end."""
    import threading

    from harvester.checkpoint import Checkpoints, State
    from harvester.coalesce import Coalescer
    from harvester.sinks import base
    from harvester.writer import WriteJob, Writer

    monkeypatch.setattr(base, "WRITE_ROWS", 1000)
    sink = Coalescer()
    for i in range(3500):
        sink.logins.put(f"u{i}".encode(), "imap", 1_795_308_723_000_000 + i, 0, b"192.0.2.1", b"mx1", "imap")
    seen: list[int] = []

    class Store:
        url = "memory:"

        def flush(self, sink: Coalescer) -> int:
            return base.write_taken(sink, self)

        def write(self, rows: list) -> int:
            seen.append(writer.in_flight())
            return len(rows)

    writer = Writer(Store(), Checkpoints(tmp_path), threading.Event())
    writer.start()
    writer.submit(WriteJob(sink, State(), []))
    assert writer.finish(10)
    assert seen == [3500, 2500, 1500, 500] and writer.in_flight() == 0
    assert (tmp_path / "checkpoints.json").exists()


def _daemon(tmp_path, *paths: str, **settings):
    from harvester.config import Settings
    from harvester.daemon import Daemon

    s = Settings()
    for k, v in settings.items():
        s.set(k, v, "test")
    s.set("state_dir", str(tmp_path / "state"), "test")

    class Store:
        url = "memory:"

    return Daemon(s, Store(), list(paths))  # type: ignore[arg-type]


def test_journal_auto_reads_the_journal_where_no_file_to_follow_exists_and_the_files_where_one_does(
        tmp_path, monkeypatch):
    """Debian 12 without rsyslog: no /var/log/mail.log, Dovecot's lines only in the journal. With rsyslog:
    the file, and not the journal as well (no line read twice)."""
    from harvester.sources import journal

    monkeypatch.setattr(journal, "local_journal_exists", lambda: True)
    monkeypatch.setattr(journal, "available", lambda: "/usr/bin/journalctl")
    dovecot_entries: list[dict] = []
    monkeypatch.setattr(journal, "edge", lambda spec, newest: dovecot_entries[-1] if dovecot_entries else None)
    maillog = tmp_path / "mail.log"
    d = _daemon(tmp_path, str(maillog))
    d._choose_journal()
    assert d._expand() == [str(maillog)]  # Dovecot has logged nothing yet: the file may still come
    dovecot_entries.append({"__CURSOR": "c"})
    assert d._choose_journal()  # what the loop asks again while it reads nothing
    assert d._expand() == ["journal:local"]
    maillog.write_text("")
    d = _daemon(tmp_path, str(maillog))
    d._choose_journal()
    assert d._expand() == [str(maillog)]
    d = _daemon(tmp_path, str(maillog), journal="yes", journal_dir=[str(tmp_path)])
    d._choose_journal()
    assert d._expand() == [str(maillog), f"journal:dir={tmp_path}", "journal:local"]
    monkeypatch.setattr(journal, "local_journal_exists", lambda: False)
    maillog.unlink()
    d = _daemon(tmp_path, str(maillog))
    d._choose_journal()
    assert d._expand() == [str(maillog)]  # nothing to fall back to: wait for the file


def test_a_daemon_that_reads_nothing_says_so_in_its_log_and_a_gauge_every_minute(tmp_path, caplog, monkeypatch):
    from harvester import metrics
    from harvester.sources import journal

    monkeypatch.setattr(journal, "local_journal_exists", lambda: False)
    d = _daemon(tmp_path, str(tmp_path / "mail.log"))
    d._add_sources(None, "end")
    assert d._reading() == 0
    assert metrics.SOURCES_READ._value.get() == 0
    assert "reading nothing" in caplog.text and "mail.log does not exist" in caplog.text
    caplog.clear()
    d._reading()
    assert "reading nothing" not in caplog.text  # said again a minute later, not on every loop
    (tmp_path / "mail.log").write_text("")
    assert d._reading() == 1


def test_a_reload_with_a_broken_config_keeps_running_and_says_it_failed(tmp_path, log_lines):
    """`systemctl reload` only sends SIGHUP and reports success: the failure must show in the log, the
    metric and the unit's status line."""
    import urllib.request

    from tests.e2e.dovecot import free_port

    (tmp_path / "log").mkdir()
    cfg = tmp_path / "h.toml"
    cfg.write_text('log_level = "info"\n')
    w = Writer(tmp_path / "log" / "maillog", log_lines)
    db = tmp_path / "h.db"
    port = free_port()
    proc = start(tmp_path, f"sqlite:///{db}", "--config", str(cfg), "--metrics-listen", f"127.0.0.1:{port}")
    try:
        w.write(len(log_lines) // 2)
        cfg.write_text('log_level = "loud"\n')
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        w.write(len(log_lines))
        want = reference(tmp_path, log_lines)
        assert settle(db, want, proc) == want  # still running, still storing
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        w.close()
        err = stop(proc)
    assert "reload failed, keeping the previous configuration" in err
    assert 'harvester_reloads_total{result="failed"} 1.0' in text
