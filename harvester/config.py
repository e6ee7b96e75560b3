"""One place that defines and validates every setting, for the TOML file and the command line.

Each setting is declared once (name, type, default, help); the config file
loader and the argparse flags are both generated from that list, so a setting
cannot exist in one and be missing from the other.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from harvester.parse import MAX_USER_BYTES
from harvester.timeparse import FUTURE_TOLERANCE_S

DEFAULT_CONFIG = Path("/etc/harvester/harvester.toml")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the key and where it came from."""


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _opt_int(lo: int, hi: int) -> Callable[[Any], int | None]:
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


def _cidrs(v: Any) -> list[str]:
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


def _paths(v: Any) -> list[str]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise TypeError("expected a path or a list of paths")
    return items


def _timezone(v: Any) -> str | None:
    if v is None:
        return None
    from harvester.timeparse import resolve_timezone

    resolve_timezone(_str(v))  # raises TimeError (a ValueError) naming the zone
    return v


def _store(v: Any) -> str | None:
    if v is None:
        return None
    s = _str(v)
    if not s.startswith(("sqlite:///", "cassandra://")):
        raise ValueError("expected sqlite:///relative.db, sqlite:////absolute.db or cassandra://host/keyspace")
    return s


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise TypeError("expected a number of seconds")
    n = float(v)
    if not 0 < n <= 3600:
        raise ValueError("must be more than 0 and at most 3600 seconds")
    return n


def _columns(v: Any) -> dict[str, list[str]]:
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
                or not all(isinstance(c, str) and _IDENT.fullmatch(c) for c in cols)):
            raise ValueError(f"service {service!r}: expected [time column] or [time column, IP column], "
                             "each a CQL name of letters, digits and _")
        out[str(service)] = list(cols)
    return out


def _ident(v: Any) -> str:
    s = _str(v)
    if s and not _IDENT.fullmatch(s):
        raise ValueError("expected a CQL name of letters, digits and _ (at most 48)")
    return s


_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
_CONSISTENCY = ("ANY", "ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM", "EACH_QUORUM", "LOCAL_ONE")


def _listen(v: Any) -> str:
    s = _str(v)
    if s:
        addr, sep, port = s.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected ADDR:PORT such as 127.0.0.1:9854 or [::1]:9854 (empty: no endpoint)")
    return s


def _choice(*choices: str) -> Callable[[Any], str]:
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


