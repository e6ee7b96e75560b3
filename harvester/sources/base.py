"""What every line source offers the daemon: complete lines in order, and where it stands.

A source follows one configured name (a file path today; the journal next) through whatever rotation its
kind has, and hands out Blocks of complete lines. `positions()` is what a checkpoint keeps of it, and
`start(positions)` takes them back after a restart, so that every line is read once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from harvester.sources.identity import Cursor, FileId, Position

AnyPosition = Position | Cursor  # a file's (tail.py) or a journal's (journal.py)


@dataclass
class Block:
    """Complete lines of one file at `offset`, and the position after them."""

    data: bytes
    offset: int
    file: FileId
    end: int


Lines = tuple[int, bytes, int]  # (decompressed offset, complete lines, compressed bytes read so far)


class Text(NamedTuple):
    """Lines as Parser.feed_text takes them: data[0] is b"\n", the lines are data[1:end]."""

    offset: int  # where data[1] is in the (decompressed) file
    data: bytes
    end: int
    read: int  # how far the reader is in the file as stored (compressed bytes): for progress bars


def ignored(_: object) -> None:
    """A callback nobody listens to (a source's default)."""


class LineSource(Protocol):
    """A followed source of log lines (sources/tail.py's Follower is the one for files). It is made by its
    opener in sources.SOURCES with the callbacks it reports through: a line over max_line (its offset; the
    line is skipped) and a rotation (how: "rename", "copytruncate")."""

    def start(self, positions: list[AnyPosition], start_at: str) -> str:
        """Resume from checkpointed positions (none: from the "end" or the "beginning"); says how, for the log."""
        ...

    def poll(self) -> list[Block]:
        """The complete lines readable now, in order (a bounded amount: backlog() says when there is more)."""
        ...

    def backlog(self) -> bool:
        """Whether more is readable already (catching up: no sleeping)."""
        ...

    def positions(self) -> list[AnyPosition]:
        """Where each part still to be read was read to, in reading order (what a checkpoint keeps)."""
        ...

    def lag_bytes(self) -> int:
        """Bytes written and not read yet (a gauge)."""
        ...

    def close(self) -> None: ...
