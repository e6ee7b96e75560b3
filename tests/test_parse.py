"""Lines -> events: the shapes, the joins across lines, and what is never a login."""

from __future__ import annotations

from datetime import UTC

import pytest

from harvester import native, patterns
from harvester.coalesce import Coalescer
from harvester.parse import Networks, Parser
from harvester.timeparse import Clock

PACK = patterns.load("dovecot")


def parse(*chunks: bytes, webmail: tuple[str, ...] = ()) -> tuple[Parser, Coalescer]:
    """Parse with a trace (Python's loop); the native scanner must leave the same tables."""
    parser, sink = _run(chunks, webmail, trace=True)
    if native.enabled():
        fast, untraced = _run(chunks, webmail, trace=False)
        assert fast.engine == "native"
        assert table(untraced.logins) == table(sink.logins) and table(untraced.others) == table(sink.others)
        assert fast.stats.events == parser.stats.events
    return parser, sink


def table(t) -> dict:
    return dict(t.items())


def _run(chunks, webmail, trace: bool) -> tuple[Parser, Coalescer]:
    parser = Parser(PACK, node="n1", webmail=Networks(webmail))
    sink = Coalescer(trace=trace)
    for i, chunk in enumerate(chunks):  # each chunk as its own file: state must carry over
        parser.begin(f"f{i}", "syslog", Clock("bsd", UTC, year=2026))
        parser.feed(chunk, sink)
        parser.end()
    return parser, sink


def rows(sink: Coalescer) -> dict[tuple[str, str], tuple[str | None, str]]:
    return {(r.user, r.service if r.kind == "login" else r.kind): (r.ip, r.detail) for r in sink.take()}


def L(msg: str, t: str = "01:00:00", tag: str = "dovecot") -> bytes:
    return f"Nov 22 {t} mx1 {tag}: {msg}\n".encode()


LOGIN = "imap-login: Login: user=<{u}>, method=PLAIN, rip={ip}, lip=10.0.0.1, mpid={pid}, session=<s>"


def test_login_gives_user_service_ip_and_node():
    _, sink = parse(L(LOGIN.format(u="jane", ip="192.0.2.1", pid=7)))
    (ev,) = sink.events()
    assert (ev.kind, ev.service, ev.user, ev.ip, ev.node, ev.digits) == ("login", "imap", "jane", "192.0.2.1",
                                                                         "mx1", 0)


@pytest.mark.parametrize(("user", "ip"), [("a>b,c d", "::1"), ("x=y<z", "2001:db8::5"), ("ÄÖ@ex.de", "192.0.2.1")])
def test_raw_user_names_and_ipv6(user, ip):
    _, sink = parse(L(LOGIN.format(u=user, ip=ip, pid=7)))
    assert rows(sink) == {(user, "imap"): (ip, None)}


def test_dovecot_2_4_and_syslog_pid_tag():
    _, sink = parse(L("pop3-login: Logged in: user=<u>, method=PLAIN, rip=192.0.2.4, lip=1.1.1.1, mpid=9, "
                      "session=<s>", tag="dovecot[1234]"))
    assert rows(sink) == {("u", "pop3"): ("192.0.2.4", None)}


def test_delivery_takes_the_ip_of_its_lmtp_session_even_across_a_file_boundary():
    _, sink = parse(L("lmtp(77): Connect from 198.51.100.1"),
                    L("lmtp(bob)<77><abc>: msgid=<m@x>: saved mail to INBOX") +
                    L("lmtp(carl)<78><abc>: msgid=<m@x>: saved mail to INBOX"))
    assert rows(sink) == {("bob", "lmtp"): ("198.51.100.1", None), ("carl", "lmtp"): (None, None)}


def test_xclient_address_on_disconnect_restamps_the_sessions_deliveries():
    _, sink = parse(L("lmtp(77): Connect from 127.0.0.8") + L("lmtp(bob)<77><abc>: msgid=<m@x>: saved mail to INBOX")
                    + L("lmtp(77): Disconnect from 198.51.100.7: Logged out (state=READY)"))
    assert rows(sink) == {("bob", "lmtp"): ("198.51.100.7", None)}


@pytest.mark.parametrize("engine", ["python", "native"])
def test_xclient_restamp_after_a_restart_reaches_deliveries_read_before_the_checkpoint(engine, monkeypatch):
    """The trial's wrong IP (delaycompress, 30 kills): killed right after a delivery of a session that had
    connected from 127.0.0.1; its Disconnect, read after the restart, names the real client. The checkpoint
    kept the session's address but not its deliveries, so the re-stamp reached none of them and the row kept
    127.0.0.1 where a backfill says the Disconnect's address. A checkpoint's sessions are the parser's whole
    LMTP state at its position: the open sessions with their deliveries."""
    import json

    if engine == "native" and not native.enabled():
        pytest.skip("native module not built")
    if engine == "python":
        monkeypatch.setattr(native, "enabled", lambda: False)
    before = L("lmtp(43268): Connect from 127.0.0.1") + L("lmtp(bob)<43268><x>: msgid=<m@x>: saved mail to INBOX")
    after = L("lmtp(43268): Disconnect from 85.100.55.173: Logged out (state=READY)")
    first = Parser(PACK, node="n1")
    first.begin("maillog", "syslog", Clock("bsd", UTC, year=2026))
    stored = Coalescer()
    first.feed(before, stored)
    saved = json.loads(json.dumps(first.sessions.snapshot(5000)))  # the checkpoint, through its file
    restarted = Parser(PACK, node="n1")
    restarted.sessions.restore(saved)
    assert restarted.sessions.snapshot(5000) == saved
    # The earlier versions' form stays readable by them (a downgrade): pid -> the address's hex, or None.
    assert saved["lmtp"] == {b"43268".hex(): b"127.0.0.1".hex()}
    restarted.begin("maillog", "syslog", Clock("bsd", UTC, year=2026))
    replay = Coalescer()
    restarted.feed(after, replay)
    assert rows(stored) == {("bob", "lmtp"): ("127.0.0.1", None)}
    assert rows(replay) == {("bob", "lmtp"): ("85.100.55.173", None)}  # what a backfill of both says


