"""Lines -> events: the shapes, the joins across lines, and what is never a login."""

from __future__ import annotations

from datetime import UTC

import pytest

from harvester import native, patterns
from harvester.coalesce import Coalescer
from harvester.parse import Parser, Webmail
from harvester.timeparse import Clock

PACK = patterns.load("dovecot")


def parse(*chunks: bytes, webmail: tuple[str, ...] = (), webmail_local: tuple[str, ...] = (),
          release: bool = False) -> tuple[Parser, Coalescer]:
    """Parse with a trace (Python's loop); the native scanner must leave the same tables. release: store the
    logins still held for their whole user name at the end (as a backfill does)."""
    parser, sink = _run(chunks, Webmail(webmail, webmail_local), trace=True, release=release)
    if native.enabled():
        fast, untraced = _run(chunks, Webmail(webmail, webmail_local), trace=False, release=release)
        assert fast.engine == "native"
        assert table(untraced.logins) == table(sink.logins) and table(untraced.others) == table(sink.others)
        assert fast.stats.events == parser.stats.events
    return parser, sink


def table(t) -> dict:
    return dict(t.items())


def _run(chunks, webmail: Webmail, trace: bool, release: bool = False) -> tuple[Parser, Coalescer]:
    parser = Parser(PACK, node="n1", webmail=webmail)
    sink = Coalescer(trace=trace)
    for i, chunk in enumerate(chunks):  # each chunk as its own file: state must carry over
        parser.begin(f"f{i}", "syslog", Clock("bsd", UTC, year=2026))
        parser.feed(chunk, sink)
        parser.end()
    if release:
        parser.release_held(sink)
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


# --- Dovecot 2.4 and what changed with it ------------------------------------------------------------------

LOGGED_IN = "{svc}-login: Logged in: user=<{u}>, method=PLAIN, rip={ip}, lip={lip}, mpid={pid}, session=<{sid}>"
LONG = "long-" + "0123456789" * 7 + "012@example.com"  # 90 bytes
CUT = LONG[:77] + "..."  # what a login line prints of it (str_sanitize(name, 80))


def test_managesieve_logins_are_stored_as_service_sieve_as_dovecots_plugin_names_them():
    _, sink = parse(L(LOGGED_IN.format(svc="managesieve", u="u", ip="192.0.2.4", lip="1.1.1.1", pid=9, sid="s")),
                    L(LOGIN.replace("imap-", "managesieve-").format(u="v", ip="192.0.2.5", pid=10)))
    assert rows(sink) == {("u", "sieve"): ("192.0.2.4", None), ("v", "sieve"): ("192.0.2.5", None)}


@pytest.mark.parametrize(("line", "kind", "detail"), [
    ("imap-login: Login aborted: Logged out (auth failed, 1 attempts in 2 secs) (auth_failed): user=<u>, "
     "method=PLAIN, rip=192.0.2.9, lip=1.1.1.1, session=<s>", "auth_fail", "attempts=1 reason=auth_failed"),
    ("pop3-login: Login aborted: Connection closed (password expired, 2 attempts in 5 secs) (password_expired): "
     "user=<u>, method=PLAIN, rip=192.0.2.9, lip=1.1.1.1, session=<s>", "auth_fail",
     "attempts=2 reason=password_expired"),
    ("pop3-login: Login aborted: Maximum number of connections from user+IP exceeded "
     "(mail_max_userip_connections=1) (connection limit reached, 1/1 successful auths in 0 secs) "
     "(connection_limit): user=<u>, method=PLAIN, rip=192.0.2.9, lip=1.1.1.1, session=<s>", "refused",
     "reason=connection_limit"),
    ("imap-login: Login aborted: Connection closed (no auth attempts in 0 secs) (no_auth_attempts): user=<u>, "
     "rip=192.0.2.9, lip=1.1.1.1, session=<s>", "aborted", "reason=no_auth_attempts"),
    ("imap-login: Login aborted: Connection closed (disconnected before auth was ready, waited 0 secs) "
     "(auth_process_not_ready): user=<u>, rip=192.0.2.9, lip=1.1.1.1, session=<s>", "aborted",
     "reason=auth_process_not_ready"),
])
def test_every_2_4_login_aborted_code_is_an_auth_failure_a_refusal_or_an_aborted_login_never_a_login(
        line, kind, detail):
    parser, sink = parse(L(line))
    assert rows(sink) == {("u", kind): ("192.0.2.9", detail)}
    assert not parser.stats.not_understood


