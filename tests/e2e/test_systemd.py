"""End to end under a real systemd: Debian 12 booted with systemd 252 as PID 1 (systemd-nspawn), the unit from deploy/
installed unchanged, Dovecot logging to syslog as it does by default, real IMAP / POP3 / LMTP traffic from clients
inside the container -> rows in the store that agree with Dovecot's own last_login plugin.

Two variants of the same machine:
- journal only: Debian 12's default (rsyslog masked, so no /var/log/mail.log): the unit must store the rows from the
  systemd journal;
- rsyslog: rsyslog writes /var/log/mail.log: the unit follows that file and must not read the journal as well.
Each proves what only a real service manager shows: READY and `active (running)`, `systemctl reload` (also a broken
config: systemd still says the reload succeeded, so harvester must say it failed), alive past WatchdogSec, and
`systemctl stop` writing the rows still waiting.

How it stays private and leaves nothing behind: the cached root file system (scripts/systemd-root, .systemd-root/)
is only the lower layer of an overlay whose upper layer is in the test's directory; the overlay is mounted in a mount
namespace of its own (`unshare --mount`) that dies with the container; nspawn runs with --private-network (loopback
only) in a cgroup of its own, created here and removed afterwards together with the payload/ and supervisor/ cgroups
nspawn leaves in it; whatever is still alive in that cgroup at the end is killed. These tests need root, the
packages scripts/e2e-deps installs, that root file system and cargo (the checkout is built into a wheel); without
them they fail, never skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harvester.events import ROW_KINDS
from tests.e2e.dovecot import LastLogin, read_last_login_dict

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".systemd-root"  # scripts/systemd-root
ROOTFS = CACHE / "root"
ROOTFS_HINT = ("run scripts/systemd-root (scripts/test does: it builds Debian 12 with systemd, Dovecot and harvester's "
               "dependencies into .systemd-root/)")
DEPS_HINT = "run scripts/e2e-deps (it installs systemd-container and mmdebstrap)"
UNIT = REPO / "deploy" / "harvester.service"
CLIENT = Path(__file__).with_name("systemd_mail_client.py")
VENV = "/opt/harvester/venv"
DB = "var/lib/private/harvester/harvester.db"  # StateDirectory=harvester of a DynamicUser= service
MAILLOG = "/var/log/mail.log"
JOURNAL_CHOSEN = "reading Dovecot's lines from the systemd journal"  # harvester's log line when it chose it
PLUGIN_DICT = "srv/mail/last_login.dict"
WATCHDOG_S = 30  # the unit's WatchdogSec=
ROWS_TIMEOUT_S = 30.0

USERS = {"alice": "pw-alice", "bob": "pw-bob", "carol": "pw-carol", "dave": "pw-dave"}
# Round one: each session from a source address of its own; dave's IMAP login fails (never a row).
ROUND1 = [["lmtp", "127.1.0.1", ["alice", "bob", "carol"]], ["imap", "127.1.0.2", "alice", USERS["alice"]],
          ["imap", "127.1.0.3", "bob", USERS["bob"]], ["pop3", "127.1.0.4", "carol", USERS["carol"]],
          ["pop3", "127.1.0.5", "alice", USERS["alice"]], ["imap", "127.1.0.6", "dave", "wrong"]]
ROUND1_ROWS = {("alice", "lmtp"): "127.1.0.1", ("bob", "lmtp"): "127.1.0.1", ("carol", "lmtp"): "127.1.0.1",
               ("alice", "imap"): "127.1.0.2", ("bob", "imap"): "127.1.0.3", ("carol", "pop3"): "127.1.0.4",
               ("alice", "pop3"): "127.1.0.5"}
ROUND1_LOGINS = {"imap": 2, "pop3": 2, "lmtp": 3}  # row-making events counted: each line read exactly once
# Round two, right before `systemctl stop`: new rows that only the stop's flush may have written.
ROUND2 = [["imap", "127.2.0.1", "bob", USERS["bob"]], ["pop3", "127.2.0.2", "dave", USERS["dave"]]]
ROUND2_ROWS = {("bob", "imap"): "127.2.0.1", ("dave", "pop3"): "127.2.0.2"}

# Dovecot's whole configuration (Debian's own conf.d is not read): logging is left at its default, syslog.
DOVECOT_CONF = """\
protocols = imap pop3 lmtp
listen = 127.0.0.1
ssl = no
auth_mechanisms = plain
disable_plaintext_auth = no
auth_failure_delay = 0
mail_location = maildir:/srv/mail/%u/Maildir
mail_uid = dovecot
mail_gid = dovecot
first_valid_uid = 1
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u /etc/dovecot/users
}
userdb {
  driver = static
  args = uid=dovecot gid=dovecot home=/srv/mail/%u
}
service lmtp {
  inet_listener lmtp {
    address = 127.0.0.1
    port = 24
  }
}
protocol imap {
  mail_plugins = $mail_plugins last_login
}
protocol pop3 {
  mail_plugins = $mail_plugins last_login
}
protocol lmtp {
  mail_plugins = $mail_plugins last_login
}
plugin {
  last_login_dict = file:/srv/mail/last_login.dict
  last_login_key = last-login/%s/%u/%r
  last_login_precision = ms
}
"""

# In a mount namespace of its own: the overlay (cached root below, the test's directory above), the checkout's wheel
# installed into the venv by a container that is not booted, then the boot. `exec`: the pid is nspawn's.
# $1 lower, $2 upper, $3 work, $4 merged, $5 directory of the wheel, $6 the wheel's name; then nspawn's extra args.
BOOT_SCRIPT = """set -e
mount -t overlay harvester-e2e -o "lowerdir=$1,upperdir=$2,workdir=$3" "$4"
M=$4 W=$5 WHEEL=$6
shift 6
systemd-nspawn -q --register=no --keep-unit --private-network -D "$M" --bind-ro="$W:/run/wheel" --pipe \
  /opt/harvester/venv/bin/pip install --quiet --no-deps --no-index --no-cache-dir --disable-pip-version-check \
  "/run/wheel/$WHEEL"
