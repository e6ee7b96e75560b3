"""One place that defines and validates every setting, for the TOML file and the command line.

Each setting is declared once (name, type, default, help); the config file
loader and the argparse flags are both generated from that list, so a setting
cannot exist in one and be missing from the other.
"""

from __future__ import annotations

import argparse
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from harvester.options import Option, choice, cidrs, declared, listen, matches, option, paths, switch, text, whole
from harvester.parse import MAX_USER_BYTES
from harvester.sinks import STORES, store_options
from harvester.sinks.base import StoreOptions
from harvester.sources.journal import DEFAULT_MATCH as DOVECOT_ENTRIES
from harvester.timeparse import FUTURE_TOLERANCE_S

DEFAULT_CONFIG = Path("/etc/harvester/harvester.toml")
T = TypeVar("T")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the key and where it came from."""


def _timezone(v: Any) -> str | None:
    if v is None:
        return None
    from harvester.timeparse import resolve_timezone

    resolve_timezone(text(v))  # raises TimeError (a ValueError) naming the zone
    return v


def _store(v: Any) -> str | None:
    if v is None:
        return None
    s = text(v)
    if not any(s.startswith(cls.URL_PREFIX) for cls in STORES.values()):
        raise ValueError("expected " + " or ".join(cls.URL_HELP for cls in STORES.values()))
    return s


@dataclass
class Settings:
    """The merged settings, typed: defaults < config file < command line. Each field is one setting,
    declared once; the config file's keys and the command line's flags are derived from these fields."""

    store: str | None = option(_store, None,
        "where rows go: sqlite:///relative.db, sqlite:////absolute.db, "
        "cassandra://host1,host2[:port]/keyspace, or redis://[user@]host:port/db (rediss:// for TLS) (default: "
        "$STATE_DIRECTORY or ~/.local/state/harvester/harvester.db)", "URL")
    timezone: str | None = option(_timezone, None,
        "zone of year-less and offset-less log timestamps (IANA name, UTC or +02:00; "
        "default: this system's zone)", "TZ")
    year: int | None = option(whole(1970, 9999), None,
        "year of 'Nov 22 01:52:03' timestamps (default: from each file's modification time)", "YYYY")
    webmail_networks: list[str] = option(cidrs, [],
        "networks of your webmail servers: IMAP logins from there count as service 'webmail', with "
        "Dovecot 2.4 also when the webmail forwards its user's address (ID x-originating-ip: the "
        "session id still names the webmail host) (comma-separated CIDRs)", "CIDR[,CIDR...]")
    webmail_local_networks: list[str] = option(cidrs, [],
        "local addresses only your webmail servers connect to (a login line's lip=): IMAP logins to "
        "them count as service 'webmail' (comma-separated CIDRs)", "CIDR[,CIDR...]")
    node: str = option(text, "",
        "name recorded for lines without a host name (Dovecot's own log files; default: this host)", "NAME")
    pattern_pack: str = option(text, "dovecot", "pattern pack: a name or a .toml file", "NAME|FILE")
    patterns_dir: list[str] = option(paths, ["/etc/harvester/patterns"],
        "directories with packs of your own, searched before the built-in ones", "DIR")
    prefix: str = option(text, "auto",
        "line prefix of the pack to use (auto: detect per file from its first lines)", "NAME")
    workers: int = option(whole(0, 256), 1,
        "processes a backfill parses with (1: the main one, with a helper that reads and decompresses; "
        "0: one per usable core)", "N")
    flush_rows: int = option(whole(1, 10_000_000), 500_000,
        "write to the store when this many distinct rows are waiting (bounds memory)", "N")
    max_line_bytes: int = option(whole(1024, 1 << 30), 1 << 20,
        "longer lines are counted and skipped", "BYTES")
    max_user_bytes: int = option(whole(1, 1 << 20), MAX_USER_BYTES,
        "lines with a longer user name are counted and skipped (no store keeps such names)", "BYTES")
    future_tolerance_s: int = option(whole(0, 366 * 86_400), FUTURE_TOLERANCE_S,
        "lines dated more than this after their file's last write (or now, when followed live) are "
        "counted and skipped: a future time would win over every real login", "SECONDS")
    log_level: str = option(choice("debug", "info", "warning", "error"), "info", "logging threshold", "LEVEL")
    log_format: str = option(choice("text", "json"), "text",
        "log lines for people (text) or for a log pipeline (json)", "FORMAT")
    rawlog: list[str] = option(paths, [],
        "Dovecot rawlog roots to read sessions from: a rawlog_dir with a directory per user (%%u), or a "
        "tree of home directories holding dovecot.rawlog/ (the rawlog binary)", "DIR")
    rawlog_user_regex: str = option(text, "",
        "take the user from a session directory's path with this regex's (?P<user>...) group (default: "
        "the directory's name, or the home directory's for dovecot.rawlog/)", "REGEX")
    # The live daemon (harvester run)
    follow: list[str] = option(paths, [],
        "run: files (or globs) to follow; the command line's PATHs are added", "PATH")
    journal: str = option(switch, "auto",
        "read the local systemd journal: yes, no, or auto (run: when none of the files to follow exists at "
        "start, as on Debian 12 without rsyslog; files win where both exist, so no line is read twice)",
        "yes|no|auto")
    journal_dir: list[str] = option(paths, [],
        "read the journal files in this directory (copied from another machine, a container's); repeatable",
        "DIR")
    journal_file: list[str] = option(paths, [], "read this journal file; repeatable", "FILE")
    journal_match: list[str] = option(matches, list(DOVECOT_ENTRIES),
        "which journal entries are Dovecot's: FIELD=VALUE (several of one field: any of them), e.g. "
        "SYSLOG_IDENTIFIER=dovecot-2 for another instance_name", "FIELD=VALUE")
    state_dir: str = option(text, "",
        "run: where checkpoints live (default: $STATE_DIRECTORY, else ~/.local/state/harvester)", "DIR")
    metrics_listen: str = option(listen, "127.0.0.1:9854",
        "run: ADDR:PORT of the Prometheus /metrics endpoint (empty: none)", "ADDR:PORT")
    start_at: str = option(choice("end", "beginning"), "end",
        "run: where to start in a file that has no checkpoint yet", "end|beginning")
    flush_interval_ms: int = option(whole(10, 600_000), 500,
        "run: write coalesced rows at least this often (a login is stored within about this + the read)",
        "MS")
    flush_events: int = option(whole(1, 10_000_000), 20_000, "run: or as soon as this many rows wait", "N")
    max_waiting_rows: int = option(whole(1000, 100_000_000), 500_000,
        "run: stop reading while this many rows wait for a store that is slow or down (bounds memory)", "N")
    poll_interval_ms: int = option(whole(10, 60_000), 1000,
        "run: look at the files at least this often (file change notifications wake it earlier)", "MS")
    # The lookup service (harvester serve)
    serve_listen: str = option(listen, "127.0.0.1:9855",
        "serve: ADDR:PORT of the read-only HTTP service (API, agents' page, /healthz, /metrics)", "ADDR:PORT")
    serve_tokens_file: str = option(text, "/etc/harvester/tokens",
        "serve: NAME:SHA256_HEX lines of the bearer tokens it accepts (harvester token add NAME; re-read on "
        "SIGHUP)", "FILE")
    serve_audit_file: str = option(text, "",
        "serve: where every lookup is recorded (who, account, time, result) as JSON lines (default: "
        "audit.log in the state directory)", "FILE")
    serve_rate_limit: int = option(whole(1, 100_000), 10,
        "serve: lookups a second per token (bursts of twice that); beyond it: 429", "N")
    serve_tls_cert: str = option(text, "", "serve: certificate file: serve HTTPS (with serve_tls_key)", "FILE")
    serve_tls_key: str = option(text, "", "serve: the certificate's key file", "FILE")
    serve_client_ca: str = option(text, "",
        "serve: CA file: a client certificate it signed is accepted instead of a token (HTTPS only)", "FILE")
    # Each registered store's own options (harvester/sinks/__init__.py), by Options class.
    stores: dict[type, Any] = field(default_factory=lambda: {cls: cls() for cls in store_options()}, repr=False)
    source: dict[str, str] = field(default_factory=dict, repr=False)  # key -> where it was set (not a setting)

    @property
    def node_name(self) -> str:
        return self.node or socket.gethostname().split(".")[0]

    def store_options(self, cls: type[T]) -> T:
        """The options of one store, typed (cls: its Options class)."""
        return self.stores[cls]

    def set(self, key: str, value: Any, where: str) -> None:
        found = _BY_KEY.get(key)
        if found is None:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(_BY_KEY)})")
        for group, name, opt in found:  # a key several stores declare (store_password_file) is set in each
            try:
                setattr(self if group is None else self.stores[group], name, opt.check(value))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}: bad value for {key!r}: {e}") from None
        self.source[key] = where


def _own(group: type[StoreOptions] | None, key: str) -> bool:
    """Whether `key` is a store's own setting (it carries the store's prefix, or store_: a connection setting
    several stores share, such as store_password_file)."""
    return group is not None and (bool(group.PREFIX) and key.startswith(group.PREFIX) or key.startswith("store_"))


_Declared = tuple[type[StoreOptions] | None, str, str, Option]


def _declared() -> list[_Declared]:
    """(store Options class or None for Settings itself, field name, key, Option), in the order --help and
    error messages list them: the general settings, each store's own (prefixed), then the few that several
    stores read (event_rows, event_ttl_days), by name."""
    own: list[_Declared] = []
    shared: list[_Declared] = []
    for cls in store_options():
        for name, key, opt in declared(cls, cls.PREFIX):
            (own if _own(cls, key) else shared).append((cls, name, key, opt))
    general: list[_Declared] = [(None, name, key, opt) for name, key, opt in declared(Settings)]
    return [*general, *own, *sorted(shared, key=lambda d: d[2])]


def _by_key() -> dict[str, list[tuple[type[StoreOptions] | None, str, Option]]]:
    """key -> where it goes: (group, field name, Option), one entry per store that declares it."""
    out: dict[str, list[tuple[type[StoreOptions] | None, str, Option]]] = {}
    for group, name, key, opt in _declared():
        out.setdefault(key, []).append((group, name, opt))
    return out


_BY_KEY = _by_key()
OPTIONS: tuple[Option, ...] = tuple(found[0][2] for found in _BY_KEY.values())
# flags that may be given more than once
_LISTS = ("patterns_dir", "follow", "rawlog", "journal_dir", "journal_file", "journal_match")
_SWITCHES = ("journal",)  # flags that may stand alone: --journal is --journal yes
# The flags of the commands that open a store but read no logs (lookup, export, forget, schema): each store's
# own prefixed settings and the store_ ones several share (a store's other unprefixed ones, event_rows and
# event_ttl_days, concern writing rows).
STORE_KEYS = tuple(key for key, found in _BY_KEY.items()
                   if _own(found[0][0], key) or (found[0][0] is not None and key.startswith("store_")))


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
        if isinstance(value, dict) and not (key in _BY_KEY and isinstance(_BY_KEY[key][0][2].default, dict)):
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
        if opt.key in _SWITCHES:
            parser.add_argument("--" + opt.key.replace("_", "-"), dest=opt.key, metavar=opt.metavar,
                                default=None, nargs="?", const="yes", help=opt.help)
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