def option(check: Callable[[Any], Any], default: Any, help: str, metavar: str = "VALUE") -> Any:
    """A setting: a field of Settings with its check, help and metavar (OPTIONS is derived from these)."""
    meta = {"check": check, "help": help, "metavar": metavar}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Settings:
    """The merged settings, typed: defaults < config file < command line. Each field is one setting,
    declared once; the config file's keys and the command line's flags are derived from these fields."""

    store: str | None = option(_store, None,
        "where rows go: sqlite:///relative.db, sqlite:////absolute.db, or "
        "cassandra://host1,host2[:port]/keyspace (default: "
        "$STATE_DIRECTORY or ~/.local/state/harvester/harvester.db)", "URL")
    timezone: str | None = option(_timezone, None,
        "zone of year-less and offset-less log timestamps (IANA name, UTC or +02:00; "
        "default: this system's zone)", "TZ")
    year: int | None = option(_opt_int(1970, 9999), None,
        "year of 'Nov 22 01:52:03' timestamps (default: from each file's modification time)", "YYYY")
    webmail_networks: list[str] = option(_cidrs, [],
        "client networks of your webmail servers: IMAP logins from there count as service "
        "'webmail' (comma-separated CIDRs)", "CIDR[,CIDR...]")
    node: str = option(_str, "",
        "name recorded for lines without a host name (Dovecot's own log files; default: this host)", "NAME")
    pattern_pack: str = option(_str, "dovecot", "pattern pack: a name or a .toml file", "NAME|FILE")
    patterns_dir: list[str] = option(_paths, ["/etc/harvester/patterns"],
        "directories with packs of your own, searched before the built-in ones", "DIR")
    prefix: str = option(_str, "auto",
        "line prefix of the pack to use (auto: detect per file from its first lines)", "NAME")
    workers: int = option(_opt_int(0, 256), 1,
        "processes a backfill parses with (1: the main one, with a helper that reads and decompresses; "
        "0: one per usable core)", "N")
    flush_rows: int = option(_opt_int(1, 10_000_000), 500_000,
        "write to the store when this many distinct rows are waiting (bounds memory)", "N")
    max_line_bytes: int = option(_opt_int(1024, 1 << 30), 1 << 20,
        "longer lines are counted and skipped", "BYTES")
    max_user_bytes: int = option(_opt_int(1, 1 << 20), MAX_USER_BYTES,
        "lines with a longer user name are counted and skipped (no store keeps such names)", "BYTES")
    future_tolerance_s: int = option(_opt_int(0, 366 * 86_400), FUTURE_TOLERANCE_S,
        "lines dated more than this after their file's last write (or now, when followed live) are "
        "counted and skipped: a future time would win over every real login", "SECONDS")
    log_level: str = option(_choice("debug", "info", "warning", "error"), "info", "logging threshold", "LEVEL")
    log_format: str = option(_choice("text", "json"), "text",
        "log lines for people (text) or for a log pipeline (json)", "FORMAT")
    rawlog: list[str] = option(_paths, [],
        "Dovecot rawlog roots to read sessions from: a rawlog_dir with a directory per user (%%u), or a "
        "tree of home directories holding dovecot.rawlog/ (the rawlog binary)", "DIR")
    rawlog_user_regex: str = option(_str, "",
        "take the user from a session directory's path with this regex's (?P<user>...) group (default: "
        "the directory's name, or the home directory's for dovecot.rawlog/)", "REGEX")
    # The live daemon (harvester run)
    follow: list[str] = option(_paths, [],
        "run: files (or globs) to follow; the command line's PATHs are added", "PATH")
    state_dir: str = option(_str, "",
        "run: where checkpoints live (default: $STATE_DIRECTORY, else ~/.local/state/harvester)", "DIR")
    metrics_listen: str = option(_listen, "127.0.0.1:9854",
        "run: ADDR:PORT of the Prometheus /metrics endpoint (empty: none)", "ADDR:PORT")
    start_at: str = option(_choice("end", "beginning"), "end",
        "run: where to start in a file that has no checkpoint yet", "end|beginning")
    flush_interval_ms: int = option(_opt_int(10, 600_000), 500,
        "run: write coalesced rows at least this often (a login is stored within about this + the read)",
        "MS")
    flush_events: int = option(_opt_int(1, 10_000_000), 20_000, "run: or as soon as this many rows wait", "N")
    max_waiting_rows: int = option(_opt_int(1000, 100_000_000), 500_000,
        "run: stop reading while this many rows wait for a store that is slow or down (bounds memory)", "N")
    poll_interval_ms: int = option(_opt_int(10, 60_000), 1000,
        "run: look at the files at least this often (file change notifications wake it earlier)", "MS")
    # Cassandra (cassandra:// stores only)
    cassandra_layout: str = option(_choice("per_service", "per_user", "custom"), "per_service",
        "table shape: per_service (one row per account and service: last_login), per_user (one row per "
        "account, a column per service: dovecot_stats), custom (your table, see cassandra_columns)", "LAYOUT")
    cassandra_table: str = option(_ident, "",
        "table name (default: last_login for per_service, dovecot_stats for per_user)", "NAME")
    cassandra_user_column: str = option(_ident, "",
        "per_user/custom: the account column (default: user)", "NAME")
    cassandra_columns: dict[str, list[str]] = option(_columns, {},
        "per_user/custom: service -> time column and IP column, e.g. "
        "imap=last_login_imap:remote_ip_imap,pop3=last_login_pop3:remote_ip_pop3 (services without one "
        "are skipped and counted)", "MAP")
    cassandra_datacenter: str = option(_str, "",
        "local datacenter for routing (default: the first contact point's)", "DC")
    cassandra_consistency: str = option(_choice(*_CONSISTENCY), "LOCAL_QUORUM", "write consistency level", "LEVEL")
    cassandra_username: str = option(_str, "", "user name (PasswordAuthenticator)", "NAME")
    cassandra_password_file: str = option(_str, "",
        "file holding the password (its first line); never give a password on the command line", "FILE")
    cassandra_tls_ca: str = option(_str, "", "CA certificate file: connect with TLS and verify the nodes", "FILE")
    cassandra_tls_cert: str = option(_str, "", "client certificate file (TLS client authentication)", "FILE")
    cassandra_tls_key: str = option(_str, "", "client certificate's key file", "FILE")
    cassandra_connect_timeout: float = option(_seconds, 10.0, "seconds to wait for a connection", "SECONDS")
    cassandra_request_timeout: float = option(_seconds, 10.0, "seconds to wait for one write or read", "SECONDS")
    cassandra_in_flight: int = option(_opt_int(1, 10_000), 256, "writes in flight at once from one process", "N")
    cassandra_retries: int = option(_opt_int(0, 100), 5,
        "retries of a write that timed out or found too few replicas (backoff 0.2 s doubling, at most "
        "10 s)", "N")
    cassandra_replication: str = option(_str, "",
        "keyspace replication for 'harvester schema --apply' (default: derived from the cluster: "
        "NetworkTopologyStrategy, per data centre min(3, its nodes))", "CQL_MAP")
    # Both stores
    event_rows: str = option(_choice("known", "all"), "known",
        "which accounts get last_event rows (failed logins, POP3 deletions): known (only accounts with a "
        "stored login, so a password spray of made-up names adds no rows; SQLite only, Cassandra cannot "
        "check without a read: see event_ttl_days) or all", "known|all")
    event_ttl_days: int = option(_opt_int(0, 7300), 30,
        "Cassandra: last_event rows expire this many days after they are written (bounds a password "
        "spray's rows; 0: never)", "DAYS")
    source: dict[str, str] = field(default_factory=dict, repr=False)  # key -> where it was set (not a setting)

    @property
    def node_name(self) -> str:
        return self.node or socket.gethostname().split(".")[0]

    def set(self, key: str, value: Any, where: str) -> None:
        opt = BY_KEY.get(key)
        if opt is None:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(BY_KEY)})")
        try:
            setattr(self, key, opt.check(value))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: bad value for {key!r}: {e}") from None
        self.source[key] = where


