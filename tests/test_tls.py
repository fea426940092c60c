"""The dual-stack TLS demo (kms/tls) with real clients of three TLS stacks against real listening
sockets: pyOpenSSL (cryptography's OpenSSL 4, ML-KEM), Python's ssl and the system `openssl
s_client` (OpenSSL 3.0, classical only). Hellos are signed by a real SoftHSM-backed KMS."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from prometheus_client import REGISTRY
from sqlalchemy import select

from kms.hsm import Hsm
from kms.service import KMS, KmsConfig
from kms.tls import CaFiles, HelloSigner, Observed, ensure_ca, issue_client, serve, tls_demo, verify_hello
from kms.tls.client import ConnectResult, connect, connect_stdlib
from kms.tls.groups import classify, openssl_version
from kms.tls.hello import HELLO_KEY
from kms.tls.models import TlsHandshakeRow, get_handshake
from kms.tls.server import ServerConfig, TlsServer, server_context
from kms.tls.wire import pyopenssl_recv, read_line
from orchestrator.auth import Principal
from orchestrator.db import Database
from sdk.canonical import canonical_json
from sdk.errors import QaiError
from sdk.signing import KeyDocument

REFUSAL = ("ERROR tls.pqc_required: negotiated group x25519 is not a post-quantum KEM; "
           "this server requires a hybrid or PQC group")


@dataclass
class Env:
    db: Database
    kms: KMS
    tls_dir: Path

    @property
    def ecdsa_ca(self) -> list[Path]:
        return [CaFiles(self.tls_dir, "ECDSA-P256").ca_cert]


@pytest.fixture
def env(sqlite_db: Database, hsm: Hsm, tmp_path: Path) -> Env:
    return Env(db=sqlite_db, kms=KMS(sqlite_db, hsm, KmsConfig(unsealed_ttl=300.0)), tls_dir=tmp_path / "tls")


@pytest.fixture
def env_both(db: Database, hsm: Hsm, tmp_path: Path) -> Env:
    """On SQLite and PostgreSQL: migration 0007 and the record insert on both engines."""
    return Env(db=db, kms=KMS(db, hsm, KmsConfig(unsealed_ttl=300.0)), tls_dir=tmp_path / "tls")


def _rows(db: Database) -> list[TlsHandshakeRow]:
    with db.read() as s:
        return list(s.scalars(select(TlsHandshakeRow).order_by(TlsHandshakeRow.at)))


def _hello_key(server: TlsServer) -> KeyDocument:
    return server.signer.public_key()


def _counter(group: str, mode: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value("qai_tls_handshakes_total", {"group": group, "mode": mode, "outcome": outcome})
    return value or 0.0


def _observed(r: ConnectResult) -> Observed:
    exporter = json.loads(base64.b64decode(json.loads(r.envelope)["payload"]))["tls_exporter"]
    return Observed(group=r.group, cipher=r.cipher, protocol=r.protocol, server_cert_sha256=r.server_cert_sha256,
                    client_identity=r.client_identity, tls_exporter=exporter)


def test_the_two_openssl_builds() -> None:
    """pyOpenSSL drives cryptography's bundled OpenSSL (3.5+: ML-KEM); Python's ssl the system one."""
    from cryptography.hazmat.backends.openssl import backend

    assert openssl_version() == backend.openssl_version_text()
    major, minor = (int(x) for x in openssl_version().split()[1].split(".")[:2])
    assert (major, minor) >= (3, 5), openssl_version()
    assert ssl.OPENSSL_VERSION_INFO < (3, 5), ssl.OPENSSL_VERSION


def test_openssl_defaults_negotiate_hybrid_or_x25519(env: Env) -> None:
    """The issue's fact, on a server context with OpenSSL's *default* groups (no set_groups)."""
    files = ensure_ca(env.tls_dir)[1]
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate_file(str(files.cert))
    ctx.use_privatekey_file(str(files.key))
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[str | None] = []

    def accept_two() -> None:
        for _ in range(2):
            sock, _ = listener.accept()
            conn = SSL.Connection(ctx, sock)
            conn.set_accept_state()
            conn.do_handshake()
            seen.append(conn.get_group_name())
            conn.sendall(b"bye\n")
            conn.shutdown()
            sock.close()

    thread = threading.Thread(target=accept_two)
    thread.start()
    port = listener.getsockname()[1]
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), socket.create_connection(("127.0.0.1", port)))
    client.set_connect_state()
    client.do_handshake()
    assert read_line(pyopenssl_recv(client)) == b"bye" and client.get_group_name() == "X25519MLKEM768"
    client.close()
    std = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    std.load_verify_locations(cafile=str(env.ecdsa_ca[0]))
    with std.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as s:
        assert read_line(s.recv) == b"bye"
    thread.join(timeout=30)
    listener.close()
    assert seen == ["X25519MLKEM768", "x25519"]


def test_pyopenssl_client_negotiates_hybrid_with_dual_server(env_both: Env) -> None:
    env = env_both
    with serve("dual", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server:
        r = connect("127.0.0.1", server.port, "pqc", keys=_hello_key(server), ca_files=env.ecdsa_ca)
    assert r.group == "X25519MLKEM768" and r.classification == "hybrid" and r.group_checked
    assert r.protocol == "TLSv1.3" and r.cipher is not None and r.cipher.startswith("TLS_")
    assert r.hello["group"] == "X25519MLKEM768" and r.hello["mode"] == "dual"
    assert r.signed_by == f"{HELLO_KEY}@1" and r.suite == "ML-DSA-65+ECDSA-P256"
    assert r.summary() == f"hybrid handshake: X25519MLKEM768 ({r.cipher}) signed hello verified"
    row = get_handshake(env.db, r.hello["handshake_id"])
    assert row is not None
    assert (row.negotiated_group, row.classification, row.outcome, row.mode) == (
        "X25519MLKEM768", "hybrid", "accepted", "dual")
    assert row.server_cert_sha256 == r.server_cert_sha256 and row.hello_sha256 is not None
    assert row.client_identity is None and row.error_code is None


def test_stdlib_ssl_client_falls_back_to_x25519_and_is_recorded(env: Env) -> None:
    # the premise: Python's ssl links the system OpenSSL, older than 3.5, so it cannot offer ML-KEM
    assert ssl.OPENSSL_VERSION_INFO < (3, 5), ssl.OPENSSL_VERSION
    with serve("dual", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server:
        r = connect_stdlib("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca)
        # a bare stdlib client too, without the helper: TLS 1.3, a nonce line, the hello line
        ctx = ssl.create_default_context(cafile=str(env.ecdsa_ca[0]))
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port)),
                             server_hostname="localhost") as s:
            assert s.version() == "TLSv1.3"
            s.sendall(b"0123456789abcdef0123\n")
            line = b""
            while not line.endswith(b"\n"):
                chunk = s.recv(4096)
                assert chunk
                line += chunk
    assert r.group == "x25519" and r.classification == "classical" and not r.group_checked
    assert r.summary().startswith(f"fallback handshake: x25519 ({r.cipher}) signed hello verified")
    bare = json.loads(base64.b64decode(json.loads(line)["payload"]))
    assert bare["group"] == "x25519" and bare["nonce"] == "0123456789abcdef0123"
    rows = _rows(env.db)
    assert [(x.negotiated_group, x.classification, x.outcome) for x in rows] == [
        ("x25519", "classical", "fallback")] * 2
    assert rows[0].id == r.hello["handshake_id"]


def test_a_bad_nonce_gets_an_error_line_and_is_recorded(env: Env) -> None:
    with serve("dual", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server:
        ctx = ssl.create_default_context(cafile=str(env.ecdsa_ca[0]))
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port)), server_hostname="localhost") as s:
            s.sendall(b"short nonce!\n")
            line = read_line(s.recv)
    assert line.startswith(b"ERROR tls.bad_nonce: ")
    [row] = _rows(env.db)
    assert (row.outcome, row.error_code, row.hello_sha256) == ("fallback", "tls.bad_nonce", None)


def test_openssl_s_client_is_refused_by_pqc_required(env: Env) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the system openssl CLI is required (apt install openssl)"
    with serve("pqc-required", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server:
        proc = subprocess.run([openssl, "s_client", "-connect", f"127.0.0.1:{server.port}", "-tls1_3", "-ign_eof",
                               "-CAfile", str(env.ecdsa_ca[0]), "-servername", "localhost"],
                              input=b"", capture_output=True, timeout=60)
        # a hybrid client on the same server is served
        ok = connect("127.0.0.1", server.port, "pqc", keys=_hello_key(server), ca_files=env.ecdsa_ca)
        # and a classical pyOpenSSL client gets the same refusal, as a stable error code
        with pytest.raises(QaiError) as err:
            connect("127.0.0.1", server.port, "classical", keys=_hello_key(server), ca_files=env.ecdsa_ca)
    out = proc.stdout.decode()
    assert REFUSAL in out
    assert "Server Temp Key: X25519, 253 bits" in out  # what OpenSSL 3.0 got: classical X25519
    assert "Verify return code: 0 (ok)" in out  # the handshake itself completed and verified
    assert ok.group == "X25519MLKEM768" and ok.hello["mode"] == "pqc-required"
    assert err.value.code == "tls.pqc_required" and err.value.status == 403
    assert err.value.details["group"] == "x25519"
    rows = _rows(env.db)
    assert [(x.negotiated_group, x.outcome, x.error_code) for x in rows] == [
        ("x25519", "refused", "tls.pqc_required"), ("X25519MLKEM768", "accepted", None),
        ("x25519", "refused", "tls.pqc_required")]
    assert rows[0].hello_sha256 is None  # nothing was signed for a refused connection


def test_classical_only_server_never_negotiates_pqc(env: Env) -> None:
    with serve("classical-only", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server:
        r = connect("127.0.0.1", server.port, "pqc", keys=_hello_key(server), ca_files=env.ecdsa_ca)
        # a client pinned to hybrid groups fails the handshake instead of falling back
        with pytest.raises(QaiError) as err:
            connect("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca, require_pqc=True)
    assert r.group == "x25519" and classify(r.group) == "classical" and r.group_checked
    assert r.summary().startswith("classical handshake: x25519")
    assert err.value.code == "tls.handshake_failed"
    rows = _rows(env.db)  # stop() waited for the server's side of both connections
    assert [(x.negotiated_group, x.classification, x.outcome) for x in rows] == [
        ("x25519", "classical", "accepted"), (None, "none", "failed")]
    assert rows[1].error_code == "tls.handshake_failed" and "key share" in (rows[1].error_message or "")


@pytest.mark.parametrize(("groups", "classification"), [("MLKEM768", "pqc"), ("SecP256r1MLKEM768", "hybrid"),
                                                        ("SecP384r1MLKEM1024", "hybrid"), ("P-256", "classical")])
def test_other_groups_are_classified(env: Env, groups: str, classification: str) -> None:
    with serve("dual", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server:
        r = connect("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca, groups=groups)
    assert r.classification == classification
    row = get_handshake(env.db, r.hello["handshake_id"])
    assert row is not None and row.negotiated_group == r.group
    assert row.outcome == ("fallback" if classification == "classical" else "accepted")


def _tamper_payload(envelope: bytes, change: Any) -> bytes:
    env = json.loads(envelope)
    env["payload"] = base64.b64encode(change(base64.b64decode(env["payload"]))).decode()
    return canonical_json(env)


def test_signed_hello_verifies_and_tampering_is_caught(env: Env) -> None:
    with serve("dual", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server:
        r = connect("127.0.0.1", server.port, "classical", keys=_hello_key(server), ca_files=env.ecdsa_ca)
        key = _hello_key(server)
    nonce, seen = r.hello["nonce"], _observed(r)
    envelope = r.envelope
    assert verify_hello(envelope, key, nonce=nonce, observed=seen).document == r.hello
    assert verify_hello(envelope, {key.name: key}, nonce=nonce, observed=seen).key == f"{HELLO_KEY}@1"

    def flip(p: bytes) -> bytes:
        return p[:10] + bytes([p[10] ^ 1]) + p[11:]

    def upgrade(p: bytes) -> bytes:  # claim the hybrid group the connection did not get
        doc = json.loads(p)
        return canonical_json({**doc, "group": "X25519MLKEM768", "classification": "hybrid"})

    for tampered in (_tamper_payload(envelope, flip), _tamper_payload(envelope, upgrade)):
        with pytest.raises(QaiError) as err:
            verify_hello(tampered, key, nonce=nonce, observed=seen)
        assert err.value.code == "tls.hello_bad_signature" and err.value.details["reason"] == "signature.invalid"
    # a genuine hello does not pass for another connection: other group, other nonce, other certificate
    assert r.channel_bound and r.group_checked
    for observed, field in ((Observed(**{**seen.__dict__, "group": "X25519MLKEM768"}), "group"),
                            (Observed(**{**seen.__dict__, "server_cert_sha256": "00" * 32}), "server_cert_sha256"),
                            (Observed(**{**seen.__dict__, "tls_exporter": "00" * 32}), "tls_exporter")):
        with pytest.raises(QaiError) as err:
            verify_hello(envelope, key, nonce=nonce, observed=observed)
        assert err.value.code == "tls.hello_mismatch" and err.value.details["field"] == field
    with pytest.raises(QaiError) as err:
        verify_hello(envelope, key, nonce="A" * 32, observed=seen)
    assert err.value.code == "tls.hello_mismatch" and err.value.details["field"] == "nonce"
    # only the pinned key verifies: another system key of the same suite is not trusted for hellos
    other = env.kms.create_key("qai.other", tenant="qai", principal=Principal.system("test"))
    with pytest.raises(QaiError) as err:
        verify_hello(envelope, other, nonce=nonce, observed=seen)
    assert err.value.code == "tls.hello_bad_signature" and err.value.details["reason"] == "signature.unknown_key"
    with pytest.raises(QaiError) as err:
        verify_hello(b"not json", key, nonce=nonce, observed=seen)
    assert err.value.code == "tls.hello_malformed"


class _LyingSigner(HelloSigner):
    """A server that signs, with its real key, a hybrid group it did not negotiate."""

    def sign(self, document: dict[str, Any]) -> bytes:
        return super().sign({**document, "group": "X25519MLKEM768", "classification": "hybrid"})


class _ForgingSigner(HelloSigner):
    """A middlebox that rewrites the signed hello's payload in flight."""

    def sign(self, document: dict[str, Any]) -> bytes:
        return _tamper_payload(super().sign(document), lambda p: p.replace(b'"x25519"', b'"X25519MLKEM768"'))


