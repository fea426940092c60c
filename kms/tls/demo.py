"""``tls_demo``: one hybrid and one classical-fallback handshake against a real ``dual`` server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kms.remote import KeyService
from kms.tls.ca import CaFiles
from kms.tls.client import ConnectResult, connect, connect_stdlib
from kms.tls.server import serve
from orchestrator.db import Database


def tls_demo_results(db: Database, kms: KeyService, tls_dir: Path, *, host: str = "127.0.0.1") -> list[ConnectResult]:
    """Start a ``dual`` server on a free port, connect once with pyOpenSSL (OpenSSL 4: hybrid) and
    once with Python's ``ssl`` (the system OpenSSL 3.0: classical fallback), verify both signed
    hellos, stop the server. Both connections are recorded in ``tls_handshakes``."""
    with serve("dual", host, 0, db=db, kms=kms, tls_dir=tls_dir) as server:
        keys = server.signer.public_key()
        # the ECDSA CA: the system OpenSSL of the stdlib client cannot read an ML-DSA certificate
        anchors = [CaFiles(tls_dir, "ECDSA-P256").ca_cert]
        hybrid = connect(host, server.port, "pqc", keys=keys, ca_files=anchors)
        fallback = connect_stdlib(host, server.port, keys=keys, ca_files=anchors)
    return [hybrid, fallback]


def tls_demo(db: Database, kms: KeyService, tls_dir: Path, *, host: str = "127.0.0.1",
             echo: Callable[[str], None] | None = print) -> list[str]:
    """The demo's two lines, e.g. ``hybrid handshake: X25519MLKEM768 (TLS_AES_256_GCM_SHA384) signed
    hello verified`` and ``fallback handshake: x25519 (…) signed hello verified …``; each is also
    passed to ``echo`` (``None``: print nothing)."""
    lines = []
    for result in tls_demo_results(db, kms, tls_dir, host=host):
        line = f"{result.summary()} - client: {result.client}"  # no [..]: rich reads it as markup
        lines.append(line)
        if echo is not None:
            echo(line)
    return lines
