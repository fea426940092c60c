"""The TLS 1.3 demo server: a threaded socket server on pyOpenSSL (cryptography's bundled OpenSSL 4).

Modes:

* ``dual`` offers the hybrid ML-KEM groups first and classical groups after them; records which one
  each client got (``accepted`` for hybrid/PQC, ``fallback`` for classical);
* ``pqc-required`` offers the same groups, completes every handshake, and then refuses a classical
  one at the application layer with one readable line, ``ERROR tls.pqc_required: …`` (a bare
  handshake_failure alert would tell the operator of an old client nothing);
* ``classical-only`` offers classical groups only, so ML-KEM is never negotiated.

Every connection is logged, recorded in ``tls_handshakes`` and counted in
``qai_tls_handshakes_total``; the record is written *before* the server's last line goes out, so
whoever reads that line can already find the record.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from OpenSSL import SSL

from kms.remote import KeyService
from kms.tls.ca import CaFiles, CertAlg, ensure_ca, fingerprint
from kms.tls.groups import MODES, SERVER_GROUPS, Mode, classify, is_post_quantum, set_groups
from kms.tls.hello import HelloSigner, Observed, check_nonce, hello_document, tls_exporter
from kms.tls.models import HandshakeRecord, Outcome, count, record
from kms.tls.wire import close_gracefully, error_line, pyopenssl_recv, read_line, set_timeouts, ssl_reason
from orchestrator.db import Database, utcnow
from sdk.errors import QaiError

log = logging.getLogger("qai.tls")

ClientAuth = Literal["none", "optional", "required"]
CLIENT_AUTH: tuple[ClientAuth, ...] = ("none", "optional", "required")
DEFAULT_PORT = 8443


@dataclass(frozen=True)
class ServerConfig:
    mode: Mode
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (TlsServer.port tells which)
    tls_dir: Path = Path(".qai/tls")
    # one certificate per algorithm; with several, OpenSSL picks per client from its signature_algorithms
    cert_algs: tuple[CertAlg, ...] = ("ECDSA-P256",)
    # optional: ask for a client certificate, verify it when sent, record its subject
    client_auth: ClientAuth = "optional"
    timeout: float = 10.0


def check_mode(mode: str) -> Mode:
    for m in MODES:
        if m == mode:
            return m
    raise QaiError("tls.bad_mode", f"unknown mode {mode!r}", status=422, details={"modes": list(MODES)})


def decide(mode: Mode, group: str | None) -> Outcome:
    """The server's verdict on a completed handshake (see kms.tls.models for the outcomes)."""
    if is_post_quantum(group):
        return "accepted"
    if mode == "pqc-required":
        return "refused"
    return "fallback" if mode == "dual" else "accepted"


def refusal_message(group: str | None) -> str:
    return (f"negotiated group {group or 'none'} is not a post-quantum KEM; "
            "this server requires a hybrid or PQC group")


def server_context(config: ServerConfig) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)  # ML-KEM key shares exist only in TLS 1.3
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    set_groups(ctx, SERVER_GROUPS[config.mode])
    for alg in config.cert_algs:
        files = CaFiles(config.tls_dir, alg)
        try:
            ctx.use_certificate_file(str(files.server_cert))
            # from the file: pyOpenSSL's use_privatekey() takes no ML-DSA key object (TypeError)
            ctx.use_privatekey_file(str(files.server_key))
            ctx.check_privatekey()
        except (SSL.Error, OSError) as exc:
            raise QaiError("tls.no_certificate", f"cannot load the {alg} server certificate from {files.dir}: "
                           f"{ssl_reason(exc)}; run `qai tls ca init`", status=500) from exc
        if config.client_auth != "none":
            ctx.load_verify_locations(str(files.ca_cert))
    if config.client_auth != "none":
        flags = SSL.VERIFY_PEER
        if config.client_auth == "required":
            flags |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        ctx.set_verify(flags)  # no callback: OpenSSL's own chain verification decides
    return ctx


