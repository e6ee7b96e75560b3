"""Read plain and rotated (compressed) log files as blocks of complete lines.

Compression is recognised by magic bytes, not by name (logrotate's
compressext can be anything). A plain file is read in place, one copy per
byte (plain_texts). Decompressing runs in a helper process (read_ahead), so
inflating the next megabytes overlaps with parsing the current ones on
another core.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import logging
import lzma
import mmap
import os
import re
import signal
import struct
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol, cast

from isal import isal_zlib

log = logging.getLogger(__name__)
CHUNK = 1 << 20  # compressed bytes read at a time
BLOCK = 4 << 20  # decompressed bytes handed to the parser at a time (roughly)
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lzma", ".z")


class ArchiveError(Exception):
    """The file could not be read to its end; `partial` says whether earlier lines were used."""

    def __init__(self, message: str, *, partial: bool) -> None:
        super().__init__(message)
        self.partial = partial


class Decompressor(Protocol):
    """What zlib's, bz2's, lzma's and zstandard's decompress objects have in common (as used here)."""

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class Format:
    name: str
    new: Callable[[], Decompressor] | None  # a fresh decompressor, or None for plain text
    errors: tuple[type[BaseException], ...] = ()


def _zstd() -> Decompressor:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


def _zstd_errors() -> tuple[type[BaseException], ...]:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - it is a dependency
        return ()
    return (zstandard.ZstdError,)


ISAL_ERROR = cast(type[BaseException], isal_zlib.error)  # typed as an instance in isal's stubs
PLAIN = Format("plain", None)
FORMATS = {
    # ISA-L's inflate (python-isal) takes half the time of zlib's (0.61 s vs 1.14 s for 65 MB);
    # zcat needs 1.48 s for the same file.
    b"\x1f\x8b": Format("gzip", lambda: isal_zlib.decompressobj(isal_zlib.MAX_WBITS | 16), (ISAL_ERROR,)),
    b"BZh": Format("bzip2", bz2.BZ2Decompressor, (OSError, ValueError)),
    b"\xfd7zXZ\x00": Format("xz", lzma.LZMADecompressor, (lzma.LZMAError,)),
    b"\x28\xb5\x2f\xfd": Format("zstd", _zstd, _zstd_errors()),
}


def sniff(head: bytes) -> Format:
    """The compression of a file, from its first bytes."""
    for magic, fmt in FORMATS.items():
        if head.startswith(magic):
            return fmt
    return PLAIN


class ReadProgress:
    """How far into the file (compressed bytes) the reader is: for progress bars."""

    read = 0


def raw_chunks(path: Path | BinaryIO, chunk: int = CHUNK,
               position: ReadProgress | None = None) -> Generator[bytes, None, None]:
    """Decompressed bytes of `path` (or of a file already open, read from where it is, closed at the end),
    in pieces; raises ArchiveError for damage.

    Concatenated members (gzip -c a >> b, pbzip2, multi-frame zstd) are read
    through. A file that ends inside a member is reported as truncated after
    everything before the damage was yielded.
    """
    f: BinaryIO
    if isinstance(path, Path | str):
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed in finally, across yields
        except OSError as e:
            raise ArchiveError(f"cannot open: {e.strerror or e}", partial=False) from None
    else:
        f, path = path, Path(str(getattr(path, "name", "?")))
    pos = position or ReadProgress()
    try:
        head = f.read(chunk)
        pos.read = len(head)
        fmt = sniff(head)
        if fmt.new is None:
            data = head
            while data:
                yield data
                data = f.read(chunk)
                pos.read += len(data)
            return
        d = fmt.new()
        data = head
        produced = False
        while True:
            if not data:
                if not d.eof:
                    raise ArchiveError(f"{fmt.name} data ends early (truncated archive?)", partial=produced)
                return
            try:
                out = d.decompress(data)
            except fmt.errors as e:
                raise ArchiveError(f"corrupt {fmt.name} data: {e}", partial=produced) from None
            if out:
                produced = True
                yield out
            if d.eof:
                rest = d.unused_data
                if len(rest) < 8:  # too short to tell a member's magic from garbage
                    more = f.read(chunk)
                    pos.read += len(more)
                    rest += more
                if not rest.strip(b"\x00"):  # the end, or padding of NULs
                    return
                if sniff(rest) is not fmt:  # not another member: gzip -d calls it trailing garbage
                    log.warning("%s: %d bytes of trailing garbage after the %s data, ignored",
                                path, len(rest) + _rest_size(f), fmt.name)
                    return
                d = fmt.new()
                data = rest
                continue
            data = f.read(chunk)
            pos.read += len(data)
    except OSError as e:
        raise ArchiveError(f"read error: {e.strerror or e}", partial=True) from None
    finally:
        f.close()


def _rest_size(f) -> int:
    here = f.tell()
    f.seek(0, os.SEEK_END)
    return f.tell() - here


def line_blocks(chunks: Iterable[bytes], *, max_line: int, on_long_line: Callable[[int], None],
                block: int = BLOCK) -> Iterator[tuple[int, bytes]]:
    """Regroup raw pieces into (offset, block of complete lines); the last line may lack "\\n".

    A line longer than `max_line` is dropped (from its start to its newline)
    and reported through `on_long_line(offset)`, so one endless line cannot
    eat the memory.
    """
    pending: list[bytes] = []
    size = 0
    start = 0  # offset of pending[0] in the decompressed stream
    skipping = False
    pos = 0  # offset of the next raw byte
    pieces = iter(chunks)
    while True:
        try:
            piece = next(pieces)
        except StopIteration:
            break
        except ArchiveError:
            # Damage further on: hand over the complete lines read before it, then report.
            data = b"".join(pending)
            cut = data.rfind(b"\n") + 1
            if cut:
                yield start, drop_long_lines(data[:cut], start, max_line, on_long_line)
            raise
        piece_at = pos
        pos += len(piece)
        if skipping:
            nl = piece.find(b"\n")
            if nl < 0:
                continue
            skipping = False
            piece = piece[nl + 1:]
            piece_at += nl + 1
            if not piece:
                start = pos
                continue
        if not pending:
            start = piece_at
        pending.append(piece)
        size += len(piece)
        if size < block:
            if size > max_line and b"\n" not in piece and _no_newline(pending):
                on_long_line(start)
                pending, size, skipping = [], 0, True
            continue
        data = b"".join(pending)
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if size > max_line:
                on_long_line(start)
                pending, size, skipping = [], 0, True
            else:
                pending = [data]
            continue
        yield start, drop_long_lines(data[:cut], start, max_line, on_long_line)
        rest = data[cut:]
        start += cut
        pending = [rest] if rest else []
        size = len(rest)
    if pending:
        data = b"".join(pending)
        if data:
            yield start, drop_long_lines(data, start, max_line, on_long_line)


def drop_long_lines(block: bytes, start: int, max_line: int, report: Callable[[int], None]) -> bytes:
    """Cut out lines longer than `max_line` from a block of complete lines (found at file offset `start`),
    reporting each one's offset: the one long-line policy of backfill and the live follower."""
    kept = _kept_lines(block, 0, len(block), start, max_line, report)
    return block if kept is None else b"".join(kept)


