"""A private, real mail stack for the end-to-end tests: Dovecot 2.3 or 2.4, rsyslogd, logrotate and real clients.

Why real parts: the daemon must cope with what production hands it - Dovecot's own lines as a syslog
daemon writes them, files renamed, truncated and compressed under it by logrotate - and the reference
answer is what Dovecot's own last_login plugin recorded for the same traffic, not what we think it should be.

How it stays private (nothing on the machine is used or changed, and several stacks can run at once):
- everything lives in one temporary directory (short, because it holds UNIX sockets);
- Dovecot listens on loopback only, on free ports, with its own base_dir, state_dir and `-c` config;
- Dovecot logs through syslog, as it does by default. glibc's syslog() can only write to /dev/log, so
  Dovecot runs in a mount namespace of its own whose /dev is a small tmpfs where /dev/log is a symlink
  to the socket of a private rsyslogd (own config, pid file and work directory, TZ=UTC);
- logrotate runs with its own config and state file.
Dovecot's log_path file is not used at all: the lines reach the maillog the way they do in production.

Two Dovecot versions, the same traffic (MailStack(version=...)): "2.3" is the host's (Debian 12's 2.3.19);
"2.4" is Debian 13's 2.4.1 from a cached trixie root file system (scripts/dovecot24-root builds it into
.dovecot24/root), run chrooted into it: in its mount namespace that root gets a /dev of its own whose /dev/log
leads to the private rsyslogd, a /proc, and the stack's directory bind-mounted at the same path, so that the
configuration, the sockets and the plugin's dict have one path inside and outside. Every mount lives only in
that namespace: it is gone when the stack's last Dovecot process is (close() makes sure of that).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import imaplib
import os
import poplib
import pwd
import re
import shutil
import signal
import smtplib
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

from harvester.events import SERVICE_RENAMES

DEPS_HINT = ("run scripts/e2e-deps (it installs dovecot-core/-imapd/-pop3d/-lmtpd/-submissiond/-managesieved, "
             "rsyslog and logrotate)")
PROGRAMS = {"dovecot": "dovecot-core", "rsyslogd": "rsyslog", "logrotate": "logrotate", "unshare": "util-linux",
            "chroot": "coreutils"}
PLUGIN = Path("/usr/lib/dovecot/modules/lib10_last_login_plugin.so")
# What the host's 2.3 needs beyond imap/pop3/lmtp (the services' binaries; their settings come with them).
EXTRA_BINARIES = {Path("/usr/lib/dovecot/submission"): "dovecot-submissiond",
                  Path("/usr/lib/dovecot/managesieve"): "dovecot-managesieved"}
VERSIONS = ("2.3", "2.4")
REPO = Path(__file__).resolve().parents[2]
ROOTFS_24 = REPO / ".dovecot24" / "root"  # scripts/dovecot24-root
ROOTFS_HINT = "run scripts/dovecot24-root (scripts/test does: it builds Debian trixie's Dovecot 2.4.1 into .dovecot24/)"
ROTATE_MODES = ("create", "copytruncate", "compress", "delaycompress")
CLIENT_TIMEOUT = 15.0


class MissingDependency(RuntimeError):
    """A program or privilege the stack needs is missing; the message says how to get it."""


@dataclass(frozen=True)
class User:
    name: str
    password: str


# Login names go into the log raw (user=<a>b,c d>), so the odd ones test the daemon's parsing for real.
TEST1, TEST2, TEST3 = User("test1", "pw-test1"), User("test2", "pw-test2"), User("test3", "pw-test3")
JANE = User("jane.doe@example.com", "pw-jane")
OBRIEN = User("o-brien+tag@example.com", "pw-obrien")  # o'brien: auth fails with this passwd-file
ODD = User("a>b,c d", "pw-odd")
# Logs in through a webmail host (WEBMAIL_HOST, in login_trusted_networks) that forwards the client's address.
WEB = User("web.user@example.com", "pw-web")
# 100 characters: Dovecot 2.4 cuts a user name to 80 in its log lines; the plugin stores the whole name.
LONG = User("long-" + "".join(str(i % 10) for i in range(83)) + "@example.com", "pw-long")
# POP3 allows one session per user and address (mail_max_userip_connections = 1): a second one is refused.
LIMITED = User("limited@example.com", "pw-limited")
USERS: tuple[User, ...] = (TEST1, TEST2, TEST3, JANE, OBRIEN, ODD, WEB, LONG, LIMITED)
NOSUCH = User("nosuch", "whatever")
WEBMAIL_HOST = "127.0.9.250"  # next_ip() never hands it out (its second octet is at least 1)
WEBMAIL_SERVER = "127.0.0.2"  # the address Dovecot listens on for the webmail host alone (its logins' lip)
# (user, service) pairs traffic_round() only ever fails to log in with: they must never be stored.
FAILED_ONLY: frozenset[tuple[str, str]] = frozenset(
    {(TEST2.name, "imap"), (TEST3.name, "pop3"), (TEST2.name, "submission"), (NOSUCH.name, "imap"),
     (NOSUCH.name, "pop3"), (NOSUCH.name, "lmtp"), (NOSUCH.name, "sieve"), (NOSUCH.name, "managesieve")})


class LastLogin(NamedTuple):
    time_ms: int
    ip: str


@dataclass(frozen=True)
class Ports:
    imap: int
    pop3: int
    lmtp: int
    submission: int
    sieve: int


def find_program(name: str) -> str:
    """The program's path, looking in sbin too (pytest is often run with a user's PATH)."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise MissingDependency(f"{name} (Debian package {PROGRAMS.get(name, name)}) is not installed: {DEPS_HINT}")
    return path


