"""The systemd journal as a line source: `journalctl -o json` as a child process.

Why journalctl, not a binding: it comes with every systemd (no libsystemd headers to build python-systemd
against, no wheel bundling its own libsystemd, so the README's first command works on a fresh machine), it
reads the local journal, a copied directory or single files alike, and its JSON is decoded by Python's C
json module while journalctl itself runs on the other core (bench/run journal: the figures).

Each entry becomes one line of the pack's RFC 3339 syslog shape, "2026-11-29T17:47:06.344884Z HOST dovecot:
MESSAGE" (natively: native/src/journal.rs): the time from __REALTIME_TIMESTAMP (UTC microseconds: no year or
zone to guess), HOST from _HOSTNAME, so the pattern pack, the LMTP and POP3
session joins and the bad-input rules apply exactly as to a file's lines. A line break inside a message
becomes a space: one entry is one line.

A position is the cursor of the last entry handed out (identity.Cursor); `--after-cursor` resumes right
after it. Two traps of journalctl's --follow on systemd 252, measured here: it limits itself to the current
boot (every call has --merge, which reads all boots), and it shows only the last 10 entries, also after a
cursor (--no-tail). journald's own "Suppressed N messages from dovecot.service" entries
are read too (by their MESSAGE_ID) and counted as lines lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from harvester import metrics, native
from harvester.sources.base import Block, Text, ignored
from harvester.sources.identity import Cursor, FileId

log = logging.getLogger(__name__)

SCHEME = "journal"
DEFAULT_MATCH = ("SYSLOG_IDENTIFIER=dovecot",)
# journald's "Suppressed N messages from UNIT" (its rate limit dropped them), sd-messages.h SD_MESSAGE_JOURNAL_DROPPED
SUPPRESSED_ID = "a596d6fe7bfa4994828e72309e95d61e"
_SUPPRESSED = re.compile(r"Suppressed (\d+) messages from (\S+)")
READ_MAX = 4 << 20  # bytes of journalctl's output one poll takes (the rest is the backlog)
PIPE_BYTES = 1 << 20  # the pipe from journalctl (Linux's default 64 KiB makes it wait on us often)
RESTART_S = 10.0  # a journalctl that exited is started again after this long
SAID_AGAIN_S = 60.0
_FIELDS = "MESSAGE,_HOSTNAME,MESSAGE_ID"  # __CURSOR and __REALTIME_TIMESTAMP come anyway
_NO_FILE = FileId(0, 0, "journal", 0)  # Block.file of a journal's lines (they have no file)
# The same monitoring places (/var/log/journal, /run/log/journal) journald writes to.
LOCAL_DIRS = ("/var/log/journal", "/run/log/journal")


def count_dropped(n: int, unit: str) -> None:
    """journald's rate limit dropped `n` of `unit`'s lines: counted, and said (nobody else would)."""
    metrics.LINES_LOST.labels("journald_rate_limit").inc(n)
    log.warning("journald dropped %d message(s) of %s (its rate limit, RateLimitBurst= in journald.conf): any "
                "login among them is lost", n, unit)


def count_gap(source: str, lost_from_us: int, lost_to_us: int) -> None:
    metrics.JOURNAL_LOST.labels(source).inc(max(0, lost_to_us - lost_from_us) / 1e6)


def specs(local: bool, directories: list[str], files: list[str], match: tuple[str, ...]) -> list[Spec]:
    """The journals the settings name: each directory, the files together (one machine's set), the local one."""
    out = [Spec(directories=(d,), match=match) for d in directories]
    out += [Spec(files=tuple(files), match=match)] if files else []
    out += [Spec(match=match)] if local else []
    return out


def available() -> str | None:
    """journalctl's path, or None."""
    return shutil.which("journalctl", path=os.environ.get("PATH", "") + ":/usr/bin:/bin")


def local_journal_exists() -> bool:
    """Whether this machine has a journal to read (journald writes one of these)."""
    return any(os.path.isdir(d) for d in LOCAL_DIRS)


def is_journal(name: str) -> bool:
    """Whether a source name is a journal's (journal:...), not a file path."""
    return name.startswith(SCHEME + ":")


def _escape(path: str) -> str:
    """A path inside a source name, where commas separate paths: ',' and '%' written as %2C and %25."""
    return path.replace("%", "%25").replace(",", "%2C")


@dataclass(frozen=True)
class Spec:
    """Which journal: the local one (no directories or files), a copied directory, or files; and the match."""

    directories: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    match: tuple[str, ...] = DEFAULT_MATCH

    @property
    def name(self) -> str:
        """The source's name (its checkpoint key): journal:local, journal:dir=D, journal:file=F[,F...]."""
        return self._name(_escape) or f"{SCHEME}:local"

    @property
    def former_name(self) -> str | None:
        """The name harvester gave this journal before paths were escaped in it (its checkpoint's key then),
        where that differs: a path with '%' in it. A path with ',' had no usable name before."""
        paths = self.directories or self.files
        if not any("%" in p for p in paths) or any("," in p for p in paths):
            return None
        return self._name(lambda p: p)

    def _name(self, write: Callable[[str], str]) -> str | None:
        """journal:dir=... or journal:file=... with each path as `write` gives it (None: the local journal)."""
        kind, paths = ("dir", self.directories) if self.directories else ("file", self.files)
        return f"{SCHEME}:{kind}={','.join(map(write, paths))}" if paths else None

    @classmethod
    def parse(cls, name: str, match: tuple[str, ...] = DEFAULT_MATCH) -> Spec:
        what = name.partition(":")[2]
        kind, _, value = what.partition("=")
        parts = tuple(urllib.parse.unquote(p, errors="surrogateescape") for p in value.split(",") if p)
        if kind == "dir":
            return cls(directories=parts, match=match)
        if kind == "file":
            return cls(files=parts, match=match)
        if kind in ("", "local"):
            return cls(match=match)
        raise ValueError(f"{name}: a journal source is journal:local, journal:dir=DIR or journal:file=FILE")

    def args(self) -> list[str]:
        """journalctl's arguments for the journal and the entries: every boot (--merge), the match, and
        journald's own suppression notes."""
        out = [available() or "journalctl", "--merge", "-o", "json", "--no-pager", f"--output-fields={_FIELDS}"]
        out += [f"--directory={d}" for d in self.directories] + [f"--file={f}" for f in self.files]
        return out

    def matches(self) -> list[str]:
        return [*self.match, "+", f"MESSAGE_ID={SUPPRESSED_ID}"]


class Entries:
    """journalctl's JSON lines -> the pack's lines; counts what journald dropped."""

    def __init__(self, on_dropped: Callable[[int, str], None] = lambda n, unit: None) -> None:
        self.on_dropped = on_dropped
        self.cursor: str | None = None  # of the last entry converted
        self.time_us = 0  # of that entry
        self.bad = 0  # lines that were not a journal entry (cut output)
        self._second = -1
        self._stamp = b""

    def convert(self, chunk: bytes) -> bytes:
        """Complete JSON lines -> log lines, each ending in b"\\n" (natively when the module is built)."""
        if native.enabled():
            lines, cursor, t, bad, notes = native.fastscan.journal_lines(chunk, SUPPRESSED_ID)
            if cursor is not None:
                self.cursor, self.time_us = cursor, t
            self.bad += bad
            for note in notes:
                self._note(note)
            return lines
        out: list[bytes] = []
        for raw in chunk.split(b"\n"):
            if not raw:
                continue
            try:
                e = json.loads(raw)
                t = int(e["__REALTIME_TIMESTAMP"])
                cursor = e["__CURSOR"]
            except (ValueError, KeyError, TypeError):
                self.bad += 1
                continue
            self.cursor, self.time_us = cursor, t
            msg = _text(e.get("MESSAGE"))
            if e.get("MESSAGE_ID") == SUPPRESSED_ID:
                self._note(msg)
                continue
            second, us = divmod(t, 1_000_000)
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
            host = _text(e.get("_HOSTNAME")) or b"-"
            out.append(b"%s.%06dZ %s dovecot: %s\n" % (self._stamp, us, host.replace(b" ", b"_"),
                                                         msg.replace(b"\n", b" ").replace(b"\r", b" ")))
        return b"".join(out)

    def _note(self, msg: bytes) -> None:
        """journald's "Suppressed N messages from UNIT": Dovecot's are lines lost."""
        m = _SUPPRESSED.search(msg.decode("utf-8", "replace"))
        if m and "dovecot" in m.group(2):
            self.on_dropped(int(m.group(1)), m.group(2))


def _text(v: object) -> bytes:
    """A journal field as bytes: JSON gives text, or an array of byte values for binary data."""
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape")
    if isinstance(v, list):
        try:
            return bytes(v)
        except (ValueError, TypeError):
            return b""
    return b""


def cursor_time_us(cursor: str) -> int | None:
    """The realtime stamp a cursor names (its t= field, hex microseconds), or None."""
    for part in cursor.split(";"):
        if part.startswith("t="):
            try:
                return int(part[2:], 16)
            except ValueError:
                return None
    return None


def _first(args: list[str], timeout: float = 30.0) -> dict | None:
    """The first entry journalctl prints for `args`, or None (the rest is not read). Raises OSError when
    journalctl fails or hangs (no permission, a broken journal), so that a failure is not taken for "no entry"."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            line = proc.stdout.readline() if ready else None
        finally:
            proc.kill()
            code = proc.wait()
        if line is None:
            raise OSError(f"journalctl gave no answer in {timeout:.0f} s")
        if not line.strip() and code not in (0, -signal.SIGKILL):
            err.seek(0)
            raise OSError(f"journalctl exited with {code}: {err.read().decode('utf-8', 'replace').strip()[-300:]}")
    try:
        return json.loads(line) if line.strip() else None
    except ValueError:
        return None


def exists(spec: Spec, cursor: str) -> bool:
    """Whether the entry a cursor names is still in the journal (vacuuming removes old files)."""
    e = _first([*spec.args(), f"--cursor={cursor}", *spec.matches()])
    return e is not None and e.get("__CURSOR") == cursor


def edge(spec: Spec, newest: bool) -> dict | None:
    """The oldest (or newest) matching entry, or None for an empty journal."""
    return _first([*spec.args(), *(["--reverse"] if newest else []), *spec.matches()])


def fmt_us(t: int | None) -> str:
    return "?" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t // 1_000_000))


class Follower:
    """The journal followed live (the daemon's LineSource for journal:...)."""

    def __init__(self, spec: Spec, *, on_dropped: Callable[[int, str], None] = lambda n, unit: None,
                 on_gap: Callable[[int, int], None] = lambda lost_from, lost_to: None,
                 on_long_line: Callable[[int], None] = ignored, max_line: int = 1 << 20) -> None:
        self.spec = spec
        self.entries = Entries(on_dropped)
        self.on_gap = on_gap
        self.max_line = max_line
        self.on_long_line = on_long_line
        self.proc: subprocess.Popen | None = None
        self.pending = b""  # a partial JSON line
        self.offset = 0  # bytes of lines handed out (Block.offset: where problems are reported)
        self.more = False
        self.cursor: str | None = None  # the last entry handed out (or where reading starts)
        self.retry_at = 0.0
        self.said_at = -SAID_AGAIN_S
        self.err: IO[bytes] | None = None  # journalctl's stderr
        self.bad_said = 0

    def start(self, positions: list, start_at: str) -> str:
        cursor = next((p.cursor for p in positions if isinstance(p, Cursor)), None)
        if cursor is not None:
            self.cursor = cursor
            if self._vacuumed(cursor):
                first = edge(self.spec, newest=False)
                lost_to = int(first["__REALTIME_TIMESTAMP"]) if first else None
                lost_from = cursor_time_us(cursor)
                log.error("%s: the checkpointed entry (%s) is no longer in the journal (vacuumed while harvester "
                          "was down): resuming at the oldest entry still there (%s); entries between are lost",
                          self.spec.name, fmt_us(lost_from), fmt_us(lost_to))
                self.on_gap(lost_from or 0, lost_to or 0)
                self.cursor = None  # from the oldest entry
                self._spawn(from_start=True)
                return f"from the oldest entry, {fmt_us(lost_to)} (the checkpointed one was vacuumed)"
            self._spawn()
            return f"after the checkpointed entry of {fmt_us(cursor_time_us(cursor))}"
        if start_at == "end":
            newest = edge(self.spec, newest=True)
            self.cursor = newest["__CURSOR"] if newest else None
            self._spawn(from_start=self.cursor is None)
            return "from its end (new entries only)"
        self._spawn(from_start=True)
        return "from its oldest entry"

    def _vacuumed(self, cursor: str) -> bool:
        """Whether the checkpointed entry is gone because older entries were removed: it is not there, and the
        oldest entry left is newer than it. A journal that cannot be asked (permissions, not flushed yet) or a
        match that no longer takes that entry is none of that: reading resumes after the cursor all the same."""
        try:
            if exists(self.spec, cursor):
                return False
            first = edge(self.spec, newest=False)
        except OSError as e:
            log.warning("%s: cannot check the checkpointed entry (%s); resuming after it", self.spec.name, e)
            return False
        at = cursor_time_us(cursor)
        return first is not None and at is not None and int(first["__REALTIME_TIMESTAMP"]) > at

    def _spawn(self, from_start: bool = False) -> None:
        # --follow shows only the last 10 entries unless told otherwise, even after a cursor: --no-tail.
        args = [*self.spec.args(), "--follow"]
        if self.cursor:
            args += [f"--after-cursor={self.cursor}", "--no-tail"]
        else:
            args += ["--no-tail"] if from_start else ["--lines=0"]
        args += self.spec.matches()
        # stderr into a file, not a pipe nobody empties while it runs: 64 KiB of warnings would stop it.
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - closed when journalctl ends (_ended, close)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.err, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, 1031, PIPE_BYTES)  # F_SETPIPE_SZ
        self.pending = b""

    def poll(self) -> list[Block]:
        proc = self.proc
        if proc is None:
            if time.monotonic() >= self.retry_at:
                self._spawn(from_start=self.cursor is None)
            return []
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        parts = [self.pending]
        got = 0
        self.more = False
        while got < READ_MAX:
            try:
                data = os.read(fd, READ_MAX - got)
            except BlockingIOError:
                break
            if not data:  # journalctl exited
                self._ended()
                break
            parts.append(data)
            got += len(data)
        else:
            self.more = True
        raw = b"".join(parts)
        cut = raw.rfind(b"\n") + 1
        self.pending = raw[cut:]
        if len(self.pending) > self.max_line:  # one entry over the limit: skipped, as a file's long line
            self.on_long_line(self.offset)
            self.pending = b""
        if not cut:
            return []
        lines = self.entries.convert(raw[:cut])
        self.cursor = self.entries.cursor or self.cursor
        if self.entries.bad > self.bad_said:
            log.warning("%s: %d line(s) of journalctl's output were no journal entry, skipped", self.spec.name,
                        self.entries.bad - self.bad_said)
            self.bad_said = self.entries.bad
        if not lines:
            return []
        block = Block(lines, self.offset, _NO_FILE, self.offset + len(lines))
        self.offset += len(lines)
        return [block]

    def _ended(self) -> None:
        """journalctl exited (the journal went away, no permission): said, then started again later."""
        proc = self.proc
        self.proc = None
        if proc is None:
            return
        proc.wait()
        err = ""
        if self.err is not None:
            self.err.seek(0)
            err = self.err.read().decode("utf-8", "replace").strip()
            self.err.close()
            self.err = None
        now = time.monotonic()
        if now - self.said_at >= SAID_AGAIN_S:
            log.error("%s: journalctl exited with %s%s; starting it again in %.0f s", self.spec.name, proc.returncode,
                      f": {err[-300:]}" if err else "", RESTART_S)
            self.said_at = now
        self.retry_at = now + RESTART_S

    def backlog(self) -> bool:
        if self.more:
            return True
        if self.proc is None or self.proc.stdout is None:
            return False
        readable, _, _ = select.select([self.proc.stdout], [], [], 0)
        return bool(readable)

    def positions(self) -> list:
        return [Cursor(self.cursor)] if self.cursor else []

    def lag_bytes(self) -> int:
        return len(self.pending)

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.err is not None:
            self.err.close()
            self.err = None


def history(spec: Spec, *, since: str | None = None, until: str | None = None,
            on_dropped: Callable[[int, str], None] = lambda n, unit: None,
            max_line: int = 1 << 20, on_long_line: Callable[[int], None] = ignored) -> Iterator[Text]:
    """The journal's entries (between `since` and `until`, journalctl's time syntax) as Texts for
    Parser.feed_text; a Text's `read` is the realtime stamp (s) of its last entry, for a progress bar."""
    args = [*spec.args()]
    args += [f"--since={since}"] if since else []
    args += [f"--until={until}"] if until else []
    err = tempfile.TemporaryFile()  # noqa: SIM115 - closed below; not a pipe: nobody empties it while it runs
    proc = subprocess.Popen([*args, *spec.matches()], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    entries = Entries(on_dropped)
    offset = 0
    pending = b""
    try:
        while True:
            data = proc.stdout.read1(READ_MAX) if hasattr(proc.stdout, "read1") else proc.stdout.read(READ_MAX)
            if not data:
                break
            raw = pending + data
            cut = raw.rfind(b"\n") + 1
            pending = raw[cut:]
            if len(pending) > max_line:
                on_long_line(offset)
                pending = b""
            lines = entries.convert(raw[:cut])
            if lines:
                yield Text(offset, b"\n" + lines, len(lines) + 1, entries.time_us // 1_000_000)
                offset += len(lines)
        proc.wait()
        if entries.bad:
            log.warning("%s: %d line(s) of journalctl's output were no journal entry, skipped", spec.name,
                        entries.bad)
        if proc.returncode:
            err.seek(0)
            text = err.read().decode("utf-8", "replace").strip()
            raise OSError(f"journalctl exited with {proc.returncode}: {text[-300:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
