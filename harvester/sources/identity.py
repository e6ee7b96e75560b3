"""Which file is which: a file is named by device, inode *and* a fingerprint of its first bytes, because
inodes are reused (a new maillog can get the inode of one logrotate just deleted), and a position is how
far one such file was read (what a checkpoint keeps of a followed path); a journal's is a cursor."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass

HEAD_BYTES = 256  # fingerprint length: the first line of a syslog file is almost always unique


@dataclass
class FileId:
    """One file's identity: (dev, ino) plus sha1 of its first `n` bytes (n < HEAD_BYTES while it is short)."""

    dev: int
    ino: int
    head: str
    n: int

    def same_inode(self, st: os.stat_result) -> bool:
        return self.dev == st.st_dev and self.ino == st.st_ino


def head_of(data: bytes) -> tuple[str, int]:
    """(fingerprint, length) of a file's first bytes."""
    data = data[:HEAD_BYTES]
    return hashlib.sha1(data, usedforsecurity=False).hexdigest(), len(data)


def identify(fd: int) -> FileId:
    """The identity of an open file."""
    st = os.fstat(fd)
    head, n = head_of(os.pread(fd, HEAD_BYTES, 0))
    return FileId(st.st_dev, st.st_ino, head, n)


def still_same(fid: FileId, fd: int) -> bool:
    """Whether the file open as `fd` still starts with the bytes `fid` was taken from (copytruncate
    and a regrown file change them)."""
    if fid.n == 0:
        return True
    return head_of(os.pread(fd, fid.n, 0))[0] == fid.head


@dataclass
class Position:
    """Read up to `offset` (a line boundary) of file `id`."""

    id: FileId
    offset: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Position:
        return cls(FileId(**d["id"]), int(d["offset"]))


@dataclass
class Cursor:
    """Read up to and including the journal entry journald's cursor `cursor` names."""

    cursor: str

    def to_json(self) -> dict:
        return {"cursor": self.cursor}


def position_from_json(d: dict) -> Position | Cursor:
    """A checkpoint's position back: a file's or a journal's."""
    return Cursor(str(d["cursor"])) if "cursor" in d else Position.from_json(d)
