"""Mail clients that run inside the systemd container (tests/e2e/test_systemd.py feeds this file to the container's
own python3 through nsenter): standard library only, no harvester, no pytest.

argv[1] is a JSON list of sessions, each [kind, source address, ...]:
  ["imap", src, user, password]      LOGIN, SELECT INBOX, LOGOUT
  ["pop3", src, user, password]      USER/PASS, STAT, QUIT
  ["lmtp", src, [user, ...]]         one delivery to every recipient
Sessions run one after the other, each from its own 127/8 source address (the stored IP then names the session).
Prints a JSON list: for each session, whether its login (or delivery) succeeded.
"""

from __future__ import annotations

import imaplib
import json
import poplib
import smtplib
import socket
import sys
import time

HOST = "127.0.0.1"
TIMEOUT = 15.0


class IMAP(imaplib.IMAP4):
    def __init__(self, src: str) -> None:
        self._src = src
        super().__init__(HOST, 143, timeout=TIMEOUT)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._src, 0))


class POP3(poplib.POP3):
    def __init__(self, src: str) -> None:
        self._src = src
        super().__init__(HOST, 110, TIMEOUT)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._src, 0))


def imap(src: str, user: str, password: str) -> bool:
    client = IMAP(src)
    try:
        try:
            client.login(user, password)
        except imaplib.IMAP4.error:
            return False
        return client.select("INBOX")[0] == "OK"
    finally:
        client.logout()


def pop3(src: str, user: str, password: str) -> bool:
    client = POP3(src)
    try:
        client.user(user)
        client.pass_(password)
        client.stat()
        return True
    except poplib.error_proto:
        return False
    finally:
        client.quit()


def lmtp(src: str, users: list[str]) -> bool:
    msg = f"From: sender@example.org\r\nSubject: e2e\r\nMessage-ID: <{time.monotonic_ns()}@e2e>\r\n\r\nbody\r\n"
    with smtplib.LMTP(HOST, 24, source_address=(src, 0), timeout=TIMEOUT) as client:
        client.ehlo_or_helo_if_needed()
        client.mail("sender@example.org")
        for u in users:
            if client.rcpt(f"<{u}>")[0] != 250:
                return False
        code, _ = client.data(msg.encode())
        replies = [code] + [client.getreply()[0] for _ in users[1:]]  # LMTP: one reply per recipient
        return all(c == 250 for c in replies)


def main() -> None:
    results = []
    for kind, src, *args in json.loads(sys.argv[1]):
        results.append({"imap": imap, "pop3": pop3, "lmtp": lmtp}[kind](src, *args))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
