"""Where each followed file was read up to (sources/identity.py's Positions) and the sessions open there,
saved only once the store acknowledged what came before.

The state file is replaced atomically (write, fsync, rename, fsync the directory), so a crash leaves
either the old or the new one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from harvester.sources.identity import Cursor, Position, position_from_json

log = logging.getLogger(__name__)
VERSION = 1


@dataclass
class State:
    """Everything a restart needs: positions per followed path (a file being drained after a rotation
    first, then the current one) and the parser's open sessions at exactly those positions."""

    positions: dict[str, list[Position | Cursor]] = field(default_factory=dict)
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
            return State({p: [position_from_json(x) for x in xs] for p, xs in data["positions"].items()},
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
