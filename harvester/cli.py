"""Command line: run, backfill, lookup, forget, export, schema, test-patterns."""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from harvester import __version__, native, patterns
from harvester.answer import EVENT_NAMES, local, row_dict
from harvester.config import STORE_KEYS, ConfigError, Settings, add_flags, resolve
from harvester.escape import for_csv, for_terminal, json_line, to_json
from harvester.events import SERVICES
from harvester.sinks import StoreError, default_url, open_store, store_class
from harvester.sources import journal
from harvester.timeparse import TimeError, resolve_timezone, rfc3339

log = logging.getLogger("harvester")

DESCRIPTION = f"""\
When did this mailbox last log in, over which protocol, and from where?

harvester reads Dovecot's log lines (live or from rotated archives, or the
systemd journal) and keeps, per account and service
({", ".join(SERVICES)}), the newest login time and client IP:
in SQLite, Cassandra, PostgreSQL / MySQL (the last_login plugin's, iRedMail's or
Modoboa's tables) or Redis.
"""

EPILOG = """\
first steps:
  harvester backfill /var/log/mail.log*        read the current and rotated logs (.gz .bz2 .xz .zst)
  harvester backfill --journal                 or the systemd journal (Debian 12 without rsyslog)
  harvester lookup jane@example.com            what an agent asks when a mailbox "is empty"
  harvester test-patterns /var/log/mail.log    check the patterns understand your log format
  harvester serve                              the same lookups over HTTP, for support tools and agents

The store defaults to an SQLite file (see --store); settings can live in one
TOML file (--config), every key named like its flag: webmail_networks = [...].
Run 'harvester COMMAND --help' for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="harvester", description=DESCRIPTION, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"harvester {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "backfill", help="read log files (plain or compressed) once into the store",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read Dovecot log files (or systemd journals) once, oldest first, and upsert the newest "
                    "login per account and service into the store. Rotated sets are ordered for you.",
        epilog=textwrap.dedent("""\
            examples:
              harvester backfill /var/log/mail.log /var/log/mail.log.*
              harvester backfill --timezone Europe/Berlin --webmail-networks 10.0.5.0/24 'archive/maillog-2025*'
              harvester backfill --store sqlite:////var/lib/harvester/h.db /var/log/dovecot-info.log
              harvester backfill --journal --since 2026-11-01      # Debian 12 without rsyslog
              harvester backfill --journal-dir /srv/copied/journal  # journals of another machine

            Quote globs to let harvester expand them. Times never move backwards in the store,
            so running a backfill twice, or over overlapping files, is safe."""))
    add_flags(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    p.add_argument("--since", metavar="TIME", help="journals: entries from TIME on (journalctl's syntax: "
                   "'2026-11-01', '2026-11-01 08:00:00', 'yesterday', '-2d')")
    p.add_argument("--until", metavar="TIME", help="journals: entries up to TIME (same syntax)")
    p.add_argument("paths", nargs="*", metavar="PATH|GLOB")

    p = sub.add_parser("lookup", help="show one account's last logins, newest first",
                       description="Every service's last login of one account (local and UTC time, IP), "
                                   "newest first, then its last failed login / POP3 deletion if any.")
    add_flags(p, ("store", "timezone", "log_level", *STORE_KEYS))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("user", metavar="USER")

    p = sub.add_parser(
        "forget", help="remove an account's rows (one service's, or all) from the store",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Remove the login row of USER for SERVICE, or without SERVICE every login and other-event "
                    "row of USER, and print what was removed (exit 1 when nothing matched). For a row a wrong "
                    "log line pinned (a time in the future) or an account that must go.",
        epilog=textwrap.dedent("""\
            examples:
              harvester forget jane@example.com imap
              harvester forget --store cassandra://cass1/mail 'jane@example.com'

            Cassandra: a row written with a future time (USING TIMESTAMP in 2099) can only be deleted by a
            tombstone at that time, and such a tombstone also hides every later real login of that row
            until Cassandra purges it (gc_grace_seconds after the delete, at a compaction); the command
            says when that is the case and what to run. The daemon re-stores an account at its next login
            in any case (unless the tombstone still hides it)."""))
    add_flags(p, ("store", "log_level", *STORE_KEYS))
    p.add_argument("user", metavar="USER")
    p.add_argument("service", metavar="SERVICE", nargs="?", help="imap, pop3, lmtp, submission, ... (default: all)")

    p = sub.add_parser("export", help="write every row as JSON lines or CSV",
                       description="Write every last-login row to stdout: user, service, last_login "
                                   "(RFC 3339 UTC), ip, node.")
    add_flags(p, ("store", "log_level", *STORE_KEYS))
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")

    p = sub.add_parser(
        "run", help="follow live log files and keep the store current (the systemd service)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Follow the maillog (through logrotate's rotations), or the systemd journal where no file "
                    "to follow exists (journal = auto), and upsert each login into the store within about a "
                    "second. Checkpoints in the state directory move only after the store acknowledged the "
                    "lines before them, so a crash or restart replays, never loses.",
        epilog=textwrap.dedent("""\
            examples:
              harvester run /var/log/mail.log
              harvester run                          # Debian 12 without rsyslog: the journal
              harvester run --journal-dir /var/log/journal/remote   # journals other machines send here
              harvester run --store cassandra://cass1,cass2/mail --metrics-listen 0.0.0.0:9854 /var/log/mail.log
              harvester run --start-at beginning --state-dir /tmp/h '/var/log/dovecot*.log'

            Signals: SIGTERM/SIGINT flush, save checkpoints and exit; SIGHUP re-reads the config file
            and pattern packs. Under systemd (Type=notify) it reports READY, WATCHDOG and STOPPING.
            Metrics: http://ADDR:PORT/metrics (default 127.0.0.1:9854)."""))
    add_flags(p)
    p.add_argument("paths", nargs="*", metavar="PATH|GLOB", help="files to follow (added to 'follow' of the config)")

    p = sub.add_parser(
        "schema", help="print (or create) the store's tables and the lookup query a support tool runs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the CREATE statements of the store (CQL for cassandra:// stores, SQL for SQLite) "
                    "and the query that looks one account up. With --apply, create what is missing.",
        epilog=textwrap.dedent("""\
            examples:
              harvester schema --store cassandra://cass1,cass2/mail
              harvester schema --store cassandra://cass1/mail --cassandra-layout per_user
              harvester schema --store cassandra://127.0.0.1/mail --apply
              harvester schema --store cassandra://cass1/mail --apply \\
                  --cassandra-replication "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 3}"

            --apply derives the keyspace's replication from the cluster it connects to
            (NetworkTopologyStrategy, per data centre min(3, its nodes)) unless --cassandra-replication is given.

            The layouts: per_service (default; one row per account and service), per_user (one row per
            account, a column per service, as in the Dovecot Pro guide's dovecot_stats) and custom (your own
            table: --cassandra-table, --cassandra-user-column, --cassandra-columns)."""))
    add_flags(p, ("store", "log_level", *STORE_KEYS))
    p.add_argument("--layout", dest="cassandra_layout", metavar="LAYOUT", default=None,
                   help="the same as --cassandra-layout: per_service, per_user or custom")
    p.add_argument("--apply", action="store_true", help="connect and create the keyspace/tables that are missing")

    p = sub.add_parser(
        "test-patterns", help="check which lines a pattern pack understands (like fail2ban-regex)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the pattern pack over FILE and report: lines matched per pattern, lines that look "
                    "like logins but matched nothing (with samples), and the events that would be stored.",
        epilog="example:\n  harvester test-patterns --pattern-pack ./mysite.toml /var/log/dovecot-info.log")
    add_flags(p, ("pattern_pack", "patterns_dir", "prefix", "timezone", "year", "webmail_networks",
                  "webmail_local_networks", "node", "log_level"))
    p.add_argument("--events", type=int, default=20, metavar="N", help="how many events to show (default 20)")
    p.add_argument("file", metavar="FILE")

    p = sub.add_parser(
        "serve", help="answer lookups over HTTP for support systems and agents (read-only)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A read-only HTTP service over the store: GET /v1/accounts/USER (the JSON of lookup "
                    "--json), a page for agents at /, /healthz and /metrics. Every lookup needs a token "
                    "(harvester token add NAME) and is written to the audit log.",
        epilog=textwrap.dedent("""            examples:
              harvester token add helpdesk            # prints the token once; keep it in the support tool
              harvester serve --listen 127.0.0.1:9855
              curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:9855/v1/accounts/jane%40example.com

            Percent-encode the account in the path (a "/" of a name is %2F). Signals: SIGHUP re-reads
            the tokens file (a deleted line is a revoked token); SIGTERM stops."""))
    add_flags(p, ("store", "timezone", "log_level", "log_format", "state_dir", "serve_listen", "serve_tokens_file",
                  "serve_audit_file", "serve_rate_limit", "serve_tls_cert", "serve_tls_key", "serve_client_ca",
                  *STORE_KEYS))
    p.add_argument("--listen", dest="serve_listen", metavar="ADDR:PORT", default=None,
                   help="the same as --serve-listen")
    p.add_argument("--tokens-file", dest="serve_tokens_file", metavar="FILE", default=None,
                   help="the same as --serve-tokens-file")

    p = sub.add_parser("token", help="make a token for harvester serve",
                       description="harvester token add NAME: a new random token for NAME, printed once; its "
                                   "SHA-256 is appended to the tokens file. Revoke it by deleting its line, then "
                                   "SIGHUP (systemctl reload harvester-serve).")
    add_flags(p, ("serve_tokens_file", "log_level"))
    p.add_argument("--tokens-file", dest="serve_tokens_file", metavar="FILE", default=None,
                   help="the same as --serve-tokens-file")
    p.add_argument("action", choices=("add",))
    p.add_argument("name", metavar="NAME")
    return top


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        settings = resolve(args)
    except (ConfigError, TimeError) as e:
        print(f"harvester: {e}", file=sys.stderr)
        return 2
    _logging(settings)
    try:
        return COMMANDS[args.command](args, settings)
    except (StoreError, patterns.PackError, ConfigError, TimeError) as e:
        print(f"harvester: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harvester: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log pipelines (--log-format json)."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
             "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            d["exception"] = self.formatException(record.exc_info)
        return json_line(d)  # a user name in a message must not reach a log viewer's terminal raw


class _TextFormatter(logging.Formatter):
    """Log lines for people: control and format characters in a message shown as escapes."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = for_terminal(record.message)
        return super().formatMessage(record)


def _logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if settings.log_format == "json"
                         else _TextFormatter("harvester: %(levelname)s: %(message)s"))
    handler.set_name("harvester")
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if h.get_name() != "harvester"] + [handler]  # others (pytest) stay
    root.setLevel(settings.log_level.upper())


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from harvester import backfill

    journals = settings.journal == "yes" or settings.journal_dir or settings.journal_file
    if not args.paths and not settings.rawlog and not journals:
        print("harvester backfill: nothing to read: give log files (PATH|GLOB), --journal, --journal-dir DIR, "
              "--journal-file FILE or --rawlog DIR", file=sys.stderr)
        return 2
    s = backfill.run(args.paths, settings, lambda: open_store(settings.store, settings=settings),
                     progress=args.progress, since=args.since, until=args.until)
    rate = s.lines / s.seconds if s.seconds > 0 else 0.0
    ok = sum(1 for _, st in s.files if st == "ok")
    out = sys.stderr
    print(f"files: {ok} read, {len(s.failed_files)} with problems", file=out)
    for path, status in s.failed_files:
        print(f"  {for_terminal(path)}: {for_terminal(status)}", file=out)
    engine = "native" if native.enabled() else "Python (the native module is not built or HARVESTER_ENGINE=python)"
    print(f"lines: {s.lines:,} ({s.bytes / 1e6:,.1f} MB) in {s.seconds:.2f} s, {rate:,.0f} lines/s, "
          f"{engine} engine", file=out)
    print("events:", file=out)
    for (kind, service), n in sorted(s.events.items()):
        print(f"  {kind:12s} {for_terminal(service):12s} {n:>12,}", file=out)
    if not s.events:
        print("  none", file=out)
    print(f"lines not understood: {s.not_understood:,}", file=out)
    if settings.rawlog:
        print(f"rawlog sessions: {s.rawlog_sessions:,} ({s.rawlog_without_ip:,} without a known address)",
              file=out)
    bad = ", ".join(f"{k}: {v:,}" for k, v in sorted(s.bad.items()) if v)
    print(f"bad input skipped: {bad or 'none'}", file=out)
    print(f"rows written: {s.rows_written:,} to {s.store_url}", file=out)
    if s.skipped:
        print("rows not stored (the table layout has no column for them): "
              + ", ".join(f"{k}: {v:,}" for k, v in sorted(s.skipped.items())), file=out)
    return 1 if s.failed_files else 0


def cmd_lookup(args: argparse.Namespace, settings: Settings) -> int:
    store = open_store(settings.store, create=False, settings=settings)
    try:
        rows = store.lookup(args.user)
    finally:
        store.close()
    zone = resolve_timezone(settings.timezone)
    if args.json:
        print(to_json([row_dict(r, zone) for r in rows], indent=2))
        return 0 if rows else 1
    if not rows:
        print(f"{for_terminal(args.user)}: no login recorded in {store.url}")
        return 1
    print(for_terminal(args.user))
    table = [("SERVICE", "LAST LOGIN (local)", "LAST LOGIN (UTC)", "IP", "NODE")]
    for r in (r for r in rows if r.kind == "login"):
        table.append((r.service, local(r.time_us, r.digits, zone), rfc3339(r.time_us, r.digits),
                      r.ip or "-", r.node or "-"))
    _print_table(table)
    others = [r for r in rows if r.kind != "login"]
    if others:
        print("\nother events (never logins):")
        table = [("EVENT", "SERVICE", "TIME (local)", "IP", "DETAIL")]
        for r in others:
            table.append((EVENT_NAMES.get(r.kind, r.kind), r.service, local(r.time_us, r.digits, zone),
                          r.ip or "-", r.detail or ""))
        _print_table(table)
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    store = open_store(settings.store, create=False, settings=settings)
    try:
        out = sys.stdout
        if args.format == "csv":
            # Cells are escaped for a person's terminal or spreadsheet (no formulas); JSON lines keep
            # every character (as \uXXXX where unsafe).
            w = csv.writer(out)
            w.writerow(("user", "service", "last_login", "ip", "node"))
            for r in store.export():
                w.writerow((for_csv(r.user), for_csv(r.service), rfc3339(r.time_us, r.digits), for_csv(r.ip or ""),
                            for_csv(r.node or "")))
        else:
            for r in store.export():
                out.write(json_line({"user": r.user, "service": r.service, "last_login": rfc3339(r.time_us, r.digits),
                                     "ip": r.ip, "node": r.node}) + "\n")
    finally:
        store.close()
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from harvester.daemon import Daemon

    journal_given = settings.journal == "yes" or settings.journal_dir or settings.journal_file
    local_journal = settings.journal == "auto" and journal.local_journal_exists() and journal.available()
    if not (settings.follow or args.paths or settings.rawlog or journal_given or local_journal):
        print("harvester run: nothing to follow: give PATHs, --journal, --rawlog DIR, or set follow in the config "
              "(this machine has no systemd journal to fall back to)", file=sys.stderr)
        return 2
    store = open_store(settings.store, settings=settings)
    try:
        return Daemon(settings, store, args.paths, reload=lambda: resolve(args)).run()
    finally:
        store.close()


def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.store or default_url()
    cls = store_class(url)
    if args.apply:
        store = open_store(url, settings=settings)
        try:
            statements, note = store.apply_schema()
        finally:
            store.close()
        print(note, file=sys.stderr)
    else:
        statements = cls.schema(url, settings.store_options(cls.Options))
    for stmt in statements[:-1]:
        print(stmt + ";\n")
    print("-- what a support tool runs to look one account up:")
    print(statements[-1] + ";")
    return 0


def cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    store = open_store(settings.store, create=False, settings=settings)
    try:
        gone = store.forget(args.user, args.service)
    finally:
        store.close()
    what = f"service {_shown(args.service)} of " if args.service else ""
    if not gone:
        print(f"nothing to forget: no {'login' if args.service else 'row'} of {what}{_shown(args.user)} "
              f"in {store.url}")
        return 1
    print(f"removed from {store.url}:")
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    future = []
    for f in gone:
        r = f.row
        print(f"  {_shown(r.user)} {_shown(r.service)} {r.kind} {rfc3339(r.time_us, r.digits)} "
              f"ip {_shown(r.ip) if r.ip else '-'}")
        if f.deleted_at_us is not None and f.deleted_at_us > now_us + FUTURE_SLACK_US:
            future.append(f)
    if future:
        tables = sorted({f.table for f in future if f.table})
        print(FUTURE_TOMBSTONE.format(n=len(future), when=rfc3339(future[0].deleted_at_us or 0, 6),
                                      purge="\n".join(PURGE.format(table=t) for t in tables)))
    return 0


# What `forget` says after deleting a row that had been written with a future time (Cassandra). The
# purge was tried on Cassandra 5.0: the next real write shows a few seconds after the first ALTER.
FUTURE_TOMBSTONE = """
note: {n} row(s) had been written with a time in the future (e.g. {when}). Cassandra can
only delete such a row with a tombstone at that time, and until Cassandra purges the tombstone
it also hides every later real write of the same row: the account's next logins there are
written but not shown. Cassandra purges it by itself only at a compaction more than
gc_grace_seconds (default 10 days) from now. To purge it now (with several nodes, first run
'nodetool repair' on the table: a replica that missed the tombstone would bring the row back):
{purge}"""
PURGE = """  ALTER TABLE {table} WITH gc_grace_seconds = 0 AND memtable_flush_period_in_ms = 1000;
  -- wait 10 seconds: the table is flushed and the tombstone dropped; then restore the settings
  ALTER TABLE {table} WITH gc_grace_seconds = 864000 AND memtable_flush_period_in_ms = 0;"""
FUTURE_SLACK_US = 300_000_000  # a deletion time this far ahead of the clock is "in the future"


def _shown(text: str) -> str:
    """User-controlled text (user names, services from log lines) for a terminal: visible escapes."""
    from harvester.sinks.base import shown

    return shown(text, limit=1000)


def cmd_test_patterns(args: argparse.Namespace, settings: Settings) -> int:
    from harvester.testpatterns import report

    return report(Path(args.file), settings, max_events=args.events)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from harvester import serve

    store = open_store(settings.store, create=False, settings=settings)
    try:
        return serve.run(settings, store)
    finally:
        store.close()


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from harvester import tokens

    try:
        token = tokens.add(Path(settings.serve_tokens_file), args.name)
    except (tokens.TokenError, OSError) as e:
        print(f"harvester token: {e}", file=sys.stderr)
        return 2
    print(token)
    print(f"(added {args.name!r} to {settings.serve_tokens_file}: keep the token, it is not stored; "
          "SIGHUP makes a running serve read it)", file=sys.stderr)
    return 0


COMMANDS = {"run": cmd_run, "backfill": cmd_backfill, "lookup": cmd_lookup, "export": cmd_export, "schema": cmd_schema,
            "test-patterns": cmd_test_patterns, "forget": cmd_forget, "serve": cmd_serve, "token": cmd_token}


def _print_table(table: Sequence[tuple[str, ...]]) -> None:
    rows = [tuple(for_terminal(c) for c in r) for r in table]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


__all__ = ["main", "build_parser"]
