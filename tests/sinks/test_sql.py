"""The SQL stores against real PostgreSQL and MariaDB servers (each test runs on both): every layout,
newest-wins in one statement, hostile user names, concurrent backfills, a restart mid-traffic."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from harvester.coalesce import Coalescer, Row
from harvester.config import Settings
from harvester.sinks import StoreError, open_store
from harvester.sinks.base import PartialWrite, flush
from tests import corpus
from tests.conftest import ROOT

T0 = 1_795_308_723_000_000  # 2026-11-22T01:32:03Z


def store(db: dict, **settings: object):
    return open_store(db["url"], settings=settings_for(db, **settings))


def settings_for(db: dict, **settings: object) -> Settings:
    s = Settings()
    s.set("store_password_file", db["password_file"], "test")
    for key, value in settings.items():
        s.set(key, value, "test")
    return s


def login(t: int, ip: str | None = "192.0.2.1", user: str = "jane@example.org", service: str = "imap",
          node: str = "mx1") -> Row:
    return Row(user, service, "login", t, 0 if t % 1_000_000 == 0 else 3, ip, node)


def test_per_service_is_the_plugins_table_and_ip_and_node_move_with_the_time(sql_db):
    s = store(sql_db)
    try:
        assert s.write([login(T0 + 5_000, "192.0.2.1"), login(T0, "192.0.2.7", service="pop3")]) == 2
        s.write([login(T0 - 60_000_000, "192.0.2.2", node="old")])  # a replayed older line: changes nothing
        assert [(r.service, r.time_us, r.ip, r.node) for r in s.lookup("jane@example.org")] == [
            ("imap", T0 + 5_000, "192.0.2.1", "mx1"), ("pop3", T0, "192.0.2.7", "mx1")]
        s.write([login(T0 + 5_000, "192.0.2.3", node="mx3")])  # an equal time: the later line wins
        assert s.lookup("jane@example.org")[0][5:7] == ("192.0.2.3", "mx3")
        # The plugin's reader sees its own columns: milliseconds in last_access.
        got = sql_db["admin"].run("SELECT userid, service, last_access, last_ip FROM last_login ORDER BY service")
        assert [tuple(r) for r in got] == [("jane@example.org", "imap", (T0 + 5_000) // 1000, "192.0.2.3"),
                                           ("jane@example.org", "pop3", T0 // 1000, "192.0.2.7")]
    finally:
        s.close()


def test_other_events_go_to_last_event_only_for_accounts_with_a_login(sql_db):
    s = store(sql_db)
    try:
        fail = Row("jane@example.org", "imap", "auth_fail", T0 + 1_000_000, 0, "198.51.100.9", "mx1", "x")
        spray = Row("nobody@example.org", "imap", "auth_fail", T0, 0, "198.51.100.9", "mx1")
        assert s.write([fail, spray, login(T0)]) == 3  # the event first: the batch's login still counts
        assert [r.kind for r in s.lookup("jane@example.org")] == ["login", "auth_fail"]
        assert s.lookup("nobody@example.org") == []
    finally:
        s.close()


HOSTILE = ["o'brien@example.org", 'a"b@example.org', "x>y,z w@example.org", "back\\slash@example.org",
           "jürgen@bücher.example",
           "名前@例え.jp", "🙂@example.org", "'; DROP TABLE last_login; --", "Jane@example.org"]


def test_hostile_user_names_are_stored_verbatim_and_oversized_ones_set_aside(sql_db):
    s = store(sql_db)
    try:
        s.write([login(T0, user="jane@example.org")])
        rows = [login(T0 + i * 1_000_000, user=u) for i, u in enumerate(HOSTILE, 1)]
        assert s.write(rows) == len(rows)
        for r in rows:
            assert [(x.user, x.time_us) for x in s.lookup(r.user)] == [(r.user, r.time_us)]
        assert s.lookup("jane@example.org")[0].time_us == T0  # Jane and jane are two accounts
        too_long = login(T0, user="x" * 300)
        with pytest.raises(PartialWrite) as e:
            s.write([too_long, login(T0, user="ok@example.org")])
        assert e.value.failed == [] and e.value.acknowledged == 1 and e.value.refused[0][0] == too_long
        assert len(list(s.export())) == len(HOSTILE) + 2
    finally:
        s.close()


def test_iredmail_table_as_iredmail_creates_it_gets_unix_seconds_domain_and_lda(sql_db):
    admin = sql_db["admin"]
    with pytest.raises(StoreError, match="no table last_login.*never creates it"):
        store(sql_db, sql_layout="iredmail")
    admin.run("CREATE TABLE last_login (username VARCHAR(255) NOT NULL DEFAULT '', domain VARCHAR(255) NOT NULL "
              "DEFAULT '', imap INTEGER DEFAULT NULL, PRIMARY KEY (username))")
    with pytest.raises(StoreError, match=r"lacks the column\(s\) pop3, lda .*never alters"):
        store(sql_db, sql_layout="iredmail")
    admin.run("ALTER TABLE last_login ADD COLUMN pop3 INTEGER DEFAULT NULL")
    admin.run("ALTER TABLE last_login ADD COLUMN lda INTEGER DEFAULT NULL")
    s = store(sql_db, sql_layout="iredmail")
    try:
        s.write([login(T0 + 500_000), login(T0 + 9_000_000, service="webmail"), login(T0, service="pop3"),
                 login(T0 + 3_000_000, service="lmtp"), login(T0, service="submission")])
        s.write([login(T0 + 1_000_000)])  # older than the webmail login in the same column
        got = admin.run("SELECT username, domain, imap, pop3, lda FROM last_login")
        assert [tuple(r) for r in got] == [("jane@example.org", "example.org", (T0 + 9_000_000) // 10**6,
                                            T0 // 10**6, (T0 + 3_000_000) // 10**6)]
        assert s.skipped() == {"submission": 1}
        assert [(r.service, r.time_us) for r in s.lookup("jane@example.org")] == [
            ("imap", T0 + 9_000_000), ("lmtp", T0 + 3_000_000), ("pop3", T0)]
    finally:
        s.close()


def modoboa_core_user(db: dict) -> None:
    """core_user as Modoboa's migrations make it (Django's AbstractUser and Modoboa's own fields)."""
    stamp, ident = ("timestamp with time zone", "serial") if db["server"] == "postgresql" else (
        "datetime(6)", "integer AUTO_INCREMENT")
    db["admin"].run(
        f"CREATE TABLE core_user (id {ident} NOT NULL PRIMARY KEY, password varchar(128) NOT NULL, "
        f"last_login {stamp} NULL, is_superuser boolean NOT NULL, username varchar(254) NOT NULL UNIQUE, "
        "first_name varchar(150) NOT NULL, last_name varchar(150) NOT NULL, email varchar(254) NOT NULL, "
        f"is_staff boolean NOT NULL, is_active boolean NOT NULL, date_joined {stamp} NOT NULL, "
        "is_local boolean NOT NULL, master_user boolean NOT NULL, language varchar(10) NOT NULL, "
        "phone_number varchar(128) NULL, secondary_email varchar(254) NULL, tfa_enabled boolean NOT NULL)")
    for name in ("jane@example.org", "o'brien@example.org"):
        db["admin"].run("INSERT INTO core_user (password, is_superuser, username, first_name, last_name, email, "
                        "is_staff, is_active, date_joined, is_local, master_user, language, tfa_enabled) VALUES "
                        "('x', false, %s, '', '', %s, false, true, %s, true, false, 'en', false)",
                        (name, name, datetime(2020, 1, 1, tzinfo=UTC)))


