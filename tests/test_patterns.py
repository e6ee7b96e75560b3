"""Pattern packs are data: loading, overriding, clear errors, prefix detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from harvester import patterns
from harvester.patterns import PackError


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


def test_builtin_pack_has_every_prefix_and_event_kind():
    pack = patterns.load("dovecot")
    assert set(pack.prefixes) == {"syslog", "syslog-rfc3339", "dovecot-file", "dovecot-file-iso"}
    kinds = {e.kind for e in pack.events.values()}
    assert {"login", "proxy", "delivery", "auth_fail", "aborted", "refused", "pop3_delete"} <= kinds


def test_operator_pack_extends_and_overrides_one_event(tmp_path):
    write(tmp_path, "mysite", """
name = "mysite"
extends = "dovecot"
[events.login]
kind = "login"
regex = '(?P<service>imap|pop3)-login: Login: user=<(?P<user>.*?)>, rip=(?P<ip>[0-9a-f.:]+), real_rip=(?P<real_ip>\\S+)'
[events.proxy]
disabled = true
""")
    pack = patterns.load("mysite", [tmp_path])
    assert "real_rip" in pack.events["login"].regex
    assert "proxy" not in pack.events and "lmtp-delivery" in pack.events
    assert pack.sources[-1].endswith("mysite.toml")


def test_operator_directory_overrides_a_builtin_pack_of_the_same_name(tmp_path):
    builtin = patterns.builtin_dir() / "dovecot.toml"
    write(tmp_path, "dovecot", builtin.read_text().replace('name = "dovecot"', 'name = "dovecot-local"'))
    assert patterns.load("dovecot", [tmp_path]).name == "dovecot-local"


@pytest.mark.parametrize(("body", "message"), [
    ('[prefixes.p]\nstyle = "bsd"\nregex = "(?P<x>.)"', "needs a (?P<ts>...) group"),
    ('[prefixes.p]\nstyle = "weird"\nregex = "(?P<ts>.)"', "style must be one of"),
    ('extends = "dovecot"\n[events.e]\nkind = "login"\nregex = "user=(?P<user>"', "bad regex"),
    ('extends = "dovecot"\n[events.e]\nkind = "logon"\nregex = "x"', "kind must be one of"),
    ('extends = "dovecot"\n[events.e]\nkind = "login"\nservice = "imap"\nregex = "x"', "needs a (?P<user>...)"),
    ('extends = "dovecot"\ncolour = 1', "unknown key(s) colour"),
    ('extends = "self"', "loops back"),
])
def test_bad_pack_is_rejected_naming_file_and_entry(tmp_path, body, message):
    path = write(tmp_path, "self", body)
    with pytest.raises(PackError) as e:
        patterns.load(str(path), [tmp_path])
    assert message in str(e.value) and str(path) in str(e.value)


def test_unknown_pack_lists_the_known_ones():
    with pytest.raises(PackError, match="known packs: .*dovecot"):
        patterns.load("nosuchpack")


@pytest.mark.parametrize(("name", "prefix"), [
    ("syslog-traditional.log", "syslog"), ("syslog-rfc3339.log", "syslog-rfc3339"),
    ("logpath-default.log", "dovecot-file"), ("logpath-usecs.log", "dovecot-file-iso"),
])
def test_prefix_is_detected_from_the_first_lines(samples, name, prefix):
    assert patterns.detect_prefix(patterns.load("dovecot"), (samples / name).read_bytes())[0] == prefix


def test_quiet_log_without_events_gets_the_closest_prefix_for_reports_but_decides_nothing():
    text = b"Nov 22 01:52:02 vm dovecot: master: Dovecot v2.3.19.1 starting up\n" * 3
    pack = patterns.load("dovecot")
    assert patterns.closest_prefix(pack, text)[0] == "syslog"
    assert patterns.detect_prefix(pack, text)[0] is None
    assert patterns.closest_prefix(pack, b"\x00\x01 binary\n")[0] is None


def test_combined_mail_log_starting_with_postfix_lines_decides_on_the_first_dovecot_line():
    """Debian's /var/log/mail.log: postfix lines first would pass for Dovecot's own log-file prefix
    (a bare timestamp); only a Dovecot line decides."""
    pack = patterns.load("dovecot")
    postfix = b"Nov 29 10:00:00 mx postfix/smtpd[123]: connect from unknown[192.0.2.1]\n"
    assert patterns.detect_prefix(pack, postfix * 50)[0] is None
    login = (b"Nov 29 10:00:01 mx dovecot: imap-login: Login: user=<a@example.com>, method=PLAIN, "
             b"rip=192.0.2.7, lip=192.0.2.1, mpid=4242, session=<x>\n")
    assert patterns.detect_prefix(pack, postfix * 50 + login)[0] == "syslog"
