"""KMS service on SQLite and PostgreSQL with a real SoftHSM token."""

from __future__ import annotations

import base64
import hashlib
import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from kms import audit
from kms.models import KmsAuditRecord, KmsKey, KmsKeyComponent, KmsKeyVersion
from kms.service import KMS
from orchestrator.auth import Principal, Role
from orchestrator.db import Database, utcnow
from sdk.errors import QaiError
from sdk.signing import SignatureBundle, verify_bundle

MSG = b"run-manifest bytes"


def _counts(db: Database) -> tuple[int, int, int]:
    with db.read() as s:
        return (
            s.scalar(select(func.count()).select_from(KmsKey)) or 0,
            s.scalar(select(func.count()).select_from(KmsKeyVersion)) or 0,
            s.scalar(select(func.count()).select_from(KmsKeyComponent)) or 0,
        )


def test_default_suite_signs_with_both_parts(kms: KMS, admin: Principal, signer_a: Principal) -> None:
    doc = kms.create_key("org-a.manifest", tenant="org-a", principal=admin)
    assert doc.suite == "ML-DSA-65+ECDSA-P256"
    assert set(doc.versions[0].public_keys) == {"ML-DSA-65", "ECDSA-P256"}
    bundle = kms.sign("org-a.manifest", principal=signer_a, message=MSG)
    assert [p.keyid for p in bundle.parts] == ["org-a.manifest@1/ML-DSA-65", "org-a.manifest@1/ECDSA-P256"]
    assert kms.verify(bundle, MSG, principal=signer_a).version == 1
    # the bundle verifies offline from the public key document alone
    assert verify_bundle(bundle, MSG, kms.public_key("org-a.manifest")).version == 1
    with pytest.raises(QaiError) as err:
        kms.verify(bundle, MSG + b"x", principal=signer_a)
    assert err.value.code == "signature.invalid"


def test_every_part_is_required(kms: KMS, admin: Principal, signer_a: Principal) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    bundle = kms.sign("k", principal=signer_a, message=MSG)
    only_classical = SignatureBundle(suite=bundle.suite, parts=[bundle.parts[1]], signed_at=bundle.signed_at)
    with pytest.raises(QaiError) as err:
        kms.verify(only_classical, MSG, principal=signer_a)
    assert err.value.code == "signature.missing_part"
    relabelled = SignatureBundle(suite="ECDSA-P256", parts=[bundle.parts[1]], signed_at=bundle.signed_at)
    with pytest.raises(QaiError) as err:
        kms.verify(relabelled, MSG, principal=signer_a)
    assert err.value.code == "signature.suite_mismatch"


def test_pqc_only_suite_and_ed25519(kms: KMS, admin: Principal, signer_a: Principal) -> None:
    kms.create_key("hi", tenant="org-a", suite="ML-DSA-87+SLH-DSA-SHA2-128f", principal=admin)
    kms.create_key("ed", tenant="org-a", suite="ML-DSA-44+Ed25519", principal=admin)
    for name in ("hi", "ed"):
        bundle = kms.sign(name, principal=signer_a, message=MSG)
        assert kms.verify(bundle, MSG, principal=signer_a).version == 1


def test_prehash_digest_signing(kms: KMS, admin: Principal, signer_a: Principal) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    for prehash, h in (("sha256", hashlib.sha256), ("sha512", hashlib.sha512)):
        digest = h(MSG).digest()
        bundle = kms.sign("k", principal=signer_a, digest=digest, prehash=prehash)  # type: ignore[arg-type]
        assert bundle.prehash == prehash
        assert kms.verify(bundle, digest, principal=signer_a).version == 1
    with pytest.raises(QaiError) as err:
        kms.sign("k", principal=signer_a, digest=b"short", prehash="sha256")
    assert err.value.code == "kms.bad_digest"


