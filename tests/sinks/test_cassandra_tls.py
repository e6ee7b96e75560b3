"""The fleet store over TLS against real Cassandra nodes (scripts/cassandra-dev start --tls / --tls-client-auth).

Each node here is this module's own (in a temporary DIR, on a free port), not the shared --auth node of the other
Cassandra tests: a TLS-only CQL port would refuse them. The nodes are stopped when the module is done."""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harvester.coalesce import Row
from harvester.config import Settings
from harvester.sinks import StoreError
from harvester.sinks.cassandra import CassandraStore
from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "cassandra-dev"
T0 = 1_795_308_723_000_000  # 2026-11-22T01:32:03Z
_ks = itertools.count()


def run_script(*args: str | Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def node(tmp_path_factory, name: str, flag: str) -> Iterator[dict]:
    """Start a node of its own with `flag`; yield its contact point and TLS files; stop it afterwards."""
    base = tmp_path_factory.mktemp(name)
    try:
        proc = run_script("start", flag, "--dir", base, "--port", "0", "--heap", "512m")
        assert proc.returncode == 0, f"scripts/cassandra-dev start {flag} failed:\n{proc.stderr[-4000:]}"
        tls = base / "run" / "tls"
        yield {"dir": base, "contact": proc.stdout.strip().splitlines()[-1], "ca": tls / "ca.pem",
               "cert": tls / "client.pem", "key": tls / "client.key"}
    finally:
        run_script("stop", "--dir", base, timeout=120)


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory) -> Iterator[dict]:
    """A node whose CQL port speaks TLS only; it asks for no client certificate."""
    yield from node(tmp_path_factory, "cassandra-tls", "--tls")


@pytest.fixture(scope="module")
def mtls_node(tmp_path_factory) -> Iterator[dict]:
    """A TLS-only node that also requires a client certificate signed by its CA."""
    yield from node(tmp_path_factory, "cassandra-mtls", "--tls-client-auth")


@pytest.fixture(scope="module")
def stranger_ca(tmp_path_factory) -> Path:
    """A CA that signed none of the nodes' certificates."""
    d = tmp_path_factory.mktemp("stranger-ca") / "tls"
    subprocess.run([ROOT / "scripts" / "devtls.py", d], check=True, capture_output=True, timeout=120)
    return d / "ca.pem"


def store(n: dict, **settings) -> CassandraStore:
    """A store on a keyspace of its own on node `n` with these settings (a short connect timeout)."""
    s = Settings()
    s.set("cassandra_replication", "{'class': 'SimpleStrategy', 'replication_factor': 1}", "test")
    s.set("cassandra_connect_timeout", 5, "test")
    for k, v in settings.items():
        s.set(k, str(v), "test")
    url = f"cassandra://{n['contact']}/tls{int(time.time())}_{next(_ks)}"
    return CassandraStore(url, options=s.store_options(CassandraStore.Options))


def refused(n: dict, **settings) -> str:
    """The StoreError message of a store that must not connect; fails if it connects or takes too long."""
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect to Cassandra") as err:
        store(n, **settings).close()
    assert time.monotonic() - t0 < 30, "refusing should take about the connect timeout at most, not hang"
    return str(err.value)


def round_trip(s: CassandraStore) -> None:
    try:
        s.apply_schema()
        rows = [Row("jane@example.org", "imap", "login", T0, 0, "192.0.2.1", "mx1"),
                Row("jane@example.org", "pop3", "login", T0 + 1_242_533, 6, "2001:db8::7", "mx2")]
        assert s.write(rows) == 2
        assert s.lookup("jane@example.org") == [rows[1], rows[0]]
    finally:
        s.close()


def test_a_store_with_the_nodes_ca_writes_and_reads_rows_over_tls(tls_node):
    """cassandra_tls_ca alone is the usual set-up: TLS, the node's chain verified, no client certificate."""
    round_trip(store(tls_node, cassandra_tls_ca=tls_node["ca"]))


