"""`harvester test-patterns FILE`: what a pattern pack makes of a log, line by line.

Like fail2ban-regex for its filters: it is the tool an operator runs after
changing login_log_format, before trusting the numbers. It classifies every
line with the pack's joined regex (slow, on purpose: a diagnostic), counts the rows
with the engine the backfill uses, and says so when the two engines disagree.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from harvester import patterns
from harvester.backfill import make_parser
from harvester.coalesce import Coalescer
from harvester.config import Settings
from harvester.escape import for_terminal
from harvester.parse import Parser
from harvester.sources.compression import ArchiveError, raw_chunks
from harvester.timeparse import Clock, resolve_timezone, rfc3339

SAMPLES = 5


def report(path: Path, settings: Settings, *, max_events: int = 20, out=None) -> int:
    """Print the report; exit status 0 if every login-like line was understood, else 1."""
    import sys

    out = out or sys.stdout
    parser = make_parser(settings)
    pack = parser.pack
    chunks: list[bytes] = []
    problem = None
    try:
        for piece in raw_chunks(path):
            chunks.append(piece)
    except ArchiveError as e:
        problem = str(e)
    data = b"".join(chunks)
    print(f"file:    {path}", file=out)
    if problem:
        print(f"warning: {problem}; reporting on what could be read", file=out)
    print(f"pack:    {pack.name} ({', '.join(pack.sources)})", file=out)
    prefix: str | None
    scores: dict[str, int]
    if settings.prefix != "auto":
        prefix, scores = settings.prefix, {}
    else:
        # As run and backfill decide: on the first Dovecot line, however far in (a combined mail log);
        # a log without any event still gets the prefix that parses most lines, to report on.
        prefix, scores = patterns.detect_prefix(pack, data[:64 << 10])
        if prefix is None:
            prefix, scores = patterns.detect_prefix(pack, data)
        if prefix is None:
            prefix, scores = patterns.closest_prefix(pack, data[:64 << 10])
    if scores:
        print("prefix:  " + ", ".join(f"{n}={c}" for n, c in scores.items()) + " (matches in the first 64 KiB)",
              file=out)
    if prefix is None:
        print("no line matches any prefix of this pack: is it a Dovecot log?", file=out)
        return 1
    print(f"using:   {prefix} ({pack.prefixes[prefix].description})", file=out)

    compiled = patterns.compile_pack(pack, prefix)
    bare = re.compile(("\\n" + pack.prefixes[prefix].regex).encode())
    per_pattern: Counter = Counter()
    unknown: list[bytes] = []
    no_prefix: list[bytes] = []
    counts: Counter[str] = Counter()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for line in lines:
        text = b"\n" + line
        m = compiled.regex.match(text)
        if m is not None:
            spec = compiled.specs[m.lastindex or 0]
            if spec.kind is None:
                counts["not understood"] += 1
                if len(unknown) < SAMPLES:
                    unknown.append(line)
            else:
                counts["matched"] += 1
                per_pattern[spec.name] += 1
        elif bare.match(text):
            counts["other lines with this prefix"] += 1
        else:
            counts["lines without this prefix"] += 1
            if len(no_prefix) < SAMPLES:
                no_prefix.append(line)

    print(f"\nlines:   {len(lines):,}", file=out)
    for k in ("matched", "not understood", "other lines with this prefix", "lines without this prefix"):
        print(f"  {k:30s} {counts[k]:>10,}", file=out)
    print("\npatterns (kind): lines matched", file=out)
    for name, pattern in pack.events.items():
        print(f"  {name:28s} {pattern.kind:14s} {per_pattern[name]:>10,}", file=out)
    if unknown:
        print("\nlines that look like logins or deliveries but match no pattern (samples):", file=out)
        for line in unknown:
            print("  " + for_terminal(line.decode("utf-8", "replace")), file=out)
    if no_prefix:
        print("\nlines without this prefix (samples; other programs' lines are normal):", file=out)
        for line in no_prefix:
            print("  " + for_terminal(line.decode("utf-8", "replace")[:200]), file=out)

    # The rows come from the engine backfills and the daemon use (the native one when built); the event
    # list from a traced run of Python's. Both must agree, or the pack means two things.
    clock = Clock(pack.prefixes[prefix].style, resolve_timezone(settings.timezone), year=settings.year,
                  reference=path.stat().st_mtime, tolerance=settings.future_tolerance_s)
    backfills = make_parser(settings)
    rows = _parsed(backfills, path, prefix, clock, data, Coalescer()).take()
    traced = _parsed(parser, path, prefix, clock, data, Coalescer(trace=True))
    events = traced.events()
    engine = "native (PCRE2 JIT), as backfill and run use" if backfills.engine == "native" else \
        "Python's re, as backfill and run use (the native module is not built, or PCRE2 refused the pack)"
    print(f"\nengine:  {engine}", file=out)
    print(f"events:  {len(events):,} (showing {min(max_events, len(events))})", file=out)
    for event in events[:max_events]:
        print(f"  {rfc3339(event.time_us, event.digits)}  {event.kind:11s} {for_terminal(event.service):11s} "
              f"{event.user!r:32s} {for_terminal(event.ip or '-'):20s} {for_terminal(event.detail or '')}".rstrip(),
              file=out)
    print(f"rows:    {sum(1 for r in rows if r.kind == 'login')} last-login rows, "
          f"{sum(1 for r in rows if r.kind != 'login')} other-event rows would be stored", file=out)
    differ = sorted(set(rows) ^ set(traced.take()))
    if differ:
        r = differ[0]
        print(f"\nwarning: the native engine and Python's disagree on {len(differ)} row(s) of this pack (first: "
              f"{r.kind} {for_terminal(r.service)} {r.user!r} {rfc3339(r.time_us, r.digits)}); keep its "
              "regexes to the syntax both read alike (see the pack's header)", file=out)
        return 1
    return 1 if counts["not understood"] else 0


def _parsed(parser: Parser, path: Path, prefix: str, clock: Clock, data: bytes, sink: Coalescer) -> Coalescer:
    parser.begin(str(path), prefix, clock)
    parser.feed(data, sink)
    parser.release_held(sink)
    parser.end()
    return sink