def test_modoboa_updates_last_login_of_existing_accounts_only_with_the_newest_of_its_services(sql_db):
    modoboa_core_user(sql_db)
    s = store(sql_db, sql_layout="modoboa")
    try:
        s.write([login(T0 + 123_456), login(T0 + 1_000_000, service="pop3"), login(T0 + 9_000_000, service="lmtp"),
                 login(T0, user="ghost@example.org"), login(T0 + 5, user="o'brien@example.org", service="webmail")])
        s.write([login(T0 - 10**9)])  # older: never moves it back
        got = {u: t for u, t in sql_db["admin"].run("SELECT username, last_login FROM core_user")}
        assert set(got) == {"jane@example.org", "o'brien@example.org"}  # never an insert
        assert got["jane@example.org"].replace(tzinfo=UTC) == datetime.fromtimestamp((T0 + 1_000_000) / 1e6, UTC)
        assert [(r.service, r.time_us) for r in s.lookup("o'brien@example.org")] == [("imap+pop3+webmail", T0 + 5)]
        with pytest.raises(StoreError, match="never deletes"):
            s.forget("jane@example.org")
    finally:
        s.close()


def test_modoboa_without_core_user_names_it_and_schema_apply_creates_nothing(sql_db, capsys):
    from tests.conftest import run_cli

    args = ["schema", "--store", sql_db["url"], "--store-password-file", sql_db["password_file"],
            "--sql-layout", "modoboa"]
    assert run_cli(*args, "--apply") == 2
    assert "no table core_user" in capsys.readouterr().err
    modoboa_core_user(sql_db)
    assert run_cli(*args, "--apply") == 0
    assert "has what sql_layout = modoboa needs" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["per_user", "custom"])