def test_rotate_keeps_old_versions_verifying(kms: KMS, admin: Principal, signer_a: Principal) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    old = kms.sign("k", principal=signer_a, message=MSG)
    doc = kms.rotate("k", principal=admin)
    assert [v.version for v in doc.versions] == [1, 2]
    assert doc.versions[0].public_keys != doc.versions[1].public_keys
    new = kms.sign("k", principal=signer_a, message=MSG)
    assert {p.version for p in new.parts} == {2}
    assert kms.verify(old, MSG, principal=signer_a).version == 1
    assert kms.verify(new, MSG, principal=signer_a).version == 2


def test_revoked_version_fails_after_revocation_time(kms: KMS, admin: Principal, signer_a: Principal) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    before = kms.sign("k", principal=signer_a, message=MSG)
    doc = kms.revoke("k", 1, principal=admin, reason="key compromise drill")
    assert doc.versions[0].state == "revoked"
    revoked_at = doc.versions[0].revoked_at
    assert revoked_at is not None
    # a signature made before revocation still verifies at its own time...
    assert kms.verify(before, MSG, principal=signer_a).version == 1
    # ...but not when it is dated after the revocation
    with pytest.raises(QaiError) as err:
        kms.verify(before, MSG, principal=signer_a, at=revoked_at + timedelta(seconds=1))
    assert err.value.code == "signature.key_revoked"
    assert "key compromise drill" in err.value.message
    # and nothing can be signed with it any more
    with pytest.raises(QaiError) as err:
        kms.sign("k", principal=signer_a, message=MSG)
    assert err.value.code == "kms.no_enabled_version"
    with pytest.raises(QaiError) as err:
        kms.revoke("k", 1, principal=admin, reason="again")
    assert err.value.code == "kms.version_revoked"


def test_disabled_version_stops_signing_but_verifies(kms: KMS, admin: Principal, signer_a: Principal) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    b1 = kms.sign("k", principal=signer_a, message=MSG)
    kms.rotate("k", principal=admin)
    kms.disable("k", 2, principal=admin)
    # latest enabled is 1 again
    b = kms.sign("k", principal=signer_a, message=MSG)
    assert {p.version for p in b.parts} == {1}
    assert kms.verify(b1, MSG, principal=signer_a).version == 1


def test_roles_and_tenants(kms: KMS, admin: Principal) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    other_tenant = Principal(subject="signer-b", role=Role.SIGNER, tenant="org-b")
    submitter = Principal(subject="sub-a", role=Role.SUBMITTER, tenant="org-a")
    for who in (other_tenant, submitter):
        with pytest.raises(QaiError) as err:
            kms.sign("k", principal=who, message=MSG)
        assert err.value.code == "auth.forbidden" and err.value.status == 403
    with pytest.raises(QaiError) as err:
        kms.create_key("k2", tenant="org-a", principal=Principal("s", Role.SIGNER, "org-a"))
    assert err.value.code == "auth.forbidden"
    operator = Principal(subject="op-a", role=Role.OPERATOR, tenant="org-a")
    kms.rotate("k", principal=operator)
    with pytest.raises(QaiError):
        kms.sign("k", principal=operator, message=MSG)


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"suite": "ML-DSA-66+ECDSA-P256"}, "crypto.unknown_algorithm"),
        ({"suite": "ML-DSA-65+ML-KEM-768"}, "kms.bad_suite"),
        ({"suite": "ML-DSA-65+ML-DSA-65"}, "kms.bad_suite"),
        ({"suite": "ML-DSA-65", "purpose": "kem"}, "kms.bad_suite"),
        ({"name": "Bad Name"}, "kms.bad_key_name"),
        ({"name": "k@1/x"}, "kms.bad_key_name"),
        ({"tenant": "nobody"}, "tenant.not_found"),
    ],
)
def test_bad_create_input_leaves_no_state(kms: KMS, admin: Principal, db: Database,
                                          kwargs: dict[str, str], code: str) -> None:
    args = {"name": "k", "tenant": "org-a", **kwargs}
    name, tenant = args.pop("name"), args.pop("tenant")
    before_objects = len(kms.hsm.key_objects())
    with pytest.raises(QaiError) as err:
        kms.create_key(name, tenant=tenant, principal=admin, **args)  # type: ignore[arg-type]
    assert err.value.code == code
    assert _counts(db) == (0, 0, 0)
    assert len(kms.hsm.key_objects()) == before_objects