def _kept_lines(data: bytes, begin: int, end: int, offset: int, max_line: int,
                report: Callable[[int], None]) -> list[bytes] | None:
    """The pieces of data[begin:end] (lines; data[begin] is at file offset `offset`) left when its
    lines longer than `max_line` are cut out and reported; None when there are none (the usual case).

    Jumps from newline to the last newline within the next max_line bytes, so a
    block costs about its length / max_line memrchr calls.
    """
    i = kept_from = begin
    keep: list[bytes] = []
    while end - i > max_line:
        j = data.rfind(b"\n", i, i + max_line + 1)
        if j >= 0:
            i = j + 1
            continue
        report(offset + i - begin)  # a long line runs from i to its newline (or to the end, unterminated)
        keep.append(data[kept_from:i])
        nl = data.find(b"\n", i, end)
        i = kept_from = end if nl < 0 else nl + 1
    if not keep:
        return None
    keep.append(data[kept_from:end])
    return keep


def _no_newline(parts: list[bytes]) -> bool:
    return all(b"\n" not in p for p in parts)


Lines = tuple[int, bytes, int]  # (decompressed offset, complete lines, compressed bytes read so far)


class Text(NamedTuple):
    """Lines as Parser.feed_text takes them: data[0] is b"\n", the lines are data[1:end]."""

    offset: int  # where data[1] is in the (decompressed) file
    data: bytes
    end: int
    read: int  # how far the reader is in the file as stored (compressed bytes): for progress bars


