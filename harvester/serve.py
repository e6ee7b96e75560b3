"""`harvester serve`: a read-only HTTP service over the configured store, for support systems and agents.

- GET /v1/accounts/{user}: the account's rows as `lookup --json` gives them (404: no row). The user is
  percent-encoded in the path; %2F is a "/" of the name, never a path separator.
- GET /: a page for agents (no JavaScript): one field, the answer as a table and in plain words.
- GET /healthz (the store answers a lookup), GET /metrics (requests and latency by route and status).

Every request but /healthz and /metrics needs a bearer token of the tokens file (tokens.py) - in the
Authorization header, or the cookie the page's sign-in form sets - or a client certificate from
serve_client_ca; else 401. Each lookup is written to the audit log (who, which account, when, what came
back); a token past its rate (serve_rate_limit per second, twice that in a burst) gets 429. There is no
listing and no prefix search. The service only reads: it calls Store.lookup, whatever the store.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import signal
import socket
import ssl
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from harvester import metrics
from harvester.answer import EVENT_NAMES, local, row_dict, verdict
from harvester.config import Settings, state_dir
from harvester.escape import to_json
from harvester.parse import MAX_USER_BYTES
from harvester.sinks.base import Store
from harvester.timeparse import resolve_timezone, rfc3339
from harvester.tokens import TokenError, Tokens

log = logging.getLogger(__name__)
API = "/v1/accounts/"
COOKIE = "harvester_token"
MAX_NAME_CHARS = MAX_USER_BYTES  # a longer account name is no account of any store (400)
HEALTH_PROBE = "harvester-healthz"  # the account /healthz looks up (a store may refuse an empty key)


class RateLimit:
    """A token bucket per principal: `rate` requests a second, bursts of twice that."""

    def __init__(self, rate: float) -> None:
        self.rate, self.burst = rate, max(2 * rate, 1.0)
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def allow(self, who: str) -> bool:
        now = time.monotonic()
        with self.lock:
            level, at = self.buckets.get(who, (self.burst, now))
            level = min(self.burst, level + (now - at) * self.rate)
            if level < 1:
                self.buckets[who] = (level, now)
                return False
            self.buckets[who] = (level - 1, now)
            return True


class Service:
    """What every request shares: the store (one lookup at a time where its driver's connection may not be
    shared between threads), the tokens, the rate limit and the audit log."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        # One lookup at a time unless the store says its reads may overlap (Store's THREAD_SAFE_READS).
        self.store_lock: Any = (contextlib.nullcontext() if getattr(type(store), "THREAD_SAFE_READS", False)
                                else threading.Lock())
        self.zone = resolve_timezone(settings.timezone)
        self.tokens_path = Path(settings.serve_tokens_file)
        self.tokens = Tokens.load(self.tokens_path)
        self.limit = RateLimit(settings.serve_rate_limit)
        audit = Path(settings.serve_audit_file) if settings.serve_audit_file else state_dir(settings) / "audit.log"
        audit.parent.mkdir(parents=True, exist_ok=True)
        self.audit_path = audit
        self.audit_file = audit.open("a", encoding="utf-8", buffering=1)
        self.audit_lock = threading.Lock()
        self.tls = settings.serve_tls_cert != ""

    def reload_tokens(self) -> None:
        """SIGHUP: the tokens file again, and the audit log reopened (logrotate renamed it)."""
        with self.audit_lock:
            self.audit_file.close()
            self.audit_file = self.audit_path.open("a", encoding="utf-8", buffering=1)
        try:
            self.tokens = Tokens.load(self.tokens_path)
            log.info("re-read %s: %d token(s)", self.tokens_path, len(self.tokens.entries))
        except TokenError as e:
            log.error("SIGHUP: %s; keeping the tokens read before", e)

    def lookup(self, user: str) -> list:
        with self.store_lock:
            return self.store.lookup(user)

    def audit(self, who: str, account: str, route: str, status: int) -> None:
        line = json.dumps({"time": rfc3339(time.time_ns() // 1000, 3), "who": who, "account": account,
                           "route": route, "status": status}, ensure_ascii=True)
        with self.audit_lock:
            self.audit_file.write(line + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a support system's client reuses its connection
    # Headers and body leave in two writes: with Nagle's algorithm the second waits for the client's
    # delayed ACK, 40 ms a request (measured: p50 44 ms before, see bench/serve).
    disable_nagle_algorithm = True
    timeout = 30  # seconds a connection may stay silent (a slow or idle client holds a thread, no more)
    tls: ssl.SSLContext | None = None  # set on the class made per server (make_server)

    def setup(self) -> None:
        """TLS is negotiated here, in the connection's own thread and under its timeout: in accept() a
        client that connects and says nothing would hold up every other."""
        if self.tls is not None:
            self.request.settimeout(self.timeout)
            self.request = self.tls.wrap_socket(self.request, server_side=True)
        super().setup()
    server_version = "harvester"
    sys_version = ""
    service: Service  # set on the class made per server (make_server)

    def log_message(self, format: str, *args: Any) -> None:  # the audit log and the metrics say it all
        pass

    # -- routing -------------------------------------------------------------------
    def do_GET(self) -> None:
        started = time.perf_counter()
        raw_path, _, query = self.path.partition("?")
        if raw_path.startswith(API):
            route, status = "account", self._account(raw_path[len(API):])
        elif raw_path == "/healthz":
            route, status = "healthz", self._healthz()
        elif raw_path == "/metrics":
            route, status = "metrics", self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
        elif raw_path == "/":
            route, status = "page", self._page(urllib.parse.parse_qs(query).get("account", [""])[0])
        else:
            route, status = "other", self._error(404, "no such page")
        metrics.SERVE_REQUESTS.labels(route, str(status)).inc()
        metrics.SERVE_SECONDS.labels(route).observe(time.perf_counter() - started)

    def do_POST(self) -> None:
        started = time.perf_counter()
        status = self._login() if self.path.partition("?")[0] == "/login" else self._error(404, "no such page")
        metrics.SERVE_REQUESTS.labels("login", str(status)).inc()
        metrics.SERVE_SECONDS.labels("login").observe(time.perf_counter() - started)

    # -- who asks ------------------------------------------------------------------
    def _who(self) -> str | None:
        """The token's name (or "cert:CN" of a verified client certificate), or None."""
        s = self.service
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        if token is None:
            for part in self.headers.get("Cookie", "").split(";"):
                k, _, v = part.strip().partition("=")
                if k == COOKIE:
                    token = urllib.parse.unquote(v)
        if token is not None:
            return s.tokens.name_of(token)
        cert: Any = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        if cert:
            names = [pair[1] for rdn in cert.get("subject", ()) for pair in rdn if pair[0] == "commonName"]
            return f"cert:{names[0]}" if names else None
        return None

    def _gate(self, route: str, account: str, who: str | None = None) -> str | int:
        """The principal (`who`, when the caller found it already), or the status already answered (401, 429)."""
        who = who or self._who()
        if who is None:
            return self._error(401, "a valid token is needed (Authorization: Bearer TOKEN)",
                               {"WWW-Authenticate": 'Bearer realm="harvester"'})
        if not self.service.limit.allow(who):
            self.service.audit(who, account, route, 429)
            return self._error(429, "too many requests for this token; try again in a second", {"Retry-After": "1"})
        return who

    # -- routes ------------------------------------------------------------------------
    def _account(self, encoded: str) -> int:
        try:
            user = urllib.parse.unquote(encoded, errors="strict")
        except UnicodeDecodeError:
            return self._error(400, "the account name is not UTF-8")
        gate = self._gate("api", user)
        if isinstance(gate, int):
            return gate
        if not user or len(user) > MAX_NAME_CHARS:
            self.service.audit(gate, user[:MAX_NAME_CHARS], "api", 400)
            return self._error(400, "an account name is 1 to 255 characters")
        rows = self._lookup(gate, user, "api")
        if rows is None:
            return self._error(503, "the store does not answer; try again later")
        status = 200 if rows else 404
        self.service.audit(gate, user, "api", status)
        if not rows:
            return self._error(404, "no row for this account")
        body = to_json([row_dict(r, self.service.zone) for r in rows], indent=2) + "\n"
        return self._send(200, body.encode(), "application/json")

    def _healthz(self) -> int:
        try:
            self.service.lookup(HEALTH_PROBE)
        except Exception as e:  # any driver error: the store does not answer
            return self._send(503, to_json({"status": "store unreachable", "error": str(e)[:300]}).encode(),
                              "application/json")
        return self._send(200, b'{"status": "ok"}', "application/json")

    def _lookup(self, who: str, account: str, route: str) -> list | None:
        """The account's rows; None when the store is down or refuses (said, audited as 503: the service goes
        on and the caller answers 503)."""
        try:
            return self.service.lookup(account)
        except Exception as e:
            log.warning("lookup failed: %s", e)
            self.service.audit(who, account, route, 503)
            return None

    def _login(self) -> int:
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit() or int(length) > 4096:  # a form of one token: anything else is no sign-in
            self.close_connection = True
            return self._error(413 if length.isdigit() else 400, "a sign-in form is at most 4096 bytes")
        form = urllib.parse.parse_qs(self.rfile.read(int(length)).decode("utf-8", "replace"))
        token = form.get("token", [""])[0].strip()
        if self.service.tokens.name_of(token) is None:
            return self._send(401, _page("", [], None, "That token is not valid.").encode(), "text/html; charset=utf-8")
        secure = "; Secure" if self.service.tls else ""
        return self._send(303, b"", "text/plain", {
            "Location": "/", "Set-Cookie": f"{COOKIE}={urllib.parse.quote(token)}; HttpOnly; SameSite=Strict; "
                                          f"Path=/{secure}"})

    def _page(self, account: str) -> int:
        who = self._who()
        if who is None:
            return self._send(200, _page("", [], None, None, sign_in=True).encode(), "text/html; charset=utf-8")
        if not account:
            return self._send(200, _page("", [], None, None).encode(), "text/html; charset=utf-8")
        gate = self._gate("page", account, who)
        if isinstance(gate, int):
            return gate
        if len(account) > MAX_NAME_CHARS:
            return self._send(400, _page(account[:MAX_NAME_CHARS], [], None, "An account name is at most 255 "
                                         "characters.").encode(), "text/html; charset=utf-8")
        rows = self._lookup(gate, account, "page")
        if rows is None:
            return self._send(503, _page(account, [], None, "The store does not answer; try again later.")
                              .encode(), "text/html; charset=utf-8")
        self.service.audit(gate, account, "page", 200 if rows else 404)
        return self._send(200 if rows else 404, _page(account, rows, self.service.zone, None).encode(),
                          "text/html; charset=utf-8")

    # -- answers -------------------------------------------------------------------------
    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> int:
        return self._send(status, to_json({"error": message}).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> int:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if ctype.startswith("text/html"):
            self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                                        "form-action 'self'")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        return status


_STYLE = """body{font:16px/1.4 system-ui,sans-serif;margin:1rem auto;max-width:60rem;padding:0 .8rem}
form{display:flex;gap:.5rem;flex-wrap:wrap}input[type=text],input[type=password]{flex:1;min-width:12rem;
font-size:1rem;padding:.4rem}button{font-size:1rem;padding:.4rem 1rem}table{border-collapse:collapse;width:100%;
margin:1rem 0}th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #ccc;vertical-align:top}
.verdict li{margin:.3rem 0}.wrap{overflow-x:auto}.note{color:#a00}"""


def _page(account: str, rows: list, zone, note: str | None, *, sign_in: bool = False) -> str:
    """The agent's page: every value HTML-escaped (account names come from whoever typed them)."""
    e = html.escape
    parts = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
             "<meta name=viewport content='width=device-width,initial-scale=1'>",
             f"<title>harvester: last logins</title><style>{_STYLE}</style></head><body>",
             "<h1>Last logins</h1>"]
    if note:
        parts.append(f"<p class=note>{e(note)}</p>")
    if sign_in:
        parts.append("<form method=post action=/login><input type=password name=token "
                     "placeholder='your access token' aria-label='access token' autocomplete=off>"
                     "<button>Sign in</button></form></body></html>")
        return "".join(parts)
    parts.append(f"<form method=get action=/><input type=text name=account value='{e(account, quote=True)}' "
                 "placeholder='account, e.g. jane@example.com' aria-label=account autofocus>"
                 "<button>Look up</button></form>")
    if account and not rows:
        parts.append(f"<p id=verdict>No login recorded for <b>{e(account)}</b>.</p>")
    elif rows:
        now = time.time_ns() // 1000
        parts.append(f"<h2>{e(account)}</h2><ul class=verdict id=verdict>")
        parts += [f"<li>{e(line)}</li>" for line in verdict(rows, now)]
        parts.append("</ul><div class=wrap><table id=logins><tr><th>Service</th><th>Last login (local)</th>"
                     "<th>IP</th><th>Node</th></tr>")
        for r in (r for r in rows if r.kind == "login"):
            parts.append(f"<tr><td>{e(r.service)}</td><td>{e(local(r.time_us, r.digits, zone))}</td>"
                         f"<td>{e(r.ip or '-')}</td><td>{e(r.node or '-')}</td></tr>")
        parts.append("</table></div>")
        others = [r for r in rows if r.kind != "login"]
        if others:
            parts.append("<div class=wrap><table id=events><tr><th>Event</th><th>Service</th><th>Time (local)</th>"
                         "<th>IP</th><th>Detail</th></tr>")
            for r in others:
                parts.append(f"<tr><td>{e(EVENT_NAMES.get(r.kind, r.kind))}</td><td>{e(r.service)}</td>"
                             f"<td>{e(local(r.time_us, r.digits, zone))}</td><td>{e(r.ip or '-')}</td>"
                             f"<td>{e(r.detail or '')}</td></tr>")
            parts.append("</table></div>")
    parts.append("</body></html>")
    return "".join(parts)


def make_server(settings: Settings, store: Store) -> tuple[ThreadingHTTPServer, Service]:
    if not settings.serve_listen:
        raise OSError("serve_listen is empty: give ADDR:PORT, e.g. 127.0.0.1:9855 or [::1]:9855")
    service = Service(settings, store)
    ctx = None
    if settings.serve_tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(settings.serve_tls_cert, settings.serve_tls_key or None)
        if settings.serve_client_ca:
            ctx.load_verify_locations(settings.serve_client_ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL  # a token still works without a certificate
    handler = type("BoundHandler", (Handler,), {"service": service, "tls": ctx})
    addr, _, port = settings.serve_listen.rpartition(":")
    host = addr.strip("[]") or "127.0.0.1"
    family = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][0]
    # A listen backlog of socketserver's 5 drops the SYNs of a support system opening many connections at
    # once, and each dropped one is retried a second later (measured: p99 1,030 ms with 16 connections).
    server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True,
                                                           "request_queue_size": 1024})
    return server_class((host, int(port)), handler), service


def run(settings: Settings, store: Store) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP re-reads the tokens file."""
    try:
        server, service = make_server(settings, store)
    except (OSError, TokenError, ssl.SSLError, ValueError) as e:
        log.error("serve_listen %s: %s", settings.serve_listen, e)
        return 2
    if not service.tokens.entries and not settings.serve_client_ca:
        log.warning("%s holds no token: every request will be refused (harvester token add NAME)",
                    service.tokens_path)
    signal.signal(signal.SIGHUP, lambda *_: service.reload_tokens())
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    log.info("serving %s on %s://%s (audit log %s)", store.url, "https" if service.tls else "http",
             settings.serve_listen, service.audit_path)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.audit_file.close()
    return 0
