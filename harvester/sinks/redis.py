"""The Redis store: keys and values as Dovecot's last_login plugin writes them, so the tools that read the
plugin's keys keep working when harvester replaces it.

The plugin's Redis dict (src/lib-dict/dict-redis.c) SETs `<prefix><key>` (the `shared/` of the dict path
stripped) to the Unix time as a decimal string in last_login_precision, with an expiry when one is set.
harvester writes the same key, and beside it a companion hash `<prefix>harvester/<key>` with what the
plugin's value cannot hold: the service, IP, node, the time in microseconds and the user name as logged.

Newest wins atomically: one Lua script (EVALSHA, many rows per call, the calls pipelined) compares the
stored time with the row's before it sets, so a replayed or older event never overwrites a newer one and
two backends writing the same key converge. Reads use SCAN, never KEYS.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from harvester.events import SERVICE_RENAMES, SERVICES, Row
from harvester.options import choice, option, seconds, text, whole
from harvester.sinks.base import Batch, Forgotten, PartialWrite, StoreError, write_taken
from harvester.sinks.tls import client_context

log = logging.getLogger(__name__)
URL = re.compile(r"(?P<scheme>rediss?)://(?:(?P<user>[^@/:]*)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\[\]@]+)"
                 r"(?::(?P<port>\d{1,5}))?(?:/(?P<db>\d{0,5}))?")
COMPANION = "harvester/"  # <prefix>COMPANION<key>: the companion hash of key <prefix><key>
ROWS_PER_CALL = 500  # rows one EVALSHA handles: long enough to amortise the call, short enough not to block Redis
SCAN_COUNT = 1000  # keys SCAN looks at per step (and keys read per pipelined step of lookup/export)
# The plugin's precisions: the stored value's unit in microseconds, and how many fractional digits it keeps.
# "ns" is the µs value with 000 appended, as the plugin writes it.
PRECISION = {"s": (1_000_000, 0), "ms": (1_000, 3), "us": (1, 6), "ns": (1, 6)}
ANY_SERVICE = "any"  # the service shown for a plugin-written key whose template has no %{service}

# The template's variables: Dovecot 2.4's names (and its user filters), 2.3's long and one-letter ones.
VARIABLES = {"user": "user", "u": "user", "username": "username", "n": "username", "user|username": "username",
             "domain": "domain", "d": "domain", "user|domain": "domain", "service": "service", "s": "service",
             "remote_ip": "remote_ip", "rip": "remote_ip", "r": "remote_ip"}
_VAR = re.compile(r"%(?:\{([^}]*)\}|(.))", re.S)
# How each variable reads in a key (export parses keys the plugin wrote, which have no companion).
_VAR_REGEX = {"user": r"(?P<user>.*)", "username": r"(?P<username>[^@]*)", "domain": r"(?P<domain>.*)",
              "service": r"(?P<service>[A-Za-z0-9_-]*)", "remote_ip": r"(?P<remote_ip>[0-9A-Fa-f:.]*)"}

# KEYS: per row its key and its companion hash. ARGV[1]: expiry in ms (0: none); then per row 7 values:
# the key's value at redis_precision, the time in µs, digits, service, ip, node, user. Returns the refused
# rows as {row number, error} pairs (a key of another type: never retried).
#
# A row wins when its value is greater than the stored one (decimal strings, compared by length first:
# the plugin's values have no leading zeros); on an equal value the companion's microseconds decide, then
# the greater (ip, node, service), so that two writers converge whatever their order. A stored value with
# no companion (the plugin's) loses to an equal one: the key keeps its value and gains the companion.
LUA = """
local function gt(a, b) return #a > #b or (#a == #b and a > b) end
local expire = tonumber(ARGV[1])
local refused = {}
for i = 1, #KEYS / 2 do
  local key, comp, a = KEYS[2 * i - 1], KEYS[2 * i], 1 + (i - 1) * 7
  local value, us = ARGV[a + 1], ARGV[a + 2]
  local cur = redis.pcall('GET', key)
  local write = not cur
  if type(cur) == 'table' then
    refused[#refused + 1] = {i, cur.err}
  elseif cur then
    if gt(value, cur) then
      write = true
    elseif value == cur then
      local h = redis.pcall('HMGET', comp, 'us', 'ip', 'node', 'service')
      if h.err then
        refused[#refused + 1] = {i, h.err}
      elseif not h[1] then
        write = true
      elseif gt(us, h[1]) then
        write = true
      elseif us == h[1] then
        local new = {ARGV[a + 5], ARGV[a + 6], ARGV[a + 4]}  -- ip, node, service
        local old = {h[2] or '', h[3] or '', h[4] or ''}
        for j = 1, 3 do
          if new[j] ~= old[j] then write = new[j] > old[j] break end
        end
      end
    end
  end
  if write then
    local ok = redis.pcall('HSET', comp, 'service', ARGV[a + 4], 'ip', ARGV[a + 5], 'node', ARGV[a + 6],
                           'us', us, 'digits', ARGV[a + 3], 'user', ARGV[a + 7])
    if type(ok) == 'table' then
      refused[#refused + 1] = {i, ok.err}
    elseif expire > 0 then
      local at = math.floor(tonumber(us) / 1000) + expire
      redis.call('SET', key, value, 'PXAT', at)
      redis.call('PEXPIREAT', comp, at)
    else
      redis.call('SET', key, value)
      if cur then redis.call('PERSIST', comp) end  -- a new key's companion is new too
    end
  end
end
return refused
"""
SHA = hashlib.sha1(LUA.encode()).hexdigest().encode()  # EVALSHA's name for it


def key_template(v: Any) -> str:
    """A redis_key: literal text and the plugin's variables (%{user}, %u, ...); at least one names the user."""
    s = text(v)
    names = {m[1].replace(" ", "") if m[1] is not None else m[2] for m in _VAR.finditer(s)} - {"%"}
    unknown = sorted(n for n in names if n not in VARIABLES)
    if unknown:
        raise ValueError(f"unknown variable(s) {', '.join(unknown)}: use %{{user}}, %{{username}}, %{{domain}}, "
                         "%{service}, %{remote_ip} (or 2.3's %u, %n, %d, %s, %r)")
    if not {VARIABLES[n] for n in names} & {"user", "username"}:
        raise ValueError("the key must name the account: %{user} or %{username}")
    return s


@dataclass
class RedisOptions:
    """The Redis store's settings: redis_<name> in the config file (store_password_file as it is)."""

    PREFIX: ClassVar[str] = "redis_"
    key: str = option(key_template, "last-login/%{user}",
        "key template, as Dovecot's last_login_key: %%{user}, %%{username}, %%{domain}, %%{service}, "
        "%%{remote_ip} (or %%u %%n %%d %%s %%r); the default keeps the newest login of any service per account",
        "TEMPLATE")
    precision: str = option(choice(*PRECISION), "s",
        "the value's unit, as last_login_precision: s, ms, us or ns", "s|ms|us|ns")
    key_prefix: str = option(text, "",
        "put before every key, as 2.3's prefix= and 2.4's redis_key_prefix", "TEXT")
    expire: int = option(whole(0, 100 * 366 * 86_400), 0,
        "keys expire this many seconds after the login (as 2.3's expire_secs= and 2.4's redis_expire; 0: never)",
        "SECONDS")
    timeout: float = option(seconds, 10.0, "seconds to wait for a connection or a reply", "SECONDS")
    tls_ca: str = option(text, "",
        "rediss://: the CA certificate file the server's certificate (and host name) is verified against "
        "(default: the system's CAs)", "FILE")
    tls_cert: str = option(text, "", "rediss://: client certificate file (Redis' tls-auth-clients)", "FILE")
    tls_key: str = option(text, "", "rediss://: the client certificate's key file", "FILE")
    password_file: str = option(text, "",
        "file holding the store's password (its first line): PostgreSQL, MySQL/MariaDB and Redis stores", "FILE",
        key="store_password_file")


@dataclass(frozen=True)
class Address:
    """What a redis:// or rediss:// URL names."""

    host: str
    port: int
    db: int
    username: str | None
    tls: bool


def parse_url(url: str) -> Address:
    """redis://[user@]host[:port][/db], rediss:// for TLS; IPv6 hosts in [brackets]. No password: that comes
    from store_password_file, never from a command line."""
    m = URL.fullmatch(url)
    if not m:
        why = " (the password comes from store_password_file)" if re.match(r"rediss?://[^@/]*:[^@/]*@", url) else ""
        raise StoreError(f"not a Redis URL: {url!r}{why} (expected redis://[user@]host:port/db or rediss://...)")
    port = int(m["port"] or 6379)
    if not 0 < port < 65536:
        raise StoreError(f"{url!r}: port {port} is out of range")
    return Address(m["host"].strip("[]"), port, int(m["db"] or 0), m["user"] or None, m["scheme"] == "rediss")


class Template:
    """redis_key_prefix + redis_key, compiled: the key of a row, the companion of a key, and back."""

    def __init__(self, o: RedisOptions) -> None:
        self.prefix = o.key_prefix
        fmt, pattern = [_brace(o.key_prefix)], [re.escape(o.key_prefix)]
        by_field = list(fmt)  # the same, "{0.user}" for "{user}": str.format reads the row's field
        self.names: list[str] = []
        head: str | None = None  # the key's literal text before its first variable
        literal, pos = o.key_prefix, 0
        for m in _VAR.finditer(o.key):
            part = o.key[pos:m.start()] + ("%" if m[2] == "%" else "")
            literal += part
            fmt.append(_brace(part))
            by_field.append(_brace(part))
            pattern.append(re.escape(part))
            pos = m.end()
            if m[2] == "%":
                continue
            name = VARIABLES[m[1].replace(" ", "") if m[1] is not None else m[2]]
            head = literal if head is None else head
            fmt.append("{" + name + "}")
            by_field.append("{0." + name + "}")
            pattern.append(f"(?P={name})" if name in self.names else _VAR_REGEX[name])
            self.names.append(name)
        fmt.append(_brace(o.key[pos:]))
        by_field.append(_brace(o.key[pos:]))
        pattern.append(re.escape(o.key[pos:]))
        self.head = literal if head is None else head
        self.format = "".join(fmt).format
        self.regex = re.compile("".join(pattern), re.S)
        self.getters = {n: _GETTERS[n] for n in dict.fromkeys(self.names)}
        # The usual templates name only the row's user and service: formatted from its fields directly.
        self.plain: Callable[[Row], str] | None = None
        if set(self.names) <= {"user", "service"}:
            self.plain = "".join(by_field).format
        # A key that could be another key's companion is refused: only possible where the template
        # begins with a variable (or with "harvester/").
        self.companion_head = self.prefix + COMPANION + self.head[len(self.prefix):]

    def key(self, r: Row) -> str:
        if self.plain is not None:
            return self.plain(r)
        return self.format(**{n: get(r) for n, get in self.getters.items()})

    def companion(self, key: str) -> str:
        return self.prefix + COMPANION + key[len(self.prefix):]

    def is_companion(self, key: str) -> bool:
        return key.startswith(self.companion_head)

    def parse(self, key: str) -> dict[str, str] | None:
        """The variables a key was made from (None: not one of this template's keys)."""
        m = self.regex.fullmatch(key)
        return None if m is None else m.groupdict()

    def is_of(self, key: str, user: str) -> bool:
        """Whether `key` is one the template makes for `user` (whatever its service and IP)."""
        parts = self.parse(key)
        account = Row(user, "", "login", 0, 0, None, None)
        return parts is not None and all(parts[n] == get(account) for n, get in self.getters.items()
                                         if n not in ("service", "remote_ip"))

    def glob(self, values: dict[str, str]) -> str:
        """A SCAN MATCH pattern: the variables in `values` as they are (escaped), the others any text."""
        out = []
        for part in re.split(r"(\{[a-z_]+\})", self.format(**{n: "{" + n + "}" for n in self.getters})):
            m = re.fullmatch(r"\{([a-z_]+)\}", part)
            out.append(_glob_escape(values[m[1]]) if m and m[1] in values else "*" if m else _glob_escape(part))
        return "".join(out)


_GETTERS: dict[str, Callable[[Row], str]] = {
    "user": lambda r: r.user, "username": lambda r: r.user.partition("@")[0],
    "domain": lambda r: r.user.partition("@")[2], "service": lambda r: r.service, "remote_ip": lambda r: r.ip or ""}


def _brace(s: str) -> str:
    """Literal text in a str.format template."""
    return s.replace("{", "{{").replace("}", "}}")


def _glob_escape(s: str) -> str:
    return re.sub(r"([*?\[\]\\^])", r"\\\1", s)


def _bulk(x: bytes) -> bytes:
    """One bulk string of Redis' protocol."""
    return b"$%d\r\n%b\r\n" % (len(x), x)


def _b(s: str) -> bytes:
    """A name as Redis keeps it: its UTF-8 bytes (a name read as non-UTF-8 bytes round-trips too)."""
    return s.encode("utf-8", "surrogateescape")


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


class RedisStore:
    """Last-login keys in a Redis database, in the plugin's format, with a companion hash each."""

    Options = RedisOptions
    URL_HELP = "redis://[user@]host:port/db, rediss://[user@]host:port/db (TLS)"
    URL_PREFIX = "redis"  # redis:// and rediss://
    THREAD_SAFE_READS = True  # redis-py's client draws a connection per command from its pool

    def __init__(self, url: str, options: RedisOptions | None = None, *, create: bool = True) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise StoreError("the Redis store needs the redis package: pip install 'harvester[redis]'") from None
        self._errors = redis.exceptions
        o = self.options = options or RedisOptions()
        self.url = url
        self.address = a = parse_url(url)
        self.template = Template(o)
        self.unit, self.digits = PRECISION[o.precision]
        self._skipped: dict[str, int] = {}
        self._bulk_cache: dict[object, bytes] = {}  # service, node or digits -> its bulk string (see _pack)
        if not a.tls and (o.tls_ca or o.tls_cert or o.tls_key):
            raise StoreError(f"{url}: redis_tls_* is set but the URL is not rediss://")
        connection: dict[str, Any] = dict(
            host=a.host, port=a.port, db=a.db, username=a.username, password=_password(o),
            socket_timeout=o.timeout, socket_connect_timeout=o.timeout,
            # One immediate retry: a pooled connection a Redis restart closed is noticed and replaced; a server
            # that is down fails the write at once (the daemon retries it with its own backoff).
            retry=Retry(NoBackoff(), 1))
        if a.tls:
            pool = redis.ConnectionPool(connection_class=_tls_connection(redis.Connection, _tls(o)), **connection)
            self.client = redis.Redis(connection_pool=pool)
        else:
            self.client = redis.Redis(**connection)
        try:
            self.client.ping()
        except (self._errors.RedisError, OSError) as e:
            self.close()
            raise StoreError(f"cannot connect to Redis at {a.host}:{a.port}: {type(e).__name__}: {e}"
                             + _hint(e, a, o)) from None

    # -- writes ------------------------------------------------------------------
    def flush(self, sink: Batch) -> int:
        return write_taken(sink, self)

    def skipped(self) -> dict[str, int]:
        """Rows of other kinds (failed logins, POP3 deletions): the plugin's keys have no place for them."""
        return dict(self._skipped)

    def write(self, rows: list[Row]) -> int:
        """Rows in calls of ROWS_PER_CALL, pipelined. What a lost connection (or a Redis loading its data) left
        unacknowledged is retried, whole calls (the script is idempotent); a row whose key holds another type
        is refused."""
        keyed, refused = self._keyed(rows)
        calls = [keyed[i:i + ROWS_PER_CALL] for i in range(0, len(keyed), ROWS_PER_CALL)]
        failed: list[Row] = []
        rejected: list[tuple[Row, str]] = []  # by the script
        why = ""
        for call, result in zip(calls, self._pipeline(calls), strict=True):
            if isinstance(result, Exception):
                failed += [r for r, _ in call]
                why = why or f"{type(result).__name__}: {result}"
            else:
                rejected += [(call[int(i) - 1][0], f"ResponseError: {_s(err) if isinstance(err, bytes) else err}")
                             for i, err in result]
        refused += rejected
        if failed or refused:
            raise PartialWrite.of(self.url, len(rows), failed, len(keyed) - len(failed) - len(rejected), refused, why)
        return len(keyed)

    def _keyed(self, rows: list[Row]) -> tuple[list[tuple[Row, str]], list[tuple[Row, str]]]:
        """(login rows with their keys, rows refused: keys where another key's companion lives); rows of other
        kinds are counted in skipped()."""
        t = self.template
        keyed, refused = [], []
        for r in rows:
            if r.kind != "login":
                self._skipped[r.place] = self._skipped.get(r.place, 0) + 1
                continue
            key = t.key(r)
            if t.is_companion(key):
                refused.append((r, f"KeyCollision: {key!r} is where another key's companion hash lives"))
            else:
                keyed.append((r, key))
        return keyed, refused

    def _pipeline(self, calls: list[list[tuple[Row, str]]]) -> list[Any]:
        """Each call's reply (refused rows) or the exception it met. Each call is sent as soon as it is packed, so
        Redis runs one while the next is packed; the replies are read at the end. Calls Redis had no script for
        (it restarted) are sent again once, after SCRIPT LOAD."""
        errors = self._errors
        pool = self.client.connection_pool
        results: list[Any] = []
        conn = None
        try:
            conn = pool.get_connection()
            packed = []
            for call in calls:
                packed.append(self._pack(call))
                conn.send_packed_command([packed[-1]], check_health=False)
            results = [self._reply(conn) for _ in packed]
            again = [i for i, res in enumerate(results) if isinstance(res, errors.NoScriptError)]
            if again:
                conn.send_command("SCRIPT", "LOAD", LUA)
                conn.read_response()
                for i in again:
                    conn.send_packed_command([packed[i]], check_health=False)
                for i in again:
                    results[i] = self._reply(conn)
        except (errors.ConnectionError, errors.TimeoutError, OSError) as e:
            if conn is not None:
                conn.disconnect()
            results += [e] * (len(calls) - len(results))
        finally:
            if conn is not None:
                pool.release(conn)
        return results

    def _reply(self, conn: Any) -> Any:
        try:
            return conn.read_response()
        except self._errors.ResponseError as e:  # this call only (OOM, a replica, no script): retried
            return e

    def _pack(self, call: list[tuple[Row, str]]) -> bytes:
        """EVALSHA of one call in Redis' protocol (packed here: redis-py's general packer took most of a write):
        a row's keys, then its arguments, each one format of bulk strings. Services, nodes and digits repeat:
        their bulk strings are made once."""
        companion, value, same = self.template.companion, self._value, self._bulk_cache
        keys: list[bytes] = []
        args: list[bytes] = [_bulk(b"%d" % (self.options.expire * 1000))]
        for r, key in call:
            k, c = _b(key), _b(companion(key))
            keys.append(b"$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(k), k, len(c), c))
            v, us, ip, user = value(r.time_us).encode(), b"%d" % r.time_us, _b(r.ip or ""), _b(r.user)
            args.append(b"$%d\r\n%b\r\n$%d\r\n%b\r\n%b%b$%d\r\n%b\r\n%b$%d\r\n%b\r\n" % (
                len(v), v, len(us), us,
                same.get(r.digits) or same.setdefault(r.digits, _bulk(b"%d" % r.digits)),
                same.get(r.service) or same.setdefault(r.service, _bulk(_b(r.service))),
                len(ip), ip,
                same.get(r.node) or same.setdefault(r.node, _bulk(_b(r.node or ""))),
                len(user), user))
        if len(same) > 10_000:  # node names come from log lines: bounded by what one call can add
            same.clear()
        head = b"*%d\r\n" % (4 + 9 * len(call)) + _bulk(b"EVALSHA") + _bulk(SHA) + _bulk(b"%d" % (2 * len(call)))
        return head + b"".join(keys) + b"".join(args)

    # -- reads -------------------------------------------------------------------
    def lookup(self, user: str) -> list[Row]:
        t = self.template
        if "remote_ip" in t.names:  # the IP is part of the key: find the account's keys
            keys = list(self._scan(t.glob(self._values(user))))
        else:
            services = [*SERVICES, *SERVICE_RENAMES] if "service" in t.names else [""]
            keys = list(dict.fromkeys(t.key(Row(user, s, "login", 0, 0, None, None)) for s in services))
        rows = []
        for key, r, companion in self._rows(keys):
            # A key of this account: its companion says so, or (a key the plugin wrote) it is the key the
            # template makes for this user (%{username} keys are shared by the same name at every domain).
            if r.user == user if companion else t.is_of(key, user):
                rows.append(r._replace(user=user))
        return sorted(rows, key=lambda r: (-r.time_us, r.service))

    def export(self) -> Iterator[Row]:
        keys: list[str] = []
        for key in self._scan(_glob_escape(self.template.head) + "*"):
            keys.append(key)
            if len(keys) >= SCAN_COUNT:
                yield from (r for _, r, _ in self._rows(keys))
                keys = []
        yield from (r for _, r, _ in self._rows(keys))

    def _values(self, user: str) -> dict[str, str]:
        r = Row(user, "", "login", 0, 0, None, None)
        return {n: get(r) for n, get in _GETTERS.items() if n not in ("service", "remote_ip")}

    def _scan(self, pattern: str) -> Iterator[str]:
        """Every key SCAN finds for `pattern` that is one of this template's (not a companion)."""
        t = self.template
        try:
            for k in self.client.scan_iter(match=_b(pattern), count=SCAN_COUNT):
                key = _s(k)
                if not t.is_companion(key) and t.parse(key) is not None:
                    yield key
        except self._errors.RedisError as e:
            raise StoreError(f"{self.url}: read failed: {e}") from None

    def _rows(self, keys: list[str]) -> list[tuple[str, Row, bool]]:
        """(key, the row it holds, whether its companion told it) per key that holds a time: from the companion
        where that describes the key's value, else (a key the plugin wrote) from the key's name and value."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.get(_b(k))
                pipe.hgetall(_b(self.template.companion(k)))
            got = pipe.execute(raise_on_error=False)
        except (self._errors.RedisError, OSError) as e:
            raise StoreError(f"{self.url}: read failed: {e}") from None
        out = []
        for k, value, comp in zip(keys, got[::2], got[1::2], strict=True):
            if not isinstance(value, bytes) or not value.isdigit():
                continue  # gone since the SCAN, or not a time (another application's key)
            us = comp.get(b"us", b"") if isinstance(comp, dict) else b""
            if us.isdigit() and self._value(int(us)) == value.decode():
                def field(name: bytes, comp: dict = comp) -> str | None:
                    return _s(comp[name]) if comp.get(name) else None

                out.append((k, Row(field(b"user") or "", field(b"service") or ANY_SERVICE, "login", int(us),
                                   int(comp.get(b"digits", b"0")), field(b"ip"), field(b"node")), True))
            else:
                out.append((k, self._plugin_row(k, int(value)), False))
        return out

    def _plugin_row(self, key: str, value: int) -> Row:
        """A key the plugin wrote: the time from its value, the rest from what the template put in its name."""
        parts = self.template.parse(key) or {}
        user = parts.get("user") or "@".join(p for p in (parts.get("username"), parts.get("domain")) if p)
        service = parts.get("service") or ANY_SERVICE
        time_us = value // 1000 if self.options.precision == "ns" else value * self.unit
        return Row(user, SERVICE_RENAMES.get(service, service), "login", time_us, self.digits,
                   parts.get("remote_ip") or None, None)

    def _value(self, time_us: int) -> str:
        """The key's value for a time: the Unix time in redis_precision, as the plugin writes it."""
        return str(time_us // self.unit) + ("000" if self.options.precision == "ns" else "")

    def forget(self, user: str, service: str | None = None) -> list[Forgotten]:
        """Delete the keys (and companions) of the account's rows, or of its row of one service."""
        gone = [r for r in self.lookup(user) if service in (None, r.service)]
        keys = {self.template.key(r) for r in gone}
        if keys:
            try:
                self.client.delete(*(_b(k) for key in keys for k in (key, self.template.companion(key))))
            except self._errors.RedisError as e:
                raise StoreError(f"{self.url}: forget failed: {e}") from None
        return [Forgotten(r) for r in gone]

    # -- schema ------------------------------------------------------------------
    @staticmethod
    def schema(url: str, options: RedisOptions) -> list[str]:
        return schema(url, options)

    def apply_schema(self) -> tuple[list[str], str]:
        """Load the script (Redis keeps it until it restarts; writes load it again when it is gone)."""
        try:
            sha = self.client.script_load(LUA)
        except self._errors.RedisError as e:
            raise StoreError(f"{self.url}: SCRIPT LOAD failed: {e}") from None
        return schema(self.url, self.options), f"-- loaded the write script into {self.url} (sha1 {sha})"

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()  # a pool of our own (rediss://) is not closed by the client


def schema(url: str, o: RedisOptions) -> list[str]:
    """The key layout, as shell comments and the redis-cli commands a support tool runs (no connection)."""
    a = parse_url(url)
    t = Template(o)
    example = Row("jane.doe@example.com", "imap", "login", 0, 0, "192.0.2.1", "mx1")
    key = t.key(example)
    unit = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds (µs + 000)"}[o.precision]
    expire = (f"SET with PXAT = login time + {o.expire} s (redis_expire), the companion expiring with it"
              if o.expire else "SET, no expiry")
    tls = [("--cacert", o.tls_ca), ("--cert", o.tls_cert), ("--key", o.tls_key)] if a.tls else []
    cli = f"redis-cli -h {a.host} -p {a.port} -n {a.db}" + (" --tls" if a.tls else "") + "".join(
        f" {flag} {_shell(path)}" for flag, path in tls if path)
    layout = "\n".join([
        f"# Redis keys as Dovecot's last_login plugin writes them (redis_key = {o.key}, redis_key_prefix = "
        f"{o.key_prefix!r}, redis_precision = {o.precision}):",
        f"#   {o.key_prefix}{o.key} -> the newest login's Unix time in {unit}, a decimal string ({expire})",
        *(["#   (no %{service} in the key: the newest login of any service wins)"] if "service" not in t.names
          else []),
        "# and beside each key harvester's companion hash, with what the plugin's value cannot hold:",
        f"#   {o.key_prefix}{COMPANION}{o.key} -> service, ip, node, us (the time in microseconds), digits "
        "(fractional digits the log gave), user (as logged)",
        "# Only logins are stored (failed logins and POP3 deletions have no key). A write runs one Lua script",
        "# (EVALSHA) that sets the key only when the row is newer than what is stored; 'harvester schema --apply'",
        "# loads it (a write loads it too when Redis lost it). Keys are the user names' UTF-8 bytes, verbatim.",
        "# Reading every key: SCAN 0 MATCH '" + _glob_escape(t.head) + "*' (never KEYS on a live server)",
    ])
    lookup = f"{cli} GET {_shell(key)}; {cli} HGETALL {_shell(t.companion(key))}"
    return [layout, lookup]


def _shell(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _tls(o: RedisOptions) -> ssl.SSLContext:
    """The context of every rediss:// connection, made once (see _tls_connection)."""
    ctx = client_context("redis", o.tls_ca, o.tls_cert, o.tls_key, required=True)
    assert ctx is not None  # required=True
    return ctx


def _tls_connection(connection: Any, ctx: ssl.SSLContext) -> Any:
    """redis-py's TCP connection class, its socket wrapped by `ctx`. (redis-py's own rediss:// makes a context
    per connection from file names, and it always trusts the system's CAs besides ssl_ca_certs.)"""
    class TlsConnection(connection):
        def _connect(self) -> ssl.SSLSocket:  # redis-py's hook: the socket of a new connection
            sock = super()._connect()
            try:
                return ctx.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise

    return TlsConnection


def _hint(e: BaseException, a: Address, o: RedisOptions) -> str:
    """What to check when the first connection failed, read from the error redis-py's was raised from ('' when
    there is nothing to add)."""
    def cause(kind: type[BaseException]) -> BaseException | None:
        c: BaseException | None = e
        while c is not None and not isinstance(c, kind):
            c = c.__cause__ or c.__context__
        return c

    if not a.tls:  # a TLS port resets a connection that does not start with a TLS handshake
        return " (is it a TLS port? then the URL is rediss://)" if cause(ConnectionResetError) else ""
    tls = cause(ssl.SSLError)
    if tls is None:  # a plain port reads the TLS hello as the start of a command and waits for the rest
        return (" (no answer to the TLS handshake: a firewall, or the server's plain port? then the URL is "
                "redis://, or use its tls-port)") if cause(TimeoutError) else ""
    if getattr(tls, "reason", None) in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return " (no TLS answered there: the server's plain port? then the URL is redis://, or use its tls-port)"
    if isinstance(tls, ssl.SSLCertVerificationError):
        if tls.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            return (f" (the server's certificate is not for {a.host!r}: use a host name or address it names in "
                    "the store URL)")
        return (f" (check redis_tls_ca: {o.tls_ca} did not sign the server's certificate)" if o.tls_ca else
                " (check redis_tls_ca: none of the system's CAs signed the server's certificate; set the CA that did)")
    if not o.tls_cert:
        return (" (the server closed the TLS connection: does it require a client certificate? set redis_tls_cert "
                "and redis_tls_key)")
    return (f" (the server closed the TLS connection: check redis_tls_cert: is {o.tls_cert} signed by a CA the "
            "server trusts, its tls-ca-cert-file?)")


def _password(o: RedisOptions) -> str | None:
    """The first line of store_password_file (None: no file, no AUTH)."""
    path = o.password_file
    if not path:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"store_password_file {path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if not lines or not lines[0]:
        raise StoreError(f"store_password_file {path}: the first line is empty")
    return lines[0]