def test_per_user_and_custom_layouts_keep_a_time_and_ip_column_per_service(sql_db, layout):
    extra: dict = {}
    if layout == "custom":
        sql_db["admin"].run("CREATE TABLE mine (who VARCHAR(200) PRIMARY KEY, seen_imap BIGINT, ip_imap VARCHAR(40), "
                            "seen_pop INTEGER)")
        extra = {"sql_table": "mine", "sql_user_column": "who", "sql_columns": "imap=seen_imap:ip_imap,pop3=seen_pop"}
    s = store(sql_db, sql_layout=layout, **extra)
    try:
        s.write([login(T0 + 7_000, "192.0.2.1"), login(T0, None, service="pop3"), login(T0, service="sieve")])
        s.write([login(T0 - 1_000_000, "192.0.2.9")])
        got = [(r.service, r.time_us, r.ip) for r in s.lookup("jane@example.org")]
        assert got == [("imap", T0 + 7_000, "192.0.2.1"), ("pop3", T0, None)] + (
            [("sieve", T0, "192.0.2.1")] if layout == "per_user" else [])
        assert s.skipped() == ({"sieve": 1} if layout == "custom" else {})
    finally:
        s.close()


def _cut_log(tmp_path, lines: int):
    log = tmp_path / "maillog"
    corpus.write_maillog(log, lines=lines, users=500, tz="UTC")
    text = log.read_bytes().splitlines(keepends=True)

    def cut(i: int) -> int:  # move a cut to the next new second, so no equal-time pair straddles it
        while i < len(text) and text[i][:15] == text[i - 1][:15]:
            i += 1
        return i

    a, b = cut(len(text) * 7 // 10), cut(len(text) * 3 // 10)
    (tmp_path / "first").write_bytes(b"".join(text[:a]))
    (tmp_path / "second").write_bytes(b"".join(text[b:]))
    return log


def _export(url: str, cfg) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "harvester", "export", "--config", str(cfg), "--store", url],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return sorted((json.loads(line) for line in out.splitlines()), key=lambda d: (d["user"], d["service"]))