echo "== booting"
exec systemd-nspawn -q -b -D "$M" --register=no --keep-unit --private-network --console=read-only "$@"
"""


class Missing(RuntimeError):
    """A part the test needs is missing; the message says how to get it."""


def check_dependencies() -> None:
    if os.geteuid() != 0:
        raise Missing("the systemd e2e test must run as root (systemd-nspawn, mount namespaces, cgroups)")
    for program, package in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux"),
                             ("unshare", "util-linux")):
        if shutil.which(program, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin") is None:
            raise Missing(f"{program} (Debian package {package}) is missing: {DEPS_HINT}")
    for part in ("lib/systemd/systemd", "usr/sbin/dovecot", f"{VENV[1:]}/bin/python"):
        if not (ROOTFS / part).exists():
            raise Missing(f"{ROOTFS / part} is missing: {ROOTFS_HINT}")
    # The venv holds the dependencies pyproject.toml had when it was built: a changed list needs a rebuild.
    deps = " ".join(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    recipe = (CACHE / "VENV_RECIPE").read_text() if (CACHE / "VENV_RECIPE").exists() else ""
    if f"deps={deps}" not in recipe:
        raise Missing(f"the container's venv was built for other dependencies than pyproject.toml's ({deps}): "
                      f"{ROOTFS_HINT}")
    if (ROOTFS / "bin" / "kill").exists() or (ROOTFS / "usr" / "bin" / "kill").exists():
        raise Missing(f"{ROOTFS} has /bin/kill (procps); the test needs a system without it: {ROOTFS_HINT}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout as a wheel, native module included, built on the host (its Python is 3.11, like Debian 12's)."""
    try:
        check_dependencies()
    except Missing as e:
        pytest.fail(str(e), pytrace=False)  # never a skip: a suite that silently skips proves nothing
    if sys.version_info[:2] != (3, 11):  # the wheel's native module is built for the host's Python
        pytest.fail(f"the systemd e2e test builds its wheel with this Python ({sys.version.split()[0]}), and Debian "
                    "12's is 3.11: run the tests with a Python 3.11 venv", pytrace=False)
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":" + str(Path.home() / ".cargo" / "bin")}
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--disable-pip-version-check",
                        "-w", str(out), str(REPO)], capture_output=True, text=True, env=env, timeout=900)
    wheels = list(out.glob("harvester-*.whl"))
    if r.returncode != 0 or len(wheels) != 1:
        pytest.fail(f"pip wheel of the checkout failed ({r.returncode}):\n{r.stdout}{r.stderr}", pytrace=False)
    print(f"wheel built in {time.monotonic() - started:.1f} s")
    import zipfile
    if not any("_fastscan" in n for n in zipfile.ZipFile(wheels[0]).namelist()):
        pytest.fail("the wheel lacks the native module (harvester/_fastscan): is cargo installed? (https://rustup.rs)",
                    pytrace=False)
    return wheels[0]


