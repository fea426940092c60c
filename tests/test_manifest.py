"""Run-manifests in the SDK: schema, canonical bytes, JSON/YAML input limits, signing through the
KMS and offline verification with every rejection reason."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kms.service import KMS
from orchestrator.auth import Principal, Role
from sdk.dsse import Envelope
from sdk.errors import QaiError, VerificationError
from sdk.manifest import (
    PAYLOAD_TYPE,
    RunManifest,
    dump_yaml,
    load_document,
    parse_manifest,
    qasm_sha256,
    sign_manifest,
    verify_manifest,
)

QASM = 'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[2] q;\nbit[2] c;\nh q[0];\ncx q[0], q[1];\nc = measure q;\n'


def manifest(**over: Any) -> RunManifest:
    fields: dict[str, Any] = {
        "job_id": str(uuid.UUID(int=7)), "tenant": "org-a", "pqc_suite": "ML-DSA-65+ECDSA-P256",
        "crypto_mode": "hybrid", "em_method": "zne-richardson", "em_version": "v0.2", "seed": 42,
        "created_at": datetime.now(UTC).isoformat(), "artifact_hash": qasm_sha256(QASM),
        "circuit": {"qasm": QASM}, "shots": 4000, "sdk_version": "0.1.0", "labels": {"team": "qec"},
    }
    fields.update(over)
    return RunManifest.model_validate(fields)


def _sign(kms: KMS, key: str, tenant: str, m: RunManifest) -> Envelope:
    signer = Principal(subject="t", role=Role.SIGNER, tenant=tenant)
    return sign_manifest(m, lambda msg: kms.sign(key, principal=signer, message=msg))


@pytest.fixture
def keys(kms: KMS, admin: Principal) -> dict[str, Any]:
    docs = {
        "org-a.hybrid": kms.create_key("org-a.hybrid", tenant="org-a", principal=admin),
        "org-a.pqc": kms.create_key("org-a.pqc", tenant="org-a", suite="ML-DSA-87+SLH-DSA-SHA2-128s",
                                    principal=admin),
        "org-a.classical": kms.create_key("org-a.classical", tenant="org-a", suite="ECDSA-P256", principal=admin),
        "org-b.hybrid": kms.create_key("org-b.hybrid", tenant="org-b", principal=admin),
    }
    return docs


def test_canonical_bytes_are_stable_and_round_trip() -> None:
    m = manifest()
    data = m.to_bytes()
    assert parse_manifest(data).to_bytes() == data
    assert parse_manifest(dump_yaml(m).encode()) == m  # YAML in, same manifest
    assert json.loads(data) == json.loads(data.decode())  # plain JSON
    assert b" " not in data.replace(b"OPENQASM 3.0", b"").split(b'"qasm"')[0]  # no insignificant spaces


@pytest.mark.parametrize(("over", "loc"), [
    ({"surprise": 1}, "surprise"),
    ({"crypto_mode": "quantum-safe-ish"}, "crypto_mode"),
    ({"artifact_hash": "sha256:" + "0" * 64}, ""),
    ({"pqc_suite": "ML-DSA-65+RSA"}, "pqc_suite"),
    ({"created_at": "2026-01-01T00:00:00"}, "created_at"),
    ({"shots": 0}, "shots"),
    ({"shot_budget": 10}, ""),
    ({"priority_class": "urgent"}, "priority_class"),
    ({"circuit": {"sha256": "sha256:" + "a" * 64}}, "circuit"),
    ({"job_id": "not-a-uuid"}, "job_id"),
    ({"tenant": "Org A"}, "tenant"),
])
def test_schema_rejections(over: dict[str, Any], loc: str) -> None:
    good = json.loads(manifest().to_bytes())
    with pytest.raises(QaiError) as err:
        parse_manifest({**good, **over})
    assert err.value.code in ("manifest.invalid", "kms.bad_suite", "crypto.unknown_algorithm")
    if err.value.code == "manifest.invalid":
        assert any(e["loc"].startswith(loc) for e in err.value.details["errors"])


def test_input_limits() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n"
    cases = [
        (bomb.encode(), "yaml.alias_forbidden"),
        (b"a: &anchor 1\n", "yaml.alias_forbidden"),
        (b"x" * (1024 * 1024 + 1), "input.too_large"),
        (b"\xff\xfe{}", "input.not_utf8"),
        (b"{" * 10, "input.malformed_json"),
        (("[" * 40 + "]" * 40).encode(), "input.too_deep"),
        (("a:\n" + "".join("  " * i + "b:\n" for i in range(1, 40))).encode(), "input.too_deep"),
        (b"a: [unclosed", "input.malformed_yaml"),
    ]
    for data, code in cases:
        with pytest.raises(QaiError) as err:
            load_document(data)
        assert err.value.code == code, data[:40]


def test_sign_and_verify_offline(kms: KMS, keys: dict[str, Any]) -> None:
    m = manifest()
    env = _sign(kms, "org-a.hybrid", "org-a", m)
    assert env.payload_type == PAYLOAD_TYPE
    assert [s.keyid for s in env.signatures] == ["org-a.hybrid@1/ML-DSA-65", "org-a.hybrid@1/ECDSA-P256"]
    verified = verify_manifest(env.to_bytes(), keys)
    assert verified.manifest == m and verified.version.version == 1
    pqc = manifest(pqc_suite="ML-DSA-87+SLH-DSA-SHA2-128s", crypto_mode="pqc-required")
    assert verify_manifest(_sign(kms, "org-a.pqc", "org-a", pqc), keys).key.name == "org-a.pqc"


def _tamper(env: Envelope, **fields: Any) -> Envelope:
    payload = json.loads(env.payload_bytes())
    payload.update(fields)
    data = json.loads(env.to_bytes())
    data["payload"] = base64.b64encode(manifest(**payload).to_bytes()).decode()
    return Envelope.model_validate(data)


def test_every_rejection_has_its_code(kms: KMS, keys: dict[str, Any], admin: Principal) -> None:
    m = manifest()
    good = _sign(kms, "org-a.hybrid", "org-a", m)
    classical = _sign(kms, "org-a.classical", "org-a", manifest(pqc_suite="ECDSA-P256", crypto_mode="classical"))
    downgraded = _sign(kms, "org-a.classical", "org-a", manifest(pqc_suite="ECDSA-P256", crypto_mode="pqc-required"))
    pqc_only_hybrid = _sign(kms, "org-a.pqc", "org-a",
                            manifest(pqc_suite="ML-DSA-87+SLH-DSA-SHA2-128s", crypto_mode="hybrid"))
    other_tenant = _sign(kms, "org-b.hybrid", "org-b", m)  # org-b's key over org-a's manifest
    non_canonical = Envelope.model_validate({**json.loads(good.to_bytes()), "payload": base64.b64encode(
        json.dumps(json.loads(good.payload_bytes()), indent=1).encode()).decode()})
    wrong_type = Envelope.model_validate({**json.loads(good.to_bytes()), "payloadType": "application/json"})
    verify_manifest(classical, keys)  # classical mode accepts a classical suite
    cases = [
        (_tamper(good, shots=1), "signature.invalid"),
        (other_tenant, "manifest.wrong_tenant"),
        (downgraded, "manifest.downgrade"),
        (pqc_only_hybrid, "manifest.downgrade"),
        (non_canonical, "manifest.not_canonical"),
        (wrong_type, "manifest.wrong_payload_type"),
    ]
    for env, code in cases:
        with pytest.raises(VerificationError) as err:
            verify_manifest(env, keys)
        assert err.value.code == code
    with pytest.raises(QaiError) as err2:
        sign_manifest(manifest(pqc_suite="ML-DSA-87+SLH-DSA-SHA2-128s"),
                      lambda msg: kms.sign("org-a.hybrid", principal=admin, message=msg))
    assert err2.value.code == "manifest.suite_mismatch"
    # a revoked version: manifests dated after the revocation fail, earlier ones still verify
    kms.revoke("org-a.hybrid", 1, reason="key compromise", principal=admin)
    late = _sign(kms, "org-a.pqc", "org-a", manifest(pqc_suite="ML-DSA-87+SLH-DSA-SHA2-128s",
                                                     crypto_mode="pqc-required"))
    assert verify_manifest(late, keys | {"org-a.hybrid": kms.public_key("org-a.hybrid")})
    revoked_keys = keys | {"org-a.hybrid": kms.public_key("org-a.hybrid")}
    verify_manifest(good, revoked_keys)  # dated before the revocation
    after = manifest(created_at=(datetime.now(UTC) + timedelta(seconds=5)).isoformat())
    env_after = sign_manifest(after, lambda msg: _forge_with_old_signature(kms, good, msg))
    with pytest.raises(VerificationError) as err3:
        verify_manifest(env_after, revoked_keys)
    assert err3.value.code == "signature.key_revoked"


def _forge_with_old_signature(kms: KMS, good: Envelope, msg: bytes) -> Any:
    """The KMS refuses to sign with a revoked version; an attacker holding the old key would not.
    Reuse the old signatures over the new message: it must fail either as revoked or invalid."""
    from sdk.signing import SignatureBundle, SignaturePart, parse_keyid

    parts = []
    for s in good.signatures:
        name, version, alg = parse_keyid(s.keyid)
        parts.append(SignaturePart(key_name=name, version=version, alg=alg, signature=s.sig))
    return SignatureBundle(suite="ML-DSA-65+ECDSA-P256", parts=parts, signed_at=datetime.now(UTC))
