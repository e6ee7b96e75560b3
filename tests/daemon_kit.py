"""The live daemon as a test drives it: a real `harvester run` process, a writer that appends like
rsyslog, real logrotate, and the one-shot backfill every scenario's final store must equal."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

LOGROTATE = "/usr/sbin/logrotate"
# No --year: the corpus spans New Year, and a live file's "Dec 31" lines must take their year from the clock
# (and a backfill's from the file's mtime) as in production; a fixed year would put them in the future.
COMMON = ["--timezone", "UTC", "--flush-interval-ms", "200", "--poll-interval-ms", "200"]


class Writer:
    """Appends lines like rsyslog: keeps its descriptor until told to reopen (its HUP after a rotation)."""

    def __init__(self, path: Path, lines: list[bytes]) -> None:
        self.path, self.lines, self.next = path, lines, 0
        self.f = open(path, "ab", buffering=0)  # noqa: SIM115 - reopened on rotation, closed in close()

    def write(self, n: int, chunk: int = 97) -> None:
        """The next `n` lines, in writes that sometimes end inside a line (the daemon must wait for it)."""
        end = min(self.next + n, len(self.lines))
        while self.next < end:
            part = b"".join(self.lines[self.next:min(self.next + chunk, end)])
            self.next = min(self.next + chunk, end)
            cut = len(part) // 3
            self.f.write(part[:cut])
            time.sleep(0.002)
            self.f.write(part[cut:])

    def reopen(self) -> None:
        self.f.close()
        self.f = open(self.path, "ab", buffering=0)  # noqa: SIM115

    def close(self) -> None:
        self.f.close()


def start(tmp: Path, store: str, *extra: str) -> subprocess.Popen:
    """`harvester run` on tmp/log/maillog, returned once it follows the file: its first checkpoint after the
    start is saved (it saves one at once, store or no store), so a rotation a test makes next happens to a
    followed file, as in production, not before the daemon looked."""
    checkpoint = tmp / "state" / "checkpoints.json"
    before = _mtime_ns(checkpoint)
    proc = subprocess.Popen([sys.executable, "-m", "harvester", "run", "--store", store, "--state-dir",
                             str(tmp / "state"), "--metrics-listen", "", "--start-at", "beginning", *COMMON,
                             *extra, str(tmp / "log" / "maillog")], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while _mtime_ns(checkpoint) == before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def rows(db: Path) -> list[tuple]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        return sorted(c.execute("SELECT user, service, last_login, last_ip, node FROM last_login"))


def reference(tmp: Path, lines: list[bytes]) -> list[tuple]:
    """What a one-shot backfill of every line written gives."""
    whole = tmp / "all-lines"
    whole.write_bytes(b"".join(lines))
    db = tmp / "ref.db"
    subprocess.run([sys.executable, "-m", "harvester", "backfill", "--store", f"sqlite:///{db}", "--timezone",
                    "UTC", str(whole)], cwd=ROOT, check=True, capture_output=True)
    return rows(db)


def settle(db: Path, want: list[tuple], proc: subprocess.Popen, timeout: float = 30) -> list[tuple]:
    deadline = time.monotonic() + timeout
    got = rows(db)
    while got != want and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.25)
        got = rows(db)
    return got


def logrotate(tmp: Path, options: str) -> None:
    conf = tmp / "logrotate.conf"
    conf.write_text(f"{tmp / 'log' / 'maillog'} {{\n    rotate 10\n    {options}\n    missingok\n}}\n")
    subprocess.run([LOGROTATE, "-f", "-s", str(tmp / "logrotate.state"), str(conf)], check=True,
                   capture_output=True)
