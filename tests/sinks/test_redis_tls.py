"""The Redis store over rediss:// against a real redis-server speaking TLS only (scripts/redis-dev start --tls).

The server is this module's own (in a temporary DIR, on a free port), not the shared one of tests/sinks/
test_redis.py: its port speaks TLS only and requires a client certificate its CA signed (tls-auth-clients yes).
Its certificate names IP:127.0.0.1 and no DNS name, so "localhost" proves the host name is checked. The server
is stopped when the module is done."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harvester.config import Settings
from harvester.events import Row
from harvester.sinks import StoreError, open_store
from harvester.sinks.redis import COMPANION, RedisStore
from tests.conftest import ROOT, run_cli

SCRIPT = ROOT / "scripts" / "redis-dev"
T0 = 1_795_308_723_123_456  # 2026-11-22T00:52:03.123456Z


def run_script(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict]:
    """The TLS-only server: its rediss:// URL, its DIR and the TLS files redis-dev made (CA, client pair)."""
    base = tmp_path_factory.mktemp("redis-tls")
    try:
        proc = run_script("start", "--tls", "--dir", base, "--port", "0")
        assert proc.returncode == 0, (f"scripts/redis-dev start --tls failed (scripts/e2e-deps installs "
                                      f"redis-server):\n{proc.stderr[-3000:]}")
        tls = base / "tls"
        yield {"url": proc.stdout.strip().splitlines()[-1], "dir": base, "stderr": proc.stderr,
               "redis_tls_ca": tls / "ca.pem", "redis_tls_cert": tls / "client.pem",
               "redis_tls_key": tls / "client.key"}
    finally:
        run_script("stop", "--dir", base)


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> Path:
    """Another CA and a client certificate it signed (scripts/devtls.py): neither is the server's."""
    d = tmp_path_factory.mktemp("stranger-tls") / "tls"
    proc = subprocess.run([str(ROOT / "scripts" / "devtls.py"), str(d)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return d


def trusted(server: dict) -> dict:
    """The settings of a client the server lets in: its CA and the client certificate."""
    return {k: server[k] for k in ("redis_tls_ca", "redis_tls_cert", "redis_tls_key")}


def store(url: str, **settings: object) -> RedisStore:
    s = Settings()
    for key, value in settings.items():
        s.set(key, str(value), "test")
    st = open_store(url, settings=s)
    assert isinstance(st, RedisStore)
    return st


def refused(url: str, **settings: object) -> str:
    """The message of the StoreError a store that must not connect ends in."""
    with pytest.raises(StoreError) as err:
        store(url, **settings).close()
    return str(err.value)


def test_rows_written_over_rediss_with_the_ca_and_a_client_certificate_are_the_plugins_keys_and_read_back(
        server, capsys):
    st = store(server["url"], **trusted(server))
    try:
        st.client.flushdb()
        jane = Row("jane.doe@example.com", "imap", "login", T0, 6, "192.0.2.1", "mx1")
        assert st.write([jane, Row("john@example.com", "pop3", "login", T0 - 5_000_000, 0, "2001:db8::7", "mx2")]) == 2
        assert st.client.get("last-login/jane.doe@example.com") == b"1795308723"  # as the plugin writes it
        assert st.client.hgetall(f"{COMPANION}last-login/jane.doe@example.com") == {
            b"service": b"imap", b"ip": b"192.0.2.1", b"node": b"mx1", b"us": str(T0).encode(), b"digits": b"6",
            b"user": b"jane.doe@example.com"}
        assert st.lookup("jane.doe@example.com") == [jane]
    finally:
        st.close()
    capsys.readouterr()
    flags = [x for k, v in trusted(server).items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert run_cli("lookup", "--store", server["url"], *flags, "john@example.com") == 0
    assert "2001:db8::7" in capsys.readouterr().out


def test_a_ca_that_did_not_sign_the_servers_certificate_is_refused_naming_redis_tls_ca(server, stranger):
    msg = refused(server["url"], **{**trusted(server), "redis_tls_ca": stranger / "ca.pem"})
    assert "certificate verify failed" in msg and f"check redis_tls_ca: {stranger / 'ca.pem'}" in msg


def test_without_redis_tls_ca_the_systems_cas_are_asked_and_refuse_a_private_ca(server):
    msg = refused(server["url"], **{**trusted(server), "redis_tls_ca": ""})
    assert "check redis_tls_ca: none of the system's CAs signed" in msg


def test_localhost_is_refused_as_the_servers_certificate_names_only_127_0_0_1(server):
    """The host name is verified: the same server, the same CA, a name its certificate does not hold."""
    msg = refused(server["url"].replace("127.0.0.1", "localhost"), **trusted(server))
    assert "Hostname mismatch" in msg and "the server's certificate is not for 'localhost'" in msg


def test_a_store_without_a_client_certificate_is_refused_naming_redis_tls_cert(server):
    msg = refused(server["url"], redis_tls_ca=server["redis_tls_ca"])
    assert "does it require a client certificate? set redis_tls_cert and redis_tls_key" in msg


def test_a_client_certificate_another_ca_signed_is_refused(server, stranger):
    msg = refused(server["url"], redis_tls_ca=server["redis_tls_ca"], redis_tls_cert=stranger / "client.pem",
                  redis_tls_key=stranger / "client.key")
    assert f"check redis_tls_cert: is {stranger / 'client.pem'} signed by a CA the server trusts" in msg


def test_plain_redis_to_the_tls_port_fails_saying_the_url_should_be_rediss(server):
    msg = refused(server["url"].replace("rediss://", "redis://"))
    assert "cannot connect to Redis at 127.0.0.1" in msg and "then the URL is rediss://" in msg


def test_rediss_to_a_plain_port_fails_asking_whether_it_is_the_plain_port(server, redis_server):
    """The other way round: rediss:// to the plain dev server (the `redis_server` fixture) must not hint at client
    certificates."""
    plain = redis_server.replace("redis://", "rediss://")
    msg = refused(plain, **trusted(server))
    assert "the server's plain port?" in msg and "redis_tls_cert" not in msg


def test_tls_settings_with_a_plain_redis_url_are_an_error(server):
    for setting in ("redis_tls_ca", "redis_tls_cert", "redis_tls_key"):
        msg = refused(server["url"].replace("rediss://", "redis://"), **{setting: server[setting]})
        assert "redis_tls_* is set but the URL is not rediss://" in msg


@pytest.mark.parametrize(("change", "expected"), [
    ({"redis_tls_ca": "/nonexistent/ca.pem"}, "redis_tls_ca /nonexistent/ca.pem: cannot read"),
    ({"redis_tls_key": "/nonexistent/client.key"}, "redis_tls_key /nonexistent/client.key: cannot read"),
    ({"redis_tls_cert": ""}, "redis_tls_key is set but redis_tls_cert is not"),
    ({"redis_tls_ca": ROOT / "README.md"}, "redis_tls_ca " + str(ROOT / "README.md") + ": not a PEM CA certificate"),
    ({"redis_tls_key": "ca.key"}, "not a PEM certificate and its key (KEY_VALUES_MISMATCH)"),
])
def test_tls_files_that_cannot_be_used_are_refused_naming_their_setting(server, change, expected):
    settings = {**trusted(server), **change}
    if settings["redis_tls_key"] == "ca.key":  # a key, but not the client certificate's
        settings["redis_tls_key"] = server["redis_tls_ca"].with_name("ca.key")
    assert expected in refused(server["url"], **settings)


def test_redis_dev_prints_the_tls_settings_and_a_later_start_without_tls_keeps_it(server):
    for line in ('redis_tls_ca = "', 'redis_tls_cert = "', 'redis_tls_key = "'):
        assert line in server["stderr"]
    status = run_script("status", "--dir", server["dir"])
    assert status.returncode == 0 and status.stdout.startswith(f"running {server['url']}")
    assert f'redis_tls_ca = "{server["redis_tls_ca"]}"' in status.stdout
    assert run_script("stop", "--dir", server["dir"]).returncode == 0
    again = run_script("start", "--dir", server["dir"])  # no --tls: the directory remembers it
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == server["url"]
    st = store(server["url"], **trusted(server))
    try:
        assert st.client.ping()
    finally:
        st.close()


def test_schema_gives_redis_cli_the_tls_files(capsys):
    capsys.readouterr()
    assert run_cli("schema", "--store", "rediss://192.0.2.1:6380/2", "--redis-tls-ca", "/etc/h/ca.pem",
                   "--redis-tls-cert", "/etc/h/client.pem", "--redis-tls-key", "/etc/h/client.key") == 0
    assert ("redis-cli -h 192.0.2.1 -p 6380 -n 2 --tls --cacert '/etc/h/ca.pem' --cert '/etc/h/client.pem' "
            "--key '/etc/h/client.key' GET 'last-login/jane.doe@example.com'") in capsys.readouterr().out