def texts(path: Path, lo: int = 0, hi: int | None = None, *, max_line: int,
          on_long_line: Callable[[int], None]) -> Iterator[Text]:
    """The lines of `path` that start at byte offsets in [lo, hi), for the parser.

    A plain file is read in place (plain_texts). A compressed one is inflated by
    a helper process (read_ahead) and is always read whole: nobody can start in
    the middle of a gzip stream.
    """
    if not compressed(path):
        return plain_texts(path, lo, hi, max_line=max_line, on_long_line=on_long_line)
    if lo or hi is not None:
        raise ValueError(f"{path}: a compressed file is read whole, not bytes {lo}-{hi}")
    return read_ahead(inflated(path, max_line), on_long_line)


def compressed(path: Path) -> bool:
    """Whether `path` is compressed, by its magic bytes (ArchiveError: it cannot be opened)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ArchiveError(f"cannot open: {e.strerror or e}", partial=False) from None
    return sniff(head).new is not None


def inflated(path: Path, max_line: int) -> Make:
    """What a read-ahead helper runs for one compressed file."""
    return lambda report: file_blocks(path, max_line=max_line, on_long_line=report)


def plain_texts(path: Path, lo: int = 0, hi: int | None = None, *, max_line: int,
                on_long_line: Callable[[int], None], block: int | None = None) -> Iterator[Text]:
    """The lines of a plain file that start at byte offsets in [lo, hi), read with one copy.

    Each read starts at the newline that ends the previous text, so it arrives
    with the b"\n" the parser wants in front, and `end` marks its last complete
    line: no joining, slicing or prefixing copies (they were a fifth of a
    backfill's time). Lines longer than `max_line` are reported and cut out.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ArchiveError(f"cannot open: {e.strerror or e}", partial=False) from None
    try:
        yield from _plain(fd, lo, hi, max_line, on_long_line, block or BLOCK)
    except OSError as e:
        raise ArchiveError(f"read error: {e.strerror or e}", partial=True) from None
    finally:
        os.close(fd)


def _plain(fd: int, lo: int, hi: int | None, max_line: int, report: Callable[[int], None],
           block: int) -> Iterator[Text]:
    # `at`: the file offset of the b"\n" before the next line; -1 is the file's start, read as if
    # a newline were there. The last line to take is the one that the first newline at or after
    # `stop` ends.
    at = -1 if lo <= 0 else _newline_from(fd, lo - 1)
    stop = None if hi is None else hi - 1
    size = block
    while at is not None and (stop is None or at < stop):
        data = b"\n" + os.pread(fd, size - 1, 0) if at < 0 else os.pread(fd, size, at)
        if len(data) <= 1:
            return
        eof = len(data) < size
        last = False
        nl = -1
        if stop is not None and stop - at < len(data):
            nl = data.find(b"\n", stop - at)
            last = nl >= 0
        if not last:
            nl = data.rfind(b"\n", 1)
        if eof and not last:
            end, last = len(data), True  # the file's last line, perhaps without its newline
        elif nl > 0:
            end = nl + 1
        elif len(data) - 1 > max_line:
            report(at + 1)
            at = _newline_from(fd, at + len(data))
            size = block
            continue
        else:
            size *= 2  # a line longer than a block but allowed: read more at once
            continue
        text, cut = _cut_long_lines(data, end, at + 1, max_line, report)
        yield Text(at + 1, text, cut, at + end)
        if last:
            return
        at += end - 1
        size = block


def _newline_from(fd: int, pos: int) -> int | None:
    """The file offset of the first newline at or after `pos`, or None."""
    while True:
        data = os.pread(fd, 64 << 10, pos)
        if not data:
            return None
        i = data.find(b"\n")
        if i >= 0:
            return pos + i
        pos += len(data)


def _cut_long_lines(data: bytes, end: int, offset: int, max_line: int,
                    report: Callable[[int], None]) -> tuple[bytes, int]:
    """(text, end) of data[1:end] without its lines longer than `max_line`: usually data as it is."""
    kept = _kept_lines(data, 1, end, offset, max_line, report)
    if kept is None:
        return data, end
    out = b"\n" + b"".join(kept)
    return out, len(out)


_HEAD = struct.Struct("<BBQQQ")  # kind, slot, a, b, payload length
_BLOCK, _LONG, _ERROR, _END, _SLOT, _FILE = range(6)
SLOT = 8 << 20  # bytes per slot of read_ahead's shared ring (a block is about BLOCK plus one read)
SLOTS = 3  # one being parsed, one ready, one being filled


def file_blocks(path: Path, *, max_line: int, on_long_line: Callable[[int], None]) -> Iterator[Lines]:
    """A file as blocks of complete lines, each with how far the reader was (for progress bars)."""
    position = ReadProgress()
    for offset, block in line_blocks(raw_chunks(path, position=position), max_line=max_line,
                                     on_long_line=on_long_line):
        yield offset, block, position.read


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
        """The texts of the index-th file (in the order given; a file not read to its end is skipped)."""
        if self.at < index:
            self.ended = True  # what is left of the file before (its reader stopped early) is dropped
        while self.at < index:
            kind, _, a, _, _ = self._next(on_long_line)
            if kind == _FILE:
                self.at, self.ended = a, False
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
        """The next message but long-line reports (handed to on_long_line); a skipped file's data is dropped."""
        while True:
            head = self.f.read(_HEAD.size)
            if len(head) < _HEAD.size:
                raise ArchiveError("the reader process ended unexpectedly", partial=True)
            kind, slot, a, b, n = _HEAD.unpack(head)
            if kind == _LONG:
                on_long_line(a)
                continue
            if self.ended or kind == _FILE:
                if kind == _SLOT:  # a file nobody reads (see texts): give its slot back
                    with contextlib.suppress(BrokenPipeError):
                        os.write(self.free_w, bytes((slot,)))
                elif kind in (_BLOCK, _ERROR):
                    self.f.read(n)
                if kind != _FILE:
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


_ROTATED = re.compile(r"^(?P<base>.+?)(?:\.(?P<num>\d+)|-(?P<date>\d{8}(?:\d{2})?(?:-\d+)?))?$")


def strip_compression(name: str) -> str:
    """maillog.2.gz -> maillog.2"""
    for suffix in COMPRESSED_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def rotation_key(path: Path) -> tuple:
    """Sort key putting a rotated set oldest first.

    maillog-20250101.gz < maillog-20250108 < maillog.3.gz < maillog.2.gz < maillog.1 < maillog
    (dated names ascending, numbered ones descending, the live file last);
    different logs are grouped by their base name.
    """
    m = _ROTATED.match(strip_compression(path.name))
    base = m.group("base") if m else path.name
    if m and m.group("date"):
        order: tuple = (0, m.group("date"), 0)
    elif m and m.group("num"):
        order = (1, "", -int(m.group("num")))
    else:
        order = (2, "", 0)
    return (str(path.parent), base, *order)


def expand(patterns: Iterable[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Paths and globs -> (existing regular files oldest first, [(pattern, problem)])."""
    import glob

    files: dict[Path, None] = {}
    problems: list[tuple[str, str]] = []
    for pat in patterns:
        matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        if not matches:
            problems.append((pat, "no file matches"))
        for m in matches:
            p = Path(m)
            if p.is_dir():
                problems.append((m, "is a directory (give files or a glob such as DIR/maillog*)"))
            elif not p.exists():
                problems.append((m, "no such file"))
            elif not os.access(p, os.R_OK):
                problems.append((m, "permission denied"))
            else:
                files[p] = None
    return sorted(files, key=rotation_key), problems
