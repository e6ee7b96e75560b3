"""Who may ask `serve`: bearer tokens, kept only as their SHA-256 in a file an operator edits.

One `NAME:SHA256_HEX_OF_TOKEN` per line, `#` comments. `harvester token add NAME` makes a random token,
prints it once and appends its line; revoking is deleting the line (and SIGHUP to `serve`). A presented
token is checked against every line with a constant-time compare, so neither a wrong token nor a right
one answers sooner.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_LINE = re.compile(r"(?P<name>[^:\s]+):(?P<hash>[0-9a-fA-F]{64})")


class TokenError(ValueError):
    """A tokens file that cannot be used; the message names the file and the line."""


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class Tokens:
    entries: tuple[tuple[str, bytes], ...] = ()  # (name, sha256 of the token)

    @classmethod
    def load(cls, path: Path) -> Tokens:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as e:
            raise TokenError(f"{path}: cannot read the tokens file: {e}") from None
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = _LINE.fullmatch(line)
            if m is None or not NAME.fullmatch(m.group("name")):
                raise TokenError(f"{path}:{n}: expected NAME:SHA256_HEX (harvester token add NAME writes one)")
            out.append((m.group("name"), bytes.fromhex(m.group("hash"))))
        return cls(tuple(out))

    def name_of(self, token: str) -> str | None:
        """The name of the token's line, or None; every line is compared, in constant time."""
        given = digest(token)
        found = None
        for name, want in self.entries:
            if hmac.compare_digest(given, want):
                found = name
        return found


def add(path: Path, name: str) -> str:
    """A new random token for `name`: its line is appended to `path` (made 0600 if new); returned once."""
    if not NAME.fullmatch(name):
        raise TokenError(f"token name {name!r}: letters, digits and _.@- only, at most 64")
    if any(n == name for n, _ in Tokens.load(path).entries):
        raise TokenError(f"{path}: a token named {name!r} exists already (delete its line to revoke it)")
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"{name}:{digest(token).hex()}\n")
    return token
