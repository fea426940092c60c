"""The PKCS#11 proxy against real SoftHSM tokens: failures get stable codes, keys stay inside."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from kms.hsm import Hsm, HsmConfig
from kms.service import KMS
from orchestrator.auth import Principal
from sdk.errors import QaiError


def test_wrong_pin_is_a_clear_error(hsm_config: HsmConfig, tmp_path: Path) -> None:
    good = Hsm(hsm_config)
    good.open()
    good.close()
    # a second process-wide login with another PIN must not ride on the first one
    bad = Hsm(replace(hsm_config, user_pin="not-the-pin"))
    with pytest.raises(QaiError) as err:
        bad.open()
    assert err.value.code == "hsm.pin_incorrect" and err.value.status == 503
    assert "not-the-pin" not in str(err.value) and "not-the-pin" not in str(err.value.details)
    # and on a fresh token, where nothing is logged in, the token itself refuses
    fresh = replace(hsm_config, softhsm_dir=tmp_path / "other")
    Hsm(fresh).open()
    Hsm(hsm_config).open()  # switching token directories re-initialises the module: all logged out
    with pytest.raises(QaiError) as err:
        Hsm(replace(fresh, user_pin="wrong-pin")).open()
    assert err.value.code == "hsm.pin_incorrect"


def test_missing_module(hsm_config: HsmConfig) -> None:
    with pytest.raises(QaiError) as err:
        Hsm(replace(hsm_config, module="/nonexistent/libpkcs11.so", softhsm_dir=None)).open()
    assert err.value.code == "hsm.module_not_found"


def test_missing_token(hsm: Hsm, hsm_config: HsmConfig) -> None:
    with pytest.raises(QaiError) as err:
        Hsm(replace(hsm_config, token_label="no-such-token", softhsm_dir=None)).open()
    assert err.value.code == "hsm.token_not_found"


def test_pkcs11_tool_lists_every_key_object_never_extractable(kms: KMS, admin: Principal,
                                                              hsm_config: HsmConfig) -> None:
    """The same check an operator runs: ``pkcs11-tool --module <softhsm> -O``."""
    kms.create_key("k", tenant="org-a", principal=admin)
    kms.create_key("e", tenant="org-a", suite="ML-DSA-44+Ed25519", principal=admin)
    assert hsm_config.softhsm_dir is not None
    env = {**os.environ, "SOFTHSM2_CONF": str((hsm_config.softhsm_dir / "softhsm2.conf").resolve())}
    out = subprocess.run(
        ["pkcs11-tool", "--module", hsm_config.module, "--token-label", hsm_config.token_label,
         "--login", "--pin", hsm_config.user_pin, "-O"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout
    blocks = re.split(r"\n(?=\S)", out)
    key_blocks = [b for b in blocks if b.startswith(("Private Key Object", "Secret Key Object"))]
    labels = {re.search(r"label:\s+(\S+)", b).group(1) for b in key_blocks}  # type: ignore[union-attr]
    assert {label.rsplit(":", 1)[0] for label in labels} >= {"qai:k:1:ECDSA-P256", "qai:e:1:Ed25519"}
    assert kms.config.kek_label in labels
    for block in key_blocks:
        access = re.search(r"Access:\s+(.*)", block)
        assert access is not None, block
        assert "never extractable" in access.group(1), block
        assert "sensitive" in access.group(1), block
    # PQC private keys are never token objects in plaintext: only the KEK and classical keys are
    assert len(key_blocks) == 3


def test_pool_survives_concurrent_use(hsm: Hsm) -> None:
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    hsm.generate_keypair("ECDSA-P256", "pool-test")
    digest = hashlib.sha256(b"x").digest()
    with ThreadPoolExecutor(16) as pool:
        sigs = list(pool.map(lambda _: hsm.sign("ECDSA-P256", "pool-test", digest), range(200)))
    assert len(sigs) == 200 and all(s[0] == 0x30 for s in sigs)
    assert hsm.stats()["in_use"] == 0
