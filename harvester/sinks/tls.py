"""The client TLS context every network store builds from its `<prefix>_tls_ca`, `_tls_cert` and `_tls_key`
settings: one meaning for them, and one set of errors naming the setting to fix."""

from __future__ import annotations

import ssl
from pathlib import Path

from harvester.sinks.base import StoreError


def client_context(prefix: str, ca: str, cert: str, key: str, *, check_hostname: bool = True,
                   required: bool = False) -> ssl.SSLContext | None:
    """The server's chain verified against `ca` alone (else the system's CAs) and, with check_hostname, its name
    against the address dialled; the client certificate offered when `cert` is set. None when neither ca nor
    cert is set and TLS is not `required`. Each file is read here, so a wrong one is a StoreError naming its
    setting before any connection is tried."""
    if key and not cert:
        raise StoreError(f"{prefix}_tls_key is set but {prefix}_tls_cert is not")
    if not (ca or cert or required):
        return None
    for setting, path in ((f"{prefix}_tls_ca", ca), (f"{prefix}_tls_cert", cert), (f"{prefix}_tls_key", key)):
        try:
            if path:
                Path(path).open("rb").close()
        except OSError as e:
            raise StoreError(f"{setting} {path}: cannot read: {e.strerror or e}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED; no CA is trusted until loaded
    ctx.check_hostname = check_hostname
    try:
        if ca:
            ctx.load_verify_locations(ca)
        else:
            ctx.load_default_certs()
    except ssl.SSLError as e:
        if not ca:
            raise StoreError(f"the system's CA certificates cannot be loaded ({e.reason or e}): set {prefix}_tls_ca "
                             "to the CA that signed the server's certificate") from None
        raise StoreError(f"{prefix}_tls_ca {ca}: not a PEM CA certificate ({e.reason or e})") from None
    if cert:
        def encrypted() -> str:  # else OpenSSL would prompt on the terminal (or fail obscurely without one)
            raise StoreError(f"{prefix}_tls_key {key or cert}: the key is encrypted; harvester needs an "
                             "unencrypted key (openssl pkey -in KEY -out PLAIN_KEY)")

        try:
            ctx.load_cert_chain(cert, key or None, password=encrypted)
        except ssl.SSLError as e:
            raise StoreError(f"{prefix}_tls_cert {cert}, {prefix}_tls_key {key or '(in the same file)'}: "
                             f"not a PEM certificate and its key ({e.reason or e})") from None
    return ctx
