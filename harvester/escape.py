"""Text from log lines made safe for where it is shown: terminals, CSV, JSON.

User names, host names and details come from log lines, which anyone who can
reach a login prompt writes into. Stores keep them verbatim; only output is
escaped. One definition of what is unsafe: every character str.isprintable()
rejects (C0 and C1 controls such as ESC or CSI U+009B, DEL, bidi and other
format characters such as U+202E, line separators, unassigned code points).
Printable non-ASCII ("zoë") stays as it is.
"""

from __future__ import annotations

import json
import re

# A CSV cell starting with one of these is a formula to a spreadsheet (OWASP "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
_JSON_UNSAFE = re.compile(r"[^\n\x20-\x7e]")  # candidates; raw newlines only come from indent


def _visible(ch: str) -> str:
    cp = ord(ch)
    if cp < 0x100:
        return f"\\x{cp:02x}"
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def for_terminal(s: str) -> str:
    """`s` with each unsafe character shown as a visible escape (\\x1b, \\u009b, \\u202e)."""
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else _visible(ch) for ch in s)


def for_csv(s: str) -> str:
    """A CSV cell: terminal-safe, and a leading = + - @ (a formula) neutralised with a quote."""
    s = for_terminal(s)
    return "'" + s if s.startswith(_FORMULA_START) else s


def _json_escape(m: re.Match[str]) -> str:
    ch = m.group()
    if ch.isprintable():
        return ch
    cp = ord(ch)
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    cp -= 0x10000
    return f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}"


def to_json(obj, indent: int | None = None) -> str:
    """JSON of `obj` with every unsafe character as a \\uXXXX escape; other non-ASCII stays readable.

    (json.dumps(ensure_ascii=False) escapes only C0: a C1 CSI or U+202E would pass raw.) Unsafe
    characters only occur inside JSON strings, where the escape means the same character.
    """
    return _JSON_UNSAFE.sub(_json_escape, json.dumps(obj, ensure_ascii=False, indent=indent))


def json_line(obj) -> str:
    """One line of JSON (no newline at the end), as to_json."""
    return to_json(obj)
