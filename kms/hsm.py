"""PKCS#11 proxy: a session pool over one token, and the few operations the KMS needs.

What runs *inside* the token:

* the key-encryption key (AES-256, ``CKA_SENSITIVE``, never extractable) that seals PQC private
  keys with AES-GCM, the key id and version bound as associated data;
* classical keys (ECDSA P-256, Ed25519), generated and used in the token. SoftHSM 2.6 has no
  ``CKM_ECDSA_SHA256``, so the digest is computed outside and signed with ``CKM_ECDSA``;
* ML-DSA, natively, when the token lists ``CKM_ML_DSA`` (PKCS#11 3.2). SoftHSM 2.6 does not, so on
  the embedded default this path is never taken (see ``docs/hsm-migration.md``).

Module path, token label and PIN come from settings, so a production HSM is a configuration
change. For SoftHSM the proxy can also create its own ``softhsm2.conf`` and initialise the token.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
from asn1crypto.core import OctetString
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.mechanisms import GCMParams, MLDSAParameterSet
from pkcs11.util.ec import encode_named_curve_parameters

from orchestrator import metrics
from sdk.errors import QaiError

SEAL_FORMAT_V1 = b"\x01"
_GCM_IV_BYTES = 12
_CURVES = {"ECDSA-P256": "secp256r1", "Ed25519": "1.3.101.112"}
_NATIVE_MLDSA = {
    "ML-DSA-44": MLDSAParameterSet.ML_DSA_44,
    "ML-DSA-65": MLDSAParameterSet.ML_DSA_65,
    "ML-DSA-87": MLDSAParameterSet.ML_DSA_87,
}
HSM_ALGORITHMS = frozenset(_CURVES)


@dataclass(frozen=True)
class HsmConfig:
    module: str
    token_label: str
    user_pin: str = field(repr=False)
    so_pin: str = field(repr=False, default="")
    pool_size: int = 4
    softhsm_dir: Path | None = None  # set: embedded SoftHSM, conf written and token auto-initialised


@dataclass(frozen=True)
class TokenObject:
    """PKCS#11 attributes of one private or secret key object (what auditors check)."""

    label: str
    object_class: str
    key_type: str
    sensitive: bool
    extractable: bool
    never_extractable: bool
    always_sensitive: bool


def hsm_error(exc: BaseException, *, operation: str) -> QaiError:
    """Map a PKCS#11 failure onto a stable code. Never includes key bytes or PINs."""
    if isinstance(exc, QaiError):
        return exc
    if isinstance(exc, p11e.PinIncorrect | p11e.PinInvalid | p11e.PinLenRange):
        return QaiError("hsm.pin_incorrect", "the HSM rejected the configured PIN", status=503)
    if isinstance(exc, p11e.PinLocked):
        return QaiError("hsm.pin_locked", "the HSM user PIN is locked", status=503)
    if isinstance(exc, p11e.NoSuchToken):
        return QaiError("hsm.token_not_found", "the configured HSM token was not found", status=503)
    if isinstance(exc, p11e.NoSuchKey):
        return QaiError("hsm.key_not_found", "a key object is missing from the HSM", status=500,
                        details={"operation": operation})
    return QaiError("hsm.error", f"HSM operation failed: {type(exc).__name__}", status=503,
                    details={"operation": operation})


# python-pkcs11 calls C_Initialize with NULL arguments, which tells the module that the application
# will not call it from several threads at once (SoftHSM then switches its mutexes off and aborts
# under concurrent use). So every call into a module is serialised per process; sessions still
# keep per-operation state apart, and parallelism comes from more processes.
_call_locks: dict[str, threading.Lock] = {}

# One loaded module per path per process. SoftHSM reads SOFTHSM2_CONF in C_Initialize, so a
# different configuration (tests use a token directory each) needs a re-initialisation.
_libs: dict[str, tuple[Any, str | None]] = {}
_logins: dict[tuple[str, str | None, str], str] = {}  # (module, conf, token) -> sha256(PIN)
_libs_lock = threading.Lock()