def check_dependencies(version: str = "2.3") -> None:
    """Fail early, with the fix in the message, instead of deep inside a start-up."""
    if version not in VERSIONS:
        raise ValueError(f"Dovecot version {version!r}: one of {VERSIONS}")
    for name in PROGRAMS:
        find_program(name)
    if not PLUGIN.exists():
        raise MissingDependency(f"{PLUGIN} (Dovecot's last_login plugin) is missing: {DEPS_HINT}")
    for binary, package in EXTRA_BINARIES.items():
        if not binary.exists():
            raise MissingDependency(f"{binary} (Debian package {package}) is missing: {DEPS_HINT}")
    for account in ("dovecot", "dovenull"):
        try:
            pwd.getpwnam(account)
        except KeyError:
            raise MissingDependency(f"system user {account} is missing (made by dovecot-core): {DEPS_HINT}") from None
    if os.geteuid() != 0:
        raise MissingDependency("the e2e tests must run as root: Dovecot switches users, and a private /dev/log "
                                "needs a mount namespace")
    if version == "2.4":
        for part in ("usr/sbin/dovecot", "usr/lib/dovecot/modules/lib10_last_login_plugin.so",
                     "usr/lib/dovecot/submission", "usr/lib/dovecot/managesieve"):
            if not (ROOTFS_24 / part).exists():
                raise MissingDependency(f"{ROOTFS_24 / part} (of Dovecot 2.4's root file system) is missing: "
                                        f"{ROOTFS_HINT}")
        chroot_ids(ROOTFS_24)


def chroot_ids(rootfs: Path) -> dict[str, tuple[int, int]]:
    """uid and gid of the accounts dovecot and dovenull in a root file system's /etc/passwd (not the host's)."""
    ids = {}
    for line in (rootfs / "etc" / "passwd").read_text().splitlines():
        name, _, uid, gid, *_ = line.split(":")
        if name in ("dovecot", "dovenull"):
            ids[name] = (int(uid), int(gid))
    if len(ids) != 2:
        raise MissingDependency(f"{rootfs}/etc/passwd lacks the dovecot and dovenull accounts: {ROOTFS_HINT}")
    return ids


def free_ports(count: int) -> list[int]:
    """count distinct TCP ports, each free on 127.0.0.1 and on ::1 alike (Dovecot listens on both).

    Every socket stays bound until all are chosen: ports picked one at a time can repeat (a stack got the same
    port twice and Dovecot refused the config with "duplicate listener")."""
    held: list[socket.socket] = []  # ports taken and ports refused alike, so neither comes round again
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
            s6 = socket.socket(socket.AF_INET6)
            held.append(s6)
            try:
                s6.bind(("::1", s.getsockname()[1]))
            except OSError:
                continue
            ports.append(s.getsockname()[1])
        return ports
    finally:
        for s in held:
            s.close()


def free_port() -> int:
    """One TCP port free on 127.0.0.1 and on ::1 alike."""
    return free_ports(1)[0]


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the test process dies, so a killed pytest leaves no daemon behind."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL if it does not go; returns the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def read_last_login_dict(path: Path) -> dict[tuple[str, str], LastLogin]:
    """The plugin's file dict (key line, value line; key shared/last-login/SERVICE/USER/IP, value epoch ms),
    reduced to the newest entry per (user, service): the row the harvester must end up with.

    Dovecot 2.3's plugin names ManageSieve logins "managesieve", 2.4's "sieve"; harvester stores "sieve" for
    both (one row per account across an upgrade, README "What counts as what"), so 2.3's name is read as 2.4's."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: dict[tuple[str, str], LastLogin] = {}
    for key, value in zip(lines[::2], lines[1::2], strict=True):
        shared, prefix, service, rest = key.split("/", 3)
        assert (shared, prefix) == ("shared", "last-login"), key
        service = SERVICE_RENAMES.get(service, service)
        user, ip = rest.rsplit("/", 1)  # an IP never has a "/", a user name might
        entry = LastLogin(int(value), ip)
        if (user, service) not in rows or entry.time_ms > rows[user, service].time_ms:
            rows[user, service] = entry
    return rows


def login_listeners(ports: Ports) -> list[str]:
    """Dovecot 2.4's login services on the stack's ports, their implicit-TLS twins off (port 0)."""
    out = []
    for service, name, port, tls in (("imap", "imap", ports.imap, "imaps"), ("pop3", "pop3", ports.pop3, "pop3s"),
                                     ("submission", "submission", ports.submission, "submissions"),
                                     ("managesieve", "sieve", ports.sieve, None)):
        off = f"  inet_listener {tls} {{\n    port = 0\n  }}\n" if tls else ""
        out.append(f"service {service}-login {{\n  inet_listener {name} {{\n    port = {port}\n  }}\n{off}}}\n")
    return out


class Rsyslog:
    """A private rsyslogd: one UNIX socket in, facility mail out to a file in the traditional format, in UTC."""

    def __init__(self, root: Path, socket_path: Path, maillog: Path) -> None:
        self.root, self.socket_path, self.maillog = root, socket_path, maillog
        self.conf = root / "rsyslog.conf"
        self.pid_file = root / "rsyslog.pid"
        self.output = root / "rsyslogd.out"
        # The same lines with microsecond RFC 3339 stamps, outside the maillog's directory and never rotated:
        # only for explaining a failed time comparison (how far the syslog stamp lagged the plugin's).
        self.precise_log = root / "maillog-rfc3339"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        work = self.root / "rsyslog-work"
        work.mkdir()
        # Rate limiting off: the Dovecot log process is one sender, and a burst must not lose lines.
        self.conf.write_text(f"""\