def _options() -> tuple[Option, ...]:
    out = []
    for f in fields(Settings):
        if "check" in f.metadata:
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            out.append(Option(f.name, f.metadata["check"], default, f.metadata["help"], f.metadata["metavar"]))
    return tuple(out)


OPTIONS: tuple[Option, ...] = _options()
BY_KEY = {o.key: o for o in OPTIONS}
_LISTS = ("patterns_dir", "follow", "rawlog")  # flags that may be given more than once
CASSANDRA_KEYS = tuple(o.key for o in OPTIONS if o.key.startswith("cassandra_"))


def config_path(explicit: str | None) -> Path | None:
    """--config, else $HARVESTER_CONFIG, else /etc/harvester/harvester.toml if it exists."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("HARVESTER_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def load_file(settings: Settings, path: Path) -> None:
    """Apply a TOML config file; unknown keys and bad values name the key and the file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for key, value in data.items():
        if isinstance(value, dict) and key != "cassandra_columns":
            raise ConfigError(f"{path}: unknown section [{key}]")
        settings.set(key, value, str(path))


def state_dir(settings: Settings) -> Path:
    """state_dir, else $STATE_DIRECTORY (systemd's StateDirectory=), else ~/.local/state/harvester."""
    if settings.state_dir:
        return Path(settings.state_dir)
    base = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "harvester"


def add_flags(parser: argparse.ArgumentParser, keys: tuple[str, ...] | None = None) -> None:
    """Add --config and one flag per setting (--webmail-networks for webmail_networks)."""
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML config file (default: $HARVESTER_CONFIG, else {DEFAULT_CONFIG} if present)")
    for opt in OPTIONS:
        if keys is not None and opt.key not in keys:
            continue
        parser.add_argument("--" + opt.key.replace("_", "-"), dest=opt.key, metavar=opt.metavar,
                            default=None, action="append" if opt.key in _LISTS else "store",
                            help=opt.help)


def resolve(args: argparse.Namespace) -> Settings:
    """Defaults, then the config file, then flags given on the command line."""
    settings = Settings()
    path = config_path(getattr(args, "config", None))
    if path is not None:
        load_file(settings, path)
    for opt in OPTIONS:
        value = getattr(args, opt.key, None)
        if value is not None:
            settings.set(opt.key, value, "--" + opt.key.replace("_", "-"))
    return settings
