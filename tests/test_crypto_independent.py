"""Our ML-DSA and SLH-DSA signatures verify under independent pure-Python implementations.

dilithium-py (FIPS 204) and slh-dsa (FIPS 205) share no code with OpenSSL or PQClean, so
agreement here means our signatures are standard, not just self-consistent.
"""

from __future__ import annotations

import pytest
import slhdsa
from dilithium_py.ml_dsa import ML_DSA_44, ML_DSA_65, ML_DSA_87

from kms.providers import PROVIDERS, get_provider

MSG = b"independently verified message"
DILITHIUM = {"ML-DSA-44": ML_DSA_44, "ML-DSA-65": ML_DSA_65, "ML-DSA-87": ML_DSA_87}
SLH = {"SLH-DSA-SHA2-128s": slhdsa.sha2_128s, "SLH-DSA-SHA2-128f": slhdsa.sha2_128f}


@pytest.mark.parametrize("provider", ["openssl", "pqclean"])
@pytest.mark.parametrize("alg", sorted(DILITHIUM))
def test_mldsa_verifies_under_dilithium_py(provider: str, alg: str) -> None:
    p = get_provider(provider)
    pair = p.generate(alg)
    sig = p.sign(alg, pair.private_key, MSG)
    ref = DILITHIUM[alg]
    assert ref.verify(pair.public_key, MSG, sig)
    assert not ref.verify(pair.public_key, MSG + b"!", sig)
    bad = bytearray(sig)
    bad[100] ^= 1
    assert not ref.verify(pair.public_key, MSG, bytes(bad))


def test_dilithium_py_signature_verifies_in_our_providers() -> None:
    pk, sk = ML_DSA_65.keygen()
    sig = ML_DSA_65.sign(sk, MSG)
    for name in ("openssl", "pqclean"):
        assert PROVIDERS[name].verify("ML-DSA-65", pk, MSG, sig)


@pytest.mark.parametrize("alg", sorted(SLH))
def test_slhdsa_verifies_under_pure_python_slhdsa(alg: str) -> None:
    p = get_provider("pqclean")
    pair = p.generate(alg)
    sig = p.sign(alg, pair.private_key, MSG)
    ref = slhdsa.PublicKey.from_digest(pair.public_key, SLH[alg])
    assert ref.verify_pure(MSG, sig)
    assert not ref.verify_pure(MSG + b"!", sig)
    bad = bytearray(sig)
    bad[-10] ^= 1
    assert not ref.verify_pure(MSG, bytes(bad))

