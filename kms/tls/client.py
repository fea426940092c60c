"""Clients of the TLS demo server.

:func:`connect` is the real one: pyOpenSSL on cryptography's OpenSSL 4, so it can offer ML-KEM. It
verifies the server certificate against the demo CA during the handshake, checks the hostname,
sends a nonce, and verifies the signed hello with public keys only against what it negotiated.

:func:`connect_stdlib` is what an unmodified Python client gets: the standard ``ssl`` module,
linked against the system OpenSSL (3.0 here), which knows no ML-KEM group and falls back to
``x25519``. Python 3.11's ``ssl`` can report neither the group nor the RFC 9266 exporter, so it
checks every other claim of the hello and takes the group from the signed hello
(``group_checked`` False).
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import SignatureAlgorithmOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from OpenSSL import SSL

from kms.tls.ca import fingerprint, load_cert
from kms.tls.groups import CLIENT_GROUPS, CLIENT_PQC_ONLY, Classification, Prefer, classify, openssl_version, set_groups
from kms.tls.hello import Observed, VerifiedHello, check_nonce, new_nonce, tls_exporter, verify_hello
from kms.tls.wire import (
    close_gracefully,
    parse_error_line,
    pyopenssl_recv,
    read_line,
    set_timeouts,
    ssl_reason,
)
from sdk.errors import QaiError
from sdk.signing import KeyDocument

Keys = KeyDocument | Mapping[str, KeyDocument]


@dataclass(frozen=True)
class ConnectResult:
    """One verified connection: what this client negotiated and what the server signed about it."""

    client: str  # which TLS stack: "pyOpenSSL (OpenSSL 4.0.3 …)" or "ssl (OpenSSL 3.0.19 …)"
    host: str
    port: int
    group: str | None  # from the signed hello when the client could not see it (group_checked False)
    classification: Classification
    cipher: str | None
    protocol: str | None
    server_cert_sha256: str
    server_cert_alg: str
    client_identity: str | None
    hello: dict[str, Any]
    signed_by: str
    suite: str
    group_checked: bool  # False: the group is the server's signed word (Python's ssl cannot report it)
    channel_bound: bool  # the hello is bound to this TLS session (RFC 9266 tls-exporter)
    envelope: bytes  # the signed hello as received, for keeping or verifying again

    @property
    def label(self) -> str:
        if self.classification in ("hybrid", "pqc"):
            return f"{self.classification} handshake"
        return "fallback handshake" if self.hello.get("mode") == "dual" else "classical handshake"

    def summary(self) -> str:
        """e.g. ``hybrid handshake: X25519MLKEM768 (TLS_AES_256_GCM_SHA384) signed hello verified``."""
        seen = "" if self.group_checked else " (group as signed by the server; this client cannot report it)"
        return f"{self.label}: {self.group} ({self.cipher}) signed hello verified{seen}"

    def to_json(self) -> dict[str, Any]:
        return {
            "client": self.client, "host": self.host, "port": self.port, "group": self.group,
            "classification": self.classification, "cipher": self.cipher, "protocol": self.protocol,
            "server_cert_sha256": self.server_cert_sha256, "server_cert_alg": self.server_cert_alg,
            "client_identity": self.client_identity, "signed_by": self.signed_by, "suite": self.suite,
            "group_checked": self.group_checked, "channel_bound": self.channel_bound, "verified": True,
            "hello": self.hello, "summary": self.summary(),
        }


_SIG_ALGS = {SignatureAlgorithmOID.ECDSA_WITH_SHA256: "ECDSA-P256", SignatureAlgorithmOID.ML_DSA_65: "ML-DSA-65"}


def _sig_alg(cert: x509.Certificate) -> str:
    """The certificate's signature algorithm in this module's names (the demo CA's two), else its OID."""
    oid = cert.signature_algorithm_oid
    return _SIG_ALGS.get(oid, oid.dotted_string)


def _server_identity(name: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def check_server_certificate(chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate],
                             server_name: str) -> None:
    """Chain and hostname/IP check with cryptography's RFC 5280 verifier (which handles ML-DSA).
    OpenSSL verified the chain during the handshake already, but pyOpenSSL exposes no
    ``SSL_set1_host``, so without this any certificate of the CA would pass for any host."""
    if not chain:
        raise QaiError("tls.bad_server_certificate", "the server sent no certificate", status=502)
    verifier = PolicyBuilder().store(Store(list(anchors))).build_server_verifier(_server_identity(server_name))
    try:
        verifier.verify(chain[0], list(chain[1:]))
    except VerificationError as exc:
        raise QaiError("tls.bad_server_certificate", f"the server certificate is not valid for {server_name}: {exc}",
                       status=502, details={"server_name": server_name}) from exc


def _client_context(groups: str, ca_files: Sequence[Path], client_cert: tuple[Path, Path] | None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    set_groups(ctx, groups)
    for f in ca_files:
        ctx.load_verify_locations(str(f))
    ctx.set_verify(SSL.VERIFY_PEER)
    if client_cert is not None:
        try:
            ctx.use_certificate_file(str(client_cert[0]))
            ctx.use_privatekey_file(str(client_cert[1]))  # a file: pyOpenSSL takes no ML-DSA key object
            ctx.check_privatekey()
        except (SSL.Error, OSError) as exc:
            raise QaiError("tls.no_certificate", f"cannot load the client certificate {client_cert[0]}: "
                           f"{ssl_reason(exc)}", status=422) from exc
    return ctx


def _open(host: str, port: int, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise QaiError("tls.unreachable", f"cannot connect to {host}:{port}: {exc.strerror or exc}",
                       status=503) from exc


def _exchange(recv_line: bytes, keys: Keys, nonce: str, observed: Observed) -> VerifiedHello:
    err = parse_error_line(recv_line)
    if err is not None:
        err.details.update({"group": observed.group, "cipher": observed.cipher})
        raise err
    return verify_hello(recv_line, keys, nonce=nonce, observed=observed)


def connect(host: str = "127.0.0.1", port: int = 8443, prefer: Prefer = "pqc", *, keys: Keys,
            ca_files: Sequence[Path], server_name: str | None = None,
            client_cert: tuple[Path, Path] | None = None, require_pqc: bool = False, groups: str | None = None,
            nonce: str | None = None, timeout: float = 10.0) -> ConnectResult:
    """Connect with pyOpenSSL, verify the server and its signed hello; return what was negotiated.

    ``prefer="pqc"`` offers the hybrid groups first and classical ones after them; ``"classical"``
    offers classical groups only. ``require_pqc`` offers hybrid groups only, so the handshake fails
    rather than fall back. ``groups`` (OpenSSL syntax) overrides both. ``keys`` are the trusted
    public key documents of the hello key; ``ca_files`` the trusted CA certificates.

    A server in ``pqc-required`` mode that refuses the connection raises ``tls.pqc_required`` (403).
    """
    if not ca_files:
        raise QaiError("tls.no_trust_anchor", "no CA certificate to verify the server with; run `qai tls ca init` "
                       "or pass --ca", status=422)
    name = server_name or host
    nonce = check_nonce(nonce or new_nonce())
    offered = groups or (CLIENT_PQC_ONLY if require_pqc else CLIENT_GROUPS[prefer])
    ctx = _client_context(offered, ca_files, client_cert)
    sock = _open(host, port, timeout)
    set_timeouts(sock, timeout)
    conn = SSL.Connection(ctx, sock)
    conn.set_connect_state()
    if isinstance(_server_identity(name), x509.DNSName):
        conn.set_tlsext_host_name(name.encode("idna"))  # SNI carries host names only, never addresses
    try:
        try:
            conn.do_handshake()
        except (SSL.Error, OSError) as exc:
            raise QaiError("tls.handshake_failed", f"TLS handshake with {host}:{port} failed: {ssl_reason(exc)}",
                           status=502, details={"offered_groups": offered}) from exc
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []
        check_server_certificate(chain, [load_cert(f) for f in ca_files], name)
        group = conn.get_group_name()
        if group is None:
            raise QaiError("tls.handshake_failed", "no key-exchange group was negotiated", status=502)
        identity = load_cert(client_cert[0]).subject.rfc4514_string() if client_cert is not None else None
        observed = Observed(group=group, cipher=conn.get_cipher_name(), protocol=conn.get_protocol_version_name(),
                            server_cert_sha256=fingerprint(chain[0]), client_identity=identity,
                            tls_exporter=tls_exporter(conn))
        conn.sendall(nonce.encode() + b"\n")
        line = read_line(pyopenssl_recv(conn))
        verified = _exchange(line, keys, nonce, observed)
    finally:
        close_gracefully(conn, sock, drain_seconds=0.5)
    return ConnectResult(client=f"pyOpenSSL ({openssl_version()})", host=host, port=port, group=group,
                         classification=classify(group), cipher=observed.cipher, protocol=observed.protocol,
                         server_cert_sha256=observed.server_cert_sha256, server_cert_alg=_sig_alg(chain[0]),
                         client_identity=identity, hello=verified.document, signed_by=verified.key,
                         suite=verified.suite, group_checked=True, channel_bound=verified.channel_bound,
                         envelope=line)


def connect_stdlib(host: str = "127.0.0.1", port: int = 8443, *, keys: Keys, ca_files: Sequence[Path],
                   server_name: str | None = None, nonce: str | None = None, timeout: float = 10.0) -> ConnectResult:
    """The same exchange through Python's ``ssl`` module (the system OpenSSL): a classical client.

    ``ca_files`` must be certificates the system OpenSSL can read: OpenSSL 3.0 cannot parse an
    ML-DSA public key, so pass the ECDSA CA only.
    """
    nonce = check_nonce(nonce or new_nonce())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and hostname checks; no system CAs
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    for f in ca_files:
        try:
            ctx.load_verify_locations(cafile=str(f))
        except ssl.SSLError as exc:
            raise QaiError("tls.bad_certificate", f"{ssl.OPENSSL_VERSION} cannot load {f}: {exc.reason}",
                           status=422, details={"path": str(f)}) from exc
    try:
        with _open(host, port, timeout) as raw, ctx.wrap_socket(raw, server_hostname=server_name or host) as s:
            der = s.getpeercert(binary_form=True)
            cipher = s.cipher()
            if der is None or cipher is None:
                raise QaiError("tls.handshake_failed", "no server certificate or cipher after the handshake",
                               status=502)
            s.sendall(nonce.encode() + b"\n")
            line = read_line(s.recv)
            cert = x509.load_der_x509_certificate(der)
            observed = Observed(group=None, cipher=cipher[0], protocol=s.version(),
                                server_cert_sha256=hashlib.sha256(der).hexdigest())
            verified = _exchange(line, keys, nonce, observed)
    except ssl.SSLError as exc:
        raise QaiError("tls.handshake_failed", f"TLS handshake with {host}:{port} failed: {exc.reason}",
                       status=502) from exc
    except OSError as exc:
        raise QaiError("tls.connection_lost", f"connection to {host}:{port} failed: {exc}", status=502) from exc
    group = verified.document["group"]
    return ConnectResult(client=f"ssl ({ssl.OPENSSL_VERSION})", host=host, port=port, group=group,
                         classification=classify(group), cipher=observed.cipher, protocol=observed.protocol,
                         server_cert_sha256=observed.server_cert_sha256, server_cert_alg=_sig_alg(cert),
                         client_identity=None, hello=verified.document, signed_by=verified.key,
                         suite=verified.suite, group_checked=False, channel_bound=verified.channel_bound,
                         envelope=line)