global(workDirectory="{work}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{self.socket_path}" RateLimit.Interval="0" UseSysTimeStamp="on")
mail.* action(type="omfile" file="{self.maillog}" template="RSYSLOG_TraditionalFileFormat")
mail.* action(type="omfile" file="{self.precise_log}" template="RSYSLOG_FileFormat")
""")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TZ": "UTC"}
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [find_program("rsyslogd"), "-n", "-f", str(self.conf), "-i", str(self.pid_file)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited with {self.proc.returncode}:\n{self.output.read_text()}")
            return self.socket_path.exists()

        wait_until(ready, 10, "rsyslogd's socket")

    def stop(self) -> None:
        stop_process(self.proc)


RAWLOG_MODES = ("", "dir", "binary")


class SmtpSink:
    """The relay host Dovecot's submission service hands mail to: a tiny SMTP server on loopback that accepts
    everything and keeps nothing (submission needs one: it connects to its relay right after the login)."""

    def __init__(self) -> None:
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SinkHandler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="smtp-sink", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


class _SinkHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        def reply(text: str) -> None:
            self.wfile.write(text.encode() + b"\r\n")
            self.wfile.flush()

        reply("220 sink.example ESMTP")
        in_data = False
        while line := self.rfile.readline():
            if in_data:
                if line.rstrip(b"\r\n") == b".":
                    in_data = False
                    reply("250 2.0.0 Ok: queued")
                continue
            verb = line.strip().split(b" ")[0].upper()
            if verb == b"EHLO":
                reply("250-sink.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10240000")
            elif verb == b"DATA":
                in_data = True
                reply("354 End data with <CR><LF>.<CR><LF>")
            elif verb == b"QUIT":
                reply("221 2.0.0 Bye")
                return
            else:
                reply("250 2.0.0 Ok")


# In a mount namespace of its own, /dev becomes a tmpfs with the few nodes Dovecot uses and a /dev/log that leads
# to the private rsyslogd. `unshare`, `sh` (and `chroot`) exec, so the pid is Dovecot's master.
# $1 syslog socket, $2 dovecot, $3 config, $4 the root Dovecot runs in ("" = the host's), $5 the stack's directory.
START_SCRIPT = """set -e
R="$4"
if [ -n "$R" ]; then
  mount -t tmpfs -o mode=1777,size=1m e2e-tmp "$R/tmp"
  mkdir -p "$R$5"
  mount --bind "$5" "$R$5"
  mount -t proc e2e-proc "$R/proc"
fi
mount -t tmpfs -o mode=0755,size=64k e2e-dev "$R/dev"
mknod -m 666 "$R/dev/null" c 1 3
mknod -m 666 "$R/dev/zero" c 1 5
mknod -m 666 "$R/dev/full" c 1 7
mknod -m 666 "$R/dev/random" c 1 8
mknod -m 666 "$R/dev/urandom" c 1 9
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
ln -s "$1" "$R/dev/log"
if [ -n "$R" ]; then
  exec chroot "$R" "$2" -F -c "$3"