# --- cgroups ------------------------------------------------------------------------------------------------------

def own_cgroups(name: str) -> list[Path]:
    """A directory of our own in each hierarchy nspawn uses (the v1 name=systemd one and the unified one), below this
    process's cgroup there: nspawn leaves its payload/ and supervisor/ cgroups where it was started."""
    mounts: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        rest = fields[fields.index("-") + 1:]
        if rest[0] == "cgroup2":
            mounts.setdefault("unified", fields[4])
        elif rest[0] == "cgroup" and "name=systemd" in rest[2].split(","):
            mounts.setdefault("systemd", fields[4])
    out = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        key = "unified" if hid == "0" else "systemd" if controllers == "name=systemd" else None
        if key in mounts:
            out.append(Path(mounts[key] + path.rstrip("/")) / name)
    return out


def cgroup_pids(top: Path) -> set[int]:
    pids: set[int] = set()
    for dirpath, _, files in os.walk(top):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                pids |= {int(p) for p in Path(dirpath, "cgroup.procs").read_text().split()}
    return pids


def remove_cgroup(top: Path) -> None:
    for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(dirpath)


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return result


# --- the container ------------------------------------------------------------------------------------------------

class Container:
    """A booted Debian 12 on an overlay of the cached root; a context manager that always cleans up."""

    def __init__(self, tmp: Path, wheel: Path, *, rsyslog: bool) -> None:
        self.tmp, self.wheel, self.rsyslog = tmp, wheel, rsyslog
        self.upper, self.work, self.merged = tmp / "upper", tmp / "work", tmp / "merged"
        self.output = tmp / "nspawn.out"
        self.cgroups = own_cgroups(f"harvester-e2e-{os.getpid()}-{tmp.name}")
        self.proc: subprocess.Popen | None = None
        self.pid1 = 0
        self.boot_s = 0.0  # from starting nspawn to `systemctl is-system-running` saying running

    # -- before the boot: files in the upper layer ---------------------------------------------------------------

    def _put(self, path: str, text: str, mode: int = 0o644) -> None:
        target = self.upper / path.lstrip("/")
        for parent in reversed(target.relative_to(self.upper).parents[:-1]):
            d = self.upper / parent
            if not d.exists():
                lower = ROOTFS / parent
                d.mkdir(mode=lower.stat().st_mode & 0o7777 if lower.is_dir() else 0o755)
        target.write_text(text)
        target.chmod(mode)

    def _ids(self, account: str) -> tuple[int, int]:
        for line in (ROOTFS / "etc" / "passwd").read_text().splitlines():
            name, _, uid, gid, *_ = line.split(":")
            if name == account:
                return int(uid), int(gid)
        raise Missing(f"{ROOTFS}/etc/passwd has no {account}: {ROOTFS_HINT}")

    def _gid(self, group: str) -> int:
        for line in (ROOTFS / "etc" / "group").read_text().splitlines():
            name, _, gid, *_ = line.split(":")
            if name == group:
                return int(gid)
        raise Missing(f"{ROOTFS}/etc/group has no {group}: {ROOTFS_HINT}")

    def _link(self, path: str, target: str) -> None:
        link = self.upper / path.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)

    def prepare(self) -> None:
        for d in (self.upper, self.work, self.merged):
            d.mkdir()
        # What an operator does: the unit, unchanged, installed and enabled (systemctl enable makes this link).
        self._put("/etc/systemd/system/harvester.service", UNIT.read_text())
        self._link("/etc/systemd/system/multi-user.target.wants/harvester.service",
                   "/etc/systemd/system/harvester.service")
        if self.rsyslog:
            # As on any machine where rsyslog has run before: the file exists when harvester starts (on the very
            # first boot rsyslog makes it only at Dovecot's first line, and harvester, started first, would
            # choose the journal until its next start).
            self._put(MAILLOG, "", mode=0o640)
            os.chown(self.upper / MAILLOG.lstrip("/"), 0, self._gid("adm"))
        else:  # Debian 12's default: no syslog daemon (here: `systemctl mask rsyslog`)
            self._link("/etc/systemd/system/rsyslog.service", "/dev/null")
        self._put("/etc/dovecot/dovecot.conf", DOVECOT_CONF)
        self._put("/etc/dovecot/users", "".join(f"{u}:{{PLAIN}}{pw}\n" for u, pw in USERS.items()), mode=0o640)
        os.chown(self.upper / "etc" / "dovecot" / "users", 0, self._gid("dovecot"))
        mail = self.upper / "srv" / "mail"
        mail.mkdir(parents=True)
        os.chown(mail, *self._ids("dovecot"))

    # -- life cycle ----------------------------------------------------------------------------------------------

    def __enter__(self) -> Container:
        try:
            self.prepare()
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def boot(self) -> None:
        cgroups = self.cgroups
        for d in cgroups:
            d.mkdir()

        def child() -> None:
            for d in cgroups:  # nspawn and everything it starts live in our cgroups
                (d / "cgroup.procs").write_text(str(os.getpid()))
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: dies with the test

        booted_at = time.monotonic()
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", BOOT_SCRIPT, "sh",
                 str(ROOTFS), str(self.upper), str(self.work), str(self.merged), str(self.wheel.parent),
                 self.wheel.name, f"--machine=hv-e2e-{os.getpid()}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=child)

        def pid1() -> int:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.tail()}")
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    with contextlib.suppress(OSError):
                        stat = Path(f"/proc/{entry.name}/stat").read_text()
                        comm, ppid = stat[stat.index("(") + 1:stat.rindex(")")], int(stat[stat.rindex(")") + 2:]
                                                                                      .split()[1])
                        if comm == "systemd" and ppid == self.proc.pid:
                            return int(entry.name)
            return 0

        self.pid1 = int(wait_until(pid1, 90, "the container's systemd (PID 1)", 0.05))  # type: ignore[arg-type]
        # PID 1 answers once its private socket exists (before, systemctl says "offline"); then wait for the boot.
        wait_until(lambda: self.path("/run/systemd/private").is_socket(), 30, "PID 1's socket /run/systemd/private")
        r = self.run("systemctl", "is-system-running", "--wait", timeout=90)
        if r.stdout.strip() != "running":
            failed = self.run("systemctl", "--failed", "--no-legend", "--plain").stdout
            raise RuntimeError(f"the container's systemd is {r.stdout.strip()!r} ({r.stderr.strip()}); failed units:"
                               f"\n{failed}\n{self.tail()}")
        self.boot_s = time.monotonic() - booted_at

    def tail(self, n: int = 40) -> str:
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        return "--- systemd-nspawn (tail) ---\n" + "\n".join(text.splitlines()[-n:])

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                if self.pid1:
                    subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "systemctl", "poweroff"],
                                   capture_output=True, timeout=30)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(15)
        finally:
            # Whatever is left in our cgroups was started by this container: kill it, then remove the cgroups.
            for _ in range(50):
                left = set().union(*(cgroup_pids(d) for d in self.cgroups if d.exists()))
                if not left:
                    break
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            if self.proc is not None:
                self.proc.wait(10)
            for d in self.cgroups:
                remove_cgroup(d)
            if os.environ.get("HARVESTER_E2E_KEEP"):
                print(f"systemd e2e container's files kept in {self.tmp}")
            else:
                shutil.rmtree(self.upper, ignore_errors=True)
                shutil.rmtree(self.work, ignore_errors=True)

    # -- inside ------------------------------------------------------------------------------------------------------

    def run(self, *cmd: str, timeout: float = 30, input: str | None = None, check: bool = False
            ) -> subprocess.CompletedProcess:
        r = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *cmd], capture_output=True, text=True,
                           timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed with {r.returncode}:\n{r.stdout}{r.stderr}")
        return r

    def path(self, inside: str) -> Path:
        """A path of the running container, seen from the host (through its PID 1's root)."""
        return Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")

    def traffic(self, sessions: list) -> list[bool]:
        r = self.run("/usr/bin/python3", "-", json.dumps(sessions), input=CLIENT.read_text(), timeout=60, check=True)
        return json.loads(r.stdout)

    def show(self, *props: str) -> dict[str, str]:
        r = self.run("systemctl", "show", "harvester", *(f"-p{p}" for p in props), check=True)
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def harvester_log(self) -> str:
        return self.run("journalctl", "-u", "harvester", "-o", "cat", "--no-pager").stdout

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        r = self.run("/usr/bin/python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                     "'http://127.0.0.1:9854/metrics', timeout=10).read().decode())", check=True)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(r.stdout) for s in family.samples}

    def rows(self, db: Path | None = None) -> dict[tuple[str, str], tuple[int, str]]:
        """The store's last_login rows {(user, service): (epoch us, ip)}, read from a copy of the SQLite file and its
        WAL (opening the live file as root could leave root-owned -wal/-shm files the service cannot open)."""
        db = db or self.path(DB)
        copy = self.tmp / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        try:
            shutil.copy(db, copy / "h.db")
            with contextlib.suppress(FileNotFoundError):
                shutil.copy(f"{db}-wal", copy / "h.db-wal")
        except FileNotFoundError:
            return {}
        try:
            con = sqlite3.connect(copy / "h.db")
            try:
                return {(u, s): (t, ip) for u, s, t, ip in
                        con.execute("SELECT user, service, last_login_us, last_ip FROM last_login")}
            finally:
                con.close()
        except sqlite3.DatabaseError:  # a copy taken mid-write; the next poll takes another
            return {}


