"""The optional native module (native/, built by setuptools-rust into harvester._fastscan).

It runs the parser's hot loop and holds the coalescing tables and the LMTP
sessions. Without it (an install with no Rust toolchain) everything works the
same in Python, about five times slower. HARVESTER_ENGINE=python switches it off, to compare
the two or to rule it out.
"""

from __future__ import annotations

import os

ENGINE = os.environ.get("HARVESTER_ENGINE", "auto")
# The compiled module, typed by harvester/_fastscan.pyi for its callers (they check enabled() first), or None.
try:
    from harvester import _fastscan as fastscan
except ImportError:  # built without cargo
    fastscan = None  # type: ignore[assignment]


def enabled() -> bool:
    """Whether new parsers and tables use the native module."""
    return fastscan is not None and ENGINE != "python"
