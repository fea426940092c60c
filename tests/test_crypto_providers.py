"""The crypto-provider interface: every algorithm on every provider, and cross-provider interop."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from kms.providers import PROVIDERS, available_providers, get_provider, provider_for
from sdk.algorithms import ALGORITHMS
from sdk.crypto import public_key_from_pem, public_key_pem, verify_signature
from sdk.errors import QaiError

MSG = b"qai provider test message"
SIGNATURES = sorted(a for a, info in ALGORITHMS.items() if info.kind == "signature")
KEMS = sorted(a for a, info in ALGORITHMS.items() if info.kind == "kem")
AVAILABLE = [p for p in PROVIDERS.values() if p.available()]


def _cases(algs: list[str]) -> list[tuple[str, str]]:
    return [(p.name, a) for p in AVAILABLE for a in algs if a in p.algorithms()]


def test_default_providers_are_available_and_liboqs_is_not() -> None:
    assert available_providers() == ["openssl", "pqclean"]
    # every algorithm in the registry has at least one available provider
    for alg in ALGORITHMS:
        assert provider_for(alg).available()
    assert provider_for("ML-DSA-65").name == "openssl"
    assert provider_for("SLH-DSA-SHA2-128s").name == "pqclean"
    assert provider_for("ML-DSA-65", preferred="pqclean").name == "pqclean"


def test_liboqs_reports_unavailable_clearly() -> None:
    with pytest.raises(QaiError) as err:
        get_provider("liboqs").generate("ML-DSA-65")
    assert err.value.code == "crypto.provider_unavailable" and err.value.status == 503
    assert "liboqs" in err.value.message and "shared library" in err.value.message


@pytest.mark.parametrize(("provider", "alg"), _cases(SIGNATURES))
def test_sign_verify_round_trip(provider: str, alg: str) -> None:
    p = get_provider(provider)
    pair = p.generate(alg)
    assert len(pair.public_key) == ALGORITHMS[alg].public_key_size
    sig = p.sign(alg, pair.private_key, MSG)
    assert p.verify(alg, pair.public_key, MSG, sig)
    assert verify_signature(alg, pair.public_key, MSG, sig)
    assert not p.verify(alg, pair.public_key, MSG + b"!", sig)
    bad = bytearray(sig)
    bad[len(bad) // 2] ^= 0x40
    assert not p.verify(alg, pair.public_key, MSG, bytes(bad))
    assert not verify_signature(alg, pair.public_key, MSG, bytes(bad))
    other = p.generate(alg)
    assert not verify_signature(alg, other.public_key, MSG, sig)


@pytest.mark.parametrize(("prehash", "hasher"), [("sha256", hashlib.sha256), ("sha512", hashlib.sha512)])
@pytest.mark.parametrize("provider", ["openssl", "pqclean"])
@pytest.mark.parametrize("alg", ["ML-DSA-44", "ML-DSA-65", "ML-DSA-87", "ECDSA-P256"])
def test_prehash_round_trip(provider: str, alg: str, prehash: str, hasher) -> None:  # type: ignore[no-untyped-def]
    p = get_provider(provider)
    if alg not in p.algorithms():
        p = provider_for(alg)
    pair = p.generate(alg)
    digest = hasher(MSG).digest()
    sig = p.sign(alg, pair.private_key, digest, prehash=prehash)
    assert verify_signature(alg, pair.public_key, digest, sig, prehash=prehash)
    assert not verify_signature(alg, pair.public_key, hasher(b"other").digest(), sig, prehash=prehash)
    # a pre-hash signature is not a pure signature over the digest bytes
    assert not verify_signature(alg, pair.public_key, digest, sig)


@pytest.mark.parametrize("alg", ["ML-DSA-44", "ML-DSA-65", "ML-DSA-87"])
def test_hash_mldsa_matches_pqclean_hash_mode(alg: str) -> None:
    """Our HashML-DSA (μ computed from a bare digest) equals PQClean's HashML-DSA (FIPS 204 §5.4)."""
    import importlib

    import pqcrypto

    mod = importlib.import_module(f"pqcrypto.sign.{alg.lower().replace('-', '_')}")
    pk, sk = mod.keygen()
    # pqcrypto's hash mode takes the digest itself as its message
    sig = mod.sign(sk, hashlib.sha256(MSG).digest(), hash_algorithm=pqcrypto.HashAlgorithm.Sha256)
    assert verify_signature(alg, pk, hashlib.sha256(MSG).digest(), sig, prehash="sha256")
    assert not verify_signature(alg, pk, hashlib.sha256(MSG).digest(), sig)
    pair = get_provider("openssl").generate(alg)
    digest = hashlib.sha512(MSG).digest()
    ours = get_provider("openssl").sign(alg, pair.private_key, digest, prehash="sha512")
    mod.verify(pair.public_key, digest, ours, hash_algorithm=pqcrypto.HashAlgorithm.Sha512)