def explain(c: Container) -> str:
    parts = [c.tail(20)]
    if c.pid1:
        parts.append("--- systemctl status harvester ---\n" +
                     c.run("systemctl", "status", "--no-pager", "-l", "harvester").stdout)
        parts.append("--- journalctl -u harvester (tail) ---\n" +
                     c.run("journalctl", "-u", "harvester", "-n", "30", "--no-pager").stdout)
        parts.append("--- journalctl -t dovecot (tail) ---\n" +
                     c.run("journalctl", "-t", "dovecot", "-o", "short-precise", "-n", "20", "--no-pager").stdout)
    return "\n".join(parts)


def wait_for_rows(c: Container, expected: dict[tuple[str, str], str], fix: str) -> dict:
    def there() -> dict | None:
        rows = c.rows()
        return rows if all(rows.get(k, (0, ""))[1] == ip for k, ip in expected.items()) else None

    try:
        return wait_until(there, ROWS_TIMEOUT_S, "the rows of the traffic")  # type: ignore[return-value]
    except TimeoutError:
        got = c.rows()
        missing = {k: ip for k, ip in expected.items() if got.get(k, (0, ""))[1] != ip}
        raise AssertionError(f"rows missing or with another IP after {ROWS_TIMEOUT_S:.0f} s: {missing}; "
                             f"stored: {got}\n{fix}\n{explain(c)}") from None


