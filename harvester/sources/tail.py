"""Follow one log path through logrotate: rename+create, copytruncate, delaycompress and compress.

The files of a path are read strictly in order, each to its (current) end
before the next: the rest of a rotated file, then each newer rotated file,
then the live one. One parser sees them as one stream, so an LMTP session
that opens at the end of one file is known when its deliveries are read at
the start of the next.

The current file is kept open, so after a rename (and even after logrotate
compressed and deleted it) its last lines are still read from the open
descriptor: the old file is drained until it has been quiet for a grace
period, because the writer (rsyslog) may append to it until it reopens.
After a restart, each checkpointed file is looked for at the path and among
its rotated siblings, by inode or by the fingerprint of its first bytes
(a copytruncate copy has a new inode; a compressed one is matched by its
decompressed text). Copytruncate while running shows as a file shorter than,
or starting differently from, what was read: the unread rest is then taken
from the copy, before the truncated file (the plain copy while it is there,
else the compressed one logrotate leaves once gzip is done). A rotated file is
opened as soon as it is recognised and read through that descriptor. Rotated
files leave the checkpointed positions in reading order only, so the positions
always name every file from the oldest unfinished one on.

Compressed files are streamed in blocks of a few MiB; their position is the
number of decompressed bytes read. Only complete lines are handed out; a
partial last line waits for its newline, unless its file is finished. Lines
longer than max_line are cut out and reported, as backfill does.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import stat
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from harvester.sources import archive, compression
from harvester.sources.archive import drop_long_lines, line_blocks
from harvester.sources.base import AnyPosition, Block, ignored
from harvester.sources.compression import ArchiveError, raw_chunks, sniff
from harvester.sources.identity import HEAD_BYTES, FileId, Position, head_of, identify, still_same
from harvester.sources.rotation import rotation_key

log = logging.getLogger(__name__)
READ_BYTES = 4 << 20  # one read of a plain file
POLL_BYTES = 16 << 20  # at most this much per poll (then backlog() says there is more): bounds memory
ARCHIVE_CHUNK = 64 << 10  # compressed bytes inflated at a time: 0.5 MB of log text, 64 MB at gzip's worst ratio
DRAIN_GRACE = 5.0  # seconds a rotated file must stay unchanged before it is finished
REPEAT = 60.0  # an unreadable path is reported once, then this often
MISSING_GRACE = 10.0  # a path missing this long is reported (a rotation leaves it missing for a moment)
LIST_TRIES = 5  # rotated files listed again when one vanished under us (gzip done, logrotate removed the copy)
FINISHED_KEPT = 8  # finished files remembered, in case one comes back at the path (a botched swap undone)


@dataclass
class _Open:
    """A plain file, read through its descriptor."""

    fd: int
    id: FileId
    offset: int
    quiet_since: float | None = None  # draining (a rotated file): since when it has not grown
    skipping: bool = False  # inside a line longer than max_line
    seen_size: int = -1  # draining: the size when last looked at


@dataclass
class _Archive:
    """A compressed rotated file, streamed once through; `offset` counts decompressed bytes. It is held open
    from the moment it was recognised: a later rotation may rename it, or put another file at its name."""

    path: Path
    id: FileId  # dev/ino of the archive, fingerprint of its decompressed first bytes
    offset: int
    f: BinaryIO
    size: int  # compressed bytes
    blocks: Generator[tuple[int, bytes, int], None, None] | None = None
    progress: compression.ReadProgress = field(default_factory=compression.ReadProgress)
    done: bool = False  # read to its end (finished once the files before it are)


@dataclass
class _Sibling:
    """A rotated file of the path as found at a restart or copytruncate."""

    path: Path
    st: os.stat_result
    compressed: bool
    first: bytes  # its first HEAD_BYTES bytes (decompressed)

    def starts_like(self, fid: FileId) -> bool:
        return 0 < fid.n <= len(self.first) and head_of(self.first[:fid.n])[0] == fid.head

    def same_file(self, st: os.stat_result) -> bool:
        """Whether `st` (of the file now opened at its name) is the file listed."""
        return (st.st_dev, st.st_ino) == (self.st.st_dev, self.st.st_ino)


@dataclass
class Follower:
    """One followed path: its current file, and before it the files still to be read, in order."""

    path: Path
    max_line: int = 1 << 20
    on_long_line: Callable[[int], None] = field(default_factory=lambda: ignored)
    on_rotation: Callable[[str], None] = field(default_factory=lambda: ignored)
    cur: _Open | None = None
    queue: list[_Open | _Archive] = field(default_factory=list)  # read before cur, first to last
    finished: list[Position] = field(default_factory=list)  # files drained and closed, newest last
    more: bool = False  # the last poll stopped at its byte budget
    unreadable_since: float | None = None
    said_at: float | None = None

    # -- start ---------------------------------------------------------------------
    def start(self, positions: list[AnyPosition], start_at: str) -> str:
        """Resume from checkpointed positions, else start at the end (or beginning) of the file.

        The oldest checkpointed file still found is read from its offset, then every newer rotated
        file (from its checkpointed offset if it has one, else whole), then the live file.
        Returns how it started, for the log."""
        files = [p for p in positions if isinstance(p, Position)]
        fd = self._open_path()
        here = identify(fd) if fd is not None else None
        for tries_left in range(LIST_TRIES - 1, -1, -1):
            how = self._resume(files, start_at, fd, here, last_try=not tries_left)
            if how is not None:
                return how
            for item in self.queue:  # a rotated file vanished before it was opened: list them again
                self._close(item)
            self.queue = []
        raise AssertionError("the last try always resumes")

    def _resume(self, positions: list[Position], start_at: str, fd: int | None, here: FileId | None, *,
                last_try: bool) -> str | None:
        """start() on one listing of the rotated files; None if one of them vanished before it was opened
        (logrotate at work: a compressed copy replaced it, or names shifted) and this is not the last try."""
        chain = _rotated(self.path)
        found: dict[int, Position] = {}  # index in chain (len(chain): the live file) -> position
        for pos in positions:
            at = self._locate(pos, chain, fd, here)
            if at is None:
                log.warning("%s: the file checkpointed at byte %d is gone (not at the path nor among its rotated "
                            "siblings); its unread rest, if any, is lost", self.path, pos.offset)
            elif at not in found:
                found[at] = pos
        how = []
        if found:
            first = min(found)
            for i in range(first, len(chain)):
                sib, known = chain[i], found.get(i)
                if self._enqueue(sib, known.offset if known else 0):
                    how.append(f"the rest of the rotated {sib.path.name} from byte {known.offset:,}" if known
                               else f"all of {sib.path.name} (rotated while stopped)")
                elif not last_try:
                    return None
                else:
                    log.warning("%s: vanished before it could be opened; its lines are not read", sib.path)
        if fd is not None:
            assert here is not None, "an open file is identified"
            if len(chain) in found:
                offset = found[len(chain)].offset
                how.append(f"from its checkpoint at byte {offset:,}")
            else:
                # The file at the path is not a checkpointed one: after a restart across a rotation it is
                # new (read all of it); with no checkpoint at all, `start_at` decides.
                offset = 0 if positions or start_at == "beginning" else os.fstat(fd).st_size
                how.append("the new file from its beginning" if positions else f"from the {start_at}")
            self.cur = _Open(fd, here, offset)
        return "; ".join(how) or "once it appears"

    def _locate(self, pos: Position, chain: list[_Sibling], fd: int | None, here: FileId | None) -> int | None:
        """Which file of the chain (len(chain): the live one) `pos` was taken from: by inode and first bytes
        (an empty file's by inode alone), else by first bytes (a copy, a compressed file)."""
        fid = pos.id
        if here is not None and fd is not None and fid.dev == here.dev and fid.ino == here.ino \
                and still_same(fid, fd):
            return len(chain)
        for i, sib in enumerate(chain):
            if not sib.compressed and fid.same_inode(sib.st) and (fid.n == 0 or sib.starts_like(fid)):
                return i
        for i in range(len(chain) - 1, -1, -1):  # newest first: a copy is usually the newest rotated file
            if chain[i].starts_like(fid):
                return i
        return None

    def _enqueue(self, sib: _Sibling, offset: int, *, copy: bool = False) -> bool:
        """Queue a rotated file to be read from `offset` (decompressed bytes for a compressed one), opened now;
        False if it is no longer at its name (it vanished or another file is there). A copy is finished as
        soon as it has been read, as is a file rotated long enough ago (no grace to wait)."""
        try:
            fd = _open_regular(sib.path)
        except FileNotFoundError:
            return False
        except OSError as e:
            log.error("%s: cannot open: %s", sib.path, e.strerror or e)
            return False
        st = os.fstat(fd)
        if not sib.same_file(st):
            os.close(fd)
            return False
        if sib.compressed:
            fid = FileId(sib.st.st_dev, sib.st.st_ino, *head_of(sib.first))
            self.queue.append(_Archive(sib.path, fid, offset, os.fdopen(fd, "rb"), st.st_size))
            return True
        age = DRAIN_GRACE if copy else max(time.time() - st.st_mtime, 0.0)
        self.queue.append(_Open(fd, identify(fd), offset, quiet_since=time.monotonic() - age, seen_size=st.st_size))
        return True

    # -- reading ---------------------------------------------------------------------
    def poll(self) -> list[Block]:
        """New complete lines, in order: the queued files' (each to its current end first), then the current
        file's; at most about POLL_BYTES (backlog() then says more is readable)."""
        self._check_rotation()
        out: list[Block] = []
        budget = POLL_BYTES
        self.more = False
        for item in list(self.queue):
            # Only the first queued file may be finished (leave the positions): a checkpoint's positions then
            # always name every file from the oldest unfinished one on, and a restart reads none of them again
            # (it reads every rotated file between two checkpointed ones whole, as rotated while stopped).
            first = item is self.queue[0]
            if isinstance(item, _Archive):
                got, at_end = self._read_archive(item, budget)
                item.done = at_end
            else:
                got, at_end = self._read(item, budget, final=False)
                if at_end and self._quiet(item) and first:  # its quiet time counts while it waits its turn
                    more, _ = self._read(item, 1 << 62, final=True)
                    got += more
                    self._finish(item)
            out += got
            budget -= sum(b.end - b.offset for b in got)
            if not at_end:
                self.more = True
                return out
            if isinstance(item, _Archive) and first:
                self._finish(item)
        if self.cur is not None:
            got, at_end = self._read(self.cur, budget, final=False)
            out += got
            self.more = not at_end
        return out

    def backlog(self) -> bool:
        """Whether more is already readable than the last poll handed out (catching up: do not sleep)."""
        return self.more or any(isinstance(item, _Archive) and not item.done for item in self.queue)

    def positions(self) -> list[AnyPosition]:
        """Where each file still to be read was read to, in reading order: queued ones, then the current one
        (an empty file too: its identity lets a restart find it after a rotation)."""
        return [Position(o.id, o.offset) for o in [*self.queue, *([self.cur] if self.cur else [])]]

    def lag_bytes(self) -> int:
        total = 0
        for o in [*self.queue, *([self.cur] if self.cur else [])]:
            with contextlib.suppress(OSError):
                if isinstance(o, _Archive):  # compressed bytes not read yet
                    total += max(o.size - o.progress.read, 0)
                else:
                    total += max(os.fstat(o.fd).st_size - o.offset, 0)
        return total

    def close(self) -> None:
        for o in [*self.queue, *([self.cur] if self.cur else [])]:
            self._close(o)
        self.queue, self.cur = [], None

    def _close(self, o: _Open | _Archive) -> None:
        if isinstance(o, _Archive):
            if o.blocks is not None:
                o.blocks.close()
            o.f.close()
            return
        with contextlib.suppress(OSError):
            os.close(o.fd)

    def _finish(self, o: _Open | _Archive) -> None:
        self._close(o)
        self.queue.remove(o)
        self.finished = [*self.finished, Position(o.id, o.offset)][-FINISHED_KEPT:]

    def _check_rotation(self) -> None:
        cur = self.cur
        try:
            st = os.stat(self.path)
        except OSError:
            # Renamed away and not re-created (yet): keep reading the open file. Once it is deleted too
            # (compressed by logrotate), nothing will write to it again: drain it and wait for a new one.
            if cur is not None and os.fstat(cur.fd).st_nlink == 0:
                self.on_rotation("rename")
                self._retire(cur)
            if self.cur is None:
                self._open_new()
            return
        if cur is None:
            self._open_new()
            return
        if not cur.id.same_inode(st):
            # rename+create (or something else put at the path): finish the old file (the writer may still
            # append until it reopens), then the new one
            self.on_rotation("rename")
            self._retire(cur)
            self._open_new()
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

    def _retire(self, cur: _Open) -> None:
        cur.quiet_since, cur.seen_size = time.monotonic(), -1
        self.queue.append(cur)
        self.cur = None

    def _open_new(self) -> None:
        """Open the file now at the path as the current one. If it is a file already read (a rotated file
        put back), go on from where it was read to."""
        fd = self._open_path()
        if fd is None:
            return
        here = identify(fd)
        for o in self.queue:
            if isinstance(o, _Open) and o.id.dev == here.dev and o.id.ino == here.ino and still_same(o.id, o.fd):
                os.close(fd)
                self.queue.remove(o)
                o.quiet_since = None
                self.cur = o
                return
        offset = 0
        for pos in self.finished:
            if pos.id.dev == here.dev and pos.id.ino == here.ino and still_same(pos.id, fd):
                offset = pos.offset
        self.cur = _Open(fd, here, offset)

    def _from_copy(self, cur: _Open) -> None:
        """Queue the unread rest of a copytruncated file from its copy: the plain copy while it is there (the
        compressed one beside it may be half written), else the compressed one (logrotate removes the plain
        copy once gzip is done). If the copy listed is gone when opened, the rotated files are listed again."""
        if cur.offset == 0:
            return
        for _ in range(LIST_TRIES):
            sib = next((s for s in reversed(_rotated(self.path))
                        if not cur.id.same_inode(s.st) and s.starts_like(cur.id)), None)
            if sib is None:
                break
            if self._enqueue(sib, cur.offset, copy=True):  # a copy is finished once read: its last partial
                return  # line is a line too
        if os.fstat(cur.fd).st_size < cur.offset:
            log.warning("%s: truncated at byte %d and no rotated copy starts like it; lines after that "
                        "offset written before the truncation are lost", self.path, cur.offset)

    def _read(self, o: _Open, budget: int, *, final: bool) -> tuple[list[Block], bool]:
        """Complete lines of `o` from its offset, about `budget` bytes at most (all of it, a last partial line
        too, when `final`); and whether its current end was reached."""
        out: list[Block] = []
        size = max(READ_BYTES, self.max_line + 1)  # a full read without a newline is a line too long
        while budget > 0:
            data = os.pread(o.fd, size, o.offset)
            eof = len(data) < size
            if o.skipping:
                nl = data.find(b"\n")
                o.offset += len(data) if nl < 0 else nl + 1
                o.skipping = nl < 0
                if nl < 0:
                    if eof:
                        return out, True
                    continue
                data = data[nl + 1:]
            start = o.offset
            cut = len(data) if final and eof else data.rfind(b"\n") + 1
            if cut == 0:
                if len(data) <= self.max_line:
                    return out, True  # nothing, or a partial line that waits for its newline
                self.on_long_line(start)
                o.offset += len(data)
                o.skipping = True
                continue
            o.offset = start + cut
            kept = drop_long_lines(data[:cut], start, self.max_line, self.on_long_line)
            if kept:
                out.append(Block(kept, start, o.id, o.offset))
            budget -= cut
            if eof:
                return out, True
        return out, False

    def _read_archive(self, a: _Archive, budget: int) -> tuple[list[Block], bool]:
        """The next blocks of a compressed file, about `budget` bytes; and whether it was read to its end."""
        if a.blocks is None:
            a.blocks = self._archive_blocks(a)
        out: list[Block] = []
        while budget > 0:
            try:
                start, data, end = next(a.blocks)
            except StopIteration:
                return out, True
            a.offset = end
            if data:
                out.append(Block(data, start, a.id, end))
            budget -= end - start
        return out, False

    def _archive_blocks(self, a: _Archive) -> Generator[tuple[int, bytes, int], None, None]:
        """(offset, lines, end) of a compressed file from decompressed byte `a.offset` (a line start)."""
        skip = a.offset
        total = skip

        def chunks() -> Iterator[bytes]:
            nonlocal total
            left = skip
            for chunk in raw_chunks(a.f, ARCHIVE_CHUNK, a.progress):
                if left >= len(chunk):
                    left -= len(chunk)
                    continue
                chunk, left = chunk[left:], 0
                total += len(chunk)
                yield chunk

        prev: tuple[int, bytes] | None = None
        try:
            # one block ahead: a block's end is where the next starts (long lines cut out make it shorter)
            for start, data in line_blocks(chunks(), max_line=self.max_line, block=archive.BLOCK,
                                           on_long_line=lambda at: self.on_long_line(skip + at)):
                if prev is not None:
                    yield prev[0], prev[1], skip + start
                prev = (skip + start, data)
        except ArchiveError as e:
            log.error("%s: %s; the lines after the damage are not read", a.path, e)
            if prev is not None:
                yield prev[0], prev[1], prev[0] + len(prev[1])
            return
        if prev is not None:
            yield prev[0], prev[1], total

    def _quiet(self, o: _Open) -> bool:
        """Whether a rotated file has stopped growing for the grace period (then it is finished)."""
        try:
            size = os.fstat(o.fd).st_size
        except OSError:
            return True
        now = time.monotonic()
        if size != o.seen_size or o.quiet_since is None:
            o.seen_size, o.quiet_since = size, now
        return now - o.quiet_since >= DRAIN_GRACE

    # -- opening -------------------------------------------------------------------------
    def _open_path(self) -> int | None:
        """The followed path opened, if it is a readable regular file; else say why (once, then every minute)."""
        try:
            fd = _open_regular(self.path)
        except OSError as e:
            self._unreadable(e)
            return None
        if self.unreadable_since is not None and self.said_at is not None:
            log.warning("%s: readable again", self.path)
        self.unreadable_since = self.said_at = None
        return fd

    def _unreadable(self, e: OSError) -> None:
        now = time.monotonic()
        if self.unreadable_since is None:
            self.unreadable_since = now
        missing = e.errno == errno.ENOENT
        if missing and now - self.unreadable_since < MISSING_GRACE:
            return
        if self.said_at is None or now - self.said_at >= REPEAT:
            for_how_long = "" if self.said_at is None else f" (for {now - self.unreadable_since:.0f} s)"
            log.error("%s: cannot read it: %s%s; lines are read again once a regular file is there", self.path,
                      e.strerror or e, for_how_long)
            self.said_at = now


def _open_regular(path: Path) -> int:
    """A descriptor of `path` if it is a regular file. O_NONBLOCK: opening a FIFO must not wait for a writer;
    anything but a regular file is closed again and refused (OSError)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL, f"it is {kind}, not a regular file")
    return fd


def _rotated(path: Path) -> list[_Sibling]:
    """The rotated files of `path` (maillog.1, maillog.2.gz, maillog-20251122.gz), oldest first, with their
    first bytes; of a file and its compressed twin (logrotate compressing it right now) only the plain one.
    A file that vanishes while they are looked at (its compressed twin just finished) makes a new listing."""
    for _ in range(LIST_TRIES):
        names = glob.glob(glob.escape(str(path)) + ".*") + glob.glob(glob.escape(str(path)) + "-*")
        out: dict[str, _Sibling] = {}
        vanished = False
        plain = compression.strip_compression
        for name in sorted(names, key=lambda n: (plain(n), n != plain(n))):
            p, base = Path(name), plain(name)
            key = rotation_key(p)
            if key[1] != path.name or key[2] == 2 or base in out:
                continue
            try:
                sib = _peek(p)
            except FileNotFoundError:
                vanished = True
                continue
            if sib is not None:
                out[base] = sib
        if not vanished:
            break
    return sorted(out.values(), key=lambda s: rotation_key(s.path))


def _peek(p: Path) -> _Sibling | None:
    """A rotated file's stat and first bytes (decompressed), both of the one file opened, or None if it cannot
    be read; FileNotFoundError if it is gone."""
    try:
        fd = _open_regular(p)
    except FileNotFoundError:
        raise
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        try:
            head = f.read(HEAD_BYTES)
        except OSError:
            return None
        if sniff(head).new is None:
            return _Sibling(p, st, False, head)
        f.seek(0)
        first = b""
        chunks: Generator[bytes, None, None] = raw_chunks(f, chunk=16 << 10)
        try:
            for chunk in chunks:
                first += chunk
                if len(first) >= HEAD_BYTES:
                    break
        except ArchiveError as e:
            if not first:
                log.error("%s: %s", p, e)
                return None
        finally:
            chunks.close()
    return _Sibling(p, st, True, first[:HEAD_BYTES])