def test_a_crafted_name_in_a_2_4_auth_failure_chooses_neither_the_code_nor_the_address():
    evil = "x>, method=PLAIN, rip=203.0.113.66, lip=1.1.1.1 (connection_limit)"
    _, sink = parse(L(f"imap-login: Login aborted: Logged out (auth failed, 1 attempts in 0 secs) (auth_failed): "
                      f"user=<{evil}>, method=PLAIN, rip=192.0.2.9, lip=1.1.1.1, session=<s>"))
    assert rows(sink) == {(evil, "auth_fail"): ("192.0.2.9", "attempts=1 reason=auth_failed")}


POP3_OUT = "pop3({u})<{pid}><s>: Disconnected: Logged out top=0/0, retr=1/361, del={d}, size=699"


def test_pop3_del_counts_are_worded_by_the_dovecot_version_of_the_node_that_wrote_them():
    """2.3's del=N/M is N of M messages, 2.4's N messages of M bytes: the node's own login lines tell which."""
    def line(host: str, msg: str) -> bytes:
        return f"Nov 22 01:00:00 {host} dovecot: {msg}\n".encode()
    _, sink = parse(
        line("old", LOGIN.replace("imap-", "pop3-").format(u="a", ip="192.0.2.1", pid=5))
        + line("old", POP3_OUT.format(u="a", pid=5, d="2/9"))
        + line("new", LOGGED_IN.format(svc="pop3", u="b", ip="192.0.2.2", lip="1.1.1.1", pid=5, sid="s"))
        + line("new", POP3_OUT.format(u="b", pid=5, d="2/699"))
        + line("other", POP3_OUT.format(u="c", pid=6, d="1/345")))
    assert {k: v for k, v in rows(sink).items() if k[1] == "pop3_delete"} == {
        ("a", "pop3_delete"): ("192.0.2.1", "deleted=2 messages=9"),
        ("b", "pop3_delete"): ("192.0.2.2", "deleted=2 bytes=699"),
        ("c", "pop3_delete"): (None, "deleted=1 messages_or_bytes=345")}


def test_mail_log_lines_with_the_2_4_mailbox_prefix_are_never_pop3_deletions_even_with_a_crafted_msgid():
    _, sink = parse(L(LOGGED_IN.format(svc="pop3", u="u", ip="192.0.2.1", lip="1.1.1.1", pid=5, sid="s"))
                    + L("pop3(u)<5><s>: Mailbox INBOX: expunge: box=INBOX, uid=1, msgid=<top=0/0, retr=0/0, "
                        "del=9/9>, size=334"))
    assert rows(sink) == {("u", "pop3"): ("192.0.2.1", None)}


def test_lmtp_recipient_and_transaction_tags_of_2_4_are_deliveries_of_the_same_session():
    _, sink = parse(L("lmtp(61): Connect from 192.0.2.25")
                    + L("lmtp(a)<61><V1q:R2>: msgid=<1@x>: saved mail to INBOX")
                    + L("lmtp(b)<61><V1q:T2:R2>: msgid=<2@x>: saved mail to INBOX")
                    + L("lmtp(61): Disconnect from 192.0.2.25: Logged out (state=READY)"))
    assert rows(sink) == {("a", "lmtp"): ("192.0.2.25", None), ("b", "lmtp"): ("192.0.2.25", None)}


@pytest.mark.parametrize("shape", [LOGGED_IN, LOGIN], ids=["2.4", "2.3"])
def test_a_user_name_the_login_line_cut_at_80_bytes_is_completed_from_its_mail_process_line(shape):
    login = shape.format(svc="imap", u=CUT, ip="192.0.2.7", lip="1.1.1.1", pid=42, sid="s")
    _, sink = parse(L(login, "01:00:00"),
                    L(f"imap({LONG})<42><s>: Disconnected: Logged out in=32 out=859", "01:20:00"))
    assert rows(sink) == {(LONG, "imap"): ("192.0.2.7", None)}
    (ev,) = sink.events()
    assert ev.time_us % 86_400_000_000 == 3_600_000_000, "the login's time, not its logout's"


def test_a_cut_name_of_a_pop3_session_that_deleted_is_completed_by_its_logout_line():
    _, sink = parse(L(LOGGED_IN.format(svc="pop3", u=CUT, ip="192.0.2.7", lip="1.1.1.1", pid=42, sid="s"))
                    + L(POP3_OUT.format(u=LONG, pid=42, d="1/354")))
    assert rows(sink) == {(LONG, "pop3"): ("192.0.2.7", None), (LONG, "pop3_delete"): ("192.0.2.7",
                                                                                         "deleted=1 bytes=354")}


