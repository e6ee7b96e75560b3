"""Where lines come from, and the registry of line sources.

Files on disk: archive.py (plain and compressed, for backfills) and tail.py (followed through rotations,
for the daemon); rawlog.py reads Dovecot's rawlog sessions. A followed name is opened by the source its
scheme names ("journal:..." next); a name without a registered scheme is a file path. A new source is one
module that follows base.LineSource plus its line in SOURCES.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from harvester.sources.base import Block, LineSource, ignored
from harvester.sources.tail import Follower


class Opener(Protocol):
    def __call__(self, name: str, *, max_line: int, on_long_line: Callable[[int], None],
                 on_rotation: Callable[[str], None]) -> LineSource: ...


def _file(name: str, *, max_line: int, on_long_line: Callable[[int], None],
          on_rotation: Callable[[str], None]) -> LineSource:
    return Follower(Path(name), max_line=max_line, on_long_line=on_long_line, on_rotation=on_rotation)


# scheme -> opener; "" is the default (a file path)
SOURCES: dict[str, Opener] = {
    "": _file,
}


def open_source(name: str, *, max_line: int, on_long_line: Callable[[int], None] = ignored,
                on_rotation: Callable[[str], None] = ignored) -> LineSource:
    """The source that follows `name`: by its scheme when one is registered, else the file at that path."""
    scheme, sep, _ = name.partition(":")
    opener = SOURCES[scheme] if sep and scheme in SOURCES else SOURCES[""]
    return opener(name, max_line=max_line, on_long_line=on_long_line, on_rotation=on_rotation)


__all__ = ["SOURCES", "Block", "LineSource", "open_source"]
