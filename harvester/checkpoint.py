"""Where each followed file was read up to, saved only once the store acknowledged what came before.

A position names a file by device, inode *and* a fingerprint of its first
bytes, because inodes are reused: a new maillog can get the inode of one
logrotate just deleted. The state file is replaced atomically (write, fsync,
rename, fsync the directory), so a crash leaves either the old or the new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
HEAD_BYTES = 256  # fingerprint length: the first line of a syslog file is almost always unique
VERSION = 1


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
class State:
    """Everything a restart needs: positions per followed path (a file being drained after a rotation
    first, then the current one) and the parser's open sessions at exactly those positions."""

    positions: dict[str, list[Position]] = field(default_factory=dict)
    # path -> {"lmtp": {pid: [ip, deliveries]}, "login_ip": [...]}: Parser.sessions
    sessions: dict[str, dict] = field(default_factory=dict)
    rawlog: dict[str, float] = field(default_factory=dict)  # rawlog root -> Unix second: sessions named by then done


class Checkpoints:
    """The state file in the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "checkpoints.json"

    def load(self) -> State:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return State()
        except (OSError, ValueError, UnicodeDecodeError) as e:
            # A state file we cannot read must not stop the daemon: start over (logs are re-read from
            # the configured start, and the store's newest-wins writes make a replay harmless).
            log.error("%s: cannot read checkpoints (%s); starting without them", self.path, e)
            return State()
        try:
            return State({p: [Position.from_json(x) for x in xs] for p, xs in data["positions"].items()},
                         data.get("sessions", {}), data.get("rawlog", {}))
        except (KeyError, TypeError, ValueError) as e:
            log.error("%s: checkpoints in an unknown shape (%s); starting without them", self.path, e)
            return State()

    def save(self, state: State) -> None:
        """Atomically replace the state file, durably (fsync of the file and of its directory)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = {"version": VERSION,
                "positions": {p: [x.to_json() for x in xs] for p, xs in state.positions.items()},
                "sessions": state.sessions, "rawlog": state.rawlog}
        text = json.dumps(data, separators=(",", ":"))  # dumps runs the C encoder; dump(f) the Python one
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class StateInUse(Exception):
    """Another harvester holds the state directory: two writers of one checkpoint file lose lines."""


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on the state directory for this process's lifetime; returns its descriptor.

    flock(2) is released by the kernel when the process dies, even by kill -9, so a stale lock file
    never blocks a restart. The holder's pid is written into it, for the message the next one prints."""
    import fcntl

    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StateInUse(f"state directory {state_dir} is in use by another harvester (pid {holder}); "
                         "give each instance its own --state-dir (and --metrics-listen)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
