"""`harvester serve` as a support system and an agent meet it: a real server process over real stores
(SQLite; the Cassandra node of the test run), real HTTP, and the agents' page in a real Chromium."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harvester.config import Settings
from harvester.events import Row
from harvester.sinks import open_store
from tests.conftest import ROOT
from tests.e2e.dovecot import free_port

T0 = 1_795_974_426_000_000
HOSTILE = ["a/b@example.com", "o'brien \"q\"@example.com", "esc\x1b[31mred@example.com", "<script>x</script>",
           "d>e,f g@example.com", "ÄÖÜ@exämple.de", "..%2F..@example.com"]


@dataclass
class Server:
    url: str
    token: str
    proc: subprocess.Popen
    tokens: Path
    audit: Path

    def get(self, path: str, token: str | None = None, headers: dict | None = None) -> tuple[int, bytes, dict]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)


def account(user: str) -> str:
    return "/v1/accounts/" + urllib.parse.quote(user, safe="")


def start(tmp: Path, store: str, *extra: str, rate: int = 1000) -> Server:
    tokens = tmp / "tokens"
    made = subprocess.run([sys.executable, "-m", "harvester", "token", "add", "desk", "--tokens-file", str(tokens)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    port = free_port()
    audit = tmp / "audit.log"
    proc = subprocess.Popen([sys.executable, "-m", "harvester", "serve", "--store", store, "--tokens-file",
                             str(tokens), "--listen", f"127.0.0.1:{port}", "--serve-audit-file", str(audit),
                             "--serve-rate-limit", str(rate), "--timezone", "Europe/Berlin", *extra],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    server = Server(f"http://127.0.0.1:{port}", made.stdout.strip(), proc, tokens, audit)
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                if server.get("/healthz")[0] == 200:
                    return server
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "serve did not answer /healthz"
            time.sleep(0.1)
    except BaseException:
        proc.kill()  # a failed start leaves no server behind
        proc.wait()
        raise


def stop(server: Server) -> str:
    server.proc.send_signal(signal.SIGTERM)
    _, err = server.proc.communicate(timeout=20)
    return err


def rows() -> list[Row]:
    out = [Row("jane@example.com", "pop3", "login", T0, 0, "203.0.113.7", "mx1"),
           Row("jane@example.com", "imap", "login", T0 - 3_600_000_000, 0, "198.51.100.4", "mx1"),
           Row("jane@example.com", "lmtp", "login", T0 - 60_000_000, 0, "192.0.2.25", "mx1"),
           Row("jane@example.com", "pop3", "pop3_delete", T0 + 5_000_000, 0, "203.0.113.7", "mx1",
               "deleted=14 messages=14")]
    out += [Row(u, "imap", "login", T0 + i, 0, "192.0.2.9", "mx1") for i, u in enumerate(HOSTILE)]
    return out


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    url = f"sqlite:///{tmp / 'h.db'}"
    store = open_store(url)
    store.write(rows())
    store.close()
    server = start(tmp, url)
    yield server
    stop(server)


def test_an_account_answers_as_lookup_json_does(sqlite_server, tmp_path):
    status, body, headers = sqlite_server.get(account("jane@example.com"), sqlite_server.token)
    assert status == 200 and headers["Content-Type"] == "application/json"
    got = json.loads(body)
    cli = subprocess.run([sys.executable, "-m", "harvester", "lookup", "--json", "--timezone", "Europe/Berlin",
                          "--store", sqlite_server_store(sqlite_server), "jane@example.com"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert got == json.loads(cli.stdout)
    assert [(r["service"], r["kind"]) for r in got][:3] == [("pop3", "login"), ("lmtp", "login"), ("imap", "login")]
    assert got[0]["local_time"].endswith("CET")


def sqlite_server_store(server: Server) -> str:
    args = server.proc.args
    return args[args.index("--store") + 1]


def test_no_token_or_a_wrong_one_is_401_and_an_unknown_account_404(sqlite_server):
    assert sqlite_server.get(account("jane@example.com"))[0] == 401
    status, _, headers = sqlite_server.get(account("jane@example.com"), "not-the-token")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert sqlite_server.get(account("nobody@example.com"), sqlite_server.token)[0] == 404
    assert sqlite_server.get("/v1/accounts/", sqlite_server.token)[0] == 400
    assert sqlite_server.get("/v1/accounts?prefix=j", sqlite_server.token)[0] == 404  # no listing


@pytest.mark.parametrize("user", HOSTILE)
def test_hostile_account_names_in_the_path_are_looked_up_verbatim_and_answered_escaped(sqlite_server, user):
    status, body, _ = sqlite_server.get(account(user), sqlite_server.token)
    assert status == 200, body
    assert json.loads(body)[0]["user"] == user
    assert b"\x1b" not in body  # JSON escapes it: no terminal escape reaches a curl user's screen
    status, page, _ = sqlite_server.get("/?account=" + urllib.parse.quote(user, safe=""),
                                        headers={"Cookie": f"harvester_token={sqlite_server.token}"})
    assert status == 200
    assert b"<script>x" not in page and b"&lt;script&gt;x" in page or "<script>" not in user


def test_every_lookup_is_in_the_audit_log_with_who_asked_and_what_came_back(sqlite_server):
    sqlite_server.get(account("nobody-else@example.com"), sqlite_server.token)
    time.sleep(0.2)
    lines = [json.loads(line) for line in sqlite_server.audit.read_text().splitlines()]
    assert {"who": "desk", "account": "nobody-else@example.com", "route": "api", "status": 404}.items() <= \
        lines[-1].items()


def test_metrics_count_requests_by_route_and_status_and_name_no_account(sqlite_server):
    sqlite_server.get(account("jane@example.com"), sqlite_server.token)
    status, text, _ = sqlite_server.get("/metrics")
    assert status == 200
    assert b'harvester_serve_requests_total{route="account",status="200"}' in text
    assert b'harvester_serve_request_duration_seconds_bucket{le="0.02",route="account"}' in text
    assert b"jane" not in text and b"example.com" not in text


def test_a_token_revoked_in_the_file_is_refused_after_sighup(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    store = open_store(url)
    store.write(rows())
    store.close()
    server = start(tmp_path, url)
    try:
        assert server.get(account("jane@example.com"), server.token)[0] == 200
        server.tokens.write_text("# revoked desk\n")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while server.get(account("jane@example.com"), server.token)[0] != 401:
            assert time.monotonic() < deadline, "the revoked token still works"
            time.sleep(0.1)
    finally:
        err = stop(server)
    assert "re-read" in err


def test_a_token_past_its_rate_gets_429(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    open_store(url).close()
    server = start(tmp_path, url, rate=2)
    try:
        codes = [server.get(account("x@example.com"), server.token)[0] for _ in range(12)]
    finally:
        stop(server)
    assert 429 in codes and codes[0] == 404
    assert json.loads(server.audit.read_text().splitlines()[-1])["status"] == 429


def test_serve_over_the_real_cassandra_node(cassandra, tmp_path):
    from tests.sinks.test_cassandra import fresh

    store = fresh(cassandra)
    try:
        store.write(rows())
        url = store.url
    finally:
        store.close()
    server = start(tmp_path, url, "--cassandra-username", "cassandra", "--cassandra-password-file",
                   cassandra["password_file"])
    try:
        status, body, _ = server.get(account("jane@example.com"), server.token)
        assert status == 200
        assert {(r["service"], r["kind"], r["ip"]) for r in json.loads(body)} == {
            ("pop3", "login", "203.0.113.7"), ("imap", "login", "198.51.100.4"), ("lmtp", "login", "192.0.2.25"),
            ("pop3", "pop3_delete", "203.0.113.7")}
        assert server.get(account("a/b@example.com"), server.token)[0] == 200
    finally:
        stop(server)


def test_an_agent_signs_in_looks_an_account_up_and_reads_the_verdict_in_chromium(sqlite_server):
    """Debian's Chromium, headless, through its driver: the page needs no JavaScript; the screenshot is kept
    in .artifacts/ (the path is printed)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    for need in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not os.path.exists(need):
            pytest.fail(f"{need} is missing: run scripts/e2e-deps (Debian's chromium, chromium-driver)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=420,900",
                "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.set_page_load_timeout(20)
        driver.get(sqlite_server.url + "/")
        driver.find_element(By.NAME, "token").send_keys(sqlite_server.token)
        driver.find_element(By.TAG_NAME, "button").click()
        field = driver.find_element(By.NAME, "account")
        field.send_keys("jane@example.com")
        driver.find_element(By.TAG_NAME, "button").click()
        verdict = driver.find_element(By.ID, "verdict").text
        table = driver.find_element(By.ID, "logins").text
        artifacts = ROOT / ".artifacts"
        artifacts.mkdir(exist_ok=True)
        shot = artifacts / "serve-agent-page.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        driver.get(sqlite_server.url + "/?account=" + urllib.parse.quote("<script>x</script>", safe=""))
        hostile = driver.find_element(By.TAG_NAME, "h2").text
    finally:
        driver.quit()
    assert "last POP3 login deleted 14 of 14 messages, from 203.0.113.7" in verdict
    assert "203.0.113.7" in table and "CET" in table
    assert hostile == "<script>x</script>"  # shown as text, never run
    assert shot.stat().st_size > 1000


def test_the_serve_unit_passes_systemd_analyze_and_stays_sandboxed(tmp_path):
    """deploy/harvester-serve.service: verified by systemd itself, exposure at most the daemon unit's bound."""
    import re

    from tests.test_deploy import ENTRY_POINT, MAX_EXPOSURE, SYSTEMD_ANALYZE, _analyze

    assert SYSTEMD_ANALYZE, "systemd-analyze is missing (Debian package systemd)"
    unit = ROOT / "deploy" / "harvester-serve.service"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(f"ExecStart={ENTRY_POINT} ", "ExecStart=/bin/true "))
    r = _analyze("verify", str(copy))
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    r = _analyze("security", "--offline=true", "--no-pager", str(copy))
    m = re.search(r"Overall exposure level for harvester-serve\.service: (\d+\.\d+)", r.stdout)
    assert m and float(m.group(1)) <= MAX_EXPOSURE, r.stdout


