"""A demo certificate authority for the TLS demo: one CA per signature algorithm, a server
certificate for ``localhost`` / ``127.0.0.1`` and client certificates for mutual TLS.

Layout under the directory (default ``$QAI_HOME/tls``)::

    ecdsa-p256/ca.pem  ca.key  server.pem  server.key  clients/<name>.pem  clients/<name>.key
    ml-dsa-65/…        (only when asked for: ``--cert-alg ML-DSA-65``)

Private keys are PKCS#8 PEM files with mode 0600. This is a demo CA: a production deployment takes
its certificates from its real PKI and keeps the keys in the proxy's HSM (docs/pqc-tls.md).

ML-DSA-65 certificates are real: the OpenSSL 4 bundled in cryptography's wheel issues and verifies
them (FIPS 204, RFC 9881 identifiers) and pyOpenSSL serves them. The profile below (SKI, AKI,
key usage, EKU) is what cryptography's own RFC 5280 verifier demands, so the client can check the
hostname with it (see :mod:`kms.tls.client`).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sdk.errors import QaiError

CertAlg = Literal["ECDSA-P256", "ML-DSA-65"]
CERT_ALGS: tuple[CertAlg, ...] = get_args(CertAlg)
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
LEAF_DAYS = 90
_RENEW_BEFORE = timedelta(days=1)  # a leaf this close to expiry is issued again by ensure_ca
_BACKDATE = timedelta(minutes=5)  # tolerate small clock differences between server and client

_SUBDIR: dict[CertAlg, str] = {"ECDSA-P256": "ecdsa-p256", "ML-DSA-65": "ml-dsa-65"}
_CLIENT_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class CaFiles:
    """Where one algorithm's CA and server certificate live."""

    root: Path
    alg: CertAlg

    @property
    def dir(self) -> Path:
        return self.root / _SUBDIR[self.alg]

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    def client_cert(self, name: str) -> Path:
        return self.dir / "clients" / f"{name}.pem"

    def client_key(self, name: str) -> Path:
        return self.dir / "clients" / f"{name}.key"


@dataclass(frozen=True)
class Issued:
    """A certificate written by this module: what, where, and whether it was new."""

    kind: Literal["ca", "server", "client"]
    alg: CertAlg
    subject: str
    cert: Path
    key: Path
    sha256: str
    not_after: datetime
    created: bool


def check_alg(alg: str) -> CertAlg:
    for a in CERT_ALGS:
        if a == alg:
            return a
    raise QaiError("tls.bad_cert_alg", f"unknown certificate algorithm {alg!r}", status=422,
                   details={"algorithms": list(CERT_ALGS)})


def _new_key(alg: CertAlg) -> CertificateIssuerPrivateKeyTypes:
    if alg == "ML-DSA-65":
        return mldsa.MLDSA65PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _sign_hash(alg: CertAlg) -> hashes.SHA256 | None:
    # ML-DSA signs the message itself (pure mode); X.509 with ML-DSA takes no separate digest.
    return None if alg == "ML-DSA-65" else hashes.SHA256()


def _write_private(path: Path, key: CertificateIssuerPrivateKeyTypes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    # created 0600 from the start: the key never exists on disk with wider permissions
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise QaiError("tls.no_certificate", f"cannot read {path}: {exc.strerror}; run `qai tls ca init`",
                       status=404, details={"path": str(path)}) from exc
    except ValueError as exc:
        raise QaiError("tls.bad_certificate", f"{path} is not a PEM certificate", status=422,
                       details={"path": str(path)}) from exc


def _load_issuer_key(path: Path) -> CertificateIssuerPrivateKeyTypes:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise QaiError("tls.bad_certificate", f"cannot load the CA key {path}", status=422,
                       details={"path": str(path)}) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | mldsa.MLDSA65PrivateKey):
        raise QaiError("tls.bad_certificate", f"{path} is not an ECDSA P-256 or ML-DSA-65 key", status=422)
    return key


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, hex: what the signed hello names and the client compares."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qai demo"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _issue_ca(files: CaFiles, now: datetime) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    key = _new_key(files.alg)
    name = _name(f"qai demo TLS CA ({files.alg})")
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, _sign_hash(files.alg)))
    _write_private(files.ca_key, key)
    _write_cert(files.ca_cert, cert)
    return cert, key


