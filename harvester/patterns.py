"""Load pattern packs (TOML data) and compile them into one regex per line prefix.

Speed comes from handing the C regex engine whole multi-megabyte blocks: every
event regex of a pack becomes one alternative of a single pattern anchored on
"\\n" + prefix, so lines that are not Dovecot events cost no Python at all.
Which alternative matched is read from `Match.lastindex` (its wrapper group
closes last), and its fields from one `Match.group(*indices)` call.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from harvester.events import KINDS, LOGIN, PROXY, ROW_KINDS, STATE_KINDS

# Fields a regex may capture, in the order Spec.fields extracts them.
PREFIX_FIELDS = ("ts", "frac", "tz", "host")
EVENT_FIELDS = ("user", "service", "ip", "pid", "real_ip")
FIELDS = PREFIX_FIELDS + EVENT_FIELDS
STYLES = ("bsd", "iso")

_GROUP_DEF = re.compile(r"\(\?P<([A-Za-z_]\w*)>")
_GROUP_REF = re.compile(r"\(\?P=([A-Za-z_]\w*)\)")
_NEVER = "_never"


class PackError(ValueError):
    """A pattern pack that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Prefix:
    name: str
    style: str
    regex: str
    description: str = ""


@dataclass(frozen=True)
class EventPattern:
    name: str
    kind: str
    regex: str
    service: str | None = None
    # A login shape only one Dovecot version writes ("2.4": "Logged in:"): it tells its node's version.
    dialect: str | None = None
    # Detail names per version of the node that wrote the line ("unknown": none seen yet), for a number
    # whose meaning changed (POP3 del=N/M: M messages in 2.3, bytes in 2.4).
    names: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Pack:
    name: str
    description: str
    prefixes: dict[str, Prefix]
    events: dict[str, EventPattern]
    watch: dict[str, str]
    gate: str | None = None
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class Spec:
    """What one alternative of the compiled regex means."""

    name: str  # event name, or "watch:<name>" for a line the pack must understand
    kind: str | None  # None for watch alternatives
    service: str | None  # fixed service, when the regex has no service group
    fields: tuple[int, ...]  # group indices in FIELDS order (missing ones: a never-set group)
    extras: tuple[tuple[str, int], ...] = ()  # other named groups -> detail
    dialect: str | None = None  # see EventPattern
    names: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class Compiled:
    """One pack joined with one prefix: the hot-path regex and what its groups mean."""

    pack: Pack
    prefix: Prefix
    regex: re.Pattern[bytes]
    specs: dict[int, Spec] = field(default_factory=dict)  # wrapper group index -> Spec


def builtin_dir() -> Path:
    """Where the packs shipped with harvester live (patterns/ in a checkout)."""
    return Path(str(resources.files("harvester._packs")))


def available(search_dirs: list[Path] | tuple[Path, ...] = ()) -> dict[str, Path]:
    """Pack name -> file; operator directories override the built-in packs."""
    found: dict[str, Path] = {}
    for d in (builtin_dir(), *search_dirs):
        if d.is_dir():
            for f in sorted(d.glob("*.toml")):
                found[f.stem] = f
    return found


def load(name_or_path: str, search_dirs: list[Path] | tuple[Path, ...] = ()) -> Pack:
    """Load a pack by name (searched in operator dirs, then built-in) or by file path."""
    return _load(name_or_path, list(search_dirs), ())


