"""Follow one log path through logrotate: rename+create, copytruncate, delaycompress and compress.

The current file is kept open, so after a rename (and even after logrotate
compressed and deleted it) its last lines are still read from the open
descriptor: the old file is drained until it has been quiet for a grace
period, because the writer (rsyslog) may append to it until it reopens.
After a restart, a checkpointed file that is no longer at the path is looked
for among its rotated siblings (plain or compressed) by its fingerprint.
Copytruncate shows as a file shorter than, or starting differently from,
what was read: the unread rest is then taken from the copy.

Only complete lines are handed out; a partial last line waits for its newline,
unless its file is finished (drained after a rotation).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harvester.checkpoint import HEAD_BYTES, FileId, Position, head_of, identify, still_same
from harvester.sources.archive import ArchiveError, raw_chunks, rotation_key

log = logging.getLogger(__name__)
READ_BYTES = 4 << 20  # per file and poll: bounds memory and keeps other files served
DRAIN_GRACE = 5.0  # seconds a rotated file must stay unchanged before it is finished


@dataclass
class Block:
    """Complete lines of one file at `offset`, and the position after them."""

    data: bytes
    offset: int
    file: FileId
    end: int


@dataclass
class _Open:
    fd: int
    id: FileId
    offset: int
    quiet_since: float | None = None  # draining: since when the file has not grown
    skipping: bool = False  # inside a line longer than max_line
    seen_size: int = -1  # draining: the size when last looked at


@dataclass
class Follower:
    """One followed path (its current file, and the one it replaced while that is drained)."""

    path: Path
    max_line: int = 1 << 20
    on_long_line: Callable[[int], None] = lambda at: None
    on_rotation: Callable[[str], None] = lambda kind: None
    cur: _Open | None = None
    old: list[_Open] = field(default_factory=list)
    pending: list[Block] = field(default_factory=list)  # read from siblings at a restart or copytruncate
    more: bool = False  # the last poll left readable bytes behind

    # -- start ---------------------------------------------------------------------
    def start(self, positions: list[Position], start_at: str) -> str:
        """Resume from checkpointed positions, else start at the end (or beginning) of the file.

        Returns how it started, for the log."""
        fd = self._open(self.path)
        here = identify(fd) if fd is not None else None
        how = []
        for pos in positions:
            if here is not None and _matches(pos.id, here, fd):
                self.cur = _Open(fd, here, pos.offset)
                how.append(f"from its checkpoint at byte {pos.offset:,}")
                continue
            found = self._resume_elsewhere(pos)
            if found is not None:
                how.append(f"the rest of the rotated {found.name} from byte {pos.offset:,}")
                newer = self._newer_than(found)
                for sib in newer:
                    self._whole(sib)
                if newer:
                    how.append("all of " + ", ".join(p.name for p in newer) + " (rotated while stopped)")
        if fd is not None and self.cur is None:
            size = os.fstat(fd).st_size
            # The file at the path is not a checkpointed one: after a restart across a rotation it is new
            # (read all of it); with no checkpoint at all, `start_at` decides.
            offset = 0 if positions or start_at == "beginning" else size
            self.cur = _Open(fd, here, offset)
            how.append("the new file from its beginning" if positions else f"from the {start_at}")
        return "; ".join(how) or "once it appears"

    def _resume_elsewhere(self, pos: Position) -> Path | None:
        """A checkpointed file that moved: find it among the rotated siblings and read its rest."""
        for sib in _siblings(self.path):
            try:
                st = os.stat(sib)
            except OSError:
                continue
            if pos.id.same_inode(st):
                fd = self._open(sib)
                if fd is not None and still_same(pos.id, fd):
                    self.old.append(_Open(fd, pos.id, pos.offset, quiet_since=time.monotonic()))
                    return sib
                if fd is not None:
                    os.close(fd)
        for sib in _siblings(self.path):
            if sib.suffix in (".gz", ".bz2", ".xz", ".zst") and self._from_archive(sib, pos):
                return sib
        log.warning("%s: the file checkpointed at byte %d is gone (not among its rotated siblings); "
                    "its unread rest, if any, is lost", self.path, pos.offset)
        return None

    def _newer_than(self, found: Path) -> list[Path]:
        """Rotated siblings newer than `found`: files born and rotated while the daemon was stopped."""
        ordered = sorted(_siblings(self.path), key=rotation_key)
        return ordered[ordered.index(found) + 1:] if found in ordered else []

    def _whole(self, sib: Path) -> None:
        """Read a whole rotated file (plain: drained from its descriptor; compressed: through the archive)."""
        if sib.suffix in (".gz", ".bz2", ".xz", ".zst"):
            try:
                data = b"".join(raw_chunks(sib))
            except ArchiveError as e:
                log.error("%s: %s; the lines before the damage are not read either", sib, e)
                return
            self.pending.append(Block(data, 0, FileId(0, 0, *head_of(data)), len(data)))
            return
        fd = self._open(sib)
        if fd is not None:
            self.old.append(_Open(fd, identify(fd), 0, quiet_since=time.monotonic()))

    def _from_archive(self, sib: Path, pos: Position) -> bool:
        """Read the rest of a checkpointed file that logrotate compressed before we finished it."""
        try:
            chunks = raw_chunks(sib)
            data = b""
            for chunk in chunks:
                data += chunk
                if len(data) >= pos.id.n:
                    break
            if head_of(data[: pos.id.n])[0] != pos.id.head:
                return False
            rest = bytearray(data)
            for chunk in chunks:
                rest += chunk
        except ArchiveError as e:
            log.error("%s: %s; cannot take the unread lines from it", sib, e)
            return False
        tail = bytes(rest[pos.offset:])
        if tail:
            self.pending.append(Block(tail, pos.offset, pos.id, pos.offset + len(tail)))
        return True

    # -- reading ---------------------------------------------------------------------
    def poll(self) -> list[Block]:
        """New complete lines: first those of finished or rotated files, then the current file's."""
        self._check_rotation()
        self.more = False
        out, self.pending = self.pending, []
        for o in list(self.old):
            out += self._read(o, final=False)
            if self._quiet(o):
                out += self._read(o, final=True)
                os.close(o.fd)
                self.old.remove(o)
        if self.cur is not None:
            out += self._read(self.cur, final=False)
        return out

    def backlog(self) -> bool:
        """Whether the last poll stopped at READ_BYTES with more already readable (catching up)."""
        return self.more

    def positions(self) -> list[Position]:
        """Where each open file was read to: the rotated one being drained first."""
        return [Position(o.id, o.offset) for o in [*self.old, *([self.cur] if self.cur else [])]]

    def lag_bytes(self) -> int:
        total = 0
        for o in [*self.old, *([self.cur] if self.cur else [])]:
            with contextlib.suppress(OSError):
                total += max(os.fstat(o.fd).st_size - o.offset, 0)
        return total

    def close(self) -> None:
        for o in [*self.old, *([self.cur] if self.cur else [])]:
            with contextlib.suppress(OSError):
                os.close(o.fd)
        self.old, self.cur = [], None

    def _check_rotation(self) -> None:
        cur = self.cur
        try:
            st = os.stat(self.path)
        except OSError:
            # Renamed away and not re-created (yet): keep reading the open file. Once it is deleted too
            # (compressed by logrotate), nothing will write to it again: drain it and wait for a new one.
            if cur is not None and os.fstat(cur.fd).st_nlink == 0:
                self.on_rotation("rename")
                cur.quiet_since = time.monotonic()
                self.old.append(cur)
                self.cur = None
            return
        if cur is None:
            fd = self._open(self.path)
            if fd is not None:
                self.cur = _Open(fd, identify(fd), 0)
            return
        if not cur.id.same_inode(st):
            # rename+create: finish the old file (the writer may still append until it reopens)
            self.on_rotation("rename")
            cur.quiet_since = time.monotonic()
            self.old.append(cur)
            fd = self._open(self.path)
            self.cur = _Open(fd, identify(fd), 0) if fd is not None else None
            return
        size = os.fstat(cur.fd).st_size
        if size < cur.offset or (cur.id.n and not still_same(cur.id, cur.fd)):
            # copytruncate: what we had not read yet was copied to a sibling just before the truncation
            self.on_rotation("copytruncate")
            self._from_copy(cur)
            cur.id = identify(cur.fd)
            cur.offset = 0
            cur.skipping = False
        elif cur.id.n < HEAD_BYTES and size > cur.id.n:
            grown = identify(cur.fd)  # a short file's fingerprint grows with it (same first bytes)
            if grown.head != cur.id.head and still_same(cur.id, cur.fd):
                cur.id = grown

    def _from_copy(self, cur: _Open) -> None:
        for sib in _siblings(self.path):
            try:
                if sib.suffix in (".gz", ".bz2", ".xz", ".zst"):
                    if self._from_archive(sib, Position(cur.id, cur.offset)):
                        return
                    continue
                with open(sib, "rb") as f:
                    if head_of(f.read(cur.id.n))[0] != cur.id.head:
                        continue
                    f.seek(cur.offset)
                    rest = f.read()
            except OSError:
                continue
            if rest:  # a copy is finished: its last partial line is a line too
                self.pending.append(Block(rest, cur.offset, cur.id, cur.offset + len(rest)))
            return
        if os.fstat(cur.fd).st_size < cur.offset:
            log.warning("%s: truncated at byte %d and no rotated copy starts like it; lines after that "
                        "offset written before the truncation are lost", self.path, cur.offset)

    def _read(self, o: _Open, *, final: bool) -> list[Block]:
        """Complete lines of `o` from its offset (all of it, a last partial line too, when `final`)."""
        data = os.pread(o.fd, READ_BYTES, o.offset)
        if not data:
            return []
        self.more = self.more or len(data) == READ_BYTES
        if o.quiet_since is not None:
            o.quiet_since = time.monotonic()
        start = o.offset
        if o.skipping:
            nl = data.find(b"\n")
            if nl < 0:
                o.offset += len(data)
                return []
            o.offset += nl + 1
            o.skipping = False
            data = data[nl + 1:]
            start = o.offset
        cut = data.rfind(b"\n") + 1
        if final and len(data) < READ_BYTES:
            cut = len(data)  # a finished file's last line has no newline: still a line
        if cut == 0:
            if len(data) > self.max_line:
                self.on_long_line(o.offset)
                o.offset += len(data)
                o.skipping = True
            return []
        o.offset = start + cut
        return [Block(data[:cut], start, o.id, o.offset)]

    def _quiet(self, o: _Open) -> bool:
        """Whether a rotated file has stopped growing for the grace period (then it is finished)."""
        try:
            size = os.fstat(o.fd).st_size
        except OSError:
            return True
        if size != o.seen_size:
            o.seen_size, o.quiet_since = size, time.monotonic()
            return DRAIN_GRACE <= 0 and size <= o.offset + READ_BYTES
        return o.quiet_since is not None and time.monotonic() - o.quiet_since >= DRAIN_GRACE

    def _open(self, path: Path) -> int | None:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("%s: cannot open: %s", path, e.strerror)
            return None


def _matches(fid: FileId, here: FileId, fd: int) -> bool:
    return fid.dev == here.dev and fid.ino == here.ino and still_same(fid, fd)


def _siblings(path: Path) -> list[Path]:
    """Rotated names of `path` (mail.log.1, mail.log.2.gz, mail.log-20251122.gz), newest first."""
    names = glob.glob(glob.escape(str(path)) + ".*") + glob.glob(glob.escape(str(path)) + "-*")
    return sorted((Path(n) for n in names), key=lambda p: -_mtime(p))


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0