@pytest.mark.parametrize(("signer", "code"), [(_LyingSigner, "tls.hello_mismatch"),
                                              (_ForgingSigner, "tls.hello_bad_signature")])
def test_client_rejects_a_lying_or_forged_hello(env: Env, signer: type[HelloSigner], code: str) -> None:
    ensure_ca(env.tls_dir)
    liar = signer(env.db, env.kms)
    config = ServerConfig(mode="dual", port=0, tls_dir=env.tls_dir)
    with TlsServer(config, liar, env.db) as server, pytest.raises(QaiError) as err:
        connect("127.0.0.1", server.port, "classical", keys=liar.public_key(), ca_files=env.ecdsa_ca)
    assert err.value.code == code


class _Relay:
    """A middlebox holding the server's own certificate and key: it terminates the client's TLS
    session, opens its own to the real server and forwards the nonce and the signed hello. Group,
    nonce and certificate all match; only the RFC 9266 channel binding gives it away."""

    def __init__(self, tls_dir: Path, upstream_port: int) -> None:
        self.ctx = server_context(ServerConfig(mode="dual", port=0, tls_dir=tls_dir, client_auth="none"))
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._relay_one, daemon=True)
        self.thread.start()

    def _relay_one(self) -> None:
        sock, _ = self.listener.accept()
        down = SSL.Connection(self.ctx, sock)
        down.set_accept_state()
        down.do_handshake()
        nonce = read_line(pyopenssl_recv(down))
        up_ctx = SSL.Context(SSL.TLS_METHOD)
        up = SSL.Connection(up_ctx, socket.create_connection(("127.0.0.1", self.upstream_port)))
        up.set_connect_state()
        up.do_handshake()
        up.sendall(nonce + b"\n")
        down.sendall(read_line(pyopenssl_recv(up)) + b"\n")
        up.close()
        down.shutdown()
        sock.close()
        self.listener.close()