def _load(name_or_path: str, search_dirs: list[Path], seen: tuple[str, ...]) -> Pack:
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.exists()):
        packs = available(search_dirs)
        if name_or_path not in packs:
            known = ", ".join(sorted(packs)) or "none"
            raise PackError(f"pattern pack {name_or_path!r} not found (known packs: {known})")
        path = packs[name_or_path]
    src = str(path)
    if src in seen:
        raise PackError(f"{src}: 'extends' loops back to itself")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PackError(f"{src}: cannot read pattern pack: {e}") from None
    unknown = set(data) - {"name", "description", "extends", "gate", "prefixes", "events", "watch"}
    if unknown:
        raise PackError(f"{src}: unknown key(s) {', '.join(sorted(unknown))}")
    base = None
    if "extends" in data:
        base = _load(str(data["extends"]), search_dirs, (*seen, src))
    prefixes = dict(base.prefixes) if base else {}
    events = dict(base.events) if base else {}
    watch = dict(base.watch) if base else {}
    for name, p in _table(data, "prefixes", src).items():
        prefixes[name] = _prefix(name, p, src)
    for name, entry in _table(data, "events", src).items():
        if isinstance(entry, dict) and entry.get("disabled") is True:
            events.pop(name, None)  # an operator may switch an inherited event off
            continue
        events[name] = _event(name, entry, src)
    for name, rx in _table(data, "watch", src).items():
        if not isinstance(rx, str):
            raise PackError(f"{src}: watch.{name} must be a regex string")
        _check_regex(rx, f"{src}: watch.{name}")
        watch[name] = rx
    gate = data.get("gate", base.gate if base else None)
    if gate is not None:
        if not isinstance(gate, str):
            raise PackError(f"{src}: gate must be a regex string")
        _check_regex(gate, f"{src}: gate")
    if not prefixes:
        raise PackError(f"{src}: a pack needs at least one [prefixes.NAME]")
    if not any(e.kind in ROW_KINDS for e in events.values()):
        raise PackError(f"{src}: a pack needs at least one login or delivery event")
    return Pack(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", base.description if base else "")),
        prefixes=prefixes,
        events=events,
        watch=watch,
        gate=gate or None,
        sources=(*(base.sources if base else ()), src),
    )


def _table(data: dict, key: str, src: str) -> dict:
    t = data.get(key, {})
    if not isinstance(t, dict):
        raise PackError(f"{src}: [{key}] must be a table")
    return t


def _entry(table: str, name: str, entry: object, src: str, keys: set[str], choice: str,
           choices) -> tuple[str, str, set[str], dict]:
    """Checks shared by prefixes and events: a table with known keys, a choice, a regex."""
    where = f"{src}: {table}.{name}"
    if not isinstance(entry, dict):
        raise PackError(f"{where} must be a table")
    unknown = set(entry) - keys
    if unknown:
        raise PackError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    if entry.get(choice) not in choices:
        raise PackError(f"{where}: {choice} must be one of {', '.join(sorted(choices))}, not {entry.get(choice)!r}")
    rx = entry.get("regex")
    if not isinstance(rx, str):
        raise PackError(f"{where}: regex is missing")
    return where, rx, _check_regex(rx, where), entry


def _prefix(name: str, p: object, src: str) -> Prefix:
    where, rx, groups, p = _entry("prefixes", name, p, src, {"regex", "style", "description"}, "style", STYLES)
    if "ts" not in groups:
        raise PackError(f"{where}: the regex needs a (?P<ts>...) group")
    bad = groups - set(PREFIX_FIELDS)
    if bad:
        raise PackError(f"{where}: prefix groups may only be {', '.join(PREFIX_FIELDS)}, not {', '.join(bad)}")
    return Prefix(name, p["style"], rx, str(p.get("description", "")))


def _event(name: str, e: object, src: str) -> EventPattern:
    where, rx, groups, e = _entry("events", name, e, src, {"regex", "kind", "service", "dialect", "names"}, "kind",
                                  KINDS)
    kind = e["kind"]
    clash = groups & set(PREFIX_FIELDS)
    if clash:
        raise PackError(f"{where}: groups {', '.join(sorted(clash))} belong to the prefix")
    service = e.get("service")
    if service is None and "service" not in groups:
        raise PackError(f"{where}: give service = \"...\" or a (?P<service>...) group")
    if kind in STATE_KINDS:
        if "pid" not in groups:
            raise PackError(f"{where}: a {kind} event needs a (?P<pid>...) group")
    elif "user" not in groups:
        raise PackError(f"{where}: the regex needs a (?P<user>...) group")
    dialect = e.get("dialect")
    if dialect is not None and (not isinstance(dialect, str) or kind not in (LOGIN, PROXY)):
        raise PackError(f"{where}: dialect is a version string, and only login and proxy events name one")
    names = e.get("names", {})
    if not (isinstance(names, dict) and all(isinstance(v, dict) and all(
            isinstance(a, str) and isinstance(b, str) and a in groups for a, b in v.items()) for v in names.values())):
        raise PackError(f"{where}: names is a table of version -> {{group = \"name\"}}, of the regex's groups")
    return EventPattern(name, kind, rx, service, dialect, names)


