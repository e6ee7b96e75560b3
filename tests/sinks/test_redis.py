"""The Redis store against a real redis-server (scripts/redis-dev): the plugin's keys and values for each key
template, precision and expiry, newest-wins with replays and two writers, hostile names, keys the plugin
wrote, and a Redis restart under the running daemon."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from harvester.config import Settings
from harvester.events import Row
from harvester.sinks import PartialWrite, open_store
from harvester.sinks.redis import COMPANION, RedisOptions, RedisStore, parse_url
from harvester.sinks.sqlite import SqliteStore
from harvester.timeparse import rfc3339
from tests import corpus, daemon_kit
from tests.conftest import ROOT, PrivateRedis, run_cli

T0 = 1_795_308_723_123_456  # 2026-11-22T00:52:03.123456Z
PER_SERVICE = "last-login/%{service}/%{user}"
_dbs = iter(range(1, 16))


def store(url: str, **settings: object) -> RedisStore:
    s = Settings()
    for key, value in settings.items():
        s.set(key, value, "test")
    st = open_store(url, settings=s)
    assert isinstance(st, RedisStore)
    return st


@pytest.fixture
def db(redis_server) -> str:
    """A database of the test run's server of its own, empty."""
    url = redis_server.rsplit("/", 1)[0] + f"/{next(_dbs, 15)}"
    st = store(url)
    st.client.flushdb()
    st.close()
    return url


def raw(st: RedisStore) -> dict[bytes, object]:
    """Every key of the store's database and what it holds (strings as bytes, hashes as dicts)."""
    out: dict[bytes, object] = {}
    for k in st.client.scan_iter(count=1000):
        out[k] = st.client.hgetall(k) if st.client.type(k) == b"hash" else st.client.get(k)
    return out


def login(user: str, service: str = "imap", t: int = T0, ip: str | None = "192.0.2.1", node: str = "mx1",
          digits: int = 6) -> Row:
    return Row(user, service, "login", t, digits, ip, node)


# -- keys and values as the plugin writes them ------------------------------------------------------------------

@pytest.mark.parametrize(("template", "prefix", "key"), [
    ("last-login/%{user}", "", "last-login/jane.doe@example.com"),  # the plugin's default
    ("last-login/%u", "", "last-login/jane.doe@example.com"),  # 2.3's spelling of it
    (PER_SERVICE, "", "last-login/imap/jane.doe@example.com"),
    ("last-login/%{service}/%{user}/%{remote_ip}", "", "last-login/imap/jane.doe@example.com/192.0.2.1"),
    ("last-login/%s/%u/%r", "mail:", "mail:last-login/imap/jane.doe@example.com/192.0.2.1"),
    ("ll/%{domain}/%{username}", "dc1:", "dc1:ll/example.com/jane.doe"),
    ("ll/%{user | domain}/%{user | username}", "", "ll/example.com/jane.doe"),  # 2.4's filters
])
def test_each_key_template_gives_the_plugins_key_a_companion_hash_and_reads_back(db, template, prefix, key):
    st = store(db, redis_key=template, redis_key_prefix=prefix)
    assert st.write([login("jane.doe@example.com", t=T0)]) == 1
    comp = (prefix + COMPANION + key[len(prefix):]).encode()
    assert raw(st) == {key.encode(): b"1795308723",
                       comp: {b"service": b"imap", b"ip": b"192.0.2.1", b"node": b"mx1", b"us": str(T0).encode(),
                              b"digits": b"6", b"user": b"jane.doe@example.com"}}
    assert st.lookup("jane.doe@example.com") == [login("jane.doe@example.com")]
    assert list(st.export()) == [login("jane.doe@example.com")]
    assert st.lookup("jane.doe@example.org") == []


def test_the_default_key_keeps_the_newest_login_of_any_service(db):
    st = store(db)
    st.write([login("jane", "imap", T0), login("jane", "pop3", T0 + 5_000_000, "192.0.2.2"),
              login("jane", "lmtp", T0 + 1_000_000, "198.51.100.7")])
    assert st.client.get("last-login/jane") == b"1795308728"
    assert st.lookup("jane") == [login("jane", "pop3", T0 + 5_000_000, "192.0.2.2")]


