"""Synthetic signed envelopes and a populated ledger, shared by the ledger tests and the benchmark."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from kms.service import KMS
from orchestrator.auth import Principal, Role, create_tenant
from orchestrator.services import Services, build_services
from orchestrator.settings import Settings
from sdk.dsse import envelope_from_bundle, pae
from sdk.signing import KeyDocument

PAYLOAD_TYPE = "application/vnd.qai.test+json"


def signed_envelopes(kms: KMS, key: str, tenant: str, n: int, *, start: int = 0) -> list[bytes]:
    """``n`` DSSE envelopes over synthetic run payloads, signed by ``key`` in batches."""
    signer = Principal(subject="test-signer", role=Role.SIGNER, tenant=tenant)
    out: list[bytes] = []
    for lo in range(start, start + n, 100):
        payloads = [json.dumps({"job": i, "tenant": tenant}).encode() for i in range(lo, min(start + n, lo + 100))]
        bundles = kms.sign_many(key, principal=signer, items=[pae(PAYLOAD_TYPE, p) for p in payloads])
        out += [envelope_from_bundle(PAYLOAD_TYPE, p, b).to_bytes() for p, b in zip(payloads, bundles, strict=True)]
    return out


def ledger_services(settings: Settings, db: object, **overrides: object) -> Iterator[Services]:
    fields = {"ledger_checkpoint_every": 10, "ledger_checkpoint_interval_seconds": 0, **overrides}
    svc = build_services(settings.model_copy(update=fields), db=db)  # type: ignore[arg-type]
    for t in ("org-a", "org-b"):
        create_tenant(svc.db, t)
    for t in ("org-a", "org-b"):
        svc.kms.create_key(f"{t}.manifests", tenant=t, principal=Principal.system("test"))
    try:
        yield svc
    finally:
        svc.close()


def trusted_keys(svc: Services) -> dict[str, KeyDocument]:
    keys = {k.name: k for k in svc.kms.list_keys(principal=Principal.system("test"))}
    return keys


def write_keys(path: Path, keys: dict[str, KeyDocument]) -> Path:
    path.write_text(json.dumps([k.model_dump(mode="json") for k in keys.values()]))
    return path
