#!/usr/bin/env python3
"""Throw-away TLS files for the dev servers and the tests: a CA, a server certificate and a client certificate.

One place for how they are made (scripts/cassandra-dev, sql-dev and redis-dev import it; the tests run it), by
`openssl` alone so it works before any virtualenv exists. The files land in DIR once, all or nothing:

  ca.pem ca.key          the CA (its key kept so a test can sign more)
  server.pem server.key  for the server, named by --server-name (default IP:127.0.0.1 only, no DNS name: a
                         client that verifies the host name refuses "localhost", which the tests use to prove it)
  client.pem client.key  a client certificate (extendedKeyUsage=clientAuth), CN from --client-cn

  scripts/devtls.py DIR [--client-cn NAME] [--server-name IP:127.0.0.1 --server-name DNS:localhost]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")
KEYS = ("ca.key", "server.key", "client.key")
DAYS = 3650


class TlsError(Exception):
    """openssl is missing or failed; the message says which command and what it printed."""


def make(directory: Path, *, org: str = "harvester dev", client_cn: str = "harvester",
         server_names: tuple[str, ...] = ("IP:127.0.0.1",), days: int = DAYS) -> dict[str, Path]:
    """The six files in directory (made once; an earlier complete set is kept), by name."""
    directory = Path(directory).resolve()
    files = {name: directory / name for name in FILES}
    if all(path.is_file() for path in files.values()):
        return files
    if directory.is_dir() and any(p.name not in FILES for p in directory.iterdir()):
        raise TlsError(f"{directory} holds other files: give an empty or new directory for the TLS files")
    openssl = shutil.which("openssl")
    if not openssl:
        raise TlsError("making TLS certificates needs openssl on PATH (apt-get install openssl)")
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _make(partial, openssl, org, client_cn, server_names, days)
        shutil.rmtree(directory, ignore_errors=True)  # an incomplete set of ours, nothing else (checked above)
        os.replace(partial, directory)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # a failed run leaves no keys behind
    return files


def _make(partial: Path, openssl: str, org: str, client_cn: str, server_names: tuple[str, ...], days: int) -> None:
    def run(*cmd: str) -> None:
        proc = subprocess.run([openssl, *cmd], cwd=partial, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            out = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip(".+*-")]  # no progress
            raise TlsError(f"openssl {' '.join(cmd)} failed (exit {proc.returncode}):\n" + "\n".join(out[-20:]))

    run("req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", str(days),
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", f"/O={org}/CN=throw-away CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash")
    server_cn = server_names[0].split(":", 1)[1]
    server_ext = f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(server_names)}"
    for name, cn, ext in (("server", server_cn, server_ext), ("client", client_cn, "extendedKeyUsage=clientAuth")):
        (partial / f"{name}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n{ext}\n")
        run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/O={org}/CN={cn}")
        run("x509", "-req", "-sha256", "-days", str(days), "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    for leftover in ("server.csr", "server.ext", "client.csr", "client.ext", "ca.srl"):
        (partial / leftover).unlink(missing_ok=True)
    for key in KEYS:
        (partial / key).chmod(0o600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/devtls.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--client-cn", default="harvester")
    parser.add_argument("--server-name", action="append", help="subjectAltName entry (default IP:127.0.0.1)")
    args = parser.parse_args(argv)
    try:
        make(args.dir, client_cn=args.client_cn, server_names=tuple(args.server_name or ("IP:127.0.0.1",)))
    except TlsError as e:
        print(f"devtls: {e}", file=sys.stderr)
        return 1
    print(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
