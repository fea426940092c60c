"""Crypto providers and the sdk verifier: every algorithm on every provider, cross-provider interop,
pre-hash modes, error codes and PEM.

The expected providers and algorithms are spelled out here, not discovered: a provider that fails
to load (a missing ``pqcrypto``, say) fails these tests instead of silently shrinking them.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import itertools
import sys
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from kms.providers import PROVIDERS, available_providers, get_provider, provider_for
from kms.providers.liboqs import OQS_NAMES, unavailable_reason
from sdk.algorithms import ALGORITHMS, get_algorithm
from sdk.crypto import hash_mldsa_mu, public_key_from_pem, public_key_pem, verify_signature
from sdk.errors import QaiError

MSG = b"qai provider test message \x00\xff"
MLDSA = ["ML-DSA-44", "ML-DSA-65", "ML-DSA-87"]
SLHDSA = ["SLH-DSA-SHA2-128s", "SLH-DSA-SHA2-128f"]
MLKEM = ["ML-KEM-768", "ML-KEM-1024"]
CLASSICAL = ["ECDSA-P256", "Ed25519"]
EXPECTED = {
    "openssl": frozenset(MLDSA + MLKEM + CLASSICAL),
    "pqclean": frozenset(MLDSA + SLHDSA + MLKEM),
}
HASHES: dict[str, Callable[[bytes], hashlib._Hash]] = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


def cases(kind: str) -> list[tuple[str, str]]:
    return [(p, a) for p, algs in EXPECTED.items() for a in sorted(algs) if ALGORITHMS[a].kind == kind]


def shared(kind: str) -> list[tuple[str, str, str]]:
    """(one provider, another, algorithm) for every ordered pair of providers that share it."""
    return [(a, b, alg) for a, b in itertools.permutations(EXPECTED, 2)
            for alg in sorted(EXPECTED[a] & EXPECTED[b]) if ALGORITHMS[alg].kind == kind]


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(QaiError) as err:
        fn()
    return err.value.code


# -- registry ---------------------------------------------------------------------------------


def test_registry_names_and_properties() -> None:
    assert set(ALGORITHMS) == set(MLDSA + SLHDSA + MLKEM + CLASSICAL)
    assert {a for a, i in ALGORITHMS.items() if i.hsm_native} == {"ECDSA-P256", "Ed25519"}
    assert {a for a, i in ALGORITHMS.items() if i.pqc} == set(MLDSA + SLHDSA + MLKEM)
    assert {a for a, i in ALGORITHMS.items() if i.kind == "kem"} == set(MLKEM)
    assert get_algorithm("SLH-DSA-SHA2-128s").oid == "2.16.840.1.101.3.4.3.20"
    assert get_algorithm("SLH-DSA-SHA2-128f").oid == "2.16.840.1.101.3.4.3.21"
    assert get_algorithm("ML-DSA-65").oid == "2.16.840.1.101.3.4.3.18"
    assert get_algorithm("ML-KEM-768").oid == "2.16.840.1.101.3.4.4.2"
    assert [get_algorithm(a).public_key_size for a in MLDSA] == [1312, 1952, 2592]


@pytest.mark.parametrize("name", ["ML-DSA-66", "ml-dsa-65", "RSA-2048", "", "SLH-DSA-SHAKE-128s"])
def test_unknown_algorithm_everywhere(name: str) -> None:
    with pytest.raises(QaiError) as err:
        get_algorithm(name)
    assert err.value.code == "crypto.unknown_algorithm" and err.value.status == 400
    assert err.value.details["known"] == sorted(ALGORITHMS)
    calls: list[Callable[[], object]] = [
        lambda: provider_for(name),
        lambda: verify_signature(name, b"k", MSG, b"s"),
        lambda: public_key_pem(name, b"k"),
        lambda: public_key_from_pem(name, "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n"),
    ]
    for p in PROVIDERS.values():  # liboqs too: the name is checked before the provider loads
        calls += [
            lambda p=p: p.generate(name),  # type: ignore[misc]
            lambda p=p: p.load_private(name, b"k"),  # type: ignore[misc]
            lambda p=p: p.sign(name, b"k", MSG),  # type: ignore[misc]
            lambda p=p: p.verify(name, b"k", MSG, b"s"),  # type: ignore[misc]
            lambda p=p: p.encapsulate(name, b"k"),  # type: ignore[misc]
            lambda p=p: p.decapsulate(name, b"k", b"c"),  # type: ignore[misc]
        ]
    assert {code_of(c) for c in calls} == {"crypto.unknown_algorithm"}


# -- registry of providers --------------------------------------------------------------------


def test_providers_available_and_their_algorithms() -> None:
    assert available_providers() == ["openssl", "pqclean"]
    for name, algs in EXPECTED.items():
        assert get_provider(name).algorithms() == algs
    assert get_provider("liboqs").algorithms() == frozenset(OQS_NAMES) <= set(ALGORITHMS)
    assert code_of(lambda: get_provider("bouncycastle")) == "crypto.unknown_provider"


def test_provider_for_prefers_openssl_then_pqclean() -> None:
    for alg in ALGORITHMS:
        p = provider_for(alg)
        assert p.available() and alg in p.algorithms()
        assert p.name == ("openssl" if alg in EXPECTED["openssl"] else "pqclean")
    assert provider_for("ML-DSA-65", preferred="pqclean").name == "pqclean"
    assert provider_for("SLH-DSA-SHA2-128f", preferred="openssl").name == "pqclean"  # openssl lacks it
    assert provider_for("ML-KEM-768", preferred="liboqs").name == "openssl"  # liboqs unavailable
    assert code_of(lambda: provider_for("ML-DSA-65", preferred="nope")) == "crypto.unknown_provider"


def test_liboqs_is_unavailable_with_a_clear_error() -> None:
    p = get_provider("liboqs")
    assert not p.available()
    reason = unavailable_reason()
    assert reason is not None and "liboqs shared library" in reason and "not found" in reason
    calls: list[Callable[[], object]] = [
        lambda: p.generate("ML-DSA-65"),
        lambda: p.load_private("ML-DSA-65", b"k"),
        lambda: p.sign("ML-DSA-65", b"k", MSG),
        lambda: p.verify("SLH-DSA-SHA2-128s", b"k", MSG, b"s"),
        lambda: p.encapsulate("ML-KEM-768", b"k"),
        lambda: p.decapsulate("ML-KEM-1024", b"k", b"c"),
    ]
    for call in calls:
        with pytest.raises(QaiError) as err:
            call()
        e = err.value
        assert (e.code, e.status, e.details["provider"]) == ("crypto.provider_unavailable", 503, "liboqs")
        assert "liboqs shared library" in e.message and "not found" in e.message
        assert "BUILD_SHARED_LIBS=ON" in e.message and "qai[liboqs]" in e.message
    # the binding was never imported, so it never tried to download and build liboqs
    assert "oqs" not in sys.modules


def test_algorithm_a_provider_lacks_or_of_the_wrong_kind() -> None:
    openssl, pqclean = get_provider("openssl"), get_provider("pqclean")
    assert code_of(lambda: openssl.generate("SLH-DSA-SHA2-128s")) == "crypto.unsupported_algorithm"
    assert code_of(lambda: pqclean.generate("Ed25519")) == "crypto.unsupported_algorithm"
    kem = openssl.generate("ML-KEM-768")
    sig = openssl.generate("ML-DSA-44")
    for p in (openssl, pqclean):
        assert code_of(lambda p=p: p.sign("ML-KEM-768", kem.private_key, MSG)) == "crypto.unsupported_algorithm"  # type: ignore[misc]
        assert code_of(lambda p=p: p.verify("ML-KEM-768", kem.public_key, MSG, b"s")) == "crypto.unsupported_algorithm"  # type: ignore[misc]
        assert code_of(lambda p=p: p.encapsulate("ML-DSA-44", sig.public_key)) == "crypto.unsupported_algorithm"  # type: ignore[misc]
    assert code_of(lambda: verify_signature("ML-KEM-768", kem.public_key, MSG, b"s")) == "crypto.not_a_signature"


# -- signatures -------------------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "alg"), cases("signature"))
def test_sign_verify_round_trip(provider: str, alg: str) -> None:
    p = get_provider(provider)
    info = get_algorithm(alg)
    pair = p.generate(alg)
    assert len(pair.public_key) == info.public_key_size
    sig = p.sign(alg, pair.private_key, MSG)
    if info.signature_size is not None:
        assert len(sig) == info.signature_size
    assert p.verify(alg, pair.public_key, MSG, sig) is True
    assert verify_signature(alg, pair.public_key, MSG, sig) is True
    # a loaded key (what the KMS caches) signs the same way
    assert verify_signature(alg, pair.public_key, MSG, p.load_private(alg, pair.private_key).sign(MSG))
    # tampered message
    assert p.verify(alg, pair.public_key, MSG + b"!", sig) is False
    assert verify_signature(alg, pair.public_key, flip(MSG, 0), sig) is False
    assert verify_signature(alg, pair.public_key, b"", sig) is False
    # tampered signature: first, middle and last byte, truncated, extended, empty
    for bad in (flip(sig, 0), flip(sig, len(sig) // 2), flip(sig, len(sig) - 1), sig[:-1], sig + b"\x00", b""):
        assert p.verify(alg, pair.public_key, MSG, bad) is False
        assert verify_signature(alg, pair.public_key, MSG, bad) is False
    # another key
    assert verify_signature(alg, p.generate(alg).public_key, MSG, sig) is False


@pytest.mark.parametrize("prehash", ["sha256", "sha512"])
@pytest.mark.parametrize(("provider", "alg"), [c for c in cases("signature") if c[1] in [*MLDSA, "ECDSA-P256"]])
def test_prehash_round_trip(provider: str, alg: str, prehash: str) -> None:
    p = get_provider(provider)
    pair = p.generate(alg)
    digest = HASHES[prehash](MSG).digest()
    sig = p.sign(alg, pair.private_key, digest, prehash=prehash)
    assert p.verify(alg, pair.public_key, digest, sig, prehash=prehash)
    assert verify_signature(alg, pair.public_key, digest, sig, prehash=prehash)
    assert verify_signature(alg, pair.public_key, digest, p.load_private(alg, pair.private_key).sign(
        digest, prehash=prehash), prehash=prehash)
    assert not verify_signature(alg, pair.public_key, HASHES[prehash](b"other").digest(), sig, prehash=prehash)
    assert not verify_signature(alg, pair.public_key, digest, flip(sig, len(sig) // 2), prehash=prehash)
    if alg in MLDSA:  # HashML-DSA is domain-separated from pure ML-DSA over the digest bytes
        assert not verify_signature(alg, pair.public_key, digest, sig)
        assert not verify_signature(alg, pair.public_key, digest, p.sign(alg, pair.private_key, digest),
                                    prehash=prehash)
    else:  # ECDSA over SHA-256: a sha256 pre-hash signature is the ordinary signature of MSG
        assert verify_signature(alg, pair.public_key, MSG, sig) is (prehash == "sha256")


@pytest.mark.parametrize(("provider", "alg"), [c for c in cases("signature") if c[1] in [*SLHDSA, "Ed25519"]])
def test_prehash_refused_for_slhdsa_and_ed25519(provider: str, alg: str) -> None:
    """SLH-DSA: pqcrypto's HashSLH-DSA hashes the whole message itself, so a digest cannot be
    signed (see test_independent_verify.py); Ed25519 (pure EdDSA) has no digest form."""
    p = get_provider(provider)
    pair = p.generate(alg)
    digest = hashlib.sha256(MSG).digest()
    for call in (
        lambda: p.sign(alg, pair.private_key, digest, prehash="sha256"),
        lambda: p.load_private(alg, pair.private_key).sign(digest, prehash="sha256"),
        lambda: p.verify(alg, pair.public_key, digest, b"s", prehash="sha256"),
        lambda: verify_signature(alg, pair.public_key, hashlib.sha512(MSG).digest(), b"s", prehash="sha512"),
    ):
        with pytest.raises(QaiError) as err:
            call()
        assert (err.value.code, err.value.status) == ("crypto.prehash_unsupported", 422)


def test_bad_prehash_arguments() -> None:
    pair = get_provider("openssl").generate("ML-DSA-44")
    for provider in ("openssl", "pqclean"):
        p = get_provider(provider)
        assert code_of(lambda p=p: p.sign("ML-DSA-44", b"", MSG, prehash="md5")) == "crypto.bad_prehash"  # type: ignore[misc]
        assert code_of(lambda p=p: p.sign("ML-DSA-44", b"", b"\x00" * 64, prehash="sha256")) == "crypto.bad_prehash"  # type: ignore[misc]
    assert code_of(lambda: verify_signature("ML-DSA-44", pair.public_key, b"\x00" * 32, b"s",
                                            prehash="sha512")) == "crypto.bad_prehash"


@pytest.mark.parametrize("prehash", ["sha256", "sha512"])
@pytest.mark.parametrize("alg", MLDSA)
def test_hash_mldsa_mu_agrees_with_pqcrypto_hash_mode(alg: str, prehash: str) -> None:
    """Our HashML-DSA (μ computed from the digest, then cryptography's sign_mu / verify_mu) and
    pqcrypto's ``hash_algorithm=`` mode make and accept the same signatures."""
    import pqcrypto
    from cryptography.hazmat.primitives.asymmetric import mldsa

    module = importlib.import_module(f"pqcrypto.sign.{alg.lower().replace('-', '_')}")
    mode = {"sha256": pqcrypto.HashAlgorithm.Sha256, "sha512": pqcrypto.HashAlgorithm.Sha512}[prehash]
    digest = HASHES[prehash](MSG).digest()
    # pqcrypto signs -> cryptography verify_mu with our μ
    pk, sk = module.keygen()
    sig = module.sign(sk, digest, hash_algorithm=mode)
    key_cls: Any = {"ML-DSA-44": mldsa.MLDSA44PublicKey, "ML-DSA-65": mldsa.MLDSA65PublicKey,
               "ML-DSA-87": mldsa.MLDSA87PublicKey}[alg]
    key_cls.from_public_bytes(pk).verify_mu(sig, hash_mldsa_mu(pk, digest, prehash))  # raises if not
    assert verify_signature(alg, pk, digest, sig, prehash=prehash)
    # cryptography sign_mu with our μ -> pqcrypto verify in hash mode
    ours = get_provider("openssl").generate(alg)
    sig2 = get_provider("openssl").sign(alg, ours.private_key, digest, prehash=prehash)
    module.verify(ours.public_key, digest, sig2, hash_algorithm=mode)  # raises if not
    with pytest.raises(pqcrypto.InvalidSignatureError):
        module.verify(ours.public_key, digest, sig2)  # not a pure signature


# -- KEM --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "alg"), cases("kem"))
def test_kem_round_trip_and_implicit_rejection(provider: str, alg: str) -> None:
    p = get_provider(provider)
    info = get_algorithm(alg)
    pair = p.generate(alg)
    assert len(pair.public_key) == info.public_key_size
    ct, shared = p.encapsulate(alg, pair.public_key)
    assert len(ct) == info.ciphertext_size and len(shared) == 32
    assert p.decapsulate(alg, pair.private_key, ct) == shared
    assert p.load_private(alg, pair.private_key).decapsulate(ct) == shared
    ct2, shared2 = p.encapsulate(alg, pair.public_key)
    assert ct2 != ct and shared2 != shared  # randomised
    # FIPS 203 implicit rejection: a modified ciphertext decapsulates, to an unrelated secret that
    # depends only on the ciphertext (no error, no oracle)
    for bad in (flip(ct, 0), flip(ct, len(ct) - 1)):
        rejected = p.decapsulate(alg, pair.private_key, bad)
        assert len(rejected) == 32 and rejected != shared
        assert p.decapsulate(alg, pair.private_key, bad) == rejected
    # another key pair's private key does not recover the secret
    assert p.decapsulate(alg, p.generate(alg).private_key, ct) != shared
    with pytest.raises(QaiError) as err:
        p.decapsulate(alg, pair.private_key, ct[:-1])
    assert err.value.code == "crypto.bad_ciphertext"
    with pytest.raises(QaiError) as err:
        p.encapsulate(alg, pair.public_key[:-1])
    assert err.value.code == "crypto.bad_key"
    with pytest.raises(QaiError) as err:  # FIPS 203 §7.2 modulus check: coefficients >= q
        p.encapsulate(alg, b"\xff" * len(pair.public_key))
    assert err.value.code == "crypto.bad_key"


# -- cross-provider interop (only public values cross the boundary) --------------------------


@pytest.mark.parametrize(("signer", "verifier", "alg"), shared("signature"))
def test_cross_provider_signatures(signer: str, verifier: str, alg: str) -> None:
    s, v = get_provider(signer), get_provider(verifier)
    pair = s.generate(alg)
    public, sig = bytes(pair.public_key), s.sign(alg, pair.private_key, MSG)
    assert v.verify(alg, public, MSG, sig)
    assert not v.verify(alg, public, MSG + b"x", sig)
    assert not v.verify(alg, public, MSG, flip(sig, 7))
    for prehash in ("sha256", "sha512"):
        digest = HASHES[prehash](MSG).digest()
        assert v.verify(alg, public, digest, s.sign(alg, pair.private_key, digest, prehash=prehash), prehash=prehash)


@pytest.mark.parametrize(("encapsulator", "holder", "alg"), shared("kem"))
def test_cross_provider_kem(encapsulator: str, holder: str, alg: str) -> None:
    h, e = get_provider(holder), get_provider(encapsulator)
    pair = h.generate(alg)
    ct, shared_secret = e.encapsulate(alg, bytes(pair.public_key))
    assert h.decapsulate(alg, pair.private_key, ct) == shared_secret
    assert h.decapsulate(alg, pair.private_key, flip(ct, 3)) != shared_secret


def test_interop_matrix_covers_every_shared_algorithm() -> None:
    assert {(a, b, alg) for a, b, alg in shared("signature") + shared("kem")} == {
        (a, b, alg) for a, b in (("openssl", "pqclean"), ("pqclean", "openssl")) for alg in MLDSA + MLKEM
    }


# -- malformed keys ---------------------------------------------------------------------------


def test_malformed_public_keys() -> None:
    ec_pair = get_provider("openssl").generate("ECDSA-P256")
    sig = get_provider("openssl").sign("ECDSA-P256", ec_pair.private_key, MSG)
    off_curve = b"\x04" + b"\x01" * 64
    compressed_tag = b"\x02" + ec_pair.public_key[1:]
    for alg, key in [("ML-DSA-65", b"\x00" * 10), ("SLH-DSA-SHA2-128s", b"\x00" * 64), ("Ed25519", b""),
                     ("ECDSA-P256", ec_pair.public_key[:33]), ("ECDSA-P256", off_curve),
                     ("ECDSA-P256", compressed_tag)]:
        with pytest.raises(QaiError) as err:
            verify_signature(alg, key, MSG, sig)
        assert (err.value.code, err.value.status) == ("crypto.bad_key", 400), alg
        with pytest.raises(QaiError) as err:
            public_key_pem(alg, key)
        assert err.value.code == "crypto.bad_key"
    assert code_of(lambda: get_provider("pqclean").verify("ML-DSA-65", b"\x00" * 10, MSG, b"s")) == "crypto.bad_key"


@pytest.mark.parametrize(("provider", "alg"), cases("signature") + cases("kem"))
def test_malformed_private_keys(provider: str, alg: str) -> None:
    p = get_provider(provider)
    pair = p.generate(alg)
    for bad in (pair.private_key[:-1], pair.private_key + b"\x00", b""):
        assert code_of(lambda bad=bad: p.load_private(alg, bad)) == "crypto.bad_key"  # type: ignore[misc]
    if alg == "ECDSA-P256":
        assert code_of(lambda: p.load_private(alg, b"\x00" * 32)) == "crypto.bad_key"  # scalar 0
        assert code_of(lambda: p.load_private(alg, b"\xff" * 32)) == "crypto.bad_key"  # >= n


# -- PEM --------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_pem_round_trip(alg: str) -> None:
    pair = provider_for(alg).generate(alg)
    pem = public_key_pem(alg, pair.public_key)
    lines = pem.splitlines()
    assert lines[0] == "-----BEGIN PUBLIC KEY-----" and lines[-1] == "-----END PUBLIC KEY-----"
    assert all(len(line) <= 64 for line in lines) and pem.endswith("\n")
    assert public_key_from_pem(alg, pem) == pair.public_key
    if alg not in SLHDSA:  # OpenSSL parses our SubjectPublicKeyInfo as the same key
        key = load_pem_public_key(pem.encode())
        raw = key.public_bytes_raw() if hasattr(key, "public_bytes_raw") else None
        if alg == "ECDSA-P256":
            from cryptography.hazmat.primitives import serialization

            raw = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        assert raw == pair.public_key


@pytest.mark.parametrize(("alg", "last_oid_byte"), [("SLH-DSA-SHA2-128s", 0x14), ("SLH-DSA-SHA2-128f", 0x15)])
def test_slhdsa_spki_is_the_standard_der(alg: str, last_oid_byte: int) -> None:
    """SEQUENCE { SEQUENCE { OID 2.16.840.1.101.3.4.3.20/21 }, BIT STRING { pk } } (RFC 9909)."""
    pk = bytes(range(32))
    der = base64.b64decode("".join(public_key_pem(alg, pk).splitlines()[1:-1]))
    oid = bytes.fromhex("06096086480165030403") + bytes([last_oid_byte])
    assert der == bytes.fromhex("3030300b") + oid + bytes.fromhex("032100") + pk


def test_pem_of_another_algorithm_or_garbage_is_refused() -> None:
    keys = {alg: provider_for(alg).generate(alg).public_key for alg in ("ML-DSA-65", "SLH-DSA-SHA2-128s",
                                                                       "ECDSA-P256", "ML-KEM-768")}
    mismatches = [("ML-DSA-65", "ML-DSA-44"), ("ML-DSA-65", "ML-KEM-768"), ("SLH-DSA-SHA2-128s", "SLH-DSA-SHA2-128f"),
                  ("SLH-DSA-SHA2-128s", "Ed25519"), ("ECDSA-P256", "Ed25519"), ("ML-KEM-768", "ML-KEM-1024")]
    for made, read in mismatches:
        pem = public_key_pem(made, keys[made])
        assert code_of(lambda pem=pem, read=read: public_key_from_pem(read, pem)) == "crypto.bad_key"  # type: ignore[misc]
    for garbage in ("", "hello", "-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n",
                    "-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n"):
        assert code_of(lambda g=garbage: public_key_from_pem("ML-DSA-65", g)) == "crypto.bad_key"  # type: ignore[misc]
        assert code_of(lambda g=garbage: public_key_from_pem("SLH-DSA-SHA2-128f", g)) == "crypto.bad_key"  # type: ignore[misc]