@pytest.mark.parametrize(("precision", "value"), [
    ("s", b"1795308723"), ("ms", b"1795308723123"), ("us", b"1795308723123456"), ("ns", b"1795308723123456000")])
def test_each_precision_writes_the_plugins_value(db, precision, value):
    st = store(db, redis_precision=precision)
    st.write([login("jane")])
    assert st.client.get("last-login/jane") == value
    assert st.lookup("jane")[0].time_us == T0


def test_expiry_counts_from_the_login_and_a_login_already_past_it_leaves_no_key(db):
    st = store(db, redis_key=PER_SERVICE, redis_expire=3600)
    now = int(time.time() * 1_000_000)
    st.write([login("jane", "imap", now - 600_000_000), login("jane", "pop3", now - 7200_000_000)])
    ttl = st.client.pttl("last-login/imap/jane") / 1000
    assert 3000 - 5 <= ttl <= 3000 + 1  # 3600 s after a login 600 s ago
    assert abs(st.client.pttl(f"{COMPANION}last-login/imap/jane") / 1000 - ttl) < 1
    assert st.client.exists("last-login/pop3/jane", f"{COMPANION}last-login/pop3/jane") == 0  # expired an hour ago
    assert [r.service for r in st.lookup("jane")] == ["imap"]


# -- newest wins --------------------------------------------------------------------------------------------------

def test_an_older_or_replayed_login_never_overwrites_a_newer_one(db):
    st = store(db, redis_key=PER_SERVICE)
    st.write([login("jane", t=T0 + 10, ip="192.0.2.10")])
    st.write([login("jane", t=T0, ip="192.0.2.99")])  # older: ignored
    st.write([login("jane", t=T0 + 10, ip="192.0.2.10")])  # replayed
    assert st.lookup("jane") == [login("jane", t=T0 + 10, ip="192.0.2.10")]
    # The same second at redis_precision = s: the microseconds decide, the key's value stays the same.
    st.write([login("jane", t=T0 + 500, ip="192.0.2.11")])
    assert st.lookup("jane") == [login("jane", t=T0 + 500, ip="192.0.2.11")]
    assert st.client.get("last-login/imap/jane") == b"1795308723"


def test_two_writers_with_the_same_time_converge_whatever_their_order(redis_server):
    a, b = login("jane", ip="192.0.2.1", node="mx1"), login("jane", ip="192.0.2.2", node="mx2")
    results = []
    for first, second in ((a, b), (b, a)):
        url = redis_server.rsplit("/", 1)[0] + "/14"
        st = store(url)
        st.client.flushdb()
        st.write([first])
        st.write([second])
        results.append(raw(st))
        st.close()
    assert results[0] == results[1]
    assert results[0][f"{COMPANION}last-login/jane".encode()][b"ip"] == b"192.0.2.2"