fi
exec "$2" -F -c "$3"
"""


class Dovecot:
    """A private Dovecot 2.3 (imap, pop3, lmtp, submission, managesieve on loopback) with the last_login plugin for
    all five services; submission relays to relay_port (an SmtpSink).

    rawlog="dir": `rawlog_dir = ROOT/rawlog/%u` for imap and pop3 (a directory per user, made here, as Dovecot
    requires) and the pre-login rawlog `imap-login -R rawlogs` / `pop3-login -R rawlogs` into
    BASE_DIR/login/rawlogs, where the client's credentials are in plain text; rawlog="binary": the rawlog binary
    as a post-login script of imap and pop3 (`script-login -d rawlog -t -I`), writing
    HOME/dovecot.rawlog/IP-YYYYMMDD-HHMMSS-PID.in|out."""

    version = "2.3"
    rootfs: Path | None = None  # the root file system Dovecot runs chrooted into; None: the host's

    def __init__(self, root: Path, syslog_socket: Path, relay_port: int, rawlog: str = "") -> None:
        if rawlog not in RAWLOG_MODES:
            raise ValueError(f"rawlog mode {rawlog!r}: one of {RAWLOG_MODES}")
        self.root, self.syslog_socket, self.relay_port, self.rawlog = root, syslog_socket, relay_port, rawlog
        self.conf = root / "dovecot.conf"
        self.base_dir = root / "run"
        self.rawlog_dir = root / "rawlog"  # rawlog="dir"
        self.prelogin_rawlog_dir = self.base_dir / "login" / "rawlogs"  # rawlog="dir"
        self.homes = root / "mail"  # HOME = homes/USER; rawlog="binary" writes HOME/dovecot.rawlog
        self.dict_path = root / "dict" / "last_login.dict"
        self.users_file = root / "users"
        self.output = root / "dovecot.out"
        self.ports = Ports(*free_ports(5))
        self.ids = self.account_ids()
        self.proc: subprocess.Popen | None = None
        self.mount_ns: str | None = None  # the master's mount namespace, /proc/PID/ns/mnt

    def account_ids(self) -> dict[str, tuple[int, int]]:
        return {name: (pwd.getpwnam(name).pw_uid, pwd.getpwnam(name).pw_gid) for name in ("dovecot", "dovenull")}

    def own(self, path: Path, account: str = "dovecot") -> None:
        os.chown(path, *self.ids[account])

    def prepare(self) -> None:
        """The directories and the passwd-file both versions use."""
        for d in (self.homes, self.dict_path.parent, self.root / "state"):
            d.mkdir()
        for d in (self.homes, self.dict_path.parent):  # written by the mail processes, which run as dovecot
            self.own(d)
        self.users_file.write_text("".join(f"{u.name}:{{PLAIN}}{u.password}\n" for u in USERS))
        self.users_file.chmod(0o644)

    def write_config(self) -> None:
        self.prepare()
        mail = self.homes
        rawlog_settings = login_executable = protocol_rawlog = ""
        if self.rawlog == "dir":  # for imap and pop3 only (submission and managesieve would write one too)
            protocol_rawlog = f"  rawlog_dir = {self.rawlog_dir}/%u\n"
            for d in (self.rawlog_dir, *(self.rawlog_dir / u.name for u in USERS)):
                d.mkdir(mode=0o700)
                self.own(d)
            login_executable = "  executable = {service}-login -R rawlogs\n"
        elif self.rawlog == "binary":
            rawlog_settings = """\
service imap {
  executable = imap postlogin
}
service pop3 {
  executable = pop3 postlogin
}
service postlogin {
  executable = script-login -d rawlog -t -I
  unix_listener postlogin {
  }
}
"""
            for u in USERS:
                for d in (mail / u.name, mail / u.name / "dovecot.rawlog"):
                    d.mkdir()
                    self.own(d)
        # auth_username_chars empty: names like "a>b,c d" are allowed, as on sites that widened it.
        # recipient_delimiter empty: "o-brien+tag@..." is a user of its own, not o-brien with a +tag detail.
        self.conf.write_text(f"""\