def test_serve_over_the_real_sql_servers(sql_db, tmp_path):
    """The same service over PostgreSQL and MariaDB (the plugin's table layout): nothing store-specific."""
    from tests.sinks.test_sql import store as sql_store

    s = sql_store(sql_db)
    try:
        s.write(rows())
    finally:
        s.close()
    server = start(tmp_path, sql_db["url"], "--store-password-file", sql_db["password_file"])
    try:
        status, body, _ = server.get(account("jane@example.com"), server.token)
        assert status == 200
        got = {(r["service"], r["kind"], r["ip"]) for r in json.loads(body)}
        assert {("pop3", "login", "203.0.113.7"), ("imap", "login", "198.51.100.4")} <= got
        status, body, _ = server.get(account("o'brien \"q\"@example.com"), server.token)
        assert status == 200 and json.loads(body)[0]["user"] == "o'brien \"q\"@example.com"
        assert server.get(account("nobody@example.com"), server.token)[0] == 404
    finally:
        stop(server)


def test_serve_over_the_real_redis_server(redis_server, tmp_path):
    """Over Redis in the plugin's key layout (last-login/%{service}/%{user}: one key per service)."""
    url = redis_server.rsplit("/", 1)[0] + "/13"
    s = Settings()
    s.set("redis_key", "last-login/%{service}/%{user}", "test")
    st = open_store(url, settings=s)
    try:
        st.client.flushdb()  # type: ignore[attr-defined]
        st.write(rows())
    finally:
        st.close()
    server = start(tmp_path, url, "--redis-key", "last-login/%{service}/%{user}")
    try:
        status, body, _ = server.get(account("jane@example.com"), server.token)
        assert status == 200
        assert {(r["service"], r["ip"]) for r in json.loads(body)} == {
            ("pop3", "203.0.113.7"), ("imap", "198.51.100.4"), ("lmtp", "192.0.2.25")}
        assert server.get(account("a/b@example.com"), server.token)[0] == 200
    finally:
        stop(server)


