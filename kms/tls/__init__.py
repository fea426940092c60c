"""Dual-stack TLS demo: hybrid ML-KEM key exchange with classical fallback (docs/pqc-tls.md).

pyOpenSSL drives the OpenSSL 4 bundled in cryptography's wheel, which offers ``X25519MLKEM768``;
Python's own ``ssl`` links the system OpenSSL (3.0 on Debian 12) and cannot. Public API::

    from kms.tls import serve, connect, connect_stdlib, tls_demo, ensure_ca, issue_client, verify_hello
"""

from kms.tls.ca import CERT_ALGS, CaFiles, CertAlg, ensure_ca, issue_client
from kms.tls.client import ConnectResult, connect, connect_stdlib
from kms.tls.demo import tls_demo
from kms.tls.groups import MODES, Mode, classify
from kms.tls.hello import HELLO_KEY, HelloSigner, Observed, verify_hello
from kms.tls.server import ServerConfig, TlsServer, serve

__all__ = [
    "CERT_ALGS",
    "HELLO_KEY",
    "MODES",
    "CaFiles",
    "CertAlg",
    "ConnectResult",
    "HelloSigner",
    "Mode",
    "Observed",
    "ServerConfig",
    "TlsServer",
    "classify",
    "connect",
    "connect_stdlib",
    "ensure_ca",
    "issue_client",
    "serve",
    "tls_demo",
    "verify_hello",
]
