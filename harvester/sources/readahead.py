"""A helper process that reads and inflates files one block ahead of the parser, handing the blocks over
through a shared memory ring (see read_ahead)."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import signal
import struct
from collections.abc import Callable, Iterable, Iterator

from harvester.sources.base import Lines, Text
from harvester.sources.compression import ArchiveError

_HEAD = struct.Struct("<BBQQQ")  # kind, slot, a, b, payload length
_BLOCK, _LONG, _ERROR, _END, _SLOT, _FILE = range(6)
SLOT = 8 << 20  # bytes per slot of read_ahead's shared ring (a block is about BLOCK plus one read)
SLOTS = 3  # one being parsed, one ready, one being filled


Make = Callable[[Callable[[int], None]], Iterable[Lines]]  # report_long_line -> a file's blocks


def read_ahead(make: Make, on_long_line: Callable[[int], None]) -> Iterator[Text]:
    """Run `make(report_long_line)` in a forked helper process and yield its blocks here, as texts.

    Reading, decompressing and cutting lines happen in a process of their own,
    one block ahead of the parser. A thread would share this process's GIL,
    which the native parser holds for milliseconds at a time: measured, zlib in
    a thread beside a busy main thread took 3.1 s instead of 1.3 s. The helper
    writes each block into a slot of a shared memory ring and the parser copies
    it out at memcpy speed: through a pipe, the same bytes cost the parser 0.17 s
    per 300 MB (a larger block still goes through the pipe). An ArchiveError in
    the helper is raised here, after the blocks before the damage.
    """
    helper = ReadAhead([make])
    try:
        yield from helper.texts(0, on_long_line)
    finally:
        helper.close()


class ReadAhead:
    """One helper process for several files, read one after another (read_ahead's, for a whole backfill).

    It is forked when made: a backfill makes it before it opens its store, so the fork never copies a
    process whose store driver runs threads (a lock held by one of them stays held in the child)."""

    def __init__(self, makes: list[Make]) -> None:
        self.ring = mmap.mmap(-1, SLOT * SLOTS)  # anonymous and shared: the forked helper writes, we read
        r, w = os.pipe()  # helper -> parser: what is in which slot, reports, oversize blocks
        free_r, self.free_w = os.pipe()  # parser -> helper: slots it may fill
        with contextlib.suppress(OSError):  # fewer, larger writes; the default is 64 KiB
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        os.write(self.free_w, bytes(range(SLOTS)))
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the helper; its results are checked in the parent
            os.close(r)
            os.close(self.free_w)
            code = 0
            try:
                with os.fdopen(w, "wb", buffering=1 << 16) as out:
                    for i, make in enumerate(makes):
                        out.write(_HEAD.pack(_FILE, 0, i, 0, 0))
                        _pump(make, out, self.ring, free_r)
                    out.flush()
            except BrokenPipeError:  # the parent stopped reading early
                pass
            except BaseException:  # noqa: BLE001 - a helper never unwinds into the parent's code
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        os.close(free_r)
        self.f = os.fdopen(r, "rb", buffering=1 << 16)
        self.at = -1  # the file whose texts come next (after its _FILE header)
        self.ended = True  # the current file's _END or _ERROR was read

    def texts(self, index: int, on_long_line: Callable[[int], None]) -> Iterator[Text]:
        """The texts of the index-th file (in the order given). Files before it that nobody read, or read
        to their end, are skipped: their messages are drained (slots given back), not handed on."""
        if self.at < index:
            self.ended = True  # what is left of the file before (its reader stopped early) is dropped
        while self.at < index:
            kind, _, a, _, _ = self._next(on_long_line)
            if kind == _FILE:
                self.at, self.ended = a, a != index  # a file before `index`: skipped too
        if self.at != index or self.ended:
            raise ValueError(f"file {index} of a read-ahead was read already")
        while True:
            kind, slot, a, b, n = self._next(on_long_line)
            if kind == _SLOT:
                data = self.ring[slot * SLOT:slot * SLOT + n]
                with contextlib.suppress(BrokenPipeError):  # the helper may be done already
                    os.write(self.free_w, bytes((slot,)))
                yield Text(a, data, n, b)
            elif kind == _BLOCK:
                yield Text(a, self.f.read(n), n, b)
            elif kind == _ERROR:
                self.ended = True
                raise ArchiveError(self.f.read(n).decode("utf-8", "replace"), partial=bool(a))
            else:
                self.ended = True
                return

    def _next(self, on_long_line: Callable[[int], None]) -> tuple[int, int, int, int, int]:
        """The next message of the file being read, but long-line reports (handed to on_long_line); what a
        skipped file sends is dropped (its slots given back), up to the next file's header."""
        while True:
            head = self.f.read(_HEAD.size)
            if len(head) < _HEAD.size:
                raise ArchiveError("the reader process ended unexpectedly", partial=True)
            kind, slot, a, b, n = _HEAD.unpack(head)
            if kind == _FILE:
                return kind, slot, a, b, n
            if self.ended:  # a file nobody reads (see texts)
                if kind == _SLOT:
                    with contextlib.suppress(BrokenPipeError):
                        os.write(self.free_w, bytes((slot,)))
                elif kind in (_BLOCK, _ERROR):
                    self.f.read(n)
                continue
            if kind == _LONG:
                on_long_line(a)
                continue
            return kind, slot, a, b, n

    def close(self) -> None:
        os.kill(self.pid, signal.SIGKILL)  # it may still be ahead of a consumer that stopped early
        os.waitpid(self.pid, 0)
        self.f.close()
        os.close(self.free_w)
        self.ring.close()


def _pump(make: Make, out, ring: mmap.mmap, free: int) -> None:
    def long_line(at: int) -> None:
        out.write(_HEAD.pack(_LONG, 0, at, 0, 0))

    try:
        for offset, block, read in make(long_line):
            n = len(block) + 1  # the parser's newline in front
            if n <= SLOT:
                out.flush()  # the parser must see what it has before we wait for a free slot
                slot = os.read(free, 1)[0]
                at = slot * SLOT
                ring[at] = 10
                ring[at + 1:at + n] = block
                out.write(_HEAD.pack(_SLOT, slot, offset, read, n))
            else:
                out.write(_HEAD.pack(_BLOCK, 0, offset, read, n))
                out.write(b"\n")
                out.write(block)
    except (ArchiveError, OSError) as e:
        partial = e.partial if isinstance(e, ArchiveError) else True
        text = (str(e) if isinstance(e, ArchiveError) else f"read error: {e.strerror or e}").encode()
        out.write(_HEAD.pack(_ERROR, 0, int(partial), 0, len(text)))
        out.write(text)
        return
    out.write(_HEAD.pack(_END, 0, 0, 0, 0))
