"""Shared fixtures: where the real Dovecot samples are, and a CLI runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harvester import cli, config

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT.parent / "shared" / "samples" / "dovecot-2.3.19"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under the README's test command (HARVESTER_NO_SKIPS=1) a skip is a failure: a test that would skip for
    want of a real part (promtool, the native module) must say so loudly in CI, not pass unseen."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("HARVESTER_NO_SKIPS") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under scripts/test, where nothing may be: {report.longrepr}"


@pytest.fixture(autouse=True)
def no_site_config(monkeypatch, tmp_path):
    """Neither $HARVESTER_CONFIG nor /etc/harvester/harvester.toml of the machine may leak into a test."""
    monkeypatch.delenv("HARVESTER_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "no-such-config.toml")


@pytest.fixture
def samples() -> Path:
    """Real Dovecot 2.3.19 output; CI has ../shared beside the checkout, so it must be there."""
    assert SAMPLES.is_dir(), f"{SAMPLES} is missing: the golden tests need ../shared/samples"
    return SAMPLES


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "h.db")


def run_cli(*args: str) -> int:
    return cli.main(list(args))


def export_rows(url: str, capsys) -> list[dict]:
    capsys.readouterr()
    assert run_cli("export", "--store", url) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.fixture(scope="session")
def cassandra(tmp_path_factory) -> dict:
    """A real Cassandra node with PasswordAuthenticator (scripts/cassandra-dev start --auth; reused when up).

    Never skipped: if it cannot start, every Cassandra test fails with the launcher's output.
    $HARVESTER_TEST_CASSANDRA=HOST:PORT points the tests at a node already up (user cassandra/cassandra)."""
    import os
    import subprocess

    secret = tmp_path_factory.mktemp("cassandra") / "password"
    secret.write_text("cassandra\n")
    if os.environ.get("HARVESTER_TEST_CASSANDRA"):
        return {"contact": os.environ["HARVESTER_TEST_CASSANDRA"], "password_file": str(secret)}
    proc = subprocess.run([str(ROOT / "scripts" / "cassandra-dev"), "start", "--auth"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"scripts/cassandra-dev start --auth failed:\n{proc.stderr[-4000:]}"
    contact = proc.stdout.strip().splitlines()[-1]
    return {"contact": contact, "password_file": str(secret)}


class PrivateNode:
    """A Cassandra node of a test's own (scripts/cassandra-dev --dir), for stopping and starting it again
    mid-test: the outage scenarios. Started on a free port; `start()` again reuses that port."""

    def __init__(self, directory: Path) -> None:
        self.cmd = [str(ROOT / "scripts" / "cassandra-dev")]
        self.dir = ["--dir", str(directory)]
        self.contact = ""

    def start(self) -> str:
        import subprocess

        port = self.contact.rsplit(":", 1)[1] if self.contact else "0"
        proc = subprocess.run([*self.cmd, "start", *self.dir, "--port", port, "--heap", "512m"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        self.contact = proc.stdout.strip()
        return self.contact

    def outage_store(self, t0: int, **settings: object):
        """(store, coalescer): a store on this node (keyspace `outage`, replication 1) that took one row, then
        the node stopped: where the outage scenarios begin."""
        from harvester.coalesce import Coalescer
        from harvester.config import Settings
        from harvester.sinks.base import flush
        from harvester.sinks.cassandra import CassandraStore

        s = Settings()
        s.set("cassandra_replication", "{'class': 'SimpleStrategy', 'replication_factor': 1}", "test")
        for key, value in settings.items():
            s.set(key, value, "test")
        store = CassandraStore(f"cassandra://{self.contact}/outage", options=s.store_options(CassandraStore.Options))
        store.apply_schema()
        sink = Coalescer()
        sink.logins.put(b"jane", "imap", t0, 0, b"192.0.2.1", b"mx1", "imap")
        assert flush(sink, store) == 1
        self.stop()
        return store, sink

    def stop(self, check: bool = True) -> None:
        import subprocess

        subprocess.run([*self.cmd, "stop", *self.dir], check=check, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def log_lines(tmp_path_factory) -> list[bytes]:
    """9,000 lines of the generated maillog (400 users, UTC), for the daemon scenarios."""
    from tests import corpus

    src = tmp_path_factory.mktemp("corpus") / "maillog"
    corpus.write_maillog(src, lines=9000, users=400, tz="UTC")
    return src.read_bytes().splitlines(keepends=True)


SQL_SERVERS = ("postgresql", "mariadb")


@pytest.fixture(scope="session", params=SQL_SERVERS)
def sql_server(request) -> dict:
    """A real PostgreSQL or MariaDB (scripts/sql-dev start; reused when up, as scripts/test starts them).

    Never skipped: if it cannot start, every test on it fails with the launcher's output."""
    import subprocess

    proc = subprocess.run([str(ROOT / "scripts" / "sql-dev"), "start", request.param], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"scripts/sql-dev start {request.param} failed:\n{proc.stderr[-4000:]}"
    url = proc.stdout.strip().splitlines()[-1]
    return {"server": request.param, "url": url, "password_file": str(ROOT / ".sql" / request.param / "password")}


@pytest.fixture
def sql_db(sql_server) -> dict:
    """A fresh, empty database of its own on `sql_server`: {"url", "password_file", "server", "admin"}; admin
    runs SQL in it (to make an iRedMail or Modoboa table as they are)."""
    import uuid

    name = "t_" + uuid.uuid4().hex[:12]
    base, _, _ = sql_server["url"].rpartition("/")
    password = Path(sql_server["password_file"]).read_text().splitlines()[0]
    admin = SqlAdmin(sql_server["server"], base.split("@")[1], password)
    admin.run(f"CREATE DATABASE {name}", database="harvester")
    admin.database = name
    yield {**sql_server, "url": f"{base}/{name}", "admin": admin}
    admin.run(f"DROP DATABASE {name}", database="harvester")


class SqlAdmin:
    """Runs SQL as the test servers' user, outside the store (what an operator or Modoboa would do)."""

    def __init__(self, server: str, hostport: str, password: str) -> None:
        self.server, self.password = server, password
        self.host, port = hostport.split(":")
        self.port = int(port)
        self.database = ""

    def run(self, sql: str, params: tuple = (), database: str | None = None) -> list[tuple]:
        if self.server == "postgresql":
            import psycopg

            with psycopg.connect(host=self.host, port=self.port, user="harvester", password=self.password,
                                 dbname=database or self.database, autocommit=True) as c:
                cur = c.execute(sql, params or None)
                return list(cur.fetchall()) if cur.description else []
        import pymysql

        c = pymysql.connect(host=self.host, port=self.port, user="harvester", password=self.password,
                            database=database or self.database, autocommit=True, charset="utf8mb4",
                            init_command="SET time_zone = '+00:00'")
        try:
            cur = c.cursor()
            cur.execute(sql, params or None)
            return list(cur.fetchall())
        finally:
            c.close()


@pytest.fixture(scope="session")
def redis_server() -> str:
    """A real redis-server on loopback (scripts/redis-dev start: Debian's package, a private directory; reused
    when up). Never skipped: if it cannot start, every Redis test fails with the launcher's output."""
    import subprocess

    proc = subprocess.run([str(ROOT / "scripts" / "redis-dev"), "start"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"scripts/redis-dev start failed (scripts/e2e-deps installs redis-server):\n" \
                                 f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout.strip().splitlines()[-1]


class PrivateRedis:
    """A redis-server of a test's own (scripts/redis-dev --dir), stopped and started again mid-test: the restart
    scenarios. Started on a free port; `start()` again reuses that port (and its append-only file)."""

    def __init__(self, directory: Path) -> None:
        self.cmd = [str(ROOT / "scripts" / "redis-dev")]
        self.dir = ["--dir", str(directory)]
        self.url = ""

    def start(self) -> str:
        import subprocess

        proc = subprocess.run([*self.cmd, "start", *self.dir], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-3000:]
        self.url = proc.stdout.strip().splitlines()[-1]
        return self.url

    def stop(self, check: bool = True) -> None:
        import subprocess

        subprocess.run([*self.cmd, "stop", *self.dir], check=check, capture_output=True, timeout=60)
