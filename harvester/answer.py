"""One account's rows as people read them: the JSON of `lookup --json` and of `serve`'s API, and the
plain-words verdict a customer-care agent reads on `serve`'s page ("last POP3 login deleted 14 of 14
messages, from 203.0.113.7, 2 hours ago")."""

from __future__ import annotations

from datetime import UTC, datetime

from harvester.events import Row
from harvester.timeparse import rfc3339

EVENT_NAMES = {"auth_fail": "failed login", "pop3_delete": "POP3 deletion", "refused": "refused (after auth)",
               "aborted": "aborted login"}
SERVICE_NAMES = {"imap": "IMAP", "pop3": "POP3", "lmtp": "LMTP delivery", "submission": "SMTP submission",
                 "sieve": "ManageSieve", "webmail": "webmail"}


def local(time_us: int, digits: int, zone) -> str:
    """The time in the operator's zone, at the log's precision, with the zone's name."""
    dt = datetime.fromtimestamp(time_us / 1e6, UTC).astimezone(zone)
    frac = f".{time_us % 1_000_000:06d}"[: digits + 1] if digits else ""
    return dt.strftime("%Y-%m-%d %H:%M:%S") + frac + " " + (dt.strftime("%Z") or dt.strftime("%z"))


def row_dict(r: Row, zone) -> dict:
    """One row as `lookup --json` and the HTTP API give it."""
    d = {"user": r.user, "service": r.service, "kind": r.kind,
         "last_login": rfc3339(r.time_us, r.digits), "local_time": local(r.time_us, r.digits, zone),
         "ip": r.ip, "node": r.node}
    if r.detail:
        d["detail"] = r.detail
    return d


def ago(seconds: float) -> str:
    """'2 hours ago' (or 'in 5 minutes' for a clock that is behind)."""
    s = abs(seconds)
    for unit, size in (("day", 86_400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if s >= size or unit == "second":
            n = int(s // size)
            text = f"{n} {unit}{'' if n == 1 else 's'}"
            return f"{text} ago" if seconds >= 0 else f"in {text}"
    raise AssertionError("unreachable")


def _fields(detail: str | None) -> dict[str, str]:
    return dict(p.split("=", 1) for p in (detail or "").split() if "=" in p)


def deletion_words(detail: str | None) -> str:
    """A POP3 deletion's counts in words: 2.3's del=N/M is N of M messages, 2.4's N messages of M bytes."""
    f = _fields(detail)
    n = f.get("deleted", "?")
    plural = "" if n == "1" else "s"
    if "messages" in f:
        return f"deleted {n} of {f['messages']} message{'' if f['messages'] == '1' else 's'}"
    if "bytes" in f:
        return f"deleted {n} message{plural} ({f['bytes']} bytes)"
    return f"deleted {n} message{plural}"


def verdict(rows: list[Row], now_us: int) -> list[str]:
    """The few sentences that answer "my mailbox is empty", newest first."""
    def when(r: Row) -> str:
        return ago((now_us - r.time_us) / 1e6)

    def origin(r: Row) -> str:
        return f"from {r.ip}" if r.ip else "from an unknown address"

    logins = [r for r in rows if r.kind == "login"]
    by_kind = {r.kind: r for r in rows if r.kind != "login"}
    out = []
    if not logins:
        out.append("no login recorded")
    newest = max((r for r in logins if r.service != "lmtp"), key=lambda r: r.time_us, default=None)
    if newest is not None:
        out.append(f"last login: {SERVICE_NAMES.get(newest.service, newest.service)} {origin(newest)}, "
                   f"{when(newest)}")
    pop3 = next((r for r in logins if r.service == "pop3"), None)
    deleted = by_kind.get("pop3_delete")
    if deleted is not None and (pop3 is None or deleted.time_us >= pop3.time_us):
        out.append(f"last POP3 login {deletion_words(deleted.detail)}, {origin(deleted)}, {when(deleted)}")
    elif pop3 is not None:
        tail = f"; the last one that deleted mail: {when(deleted)}" if deleted is not None else ""
        out.append(f"last POP3 login {origin(pop3)}, {when(pop3)}, deleted nothing{tail}")
    lmtp = next((r for r in logins if r.service == "lmtp"), None)
    if lmtp is not None:
        out.append(f"last mail delivered {when(lmtp)} (LMTP {origin(lmtp)})")
    failed = by_kind.get("auth_fail")
    if failed is not None:
        out.append(f"last failed login: {SERVICE_NAMES.get(failed.service, failed.service)} {origin(failed)}, "
                   f"{when(failed)}")
    return out
