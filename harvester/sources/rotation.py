"""Which files make a rotated set, and in which order: oldest first, the live file last."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from harvester.sources.compression import strip_compression

_ROTATED = re.compile(r"^(?P<base>.+?)(?:\.(?P<num>\d+)|-(?P<date>\d{8}(?:\d{2})?(?:-\d+)?))?$")


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