def test_two_concurrent_backfills_into_one_database_keep_the_newest_login_of_both(db, tmp_path):
    """Two backends' logs, the same accounts, times interleaved: both backfills at once (each its own process,
    thousands of keys written by both), and the result is what one SQLite backfill of both files keeps."""
    logs = []
    for n, host in enumerate(("mx1", "mx2")):
        path = tmp_path / f"maillog.{host}"
        corpus.write_maillog(path, lines=150_000, users=10_000, seed=n + 1, host=host, start="2026-11-22T00:00:00")
        logs.append(str(path))
    common = ["--timezone", "UTC", "--redis-key", PER_SERVICE, "--redis-precision", "us"]
    procs = [subprocess.Popen([sys.executable, "-m", "harvester", "backfill", "--store", db, *common,
                               "--flush-rows", "2000", log], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for log in logs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    newest: dict[tuple[str, str], Row] = {}  # per account and service, the newest of each file's own newest
    for n, log in enumerate(logs):  # (equal times: the greater IP, then node, wins, as the store's script decides)
        ref = f"sqlite:///{tmp_path}/ref{n}.db"
        subprocess.run([sys.executable, "-m", "harvester", "backfill", "--store", ref, "--timezone", "UTC", log],
                       cwd=ROOT, check=True, capture_output=True)
        for r in SqliteStore(ref).export():
            have = newest.get((r.user, r.service))
            if have is None or (r.time_us, r.ip or "", r.node or "") > (have.time_us, have.ip or "", have.node or ""):
                newest[r.user, r.service] = r
    want = sorted(newest.values())
    got = sorted(store(db, redis_key=PER_SERVICE, redis_precision="us").export())
    assert len(want) > 20_000 and {r.node for r in want} == {"mx1", "mx2"}
    assert got == want


# -- names and keys ------------------------------------------------------------------------------------------------

HOSTILE = ["o'brien \"quoted\" name@example.com", "a b>c<d@example.com", "jürgen.müller@exämple.de", "用户@例子.中国",
           "star*?[x]\\@example.com", "new\nline\x1b[31m@example.com", "a/b/c@example.com", "%{user}@example.com"]


def test_hostile_user_names_are_stored_byte_exact_and_looked_up_alone(db):
    st = store(db, redis_key="last-login/%{service}/%{user}/%{remote_ip}")
    rows = [login(u, t=T0 + i) for i, u in enumerate(HOSTILE)]
    rows.append(login("star", t=T0 + 99))  # what a glob "star*" would also find
    st.write(rows)
    keys = set(raw(st))
    for r in rows:
        assert f"last-login/imap/{r.user}/192.0.2.1".encode() in keys
        assert st.lookup(r.user) == [r]
    assert sorted(st.export()) == sorted(rows)


def test_a_key_where_another_keys_companion_lives_is_refused_and_the_rest_stored(db):
    st = store(db, redis_key="%{user}")
    with pytest.raises(PartialWrite) as e:
        st.write([login(f"{COMPANION}jane"), login("jane")])
    assert e.value.failed == [] and e.value.acknowledged == 1
    assert [r.user for r, _ in e.value.refused] == [f"{COMPANION}jane"] and "KeyCollision" in e.value.refused[0][1]
    assert st.lookup("jane") == [login("jane")]


def test_a_key_of_another_type_is_refused_and_the_rest_of_its_call_stored(db):
    st = store(db)
    st.client.lpush("last-login/listy", "x")
    with pytest.raises(PartialWrite) as e:
        st.write([login("jane"), login("listy"), login("zoe")])
    assert [r.user for r, _ in e.value.refused] == ["listy"] and "WRONGTYPE" in e.value.refused[0][1]
    assert e.value.failed == [] and e.value.acknowledged == 2
    assert st.lookup("zoe") == [login("zoe")]


def test_other_events_have_no_key_and_are_counted(db):
    st = store(db)
    assert st.write([login("jane"), Row("jane", "imap", "auth_fail", T0, 0, "203.0.113.9", "mx1", "attempts=1")]) == 1
    assert st.skipped() == {"auth_fail": 1}
    assert len(raw(st)) == 2


def test_forget_removes_the_keys_and_companions_of_one_service_or_of_every_one(db, capsys):
    st = store(db, redis_key=PER_SERVICE)
    user = HOSTILE[0]
    st.write([login(user, "imap"), login(user, "pop3", T0 + 1), login("jane", "imap")])
    assert run_cli("forget", "--store", db, "--redis-key", PER_SERVICE, user, "pop3") == 0
    assert [r.service for r in st.lookup(user)] == ["imap"]
    assert run_cli("forget", "--store", db, "--redis-key", PER_SERVICE, user) == 0
    assert st.lookup(user) == []
    assert set(raw(st)) == {b"last-login/imap/jane", f"{COMPANION}last-login/imap/jane".encode()}


# -- keys the plugin wrote ----------------------------------------------------------------------------------------

def plugin_set(st: RedisStore, key: str, value: str, expire: int = 0) -> None:
    """What dict-redis.c sends for the plugin's transaction: MULTI, SET (EXPIRE), EXEC."""
    pipe = st.client.pipeline(transaction=True)
    pipe.set(key, value)
    if expire:
        pipe.expire(key, expire)
    pipe.execute()


def test_a_key_the_plugin_wrote_is_read_by_lookup_and_export_and_kept_against_older_logins(db):
    st = store(db, redis_key="last-login/%s/%u/%r", redis_precision="ms")
    plugin_set(st, "last-login/imap/jane@example.com/192.0.2.7", "1795308723500")
    plugin_set(st, "last-login/managesieve/jane@example.com/", "1795308700000")  # 2.3's name, no address
    mine = Row("jane@example.com", "imap", "login", 1_795_308_723_500_000, 3, "192.0.2.7", None)
    sieve = Row("jane@example.com", "sieve", "login", 1_795_308_700_000_000, 3, None, None)
    assert run_cli("lookup", "--store", db, "--redis-key", "last-login/%s/%u/%r", "--redis-precision", "ms",
                   "jane@example.com") == 0
    assert st.lookup("jane@example.com") == [mine, sieve]
    assert sorted(st.export()) == sorted([mine, sieve])
    st.write([login("jane@example.com", t=1_795_308_723_400_000, ip="192.0.2.7")])  # older than the plugin's
    assert st.client.get("last-login/imap/jane@example.com/192.0.2.7") == b"1795308723500"
    assert st.lookup("jane@example.com")[0] == mine
    st.write([login("jane@example.com", t=1_795_308_724_000_000, ip="192.0.2.7")])  # newer
    assert st.client.get("last-login/imap/jane@example.com/192.0.2.7") == b"1795308724000"
    assert st.lookup("jane@example.com")[0] == login("jane@example.com", t=1_795_308_724_000_000, ip="192.0.2.7")


def test_the_plugins_default_key_reads_back_as_a_login_of_any_service(db, capsys):
    st = store(db)
    plugin_set(st, "last-login/jane@example.com", "1795308723", expire=86400)
    assert st.lookup("jane@example.com") == [Row("jane@example.com", "any", "login", 1_795_308_723_000_000, 0,
                                                 None, None)]
    capsys.readouterr()
    assert run_cli("lookup", "--store", db, "jane@example.com") == 0
    assert "2026-11-22T00:52:03Z" in capsys.readouterr().out


# -- the URL, the password, the schema -------------------------------------------------------------------------

def test_urls_name_host_port_database_user_and_tls_and_never_a_password():
    a = parse_url("rediss://harvester@[::1]:6380/3")
    assert (a.host, a.port, a.db, a.username, a.tls) == ("::1", 6380, 3, "harvester", True)
    a = parse_url("redis://cache.example.net")
    assert (a.host, a.port, a.db, a.username, a.tls) == ("cache.example.net", 6379, 0, None, False)
    with pytest.raises(Exception, match="store_password_file"):
        parse_url("redis://u:secret@host:6379/0")


def test_a_user_and_its_password_from_store_password_file_log_in(db, tmp_path, capsys):
    st = store(db)
    st.client.acl_setuser("harvester-test", enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all"])
    try:
        secret = tmp_path / "password"
        secret.write_text("s3cret\n")
        url = db.replace("redis://", "redis://harvester-test@")
        mine = store(url, store_password_file=str(secret))
        assert mine.write([login("jane")]) == 1
        secret.write_text("wrong\n")
        capsys.readouterr()
        assert run_cli("lookup", "--store", url, "--store-password-file", str(secret), "jane") != 0
        assert "cannot connect to Redis" in capsys.readouterr().err
    finally:
        st.client.acl_deluser("harvester-test")


def test_schema_explains_the_key_layout_without_a_connection(capsys):
    capsys.readouterr()
    assert run_cli("schema", "--store", "redis://192.0.2.1:6379/2", "--redis-key", PER_SERVICE,
                   "--redis-key-prefix", "mail:", "--redis-precision", "ms", "--redis-expire", "86400") == 0
    out = capsys.readouterr().out
    assert "mail:last-login/%{service}/%{user} -> the newest login's Unix time in milliseconds" in out
    assert f"mail:{COMPANION}last-login/%{{service}}/%{{user}} -> service, ip, node, us" in out
    assert "PXAT = login time + 86400 s" in out and "SCAN 0 MATCH 'mail:last-login/*'" in out
    assert ("redis-cli -h 192.0.2.1 -p 6379 -n 2 GET 'mail:last-login/imap/jane.doe@example.com'; redis-cli -h "
            f"192.0.2.1 -p 6379 -n 2 HGETALL 'mail:{COMPANION}last-login/imap/jane.doe@example.com';") in out


def test_a_template_without_the_account_or_with_an_unknown_variable_is_refused():
    s = Settings()
    with pytest.raises(ValueError, match="must name the account"):
        s.set("redis_key", "last-login/%{service}", "test")
    with pytest.raises(ValueError, match="unknown variable"):
        s.set("redis_key", "last-login/%{user}/%{session}", "test")
    assert RedisOptions().key == "last-login/%{user}"


# -- a restart mid-traffic -----------------------------------------------------------------------------------------

def redis_rows(url: str) -> list[tuple]:
    """The store's rows as daemon_kit.rows gives SQLite's: (user, service, last_login, ip, node)."""
    try:
        st = store(url, redis_key=PER_SERVICE, redis_precision="us")
    except Exception:  # noqa: BLE001 - down for the moment: nothing to compare yet
        return []
    try:
        return sorted((r.user, r.service, rfc3339(r.time_us, r.digits), r.ip, r.node) for r in st.export())
    finally:
        st.close()


def settled(url: str, want, seconds: float) -> None:
    """Wait until the store holds `want` (the daemon writes as it reads), then compare once more."""
    deadline = time.monotonic() + seconds
    while redis_rows(url) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    assert redis_rows(url) == want


def test_a_redis_restart_under_the_daemon_loses_no_row(tmp_path, log_lines):
    """The daemon follows a log while its Redis stops (rows wait, checkpoints wait) and starts again: every row
    is stored, the same as a backfill of every line gives."""
    server = PrivateRedis(tmp_path / "redis")
    url = server.start()
    (tmp_path / "log").mkdir()
    w = daemon_kit.Writer(tmp_path / "log" / "maillog", log_lines)
    proc = daemon_kit.start(tmp_path, url, "--redis-key", PER_SERVICE, "--redis-precision", "us")
    try:
        w.write(2000)
        first = daemon_kit.reference(tmp_path, log_lines[:2000])
        settled(url, first, 30)
        stopped = threading.Event()

        def restart() -> None:  # mid-traffic: while the writer appends
            time.sleep(0.5)
            server.stop()
            stopped.set()
            time.sleep(3)
            server.start()

        t = threading.Thread(target=restart)
        t.start()
        w.write(3000)
        assert stopped.wait(30)
        w.write(2000)
        t.join()
        w.write(2000)
        want = daemon_kit.reference(tmp_path, log_lines[:9000])
        settled(url, want, 60)
    finally:
        w.close()
        err = daemon_kit.stop(proc)
        server.stop(check=False)
    assert "not written" in err  # the daemon saw the outage, and retried


def test_a_restarted_redis_without_the_script_is_written_at_once(tmp_path):
    """Redis forgets its scripts when it restarts: the next write loads it again and stores every row."""
    server = PrivateRedis(tmp_path / "redis")
    url = server.start()
    try:
        st = store(url)
        st.write([login("jane")])
        server.stop()
        with pytest.raises(PartialWrite) as e:
            st.write([login("zoe")])
        assert e.value.failed == [login("zoe")] and e.value.acknowledged == 0
        server.start()
        assert st.write([login("zoe"), login("jane", t=T0 + 1)]) == 2
        assert st.lookup("zoe") == [login("zoe")] and st.lookup("jane")[0].time_us == T0 + 1
    finally:
        server.stop(check=False)

