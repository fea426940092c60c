"""Our signatures verify under implementations that share no code with OpenSSL or PQClean.

* ML-DSA (FIPS 204): dilithium-py, pure and HashML-DSA, in both directions; it also derives the
  same key pair from the ``openssl`` provider's 32-byte seed, which pins that private-key encoding.
* SLH-DSA (FIPS 205): the ``slh-dsa`` package (import ``slhdsa``), in both directions, and its
  ASN.1 reader parses our SubjectPublicKeyInfo PEM.

Agreement here means our signatures are the standard ones, not just self-consistent.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pqcrypto
import pytest
import slhdsa
from dilithium_py.ml_dsa import (
    HASH_ML_DSA_44_WITH_SHA512,
    HASH_ML_DSA_65_WITH_SHA512,
    HASH_ML_DSA_87_WITH_SHA512,
    ML_DSA_44,
    ML_DSA_65,
    ML_DSA_87,
)
from slhdsa.lowlevel.parameters import sha2_128f, sha2_128s
from slhdsa.slhdsa import HASH_ALGORITHM_OID_PREFIX

from kms.providers import get_provider
from sdk.crypto import public_key_pem, verify_signature

MSG = b"independently verified message"
DILITHIUM = {"ML-DSA-44": ML_DSA_44, "ML-DSA-65": ML_DSA_65, "ML-DSA-87": ML_DSA_87}
HASH_DILITHIUM = {"ML-DSA-44": HASH_ML_DSA_44_WITH_SHA512, "ML-DSA-65": HASH_ML_DSA_65_WITH_SHA512,
                  "ML-DSA-87": HASH_ML_DSA_87_WITH_SHA512}
SLH = {"SLH-DSA-SHA2-128s": sha2_128s, "SLH-DSA-SHA2-128f": sha2_128f}


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# -- ML-DSA / dilithium-py --------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openssl", "pqclean"])
@pytest.mark.parametrize("alg", sorted(DILITHIUM))
def test_mldsa_signatures_verify_under_dilithium_py(provider: str, alg: str) -> None:
    p, ref = get_provider(provider), DILITHIUM[alg]
    pair = p.generate(alg)
    sig = p.sign(alg, pair.private_key, MSG)
    assert ref.verify(pair.public_key, MSG, sig) is True
    assert ref.verify(pair.public_key, MSG + b"!", sig) is False
    assert ref.verify(pair.public_key, MSG, flip(sig, 100)) is False
    assert ref.verify(pair.public_key, MSG, flip(sig, len(sig) - 1)) is False
    assert ref.verify(pair.public_key, MSG, sig, ctx=b"qai") is False  # we sign with an empty context


@pytest.mark.parametrize("provider", ["openssl", "pqclean"])
@pytest.mark.parametrize("alg", sorted(DILITHIUM))
def test_hash_mldsa_signatures_verify_under_dilithium_py(provider: str, alg: str) -> None:
    """Our prehash signatures (made from a bare digest) are FIPS 204 HashML-DSA of the message."""
    p = get_provider(provider)
    pair = p.generate(alg)
    sig512 = p.sign(alg, pair.private_key, hashlib.sha512(MSG).digest(), prehash="sha512")
    assert HASH_DILITHIUM[alg].verify(pair.public_key, MSG, sig512) is True  # the public API: SHA-512
    assert HASH_DILITHIUM[alg].verify(pair.public_key, MSG + b"!", sig512) is False
    assert HASH_DILITHIUM[alg].verify(pair.public_key, MSG, flip(sig512, 50)) is False
    assert DILITHIUM[alg].verify(pair.public_key, hashlib.sha512(MSG).digest(), sig512) is False
    sig256 = p.sign(alg, pair.private_key, hashlib.sha256(MSG).digest(), prehash="sha256")
    ref = HASH_DILITHIUM[alg]
    assert ref._verify_with_pre_hash(pair.public_key, MSG, sig256, "SHA256") is True
    assert ref._verify_with_pre_hash(pair.public_key, MSG, sig512, "SHA256") is False


@pytest.mark.parametrize("alg", sorted(DILITHIUM))
def test_dilithium_py_signatures_verify_in_qai(alg: str) -> None:
    pk, sk = DILITHIUM[alg].keygen()
    pure = DILITHIUM[alg].sign(sk, MSG)
    hashed = HASH_DILITHIUM[alg].sign(sk, MSG)  # HashML-DSA with SHA-512
    digest = hashlib.sha512(MSG).digest()
    assert verify_signature(alg, pk, MSG, pure) is True
    assert verify_signature(alg, pk, digest, hashed, prehash="sha512") is True
    assert verify_signature(alg, pk, MSG, hashed) is False
    assert verify_signature(alg, pk, digest, flip(hashed, 9), prehash="sha512") is False
    for name in ("openssl", "pqclean"):
        p = get_provider(name)
        assert p.verify(alg, pk, MSG, pure) is True
        assert p.verify(alg, pk, digest, hashed, prehash="sha512") is True
        assert p.verify(alg, pk, MSG, flip(pure, 0)) is False


@pytest.mark.parametrize("alg", sorted(DILITHIUM))
def test_openssl_private_key_is_the_fips204_seed(alg: str) -> None:
    p = get_provider("openssl")
    pair = p.generate(alg)
    assert len(pair.private_key) == 32
    pk, sk = DILITHIUM[alg].key_derive(pair.private_key)  # FIPS 204 ML-DSA.KeyGen_internal(ξ)
    assert pk == pair.public_key
    assert p.verify(alg, pair.public_key, MSG, DILITHIUM[alg].sign(sk, MSG))


# -- SLH-DSA / slh-dsa ------------------------------------------------------------------------


@pytest.mark.parametrize("alg", sorted(SLH))
def test_slhdsa_signatures_verify_under_pure_python_slhdsa(alg: str) -> None:
    """One signature per parameter set (128s signing takes ~0.3 s)."""
    p = get_provider("pqclean")
    pair = p.generate(alg)
    sig = p.sign(alg, pair.private_key, MSG)
    ref = slhdsa.PublicKey.from_digest(pair.public_key, SLH[alg])  # the parameter set object is needed
    assert ref.verify_pure(MSG, sig) is True
    assert ref.verify_pure(MSG + b"!", sig) is False
    assert ref.verify_pure(MSG, flip(sig, 0)) is False  # the randomizer R
    assert ref.verify_pure(MSG, flip(sig, len(sig) - 10)) is False  # the hypertree signature
    assert ref.verify_pure(MSG, sig, ctx=b"qai") is False  # we sign with an empty context
    assert ref.verify(MSG, sig) is False  # not the pre-standard "bare" SLH-DSA


def test_slhdsa_package_signatures_verify_in_qai_with_our_private_key_encoding() -> None:
    """slh-dsa signs with a key pqclean generated: our private key is FIPS 205 SK.seed‖SK.prf‖PK."""
    alg = "SLH-DSA-SHA2-128f"
    pair = get_provider("pqclean").generate(alg)
    secret = slhdsa.SecretKey.from_digest(pair.private_key, SLH[alg])
    assert secret.pubkey.digest() == pair.public_key
    sig = secret.sign_pure(MSG, randomize=True)
    assert verify_signature(alg, pair.public_key, MSG, sig) is True
    assert get_provider("pqclean").verify(alg, pair.public_key, MSG, sig) is True
    assert verify_signature(alg, pair.public_key, MSG, flip(sig, 1000)) is False


@pytest.mark.parametrize("alg", sorted(SLH))
def test_slhdsa_pem_parses_under_slhdsa_asn1(alg: str, tmp_path: Path) -> None:
    public = get_provider("pqclean").generate(alg).public_key
    path = tmp_path / "key.pem"
    path.write_text(public_key_pem(alg, public))
    key = slhdsa.PublicKey.from_pkcs(str(path))
    assert key.digest() == public and key.par == SLH[alg]


def test_pqcrypto_hash_slhdsa_hashes_the_message_itself() -> None:
    """Why qai refuses SLH-DSA with ``prehash``: pqcrypto's HashSLH-DSA computes PH(M) from the whole
    message (unlike its HashML-DSA, which takes the digest), so a signer given only a digest cannot
    produce HashSLH-DSA. If this test fails, pqcrypto changed and digest signing may be possible."""
    pk, sk = pqcrypto.sign.slh_dsa_sha2_128f.keygen()
    ref = slhdsa.PublicKey.from_digest(pk, sha2_128f)
    digest = hashlib.sha256(MSG).digest()
    as_is = lambda d: HASH_ALGORITHM_OID_PREFIX + b"\x01" + d  # noqa: E731 - PH(M) given directly
    sig = pqcrypto.sign.slh_dsa_sha2_128f.sign(sk, MSG, hash_algorithm=pqcrypto.HashAlgorithm.Sha256)
    assert ref.verify_hash(MSG, sig) is True  # M' = 0x01 ‖ 0 ‖ OID(SHA-256) ‖ SHA-256(MSG)
    sig = pqcrypto.sign.slh_dsa_sha2_128f.sign(sk, digest, hash_algorithm=pqcrypto.HashAlgorithm.Sha256)
    assert ref.verify_hash(digest, sig, prehash=as_is) is False  # the digest was hashed again
    # HashML-DSA in the same library takes the digest as PH(M): the asymmetry qai works around
    mpk, msk = pqcrypto.sign.ml_dsa_44.keygen()
    msig = pqcrypto.sign.ml_dsa_44.sign(msk, hashlib.sha512(MSG).digest(), hash_algorithm=pqcrypto.HashAlgorithm.Sha512)
    assert HASH_ML_DSA_44_WITH_SHA512.verify(mpk, MSG, msig) is True