def _pki(d: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (CN=helpdesk): scripts/devtls.py."""
    subprocess.run([str(ROOT / "scripts" / "devtls.py"), str(d / "tls"), "--client-cn", "helpdesk"], check=True,
                   capture_output=True, timeout=120)
    return {n: d / "tls" / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_over_https_a_client_certificate_of_the_configured_ca_is_let_in_without_a_token(tmp_path):
    import ssl

    pki = _pki(tmp_path)
    url = f"sqlite:///{tmp_path / 'h.db'}"
    store = open_store(url)
    store.write(rows())
    store.close()
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harvester", "serve", "--store", url, "--tokens-file", str(tokens),
                             "--listen", f"127.0.0.1:{port}", "--serve-audit-file", str(tmp_path / "audit.log"),
                             "--serve-tls-cert", str(pki["server.pem"]), "--serve-tls-key", str(pki["server.key"]),
                             "--serve-client-ca", str(pki["ca.pem"])], cwd=ROOT, stderr=subprocess.PIPE, text=True)

    def get(cert: bool) -> int:
        ctx = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        if cert:
            ctx.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}{account('jane@example.com')}", context=ctx,
                                        timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status = get(cert=True)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.1)
        assert status == 200
        import socket

        with socket.create_connection(("127.0.0.1", port)):  # connects, never says a word
            assert get(cert=True) == 200  # the handshake of the silent one holds up nobody else
        assert get(cert=False) == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert '"who": "cert:helpdesk"' in (tmp_path / "audit.log").read_text()


def test_ipv6_listen_and_a_sign_in_form_that_lies_about_its_length(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    open_store(url).close()
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harvester", "serve", "--store", url, "--tokens-file", str(tokens),
                             "--listen", f"[::1]:{port}", "--serve-audit-file", str(tmp_path / "audit.log")],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    server = Server(f"http://[::1]:{port}", "", proc, tokens, tmp_path / "audit.log")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert server.get("/healthz")[0] == 200
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.1)
        import http.client

        for length, want in (("-1", 400), ("abc", 400), ("999999", 413)):
            c = http.client.HTTPConnection("::1", port, timeout=10)
            c.putrequest("POST", "/login")
            c.putheader("Content-Length", length)
            c.endheaders()
            assert c.getresponse().status == want, length
            c.close()
    finally:
        stop(server)