def test_duplicate_key_name_is_409_and_hsm_objects_are_cleaned(kms: KMS, admin: Principal, db: Database) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    objects = len(kms.hsm.key_objects())
    with pytest.raises(QaiError) as err:
        kms.create_key("k", tenant="org-a", principal=admin)
    assert err.value.code == "kms.key_exists" and err.value.status == 409
    assert _counts(db) == (1, 1, 2)
    assert len(kms.hsm.key_objects()) == objects


def test_oversized_message_is_refused(kms: KMS, admin: Principal, signer_a: Principal) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    with pytest.raises(QaiError) as err:
        kms.sign("k", principal=signer_a, message=b"x" * (kms.config.max_message_bytes + 1))
    assert err.value.code == "kms.message_too_large" and err.value.status == 413


def test_tampered_sealed_blob_fails_to_unseal(kms: KMS, admin: Principal, signer_a: Principal, db: Database) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    with db.write() as s:
        comp = s.get(KmsKeyComponent, ("k", 1, "ML-DSA-65"))
        assert comp is not None and comp.sealed_private is not None
        blob = bytearray(comp.sealed_private)
        blob[20] ^= 0x01
        comp.sealed_private = bytes(blob)
    kms.forget_unsealed()
    with pytest.raises(QaiError) as err:
        kms.sign("k", principal=signer_a, message=MSG)
    assert err.value.code == "kms.unseal_failed"
    with db.read() as s:
        last = s.scalars(select(KmsAuditRecord).order_by(KmsAuditRecord.seq.desc()).limit(2)).all()
    assert {(r.operation, r.result) for r in last} == {("unseal", "error"), ("sign", "error")}


def test_sealed_blob_is_bound_to_its_key(kms: KMS, admin: Principal, signer_a: Principal, db: Database) -> None:
    """Swapping sealed blobs between keys (same KEK) must not unseal: the AAD binds them."""
    kms.create_key("k1", tenant="org-a", principal=admin)
    kms.create_key("k2", tenant="org-a", principal=admin)
    with db.write() as s:
        c1 = s.get(KmsKeyComponent, ("k1", 1, "ML-DSA-65"))
        c2 = s.get(KmsKeyComponent, ("k2", 1, "ML-DSA-65"))
        assert c1 is not None and c2 is not None
        c2.sealed_private = c1.sealed_private
    kms.forget_unsealed()
    with pytest.raises(QaiError) as err:
        kms.sign("k2", principal=signer_a, message=MSG)
    assert err.value.code == "kms.unseal_failed"


def test_kem_round_trip(kms: KMS, admin: Principal, signer_a: Principal) -> None:
    for alg in ("ML-KEM-768", "ML-KEM-1024"):
        name = alg.lower()
        kms.create_key(name, tenant="org-a", suite=alg, purpose="kem", principal=admin)
        version, ct, shared = kms.encapsulate(name)
        assert kms.decapsulate(name, version, ct, principal=signer_a) == shared
        with pytest.raises(QaiError) as err:
            kms.sign(name, principal=signer_a, message=MSG)
        assert err.value.code == "kms.wrong_purpose"


def test_classical_keys_never_extractable(kms: KMS, admin: Principal) -> None:
    kms.create_key("k", tenant="org-a", suite="ML-DSA-65+ECDSA-P256", principal=admin)
    kms.create_key("e", tenant="org-a", suite="ML-DSA-44+Ed25519", principal=admin)
    objects = kms.hsm.key_objects()
    labels = {o.label for o in objects}
    assert {label.rsplit(":", 1)[0] for label in labels} >= {"qai:k:1:ECDSA-P256", "qai:e:1:Ed25519"}
    assert kms.config.kek_label in labels
    for o in objects:
        assert o.sensitive and o.always_sensitive, o
        assert not o.extractable and o.never_extractable, o