def _issue_leaf(files: CaFiles, ca: x509.Certificate, ca_key: CertificateIssuerPrivateKeyTypes, *,
                common_name: str, hosts: Sequence[str], usage: x509.ObjectIdentifier, cert_path: Path,
                key_path: Path, now: datetime) -> x509.Certificate:
    key = _new_key(files.alg)
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name)).issuer_name(ca.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - _BACKDATE).not_valid_after(now + timedelta(days=LEAF_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False))
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    cert = builder.sign(ca_key, _sign_hash(files.alg))
    _write_private(key_path, key)
    _write_cert(cert_path, cert)
    return cert


def _issued(kind: Literal["ca", "server", "client"], alg: CertAlg, cert: x509.Certificate, cert_path: Path,
            key_path: Path, created: bool) -> Issued:
    return Issued(kind=kind, alg=alg, subject=cert.subject.rfc4514_string(), cert=cert_path, key=key_path,
                  sha256=fingerprint(cert), not_after=cert.not_valid_after_utc, created=created)


def _usable_leaf(path: Path, ca: x509.Certificate, hosts: Sequence[str], now: datetime) -> x509.Certificate | None:
    """The existing leaf at ``path`` if this CA issued it, it covers ``hosts`` and it is not about to expire."""
    if not path.exists():
        return None
    cert = load_cert(path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return None  # a CA issued again since: the old leaf no longer chains
    if cert.not_valid_after_utc - _RENEW_BEFORE < now:
        return None
    if hosts:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return None
        if set(_san(hosts)) - set(san):
            return None
    return cert


def ensure_ca(directory: Path, alg: CertAlg = "ECDSA-P256", *, hosts: Sequence[str] = DEFAULT_HOSTS,
              force: bool = False) -> list[Issued]:
    """The CA and server certificate of ``alg`` under ``directory``, issued when missing, expiring
    or (``force``) always. Idempotent: an existing, valid pair is kept, so clients that pinned the
    CA keep working across restarts."""
    files = CaFiles(directory, alg)
    now = datetime.now(UTC)
    out: list[Issued] = []
    ca_ok = (not force and files.ca_cert.exists() and files.ca_key.exists()
             and load_cert(files.ca_cert).not_valid_after_utc - _RENEW_BEFORE > now)
    if ca_ok:
        ca, ca_key = load_cert(files.ca_cert), _load_issuer_key(files.ca_key)
    else:
        ca, ca_key = _issue_ca(files, now)
    out.append(_issued("ca", alg, ca, files.ca_cert, files.ca_key, not ca_ok))
    server = None if force or not files.server_key.exists() else _usable_leaf(files.server_cert, ca, hosts, now)
    created = server is None
    if server is None:
        server = _issue_leaf(files, ca, ca_key, common_name=hosts[0] if hosts else "localhost", hosts=hosts,
                             usage=ExtendedKeyUsageOID.SERVER_AUTH, cert_path=files.server_cert,
                             key_path=files.server_key, now=now)
    out.append(_issued("server", alg, server, files.server_cert, files.server_key, created))
    return out


def issue_client(directory: Path, name: str, alg: CertAlg = "ECDSA-P256") -> Issued:
    """A client certificate ``CN=<name>, O=qai demo`` for mutual TLS, from the CA of ``alg``
    (which must exist: ``qai tls ca init``). Issued again on every call."""
    if not name or not set(name) <= _CLIENT_NAME_OK or name.startswith("."):
        raise QaiError("tls.bad_client_name", f"client name {name!r} must be letters, digits, '-', '_' or '.'",
                       status=422)
    files = CaFiles(directory, alg)
    ca = load_cert(files.ca_cert)
    ca_key = _load_issuer_key(files.ca_key)
    cert = _issue_leaf(files, ca, ca_key, common_name=name, hosts=(), usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                       cert_path=files.client_cert(name), key_path=files.client_key(name), now=datetime.now(UTC))
    return _issued("client", alg, cert, files.client_cert(name), files.client_key(name), True)


def ca_files(directory: Path, algs: Sequence[CertAlg] | None = None) -> list[Path]:
    """The CA certificates present under ``directory`` (all algorithms, or those of ``algs``)."""
    return [CaFiles(directory, a).ca_cert for a in (algs or CERT_ALGS) if CaFiles(directory, a).ca_cert.exists()]
