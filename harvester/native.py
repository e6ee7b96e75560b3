"""The optional native module (native/, built by setuptools-rust into harvester._fastscan).

It runs the parser's hot loop and holds the coalescing tables and the LMTP
sessions. Without it (an install with no Rust toolchain) everything works the
same in Python, about five times slower. HARVESTER_ENGINE=python switches it off, to compare
the two or to rule it out.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

ENGINE = os.environ.get("HARVESTER_ENGINE", "auto")
fastscan: Any  # the compiled module (its API: harvester/_fastscan.pyi), or None
try:
    fastscan = importlib.import_module("harvester._fastscan")
except ImportError:  # built without cargo
    fastscan = None


def enabled() -> bool:
    """Whether new parsers and tables use the native module."""
    return fastscan is not None and ENGINE != "python"