def agrees_with_plugin(rows: dict, plugin: dict[tuple[str, str], LastLogin], keys) -> None:
    """Same IP as Dovecot's own plugin, and the same time at the log's precision (a syslog file: the second, taken
    when rsyslogd got the line, a few ms after the plugin's stamp; the journal: microseconds, also a little later)."""
    for key in keys:
        assert key in plugin, f"the plugin has no {key}: {plugin}"
        us, ip = rows[key]
        assert ip == plugin[key].ip, (key, rows[key], plugin[key])
        assert -1000 <= us // 1000 - plugin[key].time_ms <= 1000, (key, rows[key], plugin[key])


def logins_counted(metrics: dict) -> dict[str, float]:
    """harvester_events_total of the kinds that make rows (login; LMTP's delivery), by service."""
    out: dict[str, float] = {}
    for (name, labels), v in metrics.items():
        if name == "harvester_events_total" and dict(labels).get("kind") in ROW_KINDS:
            out[dict(labels)["service"]] = out.get(dict(labels)["service"], 0) + v
    return out


def sources_read(metrics: dict) -> set[str]:
    return {dict(labels).get("file", "") for (name, labels), v in metrics.items()
            if name == "harvester_lines_read_total" and v > 0}


# --- the scenario -------------------------------------------------------------------------------------------------

