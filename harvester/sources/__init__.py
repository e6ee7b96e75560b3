"""Where lines come from, and the registry of line sources.

Files on disk: archive.py (plain and compressed, for backfills) and tail.py (followed through rotations,
for the daemon); rawlog.py reads Dovecot's rawlog sessions. A followed name is opened by the source its
scheme names ("journal:..." next); a name without a registered scheme is a file path. A new source is one
module that follows base.LineSource plus its line in SOURCES (journal.py: "journal:local", "journal:dir=D",
"journal:file=F,...", the systemd journal through journalctl).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from harvester.sources import journal
from harvester.sources.base import Block, LineSource, ignored
from harvester.sources.tail import Follower


class Opener(Protocol):
    def __call__(self, name: str, *, max_line: int, on_long_line: Callable[[int], None],
                 on_rotation: Callable[[str], None], match: tuple[str, ...]) -> LineSource: ...


def _file(name: str, *, max_line: int, on_long_line: Callable[[int], None],
          on_rotation: Callable[[str], None], match: tuple[str, ...]) -> LineSource:
    return Follower(Path(name), max_line=max_line, on_long_line=on_long_line, on_rotation=on_rotation)


def _journal(name: str, *, max_line: int, on_long_line: Callable[[int], None],
             on_rotation: Callable[[str], None], match: tuple[str, ...]) -> LineSource:
    spec = journal.Spec.parse(name, match or journal.DEFAULT_MATCH)
    return journal.Follower(spec, max_line=max_line, on_long_line=on_long_line, on_dropped=journal.count_dropped,
                            on_gap=functools.partial(journal.count_gap, spec.name))


# scheme -> opener; "" is the default (a file path)
SOURCES: dict[str, Opener] = {
    "": _file,
    journal.SCHEME: _journal,
}


def former_names(name: str) -> list[str]:
    """Names the source called `name` had in earlier versions, to find its checkpoint by after an upgrade."""
    if journal.is_journal(name):
        old = journal.Spec.parse(name).former_name
        return [old] if old else []
    return []


def open_source(name: str, *, max_line: int, on_long_line: Callable[[int], None] = ignored,
                on_rotation: Callable[[str], None] = ignored, match: tuple[str, ...] = ()) -> LineSource:
    """The source that follows `name`: by its scheme when one is registered, else the file at that path.
    `match`: which entries a journal source reads (journal_match)."""
    scheme, sep, _ = name.partition(":")
    opener = SOURCES[scheme] if sep and scheme in SOURCES else SOURCES[""]
    return opener(name, max_line=max_line, on_long_line=on_long_line, on_rotation=on_rotation, match=match)


__all__ = ["SOURCES", "Block", "LineSource", "open_source"]
