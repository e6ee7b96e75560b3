"""How a setting is declared and checked: the pieces config.py and each store's options are made of.

A setting is a dataclass field made by `option()`: its type, default, check, help and metavar in one
place. config.Settings holds the general ones; a store declares its own beside its code (an Options
class registered in harvester/sinks/__init__.py); config derives the file's keys and the flags from all.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


def text(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def whole(lo: int, hi: int) -> Callable[[Any], int | None]:
    def check(v: Any) -> int | None:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise TypeError("expected a whole number")
        n = int(v)
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return n
    return check


def cidrs(v: Any) -> list[str]:
    items = [s.strip() for s in v.split(",")] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise TypeError("expected a list of CIDRs such as [\"10.0.5.0/24\", \"2001:db8:5::/48\"]")
    out = []
    for s in items:
        if not isinstance(s, str):
            raise TypeError(f"{s!r} is not a CIDR string")
        if s:
            ipaddress.ip_network(s, strict=False)  # raises ValueError with a clear text
            out.append(s)
    return out


def paths(v: Any) -> list[str]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise TypeError("expected a path or a list of paths")
    return items


def seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise TypeError("expected a number of seconds")
    n = float(v)
    if not 0 < n <= 3600:
        raise ValueError("must be more than 0 and at most 3600 seconds")
    return n


def columns(v: Any) -> dict[str, list[str]]:
    """service -> [time column, IP column]: a TOML table, or imap=last_login_imap:remote_ip_imap,pop3=..."""
    if isinstance(v, str):
        pairs = (part.split("=", 1) if "=" in part else [part, ""] for part in v.split(",") if part.strip())
        v = {k.strip(): [c.strip() for c in cols.split(":")] for k, cols in pairs}
    if not isinstance(v, dict):
        raise TypeError("expected a table such as {imap = [\"last_login_imap\", \"remote_ip_imap\"]}")
    out = {}
    for service, cols in v.items():
        cols = [cols] if isinstance(cols, str) else cols
        if (not isinstance(cols, list) or not 1 <= len(cols) <= 2
                or not all(isinstance(c, str) and IDENT.fullmatch(c) for c in cols)):
            raise ValueError(f"service {service!r}: expected [time column] or [time column, IP column], "
                             "each a CQL name of letters, digits and _")
        out[str(service)] = list(cols)
    return out


def ident(v: Any) -> str:
    s = text(v)
    if s and not IDENT.fullmatch(s):
        raise ValueError("expected a CQL name of letters, digits and _ (at most 48)")
    return s


IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")


def listen(v: Any) -> str:
    s = text(v)
    if s:
        addr, sep, port = s.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected ADDR:PORT such as 127.0.0.1:9854 or [::1]:9854 (empty: no endpoint)")
    return s


def switch(v: Any) -> str:
    """yes, no or auto; TOML's true and false are yes and no."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v not in ("yes", "no", "auto"):
        raise ValueError("must be true, false, yes, no or auto")
    return v


def yes_no(v: Any) -> bool:
    """yes or no (TOML's true and false too)."""
    if isinstance(v, bool):
        return v
    if v in ("yes", "true"):
        return True
    if v in ("no", "false"):
        return False
    raise ValueError("must be true, false, yes or no")


def matches(v: Any) -> list[str]:
    """journalctl matches, FIELD=VALUE each (FIELD: capitals, digits, _)."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and _MATCH.fullmatch(s) for s in items):
        raise ValueError("expected FIELD=VALUE journal matches such as SYSLOG_IDENTIFIER=dovecot")
    return items


_MATCH = re.compile(r"_{0,2}[A-Z0-9][A-Z0-9_]*=.*")


def choice(*choices: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return v
    return check


@dataclass(frozen=True)
class Option:
    key: str
    check: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str = "VALUE"


def option(check: Callable[[Any], Any], default: Any, help: str, metavar: str = "VALUE", *,
           key: str | None = None) -> Any:
    """A setting: a dataclass field with its check, help and metavar. Its key in the config file (and
    flag) is the field's name with its class's PREFIX, or `key`."""
    meta = {"check": check, "help": help, "metavar": metavar, "key": key}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)




def declared(cls: type, prefix: str = "") -> list[tuple[str, str, Option]]:
    """(field name, key, Option) of every option() field of the dataclass `cls`."""
    out = []
    for f in fields(cls):
        if "check" in f.metadata:
            key = f.metadata["key"] or prefix + f.name
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            out.append((f.name, key, Option(key, f.metadata["check"], default, f.metadata["help"],
                                            f.metadata["metavar"])))
    return out