@pytest.mark.parametrize("alg", ["Ed25519", "SLH-DSA-SHA2-128f"])
def test_prehash_refused_where_unsupported(alg: str) -> None:
    p = provider_for(alg)
    pair = p.generate(alg)
    with pytest.raises(QaiError) as err:
        p.sign(alg, pair.private_key, hashlib.sha256(MSG).digest(), prehash="sha256")
    assert err.value.code == "crypto.prehash_unsupported"


@pytest.mark.parametrize(("provider", "alg"), _cases(KEMS))
def test_kem_round_trip_and_implicit_rejection(provider: str, alg: str) -> None:
    p = get_provider(provider)
    pair = p.generate(alg)
    ct, shared = p.encapsulate(alg, pair.public_key)
    assert len(shared) == 32
    assert p.decapsulate(alg, pair.private_key, ct) == shared
    tampered = bytes([ct[0] ^ 1]) + ct[1:]
    assert p.decapsulate(alg, pair.private_key, tampered) != shared  # FIPS 203 implicit rejection


def _shared(kind: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for a, b in itertools.permutations(AVAILABLE, 2):
        for alg in kind:
            if alg in a.algorithms() and alg in b.algorithms():
                out.append((a.name, b.name, alg))
    return out


@pytest.mark.parametrize(("signer", "verifier", "alg"), _shared(SIGNATURES))
def test_cross_provider_signatures(signer: str, verifier: str, alg: str) -> None:
    s, v = get_provider(signer), get_provider(verifier)
    pair = s.generate(alg)
    sig = s.sign(alg, pair.private_key, MSG)
    assert v.verify(alg, pair.public_key, MSG, sig)
    assert not v.verify(alg, pair.public_key, MSG + b"x", sig)


@pytest.mark.parametrize(("encapsulator", "holder", "alg"), _shared(KEMS))
def test_cross_provider_kem(encapsulator: str, holder: str, alg: str) -> None:
    h = get_provider(holder)
    pair = h.generate(alg)
    ct, shared = get_provider(encapsulator).encapsulate(alg, pair.public_key)
    assert h.decapsulate(alg, pair.private_key, ct) == shared


def test_interop_matrix_is_not_empty() -> None:
    shared_algs = {alg for _, _, alg in _shared(SIGNATURES + KEMS)}
    assert {"ML-DSA-44", "ML-DSA-65", "ML-DSA-87", "ML-KEM-768", "ML-KEM-1024"} <= shared_algs


@pytest.mark.parametrize("alg", SIGNATURES)
def test_pem_round_trip(alg: str) -> None:
    pair = provider_for(alg).generate(alg)
    pem = public_key_pem(alg, pair.public_key)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert public_key_from_pem(alg, pem) == pair.public_key


def test_pem_of_mldsa_loads_in_openssl() -> None:
    """Our SubjectPublicKeyInfo for ML-DSA is the standard one: OpenSSL parses it."""
    from cryptography.hazmat.primitives.asymmetric import mldsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pair = get_provider("openssl").generate("ML-DSA-65")
    key = load_pem_public_key(public_key_pem("ML-DSA-65", pair.public_key).encode())
    assert isinstance(key, mldsa.MLDSA65PublicKey)
    assert key.public_bytes_raw() == pair.public_key


@pytest.mark.parametrize(("name", "code"), [("ML-DSA-66", "crypto.unknown_algorithm"),
                                            ("RSA-2048", "crypto.unknown_algorithm")])
def test_unknown_algorithm(name: str, code: str) -> None:
    with pytest.raises(QaiError) as err:
        provider_for(name)
    assert err.value.code == code and "ML-DSA-65" in err.value.details["known"]
    with pytest.raises(QaiError) as err:
        verify_signature(name, b"", b"", b"")
    assert err.value.code == code


def test_malformed_public_key() -> None:
    with pytest.raises(QaiError) as err:
        verify_signature("ML-DSA-65", b"\x00" * 10, MSG, b"sig")
    assert err.value.code == "crypto.bad_key"
