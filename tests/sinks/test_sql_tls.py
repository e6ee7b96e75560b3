"""The PostgreSQL and MariaDB stores over TLS against real servers (scripts/sql-dev start --tls; each test runs on
both): the server takes TCP clients over TLS only, with a client certificate signed by its CA, and its certificate
names IP:127.0.0.1 only.

Each server here is this module's own (a temporary DIR, a free port), not the shared one of tests/sinks/test_sql.py:
a TLS-only server would refuse those tests. It is stopped when the module is done."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harvester.coalesce import Row
from harvester.config import Settings
from harvester.sinks import StoreError, open_store, sql
from tests.conftest import ROOT, SQL_SERVERS, run_cli

SCRIPT = ROOT / "scripts" / "sql-dev"
T0 = 1_795_308_723_000_000  # 2026-11-22T01:32:03Z


def sql_dev(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", params=SQL_SERVERS)
def tls_server(request) -> Iterator[dict]:
    """A private TLS-only server: {"server", "dir", "url", "password_file", "ca", "cert", "key"}."""
    # Not in pytest's temporary tree: PostgreSQL runs as its own user, who cannot enter it (sql-dev hands it DIR).
    base = Path(tempfile.mkdtemp(prefix=f"harvester-{request.param}-tls-"))
    where = [request.param, "--dir", base]
    try:
        proc = sql_dev("start", *where, "--tls", "--port", "0")
        assert proc.returncode == 0, f"scripts/sql-dev start {request.param} --tls failed:\n{proc.stderr[-4000:]}"
        tls = base / "tls"
        yield {"server": request.param, "dir": base, "url": proc.stdout.strip().splitlines()[-1],
               "password_file": base / "password", "ca": tls / "ca.pem", "cert": tls / "client.pem",
               "key": tls / "client.key", "start_stderr": proc.stderr}
    finally:
        sql_dev("stop", *where, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> dict:
    """Another throw-away CA, and a client certificate it signed: neither has anything to do with the servers."""
    d = tmp_path_factory.mktemp("stranger") / "tls"
    subprocess.run([str(ROOT / "scripts" / "devtls.py"), str(d)], check=True, capture_output=True, timeout=120)
    return {"ca": d / "ca.pem", "cert": d / "client.pem", "key": d / "client.key"}


def open_tls(srv: dict, url: str | None = None, **tls: object):
    """The store on `srv` with the password file and these sql_tls_* settings (a short connect timeout)."""
    s = Settings()
    s.set("store_password_file", str(srv["password_file"]), "test")
    s.set("sql_connect_timeout", "5", "test")
    for key, value in tls.items():
        s.set(f"sql_tls_{key}", str(value), "test")
    return open_store(url or srv["url"], settings=s)


def refused(srv: dict, url: str | None = None, **tls: object) -> str:
    """The StoreError message of a store that must not connect."""
    with pytest.raises(StoreError) as err:
        open_tls(srv, url, **tls).close()
    return str(err.value)


def all_three(srv: dict) -> dict:
    return {"ca": srv["ca"], "cert": srv["cert"], "key": srv["key"]}


def encrypted(store) -> bool:
    """Whether the server says the store's own connection is TLS (asked over that connection)."""
    cur = store.conn.cursor()
    if store.d.name == "postgresql":
        cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        return bool(cur.fetchone()[0])
    cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
    return bool(cur.fetchone()[1])


def test_rows_written_over_tls_with_the_ca_and_a_client_certificate_are_read_back_by_lookup(tls_server, capsys):
    """The usual set-up: sql_tls_ca verifies the server, sql_tls_cert/sql_tls_key answer its client certificate
    check; the rows come back through `harvester lookup` with the same settings as flags."""
    rows = [Row("jane@example.org", "imap", "login", T0, 0, "192.0.2.1", "mx1"),
            Row("jane@example.org", "pop3", "login", T0 + 1_242_000, 0, "2001:db8::7", "mx2")]
    s = open_tls(tls_server, **all_three(tls_server))
    try:
        assert encrypted(s)
        assert s.write(rows) == 2
    finally:
        s.close()
    capsys.readouterr()
    assert run_cli("lookup", "--json", "--store", tls_server["url"], "--store-password-file",
                   str(tls_server["password_file"]), "--sql-tls-ca", str(tls_server["ca"]), "--sql-tls-cert",
                   str(tls_server["cert"]), "--sql-tls-key", str(tls_server["key"]), "jane@example.org") == 0
    got = json.loads(capsys.readouterr().out)
    assert [(d["service"], d["ip"], d["node"]) for d in got] == [("pop3", "2001:db8::7", "mx2"),
                                                                 ("imap", "192.0.2.1", "mx1")]


def test_a_ca_that_did_not_sign_the_servers_certificate_is_refused_naming_sql_tls_ca(tls_server, stranger):
    why = refused(tls_server, **{**all_three(tls_server), "ca": stranger["ca"]})
    assert "certificate verify failed" in why and "check sql_tls_ca" in why