base_dir = {self.base_dir}
state_dir = {self.root}/state
log_path = syslog
syslog_facility = mail
protocols = imap pop3 lmtp submission sieve
listen = 127.0.0.1, {WEBMAIL_SERVER}, ::1
ssl = no
auth_mechanisms = plain login
disable_plaintext_auth = no
auth_failure_delay = 0
auth_username_chars =
recipient_delimiter =
default_login_user = dovenull
default_internal_user = dovecot
mail_location = maildir:{mail}/%u/Maildir
mail_uid = dovecot
mail_gid = dovecot
first_valid_uid = 1
login_trusted_networks = {WEBMAIL_HOST}
submission_relay_host = 127.0.0.1
submission_relay_port = {self.relay_port}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_file}
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={mail}/%u
}}
{rawlog_settings}service imap-login {{
{login_executable.format(service="imap")}  inet_listener imap {{
    port = {self.ports.imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
{login_executable.format(service="pop3")}  inet_listener pop3 {{
    port = {self.ports.pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service submission-login {{
  inet_listener submission {{
    port = {self.ports.submission}
  }}
}}
service managesieve-login {{
  inet_listener sieve {{
    port = {self.ports.sieve}
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.ports.lmtp}
  }}
}}
protocol imap {{
  mail_plugins = $mail_plugins last_login
{protocol_rawlog}}}
protocol pop3 {{
  mail_plugins = $mail_plugins last_login
  mail_max_userip_connections = 1
{protocol_rawlog}}}
protocol lmtp {{
  mail_plugins = $mail_plugins last_login
}}
protocol submission {{
  mail_plugins = $mail_plugins last_login
}}
protocol sieve {{
  mail_plugins = $mail_plugins last_login
}}
plugin {{
  last_login_dict = file:{self.dict_path}
  last_login_key = last-login/%s/%u/%r
  last_login_precision = ms
}}
""")

    def start(self) -> None:
        self.write_config()
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TZ": "UTC"}
        dovecot = "/usr/sbin/dovecot" if self.rootfs else find_program("dovecot")
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [find_program("unshare"), "--mount", "--propagation", "private", "/bin/sh", "-c", START_SCRIPT, "sh",
                 str(self.syslog_socket), dovecot, str(self.conf), str(self.rootfs or ""), str(self.root)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)

        own_ns = os.readlink("/proc/self/ns/mnt")

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}:\n{self.output.read_text()}")
            if self.mount_ns is None:  # known as soon as unshare made it, so that stop() finds it on a failure too
                with contextlib.suppress(OSError):
                    ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
                    self.mount_ns = ns if ns != own_ns else None
            try:
                for port in (self.ports.imap, self.ports.pop3, self.ports.lmtp, self.ports.submission,
                             self.ports.sieve):
                    socket.create_connection(("127.0.0.1", port), 1).close()
            except OSError:
                return False
            return True

        wait_until(listening, 20, f"Dovecot {self.version}'s listeners")
        if self.rawlog == "dir":  # the login processes, chrooted to BASE_DIR/login as dovenull, write here
            self.prelogin_rawlog_dir.mkdir(mode=0o700)
            self.own(self.prelogin_rawlog_dir, "dovenull")

    def stop(self) -> None:
        """Stops the master, then waits for every process left in its mount namespace (and kills the stragglers):
        when none is left, the namespace and its mounts are gone."""
        try:
            stop_process(self.proc, timeout=15)
        finally:
            if self.mount_ns is not None:
                left = self.namespace_members()
                deadline = time.monotonic() + 5
                while left and time.monotonic() < deadline:
                    time.sleep(0.05)
                    left = self.namespace_members()
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                wait_until(lambda: not self.namespace_members(), 5, "the last process of Dovecot's mount namespace")

    def namespace_members(self) -> list[int]:
        pids = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry.name}/ns/mnt") == self.mount_ns:
                        pids.append(int(entry.name))
        return pids


class Dovecot24(Dovecot):
    """The same stack with Debian 13's Dovecot 2.4.1, chrooted into ROOTFS_24 (see the module's docstring), in
    2.4's configuration syntax, the last_login plugin configured as in the shared 2.4.1 samples
    (/work/shared/samples/dovecot-2.4.1/dovecot-syslog.conf.example). No rawlog modes."""

    version = "2.4"
    rootfs = ROOTFS_24

    def __init__(self, root: Path, syslog_socket: Path, relay_port: int, rawlog: str = "") -> None:
        if rawlog:
            raise ValueError("the Dovecot 2.4 stack has no rawlog modes")
        super().__init__(root, syslog_socket, relay_port)

    def account_ids(self) -> dict[str, tuple[int, int]]:
        return chroot_ids(ROOTFS_24)  # the chroot's own accounts, not the host's

    def write_config(self) -> None:
        self.prepare()
        self.conf.write_text(f"""\
dovecot_config_version = 2.4.1
dovecot_storage_version = 2.4.1
base_dir = {self.base_dir}
state_dir = {self.root}/state
log_path = syslog
syslog_facility = mail
protocols = imap pop3 lmtp submission sieve
listen = 127.0.0.1, {WEBMAIL_SERVER}, ::1
ssl = no
auth_mechanisms = plain login
auth_allow_cleartext = yes
auth_failure_delay = 0
auth_username_chars =
recipient_delimiter =
default_login_user = dovenull
default_internal_user = dovecot
login_trusted_networks = {WEBMAIL_HOST}
mail_driver = maildir
mail_home = {self.homes}/%{{user}}
mail_path = ~/Maildir
mail_uid = dovecot
mail_gid = dovecot
first_valid_uid = 1
submission_relay_host = 127.0.0.1
submission_relay_port = {self.relay_port}
passdb passwd-file {{
  passwd_file_path = {self.users_file}
  default_password_scheme = PLAIN
}}
userdb static {{
  fields {{
    uid = dovecot
    gid = dovecot
    home = {self.homes}/%{{user}}
  }}
}}
{"".join(login_listeners(self.ports))}service lmtp {{
  inet_listener lmtp {{
    listen = 127.0.0.1
    port = {self.ports.lmtp}
  }}
}}
protocol pop3 {{
  mail_max_userip_connections = 1
}}
mail_plugins {{
  last_login = yes
}}
last_login_key = last-login/%{{service}}/%{{user}}/%{{remote_ip}}
last_login_precision = ms
last_login {{
  dict file {{
    dict_file_path = {self.dict_path}
  }}
}}
""")


class MailStack:
    """rsyslogd + Dovecot + logrotate + clients in one temporary directory; a context manager that always cleans up.
    version: "2.3" (the host's Dovecot) or "2.4" (Debian 13's, chrooted); rawlog: Dovecot's rawlog mode (2.3 only,
    see Dovecot).

    HARVESTER_E2E_KEEP=1 leaves the directory (configs, maillog*, the plugin's dict) for a post-mortem."""

    def __init__(self, rawlog: str = "", version: str = "2.3") -> None:
        check_dependencies(version)
        self.version = version
        self.root = Path(tempfile.mkdtemp(prefix="hv-e2e-", dir="/tmp"))
        self.root.chmod(0o755)  # the mail processes (uid dovecot) must reach mail/ and dict/
        self.log_dir = self.root / "log"
        self.log_dir.mkdir()
        self.maillog = self.log_dir / "maillog"
        self.syslog = Rsyslog(self.root, self.root / "syslog.sock", self.maillog)
        self.sink = SmtpSink()
        dovecot_class = Dovecot24 if version == "2.4" else Dovecot
        self.dovecot = dovecot_class(self.root, self.syslog.socket_path, self.sink.port, rawlog)
        self.logrotate_state = self.root / "logrotate.state"
        self._hosts = 0
        self._hosts_lock = threading.Lock()

    # -- life cycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> MailStack:
        try:
            self.sink.start()
            self.syslog.start()
            self.dovecot.start()
            wait_until(lambda: "starting up for imap, pop3, lmtp, submission, sieve" in self.log_text(), 10,
                       "Dovecot's start-up line in the maillog, through rsyslogd")
        except BaseException as e:
            diagnostics = self.diagnostics()
            self.close()
            if isinstance(e, TimeoutError | RuntimeError):
                raise RuntimeError(f"{e}\n{diagnostics}") from e
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.dovecot.stop()
        finally:
            self.syslog.stop()
            self.sink.stop()
            if os.environ.get("HARVESTER_E2E_KEEP"):
                print(f"e2e mail stack kept in {self.root}")
            else:
                shutil.rmtree(self.root, ignore_errors=True)

    def diagnostics(self) -> str:
        """The tail of everything a failed run leaves behind, for assertion messages."""
        parts = []
        for path in (self.dovecot.output, self.syslog.output, self.maillog):
            if path.exists():
                parts.append(f"--- {path.name} (tail) ---\n" + "\n".join(path.read_text(errors="replace")
                                                                          .splitlines()[-30:]))
        return "\n".join(parts)

    # -- logs and rotation ----------------------------------------------------------------------------------

    def log_text(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def log_files(self) -> list[Path]:
        return sorted(self.log_dir.iterdir())

    def rotate(self, mode: str) -> None:
        """Run the real logrotate once, forced, in one of ROTATE_MODES on the live maillog.

        create: rename to maillog.1, new empty maillog, rsyslogd reopens on SIGHUP (postrotate);
        copytruncate: copy to maillog.1, truncate the live file in place (rsyslogd keeps writing into it);
        compress: like create, then maillog.1 is gzipped to maillog.1.gz (the original deleted) after the HUP;
        delaycompress: like create, and the previous maillog.1 becomes maillog.2.gz in the same run.
        Modes can follow one another: logrotate shifts maillog.N and maillog.N.gz separately."""
        if mode not in ROTATE_MODES:
            raise ValueError(f"rotation mode {mode!r}: one of {ROTATE_MODES}")
        reopen = f"  postrotate\n    kill -HUP $(cat {self.syslog.pid_file})\n  endscript\n"
        body = {
            "create": "  create 0644 root root\n" + reopen,
            "copytruncate": "  copytruncate\n",
            "compress": "  compress\n  create 0644 root root\n" + reopen,
            "delaycompress": "  compress\n  delaycompress\n  create 0644 root root\n" + reopen,
        }[mode]
        conf = self.root / f"logrotate-{mode}.conf"
        conf.write_text(f"{self.maillog} {{\n  rotate 20\n  missingok\n{body}}}\n")
        conf.chmod(0o644)
        proc = subprocess.run([find_program("logrotate"), "-f", "-s", str(self.logrotate_state), str(conf)],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"logrotate ({mode}) failed with {proc.returncode}:\n{proc.stdout}{proc.stderr}")

    # -- the reference answer -------------------------------------------------------------------------------

    def last_logins(self) -> dict[tuple[str, str], LastLogin]:
        """What Dovecot's last_login plugin stored: {(user, service): (time_ms, ip)}, newest per key."""
        return read_last_login_dict(self.dovecot.dict_path)

    # -- clients --------------------------------------------------------------------------------------------

    def next_ip(self) -> str:
        """A fresh 127/8 source address per session: the stored IP then tells which session a row came from."""
        with self._hosts_lock:
            self._hosts += 1
            k = self._hosts
        return f"127.{1 + k // 62500 % 250}.{1 + k // 250 % 250}.{1 + k % 250}"

    def _server(self, src: str) -> str:
        if src == WEBMAIL_HOST:
            return WEBMAIL_SERVER
        return "::1" if ":" in src else "127.0.0.1"

    def imap(self, user: User, src: str, *, password: str | None = None, sasl: bool = False,
             expunge: bool = False, logout: bool = True, forwarded: str | None = None) -> bool:
        """One IMAP session from src; True if the login succeeded. sasl: AUTHENTICATE PLAIN instead of LOGIN
        (needed for names with spaces). logout=False drops the connection instead of sending LOGOUT.
        forwarded: the client address a webmail host passes on before the login (`ID ("x-originating-ip" ...)`,
        believed when src is in login_trusted_networks, i.e. WEBMAIL_HOST)."""
        pw = user.password if password is None else password
        client = _IMAP(self._server(src), self.dovecot.ports.imap, src)
        try:
            if forwarded is not None:
                typ, data = client.xatom("ID", f'("name" "e2e webmail" "x-originating-ip" "{forwarded}")')
                assert typ == "OK", data
            try:
                if sasl:
                    client.authenticate("PLAIN", lambda _: f"\0{user.name}\0{pw}".encode())
                else:
                    client.login(user.name, pw)
            except imaplib.IMAP4.error:
                return False
            typ, data = client.select("INBOX")
            assert typ == "OK", data
            if expunge and int(data[0]) > 0:
                client.store("1:*", "+FLAGS", "\\Deleted")
                client.expunge()
            return True
        finally:
            if logout:
                client.logout()
            else:
                client.shutdown()

    def pop3(self, user: User, src: str, *, password: str | None = None, sasl: bool = False,
             delete: bool = True) -> bool:
        """One POP3 session from src; True if the login succeeded. delete: RETR and DELE every message."""
        pw = user.password if password is None else password
        client = _POP3(self._server(src), self.dovecot.ports.pop3, src)
        try:
            try:
                if sasl:
                    client._shortcmd("AUTH PLAIN " + base64.b64encode(f"\0{user.name}\0{pw}".encode()).decode())
                else:
                    client.user(user.name)
                    client.pass_(pw)
            except poplib.error_proto:
                return False
            count, _ = client.stat()
            if delete:
                for n in range(1, count + 1):
                    client.retr(n)
                    client.dele(n)
            return True
        finally:
            client.quit()

    def pop3_twice(self, user: User, src: str) -> tuple[bool, bool]:
        """Two POP3 sessions of one user from one address at the same time (with mail_max_userip_connections = 1:
        the second is refused after a successful authentication); whether each logged in."""
        first = _POP3(self._server(src), self.dovecot.ports.pop3, src)
        try:
            try:
                first.user(user.name)
                first.pass_(user.password)
            except poplib.error_proto:
                return False, False
            second = _POP3(self._server(src), self.dovecot.ports.pop3, src)
            try:
                second.user(user.name)
                second.pass_(user.password)
                second_ok = True
            except poplib.error_proto:
                second_ok = False
            finally:
                try:
                    second.quit()
                except (poplib.error_proto, OSError):
                    second.close()
            first.stat()
            return True, second_ok
        finally:
            first.quit()

    def submission(self, user: User, src: str, *, password: str | None = None, send: bool = True) -> bool:
        """One submission session from src (AUTH PLAIN); True if the login succeeded. send: one message, which
        Dovecot relays to the stack's SmtpSink."""
        pw = user.password if password is None else password
        with smtplib.SMTP(self._server(src), self.dovecot.ports.submission, source_address=(src, 0),
                          timeout=CLIENT_TIMEOUT) as client:
            client.ehlo("client.e2e.example")
            code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{user.name}\0{pw}".encode()).decode())
            if code != 235:
                return False
            if send:
                client.sendmail("sender@example.org", ["rcpt@example.org"],
                                b"Subject: via submission\r\n\r\nhello\r\n")
            return True

    def sieve(self, user: User, src: str, *, password: str | None = None) -> bool:
        """One ManageSieve session from src (AUTHENTICATE "PLAIN", LISTSCRIPTS, LOGOUT); True if the login
        succeeded."""
        pw = user.password if password is None else password
        with socket.create_connection((self._server(src), self.dovecot.ports.sieve), CLIENT_TIMEOUT,
                                      source_address=(src, 0)) as sock, sock.makefile("rb") as reader:
            def response() -> bytes:
                """Lines up to the one that starts with OK, NO or BYE (the capabilities carry no literals)."""
                while True:
                    line = reader.readline()
                    if not line:
                        raise EOFError("the ManageSieve server closed the connection")
                    if line[:2] in (b"OK", b"NO") or line[:3] == b"BYE":
                        return line

            response()  # the greeting: capabilities, then OK
            token = base64.b64encode(f"\0{user.name}\0{pw}".encode())
            sock.sendall(b'AUTHENTICATE "PLAIN" "' + token + b'"\r\n')
            if not response().startswith(b"OK"):
                sock.sendall(b"LOGOUT\r\n")
                return False
            sock.sendall(b"LISTSCRIPTS\r\n")
            assert response().startswith(b"OK")
            sock.sendall(b"LOGOUT\r\n")
            response()
            return True

    def lmtp(self, recipients: list[User], src: str, subject: str = "hello") -> list[User]:
        """One LMTP transaction from src (as an MTA would hand mail over); returns the recipients it delivered to."""
        msg = (f"From: sender@example.org\r\nSubject: {subject}\r\n"
               f"Message-ID: <{time.monotonic_ns()}@e2e.example>\r\n\r\nbody\r\n").encode()
        with smtplib.LMTP("127.0.0.1", self.dovecot.ports.lmtp, source_address=(src, 0),
                          timeout=CLIENT_TIMEOUT) as client:
            client.ehlo_or_helo_if_needed()
            code, resp = client.mail("sender@example.org")
            assert code == 250, resp
            accepted = [u for u in recipients if client.rcpt(lmtp_path(u.name))[0] == 250]
            if accepted:
                code, resp = client.data(msg)
                # LMTP answers DATA once per accepted recipient; smtplib reads only the first reply.
                replies = [code] + [client.getreply()[0] for _ in accepted[1:]]
                assert all(c == 250 for c in replies), (replies, resp)
            else:
                client.rset()
            return accepted

    # -- a round of everyday traffic ------------------------------------------------------------------------

    def traffic_round(self, n: int) -> None:
        """Every kind of session once, each from a fresh source address (jane: ::1 every other round): LMTP
        deliveries (one rejected recipient), IMAP logins by LOGIN and AUTHENTICATE, POP3 sessions that delete
        what was delivered, a submission login that sends a message, a ManageSieve login (the plugin's service
        `sieve`), a webmail login (WEBMAIL_HOST forwards a client address, which the plugin stores), a user name
        of 100 characters, two POP3 sessions at once of which the second is refused (connection limit); then
        failed logins, some for keys that logged in from another address just before (a failure must not
        replace that row), some for keys that never succeed (FAILED_ONLY).

        Successes run one after the other, so the log's order is the plugin's order. Dovecot answers a failed
        login only at its next failure flush (every 0.5 s even with auth_failure_delay = 0), so the failures
        run side by side."""
        must = self._must
        must(self.lmtp([*USERS, NOSUCH], self.next_ip(), f"round {n}"), list(USERS), "LMTP to every user")
        must(self.imap(TEST1, self.next_ip(), expunge=True), True, "IMAP test1")
        must(self.pop3(TEST2, self.next_ip()), True, "POP3 test2")
        must(self.imap(TEST3, self.next_ip(), sasl=True, expunge=n % 3 == 0), True, "IMAP test3 SASL")
        must(self.imap(JANE, "::1" if n % 2 == 0 else self.next_ip()), True, "IMAP jane")
        must(self.imap(ODD, self.next_ip(), sasl=True), True, "IMAP odd name")
        must(self.pop3(OBRIEN, self.next_ip(), sasl=True), True, "POP3 o-brien")
        if n % 2 == 1:
            must(self.pop3(ODD, self.next_ip(), sasl=True), True, "POP3 odd name")
        must(self.submission(TEST1, self.next_ip()), True, "submission test1")
        must(self.sieve(JANE, self.next_ip()), True, "ManageSieve jane")
        must(self.imap(WEB, WEBMAIL_HOST, forwarded=f"198.51.100.{1 + n % 250}"), True, "IMAP through webmail")
        must(self.imap(LONG, self.next_ip()), True, "IMAP with a 100-character user name")
        must(self.pop3_twice(LIMITED, self.next_ip()), (True, False), "POP3 twice at once, over the limit")
        must(self.lmtp([TEST3], self.next_ip(), f"round {n} again"), [TEST3], "LMTP to test3 alone")
        failures: list[tuple[str, Callable[[], bool]]] = [
            ("IMAP test1 wrong pw", partial(self.imap, TEST1, self.next_ip(), password="wrong", logout=n % 2 == 0)),
            ("IMAP test2 wrong pw", partial(self.imap, TEST2, self.next_ip(), password="wrong")),
            ("POP3 test3 wrong pw", partial(self.pop3, TEST3, self.next_ip(), password="wrong")),
            ("POP3 odd name wrong pw", partial(self.pop3, ODD, self.next_ip(), password="wrong", sasl=True)),
            ("IMAP unknown user", partial(self.imap, NOSUCH, self.next_ip())),
            ("POP3 unknown user", partial(self.pop3, NOSUCH, self.next_ip())),
            ("submission test2 wrong pw", partial(self.submission, TEST2, self.next_ip(), password="wrong")),
            ("ManageSieve unknown user", partial(self.sieve, NOSUCH, self.next_ip())),
        ]
        with ThreadPoolExecutor(len(failures)) as pool:
            results = [(what, pool.submit(session)) for what, session in failures]
            for what, result in results:
                must(result.result(), False, what)

    @staticmethod
    def _must(got: object, expected: object, what: str) -> None:
        if got != expected:
            raise AssertionError(f"{what}: got {got!r}, expected {expected!r}")


def lmtp_path(name: str) -> str:
    """RCPT TO path for a user name: a local part that is not a dot-atom is quoted (RFC 5321)."""
    if re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+(@[A-Za-z0-9.-]+)?", name):
        return f"<{name}>"
    return '<"' + name.replace("\\", "\\\\").replace('"', '\\"') + '">'


class _IMAP(imaplib.IMAP4):
    """imaplib's client, its socket bound to a chosen source address (so each session has its own rip)."""

    def __init__(self, host: str, port: int, src: str) -> None:
        self._src = src
        super().__init__(host, port, timeout=CLIENT_TIMEOUT)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._src, 0))


class _POP3(poplib.POP3):
    """poplib's client, its socket bound to a chosen source address."""

    def __init__(self, host: str, port: int, src: str) -> None:
        self._src = src
        super().__init__(host, port, CLIENT_TIMEOUT)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._src, 0))