def test_concurrent_signing_keeps_the_audit_chain(kms: KMS, admin: Principal, signer_a: Principal,
                                                   db: Database) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    bundles: list[SignatureBundle] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(10):
                bundles.append(kms.sign("k", principal=signer_a, message=f"{i}-{j}".encode()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(bundles) == 80
    report = audit.verify_chain(db)
    assert report.ok, report.first_break
    with db.read() as s:
        signs = s.scalar(select(func.count()).select_from(KmsAuditRecord)
                         .where(KmsAuditRecord.operation == "sign"))
    assert signs == 80


def test_audit_log_is_append_only_and_chain_names_first_break(kms: KMS, admin: Principal,
                                                              signer_a: Principal, db: Database) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    for i in range(5):
        kms.sign("k", principal=signer_a, message=bytes([i]))
    report = audit.verify_chain(db)
    assert report.ok and report.records >= 6
    for stmt in ("UPDATE kms_audit_log SET actor = 'mallory' WHERE seq = 3",
                 "DELETE FROM kms_audit_log WHERE seq = 3"):
        with pytest.raises(Exception, match="append-only"), db.write() as s:
            s.execute(text(stmt))
    # an attacker with superuser rights bypasses the trigger; the chain still shows it
    with db.write() as s:
        if db.dialect == "postgresql":
            s.execute(text("ALTER TABLE kms_audit_log DISABLE TRIGGER kms_audit_log_append_only"))
            s.execute(text("UPDATE kms_audit_log SET actor = 'mallory' WHERE seq = 3"))
            s.execute(text("ALTER TABLE kms_audit_log ENABLE TRIGGER kms_audit_log_append_only"))
        else:
            s.execute(text("DROP TRIGGER kms_audit_log_no_update"))
            s.execute(text("UPDATE kms_audit_log SET actor = 'mallory' WHERE seq = 3"))
    report = audit.verify_chain(db)
    assert not report.ok
    assert report.first_break is not None and report.first_break["seq"] == 3
    assert "edited" in report.first_break["reason"]


def test_audit_records_every_operation(kms: KMS, admin: Principal, signer_a: Principal, db: Database) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    bundle = kms.sign("k", principal=signer_a, message=MSG)
    kms.rotate("k", principal=admin)
    kms.disable("k", 2, principal=admin)
    kms.revoke("k", 1, principal=admin, reason="test")
    with pytest.raises(QaiError):
        kms.verify(bundle, b"other", principal=signer_a)
    with db.read() as s:
        ops = [(r.operation, r.result, r.actor)
               for r in s.scalars(select(KmsAuditRecord).order_by(KmsAuditRecord.seq))]
    kinds = {(op, res) for op, res, _ in ops}
    assert {("create", "ok"), ("unseal", "ok"), ("sign", "ok"), ("rotate", "ok"), ("disable", "ok"),
            ("revoke", "ok"), ("verify", "error")} <= kinds
    sign_rec = next(r for r in ops if r[0] == "sign")
    assert sign_rec[2] == "signer-a"
    with db.read() as s:
        rec = s.scalars(select(KmsAuditRecord).where(KmsAuditRecord.operation == "sign")).first()
    assert rec is not None and rec.detail["sha256"] == hashlib.sha256(MSG).hexdigest()


def test_signature_after_rotation_time_window(kms: KMS, admin: Principal, signer_a: Principal) -> None:
    kms.create_key("k", tenant="org-a", principal=admin)
    bundle = kms.sign("k", principal=signer_a, message=MSG)
    with pytest.raises(QaiError) as err:
        kms.verify(bundle, MSG, principal=signer_a, at=utcnow() - timedelta(days=1))
    assert err.value.code == "signature.not_yet_valid"


def test_public_key_document_has_no_private_material(kms: KMS, admin: Principal) -> None:
    doc = kms.create_key("k", tenant="org-a", principal=admin)
    raw = doc.model_dump_json()
    for v in doc.versions:
        for alg, pk in v.public_keys.items():
            size = {"ML-DSA-65": 1952, "ECDSA-P256": 65}[alg]
            assert len(base64.b64decode(pk)) == size
    assert "sealed" not in raw and "private" not in raw