def test_a_store_without_tls_settings_is_refused_by_a_tls_only_node_with_a_clear_error(tls_node):
    """A forgotten cassandra_tls_ca must end in a StoreError naming the node, not a traceback or a hang."""
    assert tls_node["contact"] in refused(tls_node)


def test_a_ca_that_did_not_sign_the_nodes_certificate_is_refused(tls_node, stranger_ca):
    """Verifying the chain is the point of cassandra_tls_ca: a node the CA does not vouch for is not used."""
    assert "certificate verify failed" in refused(tls_node, cassandra_tls_ca=stranger_ca)


@pytest.fixture
def other_address(tls_node) -> Iterator[dict]:
    """The TLS node reached at 127.0.0.2, an address its certificate (IP:127.0.0.1) does not name: a plain TCP
    relay in front of it, so the TLS handshake is still the node's own."""
    port = int(tls_node["contact"].rsplit(":", 1)[1])
    listener = socket.create_server(("127.0.0.2", 0))
    stop = threading.Event()

    def pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield dict(tls_node, contact=f"127.0.0.2:{listener.getsockname()[1]}")
    finally:
        stop.set()
        listener.close()


def test_a_node_whose_certificate_does_not_name_its_address_is_refused_saying_how_to_fix_it(other_address):
    """cassandra_tls_ca verifies the node's address too (the driver dials addresses: a contact point's name is
    resolved first): a certificate that vouches for 127.0.0.1 is not good for 127.0.0.2."""
    why = refused(other_address, cassandra_tls_ca=other_address["ca"])
    assert "127.0.0.2" in why and "subjectAltName" in why and "cassandra_tls_check_hostname = no" in why


def test_with_the_address_check_off_the_chain_alone_is_verified(other_address, stranger_ca):
    """cassandra_tls_check_hostname = no (fleets whose certificates carry DNS names only) lets the node in at an
    address its certificate does not name, and still refuses a CA that signed nothing."""
    round_trip(store(other_address, cassandra_tls_ca=other_address["ca"], cassandra_tls_check_hostname="no"))
    assert "certificate verify failed" in refused(other_address, cassandra_tls_ca=stranger_ca,
                                                  cassandra_tls_check_hostname="no")


def test_the_script_tells_the_tls_files_and_refuses_to_reuse_the_node_in_another_tls_mode(tls_node):
    """`status` prints the harvester settings for the PEM files; a start asking for another TLS mode must not
    hand out the contact point of a node that would refuse the caller."""
    status = run_script("status", "--dir", tls_node["dir"], timeout=60)
    assert status.returncode == 0, status.stderr
    assert "TLS" in status.stdout.splitlines()[0]
    assert f'cassandra_tls_ca = "{tls_node["ca"]}"' in status.stdout
    for other in ([], ["--tls-client-auth"]):
        proc = run_script("start", *other, "--dir", tls_node["dir"], timeout=60)
        assert proc.returncode == 1 and proc.stdout == ""
        assert "already up with --tls" in proc.stderr


def test_a_store_with_a_client_certificate_signed_by_the_nodes_ca_is_let_in(mtls_node):
    """cassandra_tls_cert and cassandra_tls_key answer the node's require_client_auth."""
    round_trip(store(mtls_node, cassandra_tls_ca=mtls_node["ca"], cassandra_tls_cert=mtls_node["cert"],
                     cassandra_tls_key=mtls_node["key"]))


def test_a_store_without_a_client_certificate_is_refused_when_the_node_requires_one(mtls_node):
    """Trusting the node is not enough when the node wants to know the client."""
    refused(mtls_node, cassandra_tls_ca=mtls_node["ca"])


def test_a_client_certificate_from_another_ca_is_refused(mtls_node, tls_node):
    """The node trusts only client certificates its own CA signed (the other node's CA is a stranger here)."""
    refused(mtls_node, cassandra_tls_ca=mtls_node["ca"], cassandra_tls_cert=tls_node["cert"],
            cassandra_tls_key=tls_node["key"])