def _load_module(module: str) -> Any:
    conf = os.environ.get("SOFTHSM2_CONF")
    with _libs_lock:
        cached = _libs.get(module)
        if cached is not None:
            lib, loaded_conf = cached
            if loaded_conf != conf:
                lib.reinitialize()  # logs every session out
                _libs[module] = (lib, conf)
                _logins.clear()
            return lib
        if not Path(module).exists():
            raise QaiError("hsm.module_not_found", "the PKCS#11 module was not found", status=503,
                           details={"module": module})
        try:
            lib = pkcs11.lib(module)
        except Exception as exc:
            raise QaiError("hsm.module_not_loadable", "the PKCS#11 module could not be loaded",
                           status=503, details={"module": module, "reason": type(exc).__name__}) from exc
        _libs[module] = (lib, conf)
        return lib


def prepare_softhsm(config: HsmConfig) -> None:
    """Write the embedded token's ``softhsm2.conf`` and initialise the token on first use."""
    assert config.softhsm_dir is not None
    tokens = config.softhsm_dir / "tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = config.softhsm_dir / "softhsm2.conf"
    if not conf.exists():
        conf.write_text(
            f"directories.tokendir = {tokens.resolve()}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
    os.environ["SOFTHSM2_CONF"] = str(conf.resolve())
    lib = _load_module(config.module)
    try:
        lib.get_token(token_label=config.token_label)
        return
    except p11e.NoSuchToken:
        pass
    util = shutil.which("softhsm2-util")
    if util is None:
        raise QaiError("hsm.softhsm_missing", "softhsm2-util is not installed (apt: softhsm2)",
                       status=503)
    proc = subprocess.run(
        [util, "--init-token", "--free", "--label", config.token_label,
         "--pin", config.user_pin, "--so-pin", config.so_pin],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        # softhsm2-util does not echo PINs; its message is safe to surface.
        raise QaiError("hsm.token_init_failed", "could not initialise the SoftHSM token", status=503,
                       details={"stderr": proc.stderr.strip()[-300:]})
    lib.reinitialize()  # the new slot is only seen after C_Initialize
    _libs[config.module] = (lib, os.environ.get("SOFTHSM2_CONF"))
    _logins.clear()


class _PooledSession:
    def __init__(self, session: Any) -> None:
        self.session = session
        self.keys: dict[tuple[str, ObjectClass], Any] = {}

    def key(self, label: str, object_class: ObjectClass) -> Any:
        cache_key = (label, object_class)
        obj = self.keys.get(cache_key)
        if obj is None:
            obj = self.session.get_key(label=label, object_class=object_class)
            self.keys[cache_key] = obj
        return obj


class Hsm:
    """A session pool over one token. Thread-safe: each operation borrows one session."""

    def __init__(self, config: HsmConfig) -> None:
        self.config = config
        self._pool: queue.Queue[_PooledSession] | None = None
        self._all: list[_PooledSession] = []
        self._open_lock = threading.Lock()
        self._mechanisms: frozenset[int] = frozenset()
        self._call_lock = _call_locks.setdefault(config.module, threading.Lock())
        self.in_use = 0
        self.errors = 0

    # -- pool ---------------------------------------------------------------------------------
    def open(self) -> None:
        with self._open_lock, self._call_lock:
            if self._pool is not None:
                return
            if self.config.softhsm_dir is not None:
                prepare_softhsm(self.config)
            lib = _load_module(self.config.module)
            login_key = (self.config.module, os.environ.get("SOFTHSM2_CONF"), self.config.token_label)
            pin_hash = hashlib.sha256(self.config.user_pin.encode()).hexdigest()
            try:
                token = lib.get_token(token_label=self.config.token_label)
                first = token.open(rw=True, user_pin=self.config.user_pin)
                _logins[login_key] = pin_hash
            except p11e.UserAlreadyLoggedIn:
                # Another pool of this process logged in already (login is per application).
                # Only accept it with the same PIN, or a wrong PIN would pass unnoticed.
                if _logins.get(login_key) != pin_hash:
                    raise QaiError("hsm.pin_incorrect", "the HSM rejected the configured PIN",
                                   status=503) from None
                first = token.open(rw=True)
            except Exception as exc:
                raise hsm_error(exc, operation="open") from exc
            # C_Login is per application: the other sessions share the first one's login.
            sessions = [first] + [token.open(rw=True) for _ in range(self.config.pool_size - 1)]
            self._mechanisms = frozenset(int(m) for m in token.slot.get_mechanisms())
            pool: queue.Queue[_PooledSession] = queue.Queue()
            for s in sessions:
                pooled = _PooledSession(s)
                self._all.append(pooled)
                pool.put(pooled)
            self._pool = pool

    def close(self) -> None:
        with self._open_lock, self._call_lock:
            for pooled in self._all:
                with contextlib.suppress(Exception):  # a dead session needs no closing
                    pooled.session.close()
            self._all.clear()
            self._pool = None

    @contextmanager
    def session(self, operation: str) -> Iterator[_PooledSession]:
        if self._pool is None:
            self.open()
        assert self._pool is not None
        pooled = self._pool.get(timeout=30)
        self.in_use += 1
        metrics.HSM_SESSIONS_ACQUIRED.inc()
        try:
            with self._call_lock:
                yield pooled
        except QaiError:
            self.errors += 1
            metrics.HSM_SESSION_ERRORS.labels(operation).inc()
            raise
        except p11e.PKCS11Error as exc:
            self.errors += 1
            metrics.HSM_SESSION_ERRORS.labels(operation).inc()
            pooled.keys.clear()
            raise hsm_error(exc, operation=operation) from exc
        finally:
            self.in_use -= 1
            self._pool.put(pooled)

    def ping(self) -> None:
        with self.session("ping") as s:
            s.session.token  # noqa: B018 - touching the token proves the session is alive

    def supports_native(self, alg: str) -> bool:
        """True when the token can generate and use ``alg`` itself (PKCS#11 3.2 ML-DSA)."""
        if self._pool is None:
            self.open()
        return alg in _NATIVE_MLDSA and int(Mechanism.ML_DSA) in self._mechanisms

    # -- key-encryption key -------------------------------------------------------------------
    def ensure_kek(self, label: str) -> None:
        with self.session("ensure_kek") as s:
            try:
                s.key(label, ObjectClass.SECRET_KEY)
                return
            except p11e.NoSuchKey:
                pass
            s.session.generate_key(
                KeyType.AES, 256, label=label, store=True,
                template={
                    Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
                    Attribute.WRAP: False, Attribute.UNWRAP: False,
                },
            )

    def seal(self, kek_label: str, plaintext: bytes | bytearray, aad: bytes) -> bytes:
        """AES-256-GCM in the token; returns ``0x01 ‖ iv ‖ ciphertext ‖ tag``."""
        iv = os.urandom(_GCM_IV_BYTES)
        with self.session("seal") as s:
            kek = s.key(kek_label, ObjectClass.SECRET_KEY)
            ct = kek.encrypt(bytes(plaintext), mechanism=Mechanism.AES_GCM,
                             mechanism_param=GCMParams(iv, aad, 128))
        return SEAL_FORMAT_V1 + iv + bytes(ct)

    def unseal(self, kek_label: str, blob: bytes, aad: bytes) -> bytearray:
        if len(blob) < 1 + _GCM_IV_BYTES + 16 or blob[:1] != SEAL_FORMAT_V1:
            raise QaiError("kms.unseal_failed", "sealed key blob is malformed", status=500)
        iv, ct = blob[1 : 1 + _GCM_IV_BYTES], blob[1 + _GCM_IV_BYTES :]
        with self.session("unseal") as s:
            kek = s.key(kek_label, ObjectClass.SECRET_KEY)
            try:
                pt = kek.decrypt(ct, mechanism=Mechanism.AES_GCM,
                                 mechanism_param=GCMParams(iv, aad, 128))
            except p11e.PKCS11Error as exc:
                # GCM tag mismatch: the blob or its binding (key id, version) was altered.
                raise QaiError("kms.unseal_failed",
                               "sealed key failed authentication (tampered or misbound)",
                               status=500) from exc
        return bytearray(pt)

    # -- in-token asymmetric keys ---------------------------------------------------------------
    def generate_keypair(self, alg: str, label: str) -> bytes:
        """Generate ``alg`` in the token under ``label``; returns the raw public key."""
        private_template = {
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.ID: label.encode(),
        }
        public_template = {Attribute.TOKEN: True, Attribute.VERIFY: True, Attribute.ID: label.encode()}
        with self.session("generate_keypair") as s:
            if alg in _NATIVE_MLDSA:
                # PKCS#11 3.2 native ML-DSA; taken only when supports_native() said so.
                pub, _ = s.session.generate_keypair(
                    KeyType.ML_DSA, store=True, label=label,
                    public_template={**public_template, Attribute.PARAMETER_SET: _NATIVE_MLDSA[alg]},
                    private_template=private_template,
                )
                return bytes(pub[Attribute.VALUE])
            curve = _CURVES.get(alg)
            if curve is None:
                raise QaiError("crypto.unknown_algorithm", f"{alg} is not an HSM algorithm",
                               details={"hsm_algorithms": sorted(HSM_ALGORITHMS)})
            key_type = KeyType.EC if alg == "ECDSA-P256" else KeyType.EC_EDWARDS
            mech = (Mechanism.EC_KEY_PAIR_GEN if alg == "ECDSA-P256"
                    else Mechanism.EC_EDWARDS_KEY_PAIR_GEN)
            params = s.session.create_domain_parameters(
                key_type, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True
            )
            pub, _ = params.generate_keypair(
                store=True, label=label, mechanism=mech,
                public_template=public_template, private_template=private_template,
            )
            point = bytes(pub[Attribute.EC_POINT])
        native: bytes = OctetString.load(point).native
        return bytes(native)

    def sign(self, alg: str, label: str, data: bytes) -> bytes:
        """Sign in the token. For ECDSA ``data`` is the digest; the result is DER."""
        with self.session("sign") as s:
            key = s.key(label, ObjectClass.PRIVATE_KEY)
            if alg == "ECDSA-P256":
                raw = key.sign(data, mechanism=Mechanism.ECDSA)
                half = len(raw) // 2
                return encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                            int.from_bytes(raw[half:], "big"))
            if alg == "Ed25519":
                return bytes(key.sign(data, mechanism=Mechanism.EDDSA))
            if alg in _NATIVE_MLDSA:
                return bytes(key.sign(data, mechanism=Mechanism.ML_DSA))
        raise QaiError("crypto.unknown_algorithm", f"{alg} is not an HSM algorithm")

    def destroy(self, label: str) -> None:
        """Remove every object with ``label`` (used when key creation fails half-way)."""
        with self.session("destroy") as s:
            for obj in list(s.session.get_objects({Attribute.LABEL: label})):
                obj.destroy()
            for pooled in self._all:
                pooled.keys = {k: v for k, v in pooled.keys.items() if k[0] != label}

    def key_objects(self) -> list[TokenObject]:
        """Attributes of every private and secret key object on the token."""
        out: list[TokenObject] = []
        with self.session("inspect") as s:
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY):
                for obj in s.session.get_objects({Attribute.CLASS: cls}):
                    out.append(TokenObject(
                        label=str(obj[Attribute.LABEL]),
                        object_class=cls.name,
                        key_type=KeyType(obj[Attribute.KEY_TYPE]).name,
                        sensitive=bool(obj[Attribute.SENSITIVE]),
                        extractable=bool(obj[Attribute.EXTRACTABLE]),
                        never_extractable=bool(obj[Attribute.NEVER_EXTRACTABLE]),
                        always_sensitive=bool(obj[Attribute.ALWAYS_SENSITIVE]),
                    ))
        return out

    def stats(self) -> dict[str, int]:
        return {"pool_size": self.config.pool_size, "in_use": self.in_use, "errors": self.errors}