def test_a_cut_name_no_line_completes_is_stored_as_logged_with_its_dots_when_released():
    login = L(LOGGED_IN.format(svc="imap", u=CUT, ip="192.0.2.7", lip="1.1.1.1", pid=42, sid="s"))
    other = L(f"imap({'z' * 90})<42><s>: Disconnected: Logged out")  # same pid, another name: no completion
    _, held = parse(login + other)
    assert rows(held) == {}
    _, sink = parse(login + other, release=True)
    assert rows(sink) == {(CUT, "imap"): ("192.0.2.7", None)}


def test_held_logins_survive_a_checkpoint_and_are_completed_after_a_restart():
    from harvester.sessions import Sessions

    first, sink = parse(L(LOGGED_IN.format(svc="imap", u=CUT, ip="192.0.2.7", lip="1.1.1.1", pid=42, sid="s")))
    snap = first.sessions.snapshot(100)
    restored = Sessions()
    restored.restore(snap)
    parser = Parser(PACK, node="n1", sessions=restored)
    parser.begin("f", "syslog", Clock("bsd", UTC, year=2026))
    sink = Coalescer()
    parser.feed(L(f"imap({LONG})<42><s>: Disconnected: Logged out"), sink)
    assert rows(sink) == {(LONG, "imap"): ("192.0.2.7", None)}


WEBMAIL_SID = "09bn4W1hi+Z/AAn6"  # a real 2.4.1 session id: the host that connected was 127.0.9.250


def test_webmail_forwarding_its_users_address_is_told_by_the_host_its_session_id_names():
    """Roundcube/SOGo send ID x-originating-ip: rip is the user's address, only the session id has the webmail
    host's. Stored as webmail, with the user's address (as the plugin stores it)."""
    line = LOGGED_IN.format(svc="imap", u="dana", ip="198.51.100.23", lip="127.0.0.1", pid=6405, sid=WEBMAIL_SID)
    _, sink = parse(L(line), webmail=("127.0.9.250/32",))
    assert rows(sink) == {("dana", "webmail"): ("198.51.100.23", None)}
    _, sink = parse(L(line), webmail=("127.0.8.0/24",))
    assert rows(sink) == {("dana", "imap"): ("198.51.100.23", None)}


def test_webmail_connecting_to_a_local_address_of_its_own_is_told_by_lip():
    _, sink = parse(L(LOGGED_IN.format(svc="imap", u="a", ip="198.51.100.23", lip="10.0.0.80", pid=1, sid="x"))
                    + L(LOGGED_IN.format(svc="imap", u="b", ip="198.51.100.24", lip="10.0.0.1", pid=2, sid="y")),
                    webmail_local=("10.0.0.80/32",))
    assert rows(sink) == {("a", "webmail"): ("198.51.100.23", None), ("b", "imap"): ("198.51.100.24", None)}


def test_a_held_login_whose_pid_is_reused_is_stored_under_its_cut_name_not_lost():
    other = "long-" + "9" * 72 + "@example.com"
    _, sink = parse(L(LOGGED_IN.format(svc="imap", u=CUT, ip="192.0.2.7", lip="1.1.1.1", pid=42, sid="s"))
                    + L(LOGGED_IN.format(svc="imap", u=other[:77] + "...", ip="192.0.2.8", lip="1.1.1.1", pid=42,
                                         sid="t"))
                    + L(f"imap({other})<42><t>: Disconnected: Logged out"))
    assert rows(sink) == {(CUT, "imap"): ("192.0.2.7", None), (other, "imap"): ("192.0.2.8", None)}


def test_a_login_released_under_its_cut_name_is_still_stored_whole_when_its_process_names_it_later():
    """An IMAP session longer than the wait (IDLE): the cut row first, the whole name at its logout."""
    parser = Parser(PACK, node="n1")
    parser.begin("f", "syslog", Clock("bsd", UTC, year=2026))
    sink = Coalescer()
    parser.feed(L(LOGGED_IN.format(svc="imap", u=CUT, ip="192.0.2.7", lip="1.1.1.1", pid=42, sid="s")), sink)
    assert parser.release_held(sink) == 1
    parser.feed(L(f"imap({LONG})<42><s>: Disconnected: Logged out", "03:00:00"), sink)
    assert rows(sink) == {(CUT, "imap"): ("192.0.2.7", None), (LONG, "imap"): ("192.0.2.7", None)}