def test_the_host_name_is_verified_localhost_is_not_in_the_servers_certificate(tls_server):
    """The certificate names IP:127.0.0.1 only: the same server by the name "localhost" is not the one vouched
    for, although the CA is right and the name leads there."""
    why = refused(tls_server, tls_server["url"].replace("@127.0.0.1:", "@localhost:"), **all_three(tls_server))
    assert "does not name localhost" in why


def test_a_store_without_a_client_certificate_is_refused_naming_sql_tls_cert(tls_server):
    why = refused(tls_server, ca=tls_server["ca"])
    assert "sql_tls_cert and sql_tls_key" in why


def test_a_client_certificate_from_another_ca_is_refused(tls_server, stranger):
    why = refused(tls_server, ca=tls_server["ca"], cert=stranger["cert"], key=stranger["key"])
    assert "sql_tls_cert" in why


def test_a_client_certificate_without_sql_tls_ca_still_verifies_the_server(tls_server):
    """Without sql_tls_ca the server is checked against the system's CAs (which never signed this dev server's
    certificate), not taken on trust."""
    why = refused(tls_server, cert=tls_server["cert"], key=tls_server["key"])
    assert "certificate verify failed" in why and "sql_tls_ca is not set" in why


def test_without_sql_tls_ca_the_systems_ca_bundle_is_what_verifies_the_server(tls_server, monkeypatch):
    """The system's CAs are the bundle OpenSSL names (SSL_CERT_FILE here, holding the dev CA): the server is
    let in, by PostgreSQL's libpq too (psycopg's own OpenSSL finds no "system" CAs on Debian)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_server["ca"]))
    s = open_tls(tls_server, cert=tls_server["cert"], key=tls_server["key"])
    try:
        assert encrypted(s)
    finally:
        s.close()


def test_the_system_ca_bundle_handed_to_libpq_is_a_file_without_ssl_cert_file_too(monkeypatch):
    """libpq's own "system" would look where psycopg[binary]'s OpenSSL was built to (/usr/lib/psycopg-openssl,
    absent): harvester names the bundle file Python's OpenSSL uses instead."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    assert Path(sql.system_ca_bundle()).is_file()


def test_a_plain_connection_is_refused_by_the_server(tls_server):
    """What carried the rows above was TLS: the server refuses the same user and password in plain text, and a
    store without TLS settings gets an error that points at them."""
    password = Path(tls_server["password_file"]).read_text().splitlines()[0]
    port = int(tls_server["url"].rsplit(":", 1)[1].split("/")[0])
    if tls_server["server"] == "postgresql":
        import psycopg

        with pytest.raises(psycopg.OperationalError, match="no encryption"):
            psycopg.connect(host="127.0.0.1", port=port, user="harvester", password=password, dbname="harvester",
                            sslmode="disable", connect_timeout=5).close()
    else:
        import pymysql

        with pytest.raises(pymysql.err.OperationalError, match="Access denied"):
            pymysql.connect(host="127.0.0.1", port=port, user="harvester", password=password,
                            database="harvester", ssl_disabled=True, connect_timeout=5).close()
    assert "sql_tls_ca" in refused(tls_server)


def test_tls_files_that_cannot_be_used_are_named_by_their_setting_before_any_connection(tls_server, tmp_path):
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    assert "sql_tls_ca" in refused(tls_server, **{**all_three(tls_server), "ca": not_pem})
    assert "sql_tls_key" in refused(tls_server, **{**all_three(tls_server), "key": tmp_path / "missing.key"})
    assert "sql_tls_cert" in refused(tls_server, **{**all_three(tls_server), "cert": not_pem})
    locked = tmp_path / "locked.key"
    subprocess.run(["openssl", "pkey", "-in", str(tls_server["key"]), "-aes256", "-passout", "pass:secret", "-out",
                    str(locked)], check=True, capture_output=True)
    assert "the key is encrypted" in refused(tls_server, **{**all_three(tls_server), "key": locked})


def test_the_script_prints_the_tls_settings_and_a_restart_of_the_directory_keeps_tls(tls_server):
    """`start` told the sql_tls_* settings; stopped and started again without --tls, DIR is the same TLS-only
    server (the flag is kept by the directory), on the same port."""
    for line in (f'sql_tls_ca = "{tls_server["ca"]}"', f'sql_tls_cert = "{tls_server["cert"]}"',
                 f'sql_tls_key = "{tls_server["key"]}"'):
        assert line in tls_server["start_stderr"]
    stop = sql_dev("stop", tls_server["server"], "--dir", tls_server["dir"], timeout=120)
    assert stop.returncode == 0, stop.stderr
    again = sql_dev("start", tls_server["server"], "--dir", tls_server["dir"])
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == tls_server["url"]
    assert f'sql_tls_ca = "{tls_server["ca"]}"' in again.stderr
    assert "sql_tls_ca" in refused(tls_server)
    open_tls(tls_server, **all_three(tls_server)).close()