def _peer(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def observe(conn: SSL.Connection, rec: HandshakeRecord) -> Observed:
    """Fill ``rec`` with what this end negotiated, and return it as the hello's claims."""
    rec.group = conn.get_group_name()
    rec.classification = classify(rec.group)
    rec.cipher = conn.get_cipher_name()
    rec.protocol = conn.get_protocol_version_name()
    cert = conn.get_certificate(as_cryptography=True)  # the certificate chosen for this client
    rec.server_cert_sha256 = fingerprint(cert) if cert is not None else None
    client = conn.get_peer_certificate(as_cryptography=True)  # verified by OpenSSL when present
    rec.client_identity = client.subject.rfc4514_string() if client is not None else None
    return Observed(group=rec.group, cipher=rec.cipher, protocol=rec.protocol,
                    server_cert_sha256=rec.server_cert_sha256 or "", client_identity=rec.client_identity,
                    tls_exporter=tls_exporter(conn))


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True  # stop() waits for connections in flight (each bounded by the timeout)

    def __init__(self, address: tuple[str, int], owner: TlsServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        super().__init__(address, _Handler)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, _TCPServer)
        self.server.owner.handle(self.request, self.client_address)


class TlsServer:
    """A listening TLS server. ``start()`` serves on a background thread; ``stop()`` closes the
    listener and waits for open connections. Also a context manager."""

    def __init__(self, config: ServerConfig, signer: HelloSigner, db: Database, *,
                 on_handshake: Callable[[HandshakeRecord], None] | None = None) -> None:
        self.config = config
        self.signer = signer
        self.db = db
        self.on_handshake = on_handshake
        self.context = server_context(config)
        try:
            self._tcp = _TCPServer((config.host, config.port), self)
        except OSError as exc:
            raise QaiError("tls.cannot_listen", f"cannot listen on {config.host}:{config.port}: {exc.strerror}",
                           status=503) from exc
        self.host: str = config.host
        self.port: int = int(self._tcp.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> TlsServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._tcp.serve_forever, kwargs={"poll_interval": 0.2},
                                            name=f"qai-tls-{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._tcp.shutdown()
            self._thread.join()
            self._thread = None
        self._tcp.server_close()

    def __enter__(self) -> TlsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one connection ----------------------------------------------------------------------
    def handle(self, sock: socket.socket, addr: Any) -> None:
        rec = HandshakeRecord(mode=self.config.mode, peer=_peer(addr))
        set_timeouts(sock, self.config.timeout)
        conn = SSL.Connection(self.context, sock)
        conn.set_accept_state()
        try:
            self._serve(conn, rec)
        except Exception:  # a bug must not kill the server; the connection is recorded as it stands
            log.exception("tls connection from %s failed", rec.peer)
            rec.error_code = rec.error_code or "internal.error"
            self._finish(rec)
        finally:
            close_gracefully(conn, sock)

    def _serve(self, conn: SSL.Connection, rec: HandshakeRecord) -> None:
        try:
            conn.do_handshake()
        except (SSL.Error, OSError) as exc:
            rec.error_code, rec.error_message = "tls.handshake_failed", ssl_reason(exc)
            self._finish(rec)
            return
        observed = observe(conn, rec)
        rec.outcome = decide(self.config.mode, rec.group)
        if rec.outcome == "refused":
            rec.error_code, rec.error_message = "tls.pqc_required", refusal_message(rec.group)
            self._finish(rec)
            self._send(conn, error_line(rec.error_code, rec.error_message))
            return
        try:
            nonce = check_nonce(read_line(pyopenssl_recv(conn), limit=256).decode("ascii", "replace").strip())
            envelope = self.signer.sign(hello_document(handshake_id=rec.id, mode=self.config.mode,
                                                       observed=observed, nonce=nonce, now=utcnow()))
        except QaiError as err:
            rec.error_code, rec.error_message = err.code, err.message
            self._finish(rec)
            if err.code not in ("tls.connection_lost", "tls.timeout"):
                self._send(conn, error_line(err.code, err.message))
            return
        rec.hello_sha256 = hashlib.sha256(envelope).hexdigest()
        self._finish(rec)
        self._send(conn, envelope + b"\n")

    def _send(self, conn: SSL.Connection, data: bytes) -> None:
        try:
            conn.sendall(data)
        except (SSL.Error, OSError) as exc:  # recorded already; the client hung up first
            log.info("tls: could not answer a client: %s", ssl_reason(exc))

    def _finish(self, rec: HandshakeRecord) -> None:
        count(rec)
        try:
            record(self.db, rec)
        except Exception:  # the metric and the log still tell; a database outage must not stop TLS
            log.exception("tls: could not record handshake %s", rec.id)
        log.info("tls handshake mode=%s group=%s class=%s cipher=%s protocol=%s client=%s peer=%s outcome=%s%s",
                 rec.mode, rec.group or "-", rec.classification, rec.cipher or "-", rec.protocol or "-",
                 rec.client_identity or "anonymous", rec.peer, rec.outcome,
                 f" error={rec.error_code}" if rec.error_code else "")
        if self.on_handshake is not None:
            try:
                self.on_handshake(rec)
            except Exception:  # a failing printer must not turn a served connection into an error
                log.exception("tls: on_handshake callback failed")


def write_key_document(signer: HelloSigner, tls_dir: Path) -> Path:
    """The hello key's public document next to the certificates, for clients of this machine to pin
    (``qai tls connect`` reads it by default). Public material only."""
    path = tls_dir / "hello-key.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(signer.public_key().model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def serve(mode: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, db: Database, kms: KeyService,
          tls_dir: Path = Path(".qai/tls"), cert_algs: Sequence[CertAlg] = ("ECDSA-P256",),
          client_auth: ClientAuth = "optional", timeout: float = 10.0,
          on_handshake: Callable[[HandshakeRecord], None] | None = None) -> TlsServer:
    """Start a TLS server in ``mode`` and return it, running (``stop()`` ends it).

    Issues the demo certificates of ``cert_algs`` when missing, creates the hello signing key on
    first use and writes its public key document to ``tls_dir/hello-key.json``.
    """
    config = ServerConfig(mode=check_mode(mode), host=host, port=port, tls_dir=tls_dir,
                          cert_algs=tuple(dict.fromkeys(cert_algs)), client_auth=client_auth, timeout=timeout)
    if not config.cert_algs:
        raise QaiError("tls.bad_cert_alg", "serve needs at least one certificate algorithm", status=422)
    for alg in config.cert_algs:
        ensure_ca(tls_dir, alg)
    signer = HelloSigner(db, kms)
    write_key_document(signer, tls_dir)
    return TlsServer(config, signer, db, on_handshake=on_handshake).start()
