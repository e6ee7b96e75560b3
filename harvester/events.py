"""The Event type, event kinds and service names shared by every stage."""

from __future__ import annotations

from typing import Any, NamedTuple

# Kinds that mean "this account was used over this service": they make last-login rows.
LOGIN = "login"
PROXY = "proxy"
DELIVERY = "delivery"
ROW_KINDS = frozenset({LOGIN, PROXY, DELIVERY})

# Kinds kept apart from logins: never a login, but a support agent wants to see them.
AUTH_FAIL = "auth_fail"
ABORTED = "aborted"
REFUSED = "refused"
POP3_DELETE = "pop3_delete"
OTHER_KINDS = frozenset({AUTH_FAIL, ABORTED, REFUSED, POP3_DELETE})

# Kinds that only carry session state, never emitted: an LMTP session's MTA address, and a mail process's
# full user name (a login line cuts names longer than 80 bytes).
SESSION_START = "session_start"
SESSION_END = "session_end"
SESSION_USER = "session_user"
STATE_KINDS = frozenset({SESSION_START, SESSION_END, SESSION_USER})

KINDS = ROW_KINDS | OTHER_KINDS | STATE_KINDS

WEBMAIL = "webmail"  # IMAP logins from webmail_networks
# Services as Dovecot's own last_login plugin names them (its %{service}); ManageSieve is "sieve".
SERVICES = ("imap", "pop3", "lmtp", "submission", "sieve", WEBMAIL)
# A service's name in a log line (the login process "managesieve-login") -> its name above. Rows that
# earlier versions stored under the old name are read (and, where a store can, migrated) under the new.
SERVICE_RENAMES = {"managesieve": "sieve"}


class Event(NamedTuple):
    """One thing that happened to one account, as the log told it.

    `time_us` is UTC epoch microseconds; `digits` is how many fractional digits
    the log gave (0 for a second-precision log), so output can keep its precision.
    """

    kind: str
    service: str
    user: str
    time_us: int
    digits: int
    ip: str | None
    node: str | None
    detail: str | None = None


class Row(NamedTuple):
    """One store row: the newest event of its kind for one account."""

    user: str
    service: str
    kind: str  # "login" for last-login rows, else the event kind (auth_fail, pop3_delete, ...)
    time_us: int
    digits: int
    ip: str | None
    node: str | None
    detail: str | None = None

    @property
    def place(self) -> str:
        """What a store names the row by when it has no place for it (skipped()): its service for a login,
        else its kind."""
        return self.service if self.kind == LOGIN else self.kind


class NativeTables(NamedTuple):
    """What the coalescing stage hands a store that writes natively: both tables (harvester._fastscan.Table:
    logins by (user, service), other events by (user, kind)) and other processes' runs (Table dumps) of each."""

    logins: Any  # harvester._fastscan.Table
    others: Any
    login_runs: list[bytes]
    other_runs: list[bytes]