def test_a_hello_relayed_from_another_tls_session_is_caught(env: Env) -> None:
    with serve("dual", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server:
        relay = _Relay(env.tls_dir, server.port)
        with pytest.raises(QaiError) as err:
            connect("127.0.0.1", relay.port, keys=_hello_key(server), ca_files=env.ecdsa_ca)
        relay.thread.join(timeout=30)
    assert err.value.code == "tls.hello_mismatch" and err.value.details["field"] == "tls_exporter"


def test_counter_counts_by_group_mode_and_outcome(env: Env) -> None:
    before = {k: _counter(*k) for k in (("X25519MLKEM768", "dual", "accepted"), ("x25519", "dual", "fallback"),
                                        ("x25519", "pqc-required", "refused"), ("none", "classical-only", "failed"))}
    with serve("dual", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server:
        connect("127.0.0.1", server.port, "pqc", keys=_hello_key(server), ca_files=env.ecdsa_ca)
        connect("127.0.0.1", server.port, "pqc", keys=_hello_key(server), ca_files=env.ecdsa_ca)
        connect_stdlib("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca)
    with serve("pqc-required", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server, \
            pytest.raises(QaiError, match=r"^tls\.pqc_required: "):
        connect_stdlib("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca)
    with serve("classical-only", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server, \
            pytest.raises(QaiError, match=r"^tls\.handshake_failed: "):
        connect("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca, require_pqc=True)
    after = {k: _counter(*k) for k in before}
    assert {k: after[k] - before[k] for k in before} == {
        ("X25519MLKEM768", "dual", "accepted"): 2, ("x25519", "dual", "fallback"): 1,
        ("x25519", "pqc-required", "refused"): 1, ("none", "classical-only", "failed"): 1}


def test_mutual_tls_records_the_client_identity(env: Env) -> None:
    ensure_ca(env.tls_dir)
    alice = issue_client(env.tls_dir, "alice")
    files = CaFiles(env.tls_dir, "ECDSA-P256")
    with serve("dual", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server:
        r = connect("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca,
                    client_cert=(alice.cert, alice.key))
        anonymous = connect("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca)
    assert r.client_identity == "CN=alice,O=qai demo" == alice.subject
    assert r.hello["client_identity"] == "CN=alice,O=qai demo"
    row = get_handshake(env.db, r.hello["handshake_id"])
    assert row is not None and row.client_identity == "CN=alice,O=qai demo"
    anon_row = get_handshake(env.db, anonymous.hello["handshake_id"])
    assert anon_row is not None and anon_row.client_identity is None
    # required: a client without a certificate does not get through, and is recorded as failed
    with serve("dual", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir,
               client_auth="required") as server:
        with pytest.raises(QaiError) as err:
            connect("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca)
        ok = connect("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca,
                     client_cert=(files.client_cert("alice"), files.client_key("alice")))
    assert err.value.code in ("tls.handshake_failed", "tls.connection_lost")
    assert "certificate" in err.value.message
    assert ok.client_identity == "CN=alice,O=qai demo"
    failed = [x for x in _rows(env.db) if x.outcome == "failed"]
    assert len(failed) == 1 and "certificate" in (failed[0].error_message or "")


def test_ml_dsa_65_certificates(env: Env) -> None:
    """cryptography's OpenSSL 4 issues and verifies ML-DSA-65 certificates and pyOpenSSL serves them;
    with both certificates loaded, OpenSSL picks per client, so classical clients keep working."""
    issued = ensure_ca(env.tls_dir, "ML-DSA-65")
    assert [i.kind for i in issued] == ["ca", "server"] and all(i.alg == "ML-DSA-65" for i in issued)
    mldsa_ca = CaFiles(env.tls_dir, "ML-DSA-65").ca_cert
    bob = issue_client(env.tls_dir, "bob", "ML-DSA-65")
    with serve("dual", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir,
               cert_algs=("ECDSA-P256", "ML-DSA-65")) as server:
        pq = connect("127.0.0.1", server.port, keys=_hello_key(server), ca_files=[mldsa_ca],
                     server_name="localhost", client_cert=(bob.cert, bob.key))
        legacy = connect_stdlib("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca)
    assert (pq.server_cert_alg, pq.group, pq.client_identity) == ("ML-DSA-65", "X25519MLKEM768", "CN=bob,O=qai demo")
    assert (legacy.server_cert_alg, legacy.group) == ("ECDSA-P256", "x25519")
    with serve("dual", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir,
               cert_algs=("ML-DSA-65",)) as server:
        # an ML-DSA certificate alone: the system OpenSSL 3.0 offers no ML-DSA signature algorithm
        with pytest.raises(QaiError) as err:
            connect_stdlib("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca)
        # and a client trusting only the ECDSA CA rejects the ML-DSA chain
        with pytest.raises(QaiError) as untrusted:
            connect("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca)
    assert err.value.code == "tls.handshake_failed"
    assert untrusted.value.code == "tls.handshake_failed" and "certificate verify failed" in untrusted.value.message


def test_demo_ca_is_idempotent_and_hostname_is_checked(env: Env, tmp_path: Path) -> None:
    first = ensure_ca(env.tls_dir)
    again = ensure_ca(env.tls_dir)
    assert [i.created for i in first] == [True, True] and [i.created for i in again] == [False, False]
    assert [i.sha256 for i in first] == [i.sha256 for i in again]
    assert all(oct(i.key.stat().st_mode & 0o777) == "0o600" for i in first)
    reissued = ensure_ca(env.tls_dir, force=True)
    assert all(i.created for i in reissued) and reissued[0].sha256 != first[0].sha256
    other = ensure_ca(tmp_path / "other-ca")
    with serve("dual", "127.0.0.1", 0, db=env.db, kms=env.kms, tls_dir=env.tls_dir) as server:
        with pytest.raises(QaiError) as wrong_name:
            connect("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca,
                    server_name="example.com")
        with pytest.raises(QaiError) as wrong_ca:
            connect("127.0.0.1", server.port, keys=_hello_key(server), ca_files=[other[0].cert])
        by_name = connect("127.0.0.1", server.port, keys=_hello_key(server), ca_files=env.ecdsa_ca,
                          server_name="localhost")
    assert wrong_name.value.code == "tls.bad_server_certificate"
    assert wrong_ca.value.code == "tls.handshake_failed"
    assert by_name.group == "X25519MLKEM768"


def test_tls_demo_prints_one_hybrid_and_one_fallback_line(env: Env) -> None:
    printed: list[str] = []
    lines = tls_demo(env.db, env.kms, env.tls_dir, echo=printed.append)
    assert lines == printed and len(lines) == 2
    assert lines[0].startswith("hybrid handshake: X25519MLKEM768 (TLS_") and "signed hello verified" in lines[0]
    assert lines[1].startswith("fallback handshake: x25519 (TLS_") and "signed hello verified" in lines[1]
    assert [(x.classification, x.outcome) for x in _rows(env.db)] == [("hybrid", "accepted"),
                                                                      ("classical", "fallback")]


def test_cli_serve_and_connect_as_processes(tmp_path: Path) -> None:
    """`tls serve` and `tls connect` as a user runs them, on an embedded default of their own."""
    from tests.conftest import free_port

    env = {**os.environ, "QAI_HOME": str(tmp_path / ".qai")}
    env.pop("SOFTHSM2_CONF", None)
    cli = [sys.executable, "-m", "kms.tls.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    init = run("ca", "init", "--client", "carol", "--json")
    assert init.returncode == 0, init.stderr
    assert [i["kind"] for i in json.loads(init.stdout)["issued"]] == ["ca", "server", "client"]
    port = free_port()
    server = subprocess.Popen([*cli, "serve", "--mode", "dual", "--port", str(port), "--json"], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        started = json.loads(server.stdout.readline())  # printed once listening
        assert started["listening"] == f"127.0.0.1:{port}" and started["mode"] == "dual"
        hybrid = run("connect", "--port", str(port), "--client-cert", "carol", "--json")
        assert hybrid.returncode == 0, hybrid.stderr
        result = json.loads(hybrid.stdout)
        assert (result["group"], result["classification"], result["verified"]) == ("X25519MLKEM768", "hybrid", True)
        assert result["client_identity"] == "CN=carol,O=qai demo"
        fallback = json.loads(run("connect", "--port", str(port), "--stdlib", "--json").stdout)
        assert (fallback["group"], fallback["classification"]) == ("x25519", "classical")
        logged = [json.loads(server.stdout.readline()) for _ in range(2)]
        assert [(x["group"], x["outcome"]) for x in logged] == [("X25519MLKEM768", "accepted"),
                                                                ("x25519", "fallback")]
        bad = run("connect", "--port", str(port), "--prefer", "nope")
        assert bad.returncode == 2
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)
    assert server.returncode == 0
    listed = run("handshakes", "--json")
    assert listed.returncode == 0, listed.stderr
    counts = {(c["mode"], c["outcome"]): c["count"] for c in json.loads(listed.stdout)["counts"]}
    assert counts == {("dual", "accepted"): 1, ("dual", "fallback"): 1}