def the_unit_stores_logins_under_systemd(c: Container, *, rsyslog: bool) -> None:
    source_fix = ("harvester must read the file it is given when it exists at start (rsyslog), else the journal "
                  "(issue #16 item 4: a journal source and the unit's fallback to it)")
    try:
        wait_until(lambda: c.show("ActiveState")["ActiveState"] == "active", 30, "harvester to be active")
    except TimeoutError:
        raise AssertionError(f"harvester.service did not become active\n{explain(c)}") from None
    started = c.show("MainPID", "ExecMainStartTimestampMonotonic")
    assert (c.path(MAILLOG).exists()) == rsyslog, f"{MAILLOG} should exist only with rsyslog"

    # -- real traffic -> rows that agree with Dovecot's own plugin ---------------------------------------------
    sent = time.monotonic()
    assert c.traffic(ROUND1) == [True] * 5 + [False]
    rows = wait_for_rows(c, ROUND1_ROWS, source_fix)
    print(f"{'rsyslog' if rsyslog else 'journal only'}: boot to harvester READY (system running) {c.boot_s:.1f} s, "
          f"traffic to rows {time.monotonic() - sent:.1f} s")
    plugin = read_last_login_dict(c.path(PLUGIN_DICT))
    agrees_with_plugin(rows, plugin, ROUND1_ROWS)
    assert ("dave", "imap") not in rows, "a failed login was stored"
    log = c.harvester_log()
    m = c.metrics()
    # Every login read exactly once: the file and the journal both hold these lines where rsyslog runs.
    assert logins_counted(m) == ROUND1_LOGINS, (
        f"logins read {logins_counted(m)}, expected each once: {ROUND1_LOGINS} (sources: {sources_read(m)})\n{log}")
    # The daemon names its choice at start (journal = auto: files it is given win when one exists).
    if rsyslog:
        assert f"following {MAILLOG}" in log, log
        assert JOURNAL_CHOSEN not in log, f"the journal is read although {MAILLOG} exists:\n{log}"
        assert sources_read(m) == {MAILLOG}, f"read more than the file: {sources_read(m)}\n{log}"
    else:
        assert JOURNAL_CHOSEN in log, log
        assert sources_read(m) == {"journal:local"}, f"read other than the journal: {sources_read(m)}\n{log}"

    # -- reload: works without /bin/kill; a broken config is said to have failed -------------------------------
    conf = c.path("/etc/harvester/harvester.toml")
    conf.parent.mkdir(mode=0o755, exist_ok=True)
    conf.write_text("# written by tests/e2e/test_systemd.py\nmax_line_bytes = 65536\n")
    conf.chmod(0o644)

    def reload(expect: str, count: int) -> None:
        r = c.run("systemctl", "reload", "harvester")
        # systemd 252 reports only whether ExecReload= ran, not whether harvester's reload worked.
        assert r.returncode == 0, f"systemctl reload failed: {r.stdout}{r.stderr}\n{explain(c)}"
        wait_until(lambda: c.harvester_log().count(expect) >= count, 15, f"{expect!r} in harvester's log")

    reload("reloaded configuration and pattern packs", 1)
    conf.write_text("max_line_bytes = [not toml\n")
    reload("reload failed", 1)
    status = c.show("ActiveState", "StatusText")
    assert status["ActiveState"] == "active" and status["StatusText"].startswith("reload failed"), status
    failed_reloads = c.metrics().get(("harvester_reloads_total", (("result", "failed"),)))
    assert failed_reloads == 1, ('a failed reload must count in harvester_reloads_total{result="failed"} '
                                 f"(issue #16 item 6), got {failed_reloads}")
    conf.write_text("max_line_bytes = 65536\n")
    reload("reloaded configuration and pattern packs", 2)

    # -- alive past WatchdogSec: the same process, never restarted --------------------------------------------
    # CLOCK_MONOTONIC is the host's inside the container too.
    since = int(started["ExecMainStartTimestampMonotonic"]) / 1e6
    time.sleep(max(0.0, since + WATCHDOG_S + 5 - time.monotonic()))
    now = c.show("ActiveState", "SubState", "NRestarts", "MainPID", "Result")
    assert now == {"ActiveState": "active", "SubState": "running", "NRestarts": "0",
                   "MainPID": started["MainPID"], "Result": "success"}, f"{now}\n{explain(c)}"

    # -- stop flushes. A restart with rows written only every minute (the restart resumes from the checkpoint:
    # round one is not stored again), traffic, harvester has read it (its events are counted) and holds its rows,
    # then `systemctl stop`: the rows must be written on the way out. (Lines still unread at SIGTERM are not
    # lost either: they lie after the checkpoint and are read at the next start.)
    conf.write_text("flush_interval_ms = 60000\n")
    c.run("systemctl", "restart", "harvester", check=True)
    assert c.show("ActiveState")["ActiveState"] == "active", explain(c)
    assert c.traffic(ROUND2) == [True, True]
    expected = {service: 0 for service in ROUND1_LOGINS}  # the counters start again with the process
    for kind, *_ in ROUND2:
        expected[kind] += 1

    def read() -> bool:
        counted = logins_counted(c.metrics())
        return {k: counted.get(k, 0) for k in expected} == expected

    try:
        wait_until(read, 10, "harvester to read round two", 0.05)
    except TimeoutError:
        raise AssertionError(f"round two's logins not read, or round one's read again after the restart: "
                             f"{logins_counted(c.metrics())}, expected {expected}\n{explain(c)}") from None
    held = {k for k, ip in ROUND2_ROWS.items() if c.rows().get(k, (0, ""))[1] != ip}
    assert held == set(ROUND2_ROWS), f"rows written before the stop, though flush_interval_ms = 60000: {held}"
    stop = c.run("systemctl", "stop", "harvester")
    assert stop.returncode == 0, stop.stderr
    after = c.show("ActiveState", "Result", "ExecMainStatus")
    assert after == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, after
    rows = c.rows()
    missing = {k: ip for k, ip in ROUND2_ROWS.items() if rows.get(k, (0, ""))[1] != ip}
    assert not missing, f"rows of the traffic right before the stop are missing: {missing}\n{explain(c)}"
    agrees_with_plugin(rows, read_last_login_dict(c.path(PLUGIN_DICT)), ROUND2_ROWS)


@pytest.fixture(scope="module")
def machines(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Container]]:
    """Both machines booted at once, so that their waits for WatchdogSec overlap (each test counts from its own
    service's start); both shut down and cleaned up afterwards, whatever happened."""
    booted: dict[str, Container] = {}
    with contextlib.ExitStack() as stack:
        for name, rsyslog in (("journal", False), ("rsyslog", True)):
            booted[name] = stack.enter_context(Container(tmp_path_factory.mktemp(name), wheel, rsyslog=rsyslog))
        yield booted
    # Nothing left running: every process of the containers' cgroups is gone, and with them the overlays' namespaces.
    for c in booted.values():
        assert c.proc is not None and c.proc.returncode is not None
        assert not any(d.exists() for d in c.cgroups), c.cgroups


def test_debian12_default_journal_only_the_unit_stores_logins_from_the_journal(machines):
    the_unit_stores_logins_under_systemd(machines["journal"], rsyslog=False)


def test_with_rsyslog_the_unit_follows_mail_log_and_does_not_read_the_journal_too(machines):
    the_unit_stores_logins_under_systemd(machines["rsyslog"], rsyslog=True)