def _check_regex(rx: str, where: str) -> set[str]:
    if _POSIX_CLASS.search(rx):  # PCRE2 reads [[:alpha:]] as a class of letters, Python's re as a plain set
        raise PackError(f"{where}: a POSIX class ([[:name:]]) reads differently under PCRE2 and Python's re; "
                        "write the class out (for [[:alpha:]], [A-Za-z])")
    try:
        compiled = re.compile(rx.encode())
    except (re.error, UnicodeEncodeError) as e:
        raise PackError(f"{where}: bad regex: {e}") from None
    return set(compiled.groupindex)


_POSIX_CLASS = re.compile(r"\[\[[:=.]")


def compile_pack(pack: Pack, prefix_name: str) -> Compiled:
    """Join every event and watch regex of `pack` behind one prefix into a single pattern."""
    prefix = pack.prefixes[prefix_name]
    alts: list[str] = []
    plans: list[tuple[EventPattern | str, list[str], str]] = []
    for i, event in enumerate(pack.events.values()):
        tag = f"e{i}"
        alts.append(f"(?P<{tag}>{_rename(event.regex, tag)})")
        plans.append((event, sorted(_GROUP_DEF.findall(event.regex)), tag))
    for i, (name, rx) in enumerate(pack.watch.items()):
        tag = f"w{i}"
        alts.append(f"(?P<{tag}>{_rename(rx, tag)})")
        plans.append((f"watch:{name}", [], tag))
    gate = f"(?={pack.gate})" if pack.gate else ""
    source = "\\n" + prefix.regex + gate + "(?:" + "|".join(alts) + f")(?:(?!)(?P<{_NEVER}>))?"
    try:
        regex = re.compile(source.encode())
    except re.error as e:  # names were checked one by one; a clash here is a pack bug
        raise PackError(f"{', '.join(pack.sources)}: regexes cannot be joined: {e}") from None
    gi = regex.groupindex
    never = gi[_NEVER]
    compiled = Compiled(pack, prefix, regex)
    for ev, groups, tag in plans:
        fields = tuple(gi.get(f, never) for f in PREFIX_FIELDS) + tuple(
            gi.get(f"{tag}_{f}", never) for f in EVENT_FIELDS
        )
        extras = tuple((g, gi[f"{tag}_{g}"]) for g in groups if g not in EVENT_FIELDS)
        if isinstance(ev, str):  # a watch alternative
            compiled.specs[gi[tag]] = Spec(ev, None, None, fields, extras)
        else:
            compiled.specs[gi[tag]] = Spec(ev.name, ev.kind, ev.service, fields, extras, ev.dialect, ev.names)
    return compiled


def _rename(rx: str, tag: str) -> str:
    rx = _GROUP_DEF.sub(lambda m: f"(?P<{tag}_{m.group(1)}>", rx)
    return _GROUP_REF.sub(lambda m: f"(?P={tag}_{m.group(1)})", rx)


def detect_prefix(pack: Pack, sample: bytes) -> tuple[str | None, dict[str, int]]:
    """Pick the prefix under which the pack recognises most Dovecot lines of `sample`.

    Returns (name or None, matches per prefix). Only a line the pack recognises decides: a combined
    mail log often starts with other daemons' lines, which the bare timestamp prefix of Dovecot's own
    log file would also take. None means "not yet": ask again with later lines (no line of `sample`
    is an event under any prefix, so nothing in it is lost by waiting).
    """
    text = b"\n" + sample
    scores = {n: sum(1 for _ in compile_pack(pack, n).regex.finditer(text)) for n in pack.prefixes}
    best = max(scores, key=lambda n: scores[n])
    return (best if scores[best] > 0 else None), scores


def closest_prefix(pack: Pack, sample: bytes) -> tuple[str | None, dict[str, int]]:
    """The prefix that merely parses most lines of `sample` (a quiet log with no event yet), for reports:
    never for storing, where only `detect_prefix` decides."""
    text = b"\n" + sample
    bare = {n: len(re.findall(("\\n" + p.regex).encode(), text)) for n, p in pack.prefixes.items()}
    best = max(bare, key=lambda n: bare[n])
    return (best if bare[best] > 0 else None), bare