def test_a_checkpoint_of_the_previous_version_with_addresses_only_is_restored():
    parser = Parser(PACK, node="n1")
    parser.sessions.restore({"lmtp": {b"77".hex(): b"198.51.100.1".hex(), b"78".hex(): None}, "login_ip": []})
    parser.begin("maillog", "syslog", Clock("bsd", UTC, year=2026))
    sink = Coalescer()
    parser.feed(L("lmtp(bob)<77><abc>: msgid=<m@x>: saved mail to INBOX")
                + L("lmtp(carl)<78><abc>: msgid=<m@x>: saved mail to INBOX"), sink)
    assert rows(sink) == {("bob", "lmtp"): ("198.51.100.1", None), ("carl", "lmtp"): (None, None)}


def test_unix_socket_lmtp_has_no_ip():
    _, sink = parse(L("lmtp(5): Connect from local") + L("lmtp(bob)<5><abc>: msgid=unspecified: saved mail to INBOX")
                    + L("lmtp(5): Disconnect from local: Logged out (state=READY)"))
    assert rows(sink) == {("bob", "lmtp"): (None, None)}


def test_failures_and_refusals_are_never_logins():
    _, sink = parse(
        L("imap-login: Disconnected: Connection closed (auth failed, 1 attempts in 2 secs): user=<u>, method=PLAIN, "
          "rip=192.0.2.3, lip=1.1.1.1, session=<s>")
        + L("imap-login: Disconnected: Maximum number of connections from user+IP exceeded "
            "(mail_max_userip_connections=10): user=<v>, method=PLAIN, rip=192.0.2.4, lip=1.1.1.1, session=<s>")
        + L("imap-login: Disconnected: Connection closed (no auth attempts in 0 secs): user=<>, rip=192.0.2.5, "
            "lip=1.1.1.1, session=<s>"))
    assert not len(sink.logins)
    assert rows(sink) == {("u", "auth_fail"): ("192.0.2.3", "attempts=1"), ("v", "refused"): ("192.0.2.4", None)}


def test_pop3_deletion_gets_the_ip_of_the_login_with_the_same_pid():
    _, sink = parse(
        L(LOGIN.replace("imap", "pop3").format(u="p", ip="192.0.2.9", pid=4243))
        + L("pop3(p)<4243><s>: Disconnected: Logged out top=0/0, retr=1/9, del=0/3, size=9")
        + L("pop3(p)<4243><s>: Disconnected: Logged out top=0/0, retr=2/9, del=2/3, size=9"))
    assert rows(sink)[("p", "pop3_delete")] == ("192.0.2.9", "deleted=2 messages=3")
    assert sum(1 for e in sink.events() if e.kind == "pop3_delete") == 1


def test_webmail_networks_turn_imap_but_not_pop3_into_webmail():
    _, sink = parse(L(LOGIN.format(u="w", ip="10.99.1.2", pid=1))
                    + L(LOGIN.replace("imap", "pop3").format(u="w", ip="10.99.1.2", pid=2)), webmail=("10.99.0.0/16",))
    assert set(rows(sink)) == {("w", "webmail"), ("w", "pop3")}


def test_equal_times_the_later_line_wins():
    _, sink = parse(L(LOGIN.format(u="t", ip="192.0.2.1", pid=1)) + L(LOGIN.format(u="t", ip="192.0.2.2", pid=2)))
    assert rows(sink) == {("t", "imap"): ("192.0.2.2", None)}


def test_older_line_after_a_newer_one_changes_nothing():
    _, sink = parse(L(LOGIN.format(u="t", ip="192.0.2.2", pid=1), t="02:00:00")
                    + L(LOGIN.format(u="t", ip="192.0.2.1", pid=2), t="01:00:00"))
    assert rows(sink) == {("t", "imap"): ("192.0.2.2", None)}


def test_unknown_login_shape_is_counted_not_guessed():
    parser, sink = parse(L("imap-login: Login: usr=<x> from 1.2.3.4"))
    assert parser.stats.not_understood["login"] == 1 and not len(sink.logins)


def test_a_client_chosen_user_name_cannot_choose_the_stored_ip():
    _, sink = parse(L("imap-login: Disconnected: Connection closed (auth failed, 1 attempts in 2 secs): "
                      "user=<victim>, rip=203.0.113.66>, method=PLAIN, rip=198.51.100.1, lip=10.0.0.1, session=<s>"))
    assert rows(sink) == {("victim>, rip=203.0.113.66", "auth_fail"): ("198.51.100.1", "attempts=1")}


def test_2_2_early_lmtp_shape_joins_its_session():
    _, sink = parse(L("lmtp(123): Connect from 192.0.2.7")
                    + L("lmtp(123, bob): Info: ABC: msgid=<x@y>: saved mail to INBOX"))
    assert rows(sink) == {("bob", "lmtp"): ("192.0.2.7", None)}