@pytest.mark.parametrize("layout", ["per_service", "per_user", "iredmail"])
def test_two_backfills_of_overlapping_logs_at_once_converge_on_the_newest_event(sql_db, tmp_path, layout):
    """Two harvesters write the same accounts at the same time from overlapping parts of one log; the table
    must equal a single SQLite backfill of the whole log (in what the layout keeps)."""
    log = _cut_log(tmp_path, 30_000)
    if layout == "iredmail":
        sql_db["admin"].run("CREATE TABLE last_login (username VARCHAR(255) NOT NULL DEFAULT '', domain VARCHAR(255) "
                            "NOT NULL DEFAULT '', imap INTEGER DEFAULT NULL, pop3 INTEGER DEFAULT NULL, lda INTEGER "
                            "DEFAULT NULL, PRIMARY KEY (username))")
    cfg = tmp_path / "h.toml"
    cfg.write_text(f'timezone = "UTC"\nyear = 2025\nstore_password_file = "{sql_db["password_file"]}"\n'
                   f'flush_rows = 2000\nsql_layout = "{layout}"\n')
    procs = [subprocess.Popen([sys.executable, "-m", "harvester", "backfill", "--config", str(cfg), "--store",
                               sql_db["url"], str(tmp_path / name)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for name in ("first", "second")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    ref = f"sqlite:///{tmp_path / 'ref.db'}"
    subprocess.run([sys.executable, "-m", "harvester", "backfill", "--config", str(cfg), "--store", ref, str(log)],
                   cwd=ROOT, check=True, capture_output=True)
    want, got = _export(ref, cfg), _export(sql_db["url"], cfg)
    if layout != "per_service":  # no node column; iRedMail: no address, whole seconds, webmail in imap
        keep = {"imap": "imap", "webmail": "imap", "pop3": "pop3", "lmtp": "lmtp"} if layout == "iredmail" else None
        newest: dict = {}
        for d in want:
            svc = keep.get(d["service"]) if keep else d["service"]
            if svc is None:
                continue
            d = {**d, "service": svc, "node": None, "ip": None if keep else d["ip"]}
            if keep:
                d["last_login"] = d["last_login"][:19] + "Z"
            k = (d["user"], svc)
            newest[k] = max(newest.get(k, d), d, key=lambda x: x["last_login"])
        want = sorted(newest.values(), key=lambda d: (d["user"], d["service"]))
    assert len(want) > 1000
    assert got == want


def test_a_server_restart_mid_traffic_loses_nothing(sql_server, tmp_path):
    """A private server stops between two flushes and while a flush is under way: the failed flush keeps
    every row queued (PartialWrite, nothing acknowledged), the store reconnects by itself, and once the server
    is back the same rows are stored."""
    cmd = [str(ROOT / "scripts" / "sql-dev")]
    # In the checkout (PostgreSQL runs as its own user, who cannot enter pytest's private temporary tree).
    srv = ROOT / ".sql" / f"restart-{sql_server['server']}-{tmp_path.name}"
    where = [sql_server["server"], "--dir", str(srv), "--port", "0"]
    url = subprocess.run([*cmd, "start", *where], check=True, capture_output=True, text=True).stdout.split()[-1]
    db = {"url": url, "password_file": str(srv / "password")}
    try:
        s = store(db)
        sink = Coalescer()
        sink.logins.put(b"jane", "imap", T0, 0, b"192.0.2.1", b"mx1", "imap")
        assert flush(sink, s) == 1
        subprocess.run([*cmd, "stop", *where], check=True, capture_output=True)
        for i in range(500):
            sink.logins.put(f"u{i}".encode(), "pop3", T0 + i, 0, b"192.0.2.2", b"mx1", "pop3")
        with pytest.raises(StoreError) as e:
            flush(sink, s)
        assert isinstance(e.value, PartialWrite) and e.value.acknowledged == 0 and len(e.value.failed) == 500
        assert len(sink) == 500
        subprocess.run([*cmd, "start", *where], check=True, capture_output=True)
        assert flush(sink, s) == 500
        assert len(sink) == 0
        # Mid-write: the server stops while a big flush runs; whatever was not acknowledged stays queued.
        for i in range(60_000):
            sink.logins.put(f"v{i}".encode(), "imap", T0 + i * 1000, 3, b"192.0.2.3", b"mx1", "imap")
        stopper = subprocess.Popen([*cmd, "stop", *where], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        written = 0
        with contextlib.suppress(StoreError):
            written += flush(sink, s)
        stopper.wait(timeout=120)
        subprocess.run([*cmd, "start", *where], check=True, capture_output=True)
        for _ in range(30):
            try:
                written += flush(sink, s)
                break
            except StoreError:
                time.sleep(1)
        assert len(sink) == 0
        assert len(list(s.export())) == 1 + 500 + 60_000
        assert s.lookup("jane")[0].ip == "192.0.2.1" and s.lookup("v59999")[0].time_us == T0 + 59_999_000
        s.close()
    finally:
        subprocess.run([*cmd, "stop", *where], capture_output=True)
        shutil.rmtree(srv, ignore_errors=True)


def test_schema_prints_each_layouts_tables_and_lookup_and_apply_creates_the_owned_ones(sql_db, capsys):
    from tests.conftest import run_cli

    for layout in ("per_service", "per_user", "iredmail", "modoboa"):
        assert run_cli("schema", "--store", sql_db["url"], "--sql-layout", layout) == 0
        out = capsys.readouterr().out
        assert "what a support tool runs" in out
        assert ("CREATE TABLE" in out) == (layout in ("per_service", "per_user"))
    args = ["--store", sql_db["url"], "--store-password-file", sql_db["password_file"]]
    assert run_cli("schema", *args, "--apply") == 0
    assert "created table last_login" in capsys.readouterr().err
    assert run_cli("lookup", *args, "nobody") == 1
