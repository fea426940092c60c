"""Lineage: every nightly step states, as an in-toto v1 Statement, what it produced from what.

A statement's subjects are the step's outputs, named by object-store key with their sha256; its
predicate holds the inputs (also by key and sha256, or by id), the parameters and the versions of
the code that ran. It is signed through the KMS as a DSSE envelope (payload type
``application/vnd.in-toto+json``, in-toto Attestation Framework v1, "Envelope layer"), stored
content-addressed and appended to the ledger (entry type ``lineage``) in the same transaction
that records it on the run's row, so a run never names a statement the ledger lacks.

Verifying a chain (``verify_run``) re-checks, for each statement: its ledger entry (type, digest,
object path), its signature with the key version valid at the entry's time, and every subject
against the bytes now in the object store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, cast

from sdk.canonical import canonical_json
from sdk.dsse import envelope_bytes, envelope_from_bundle, pae, parse_envelope, verify_envelope
from sdk.errors import QaiError
from sdk.ledger import SYSTEM_TENANT, LedgerEntry

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from orchestrator.services import Services

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
PREDICATE_TYPE = "https://qai.local/attestations/nightly-step/v1"
LINEAGE_KEY = "qai.nightly"
ENTRY_TYPE: Literal["lineage"] = "lineage"


def lineage_key(svc: Services) -> str:
    from orchestrator.ledger import system_signing_key

    return system_signing_key(svc.db, svc.kms, LINEAGE_KEY, suite=svc.settings.ledger_suite, subject="nightly",
                              error_code="nightly.bad_key")


def statement(subjects: Mapping[str, str], predicate: Mapping[str, Any]) -> dict[str, Any]:
    """An in-toto v1 Statement: ``subjects`` maps an object-store key to its hex sha256."""
    return {"_type": STATEMENT_TYPE,
            "subject": [{"name": name, "digest": {"sha256": sha}} for name, sha in sorted(subjects.items())],
            "predicateType": PREDICATE_TYPE, "predicate": dict(predicate)}


@dataclass(frozen=True)
class Attestation:
    step: str
    path: str
    sha256: str
    ledger_index: int

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "path": self.path, "sha256": self.sha256, "ledger_index": self.ledger_index}


def attest(svc: Services, run_id: str, step: str, subjects: Mapping[str, str], predicate: Mapping[str, Any]
           ) -> Attestation:
    """Sign, store and ledger the statement of ``step``; the run's row lists it in the same transaction."""
    from orchestrator.auth import Principal
    from orchestrator.ledger import LedgerWrite
    from orchestrator.objects import put_once

    key = lineage_key(svc)
    at = datetime.now(UTC)  # after the key exists: the statement is verified as of its ledger time
    payload = canonical_json(statement(subjects, {"run_id": run_id, "step": step, **predicate}))
    bundle = svc.kms.sign(key, principal=Principal.system("nightly"), message=pae(PAYLOAD_TYPE, payload))
    envelope = envelope_bytes(envelope_from_bundle(PAYLOAD_TYPE, payload, bundle))
    sha = hashlib.sha256(envelope).hexdigest()
    path = f"nightly/lineage/{sha}.dsse.json"
    put_once(svc.objects, path, envelope)
    entry = LedgerEntry(type=ENTRY_TYPE, sha256=sha, path=path, tenant=SYSTEM_TENANT, time=at)
    found: list[Attestation] = []

    def before(conn: Connection, first_index: int) -> None:
        from sqlalchemy import Table, select, update

        from em_policy.nightly.models import NightlyRunRow

        runs = cast(Table, NightlyRunRow.__table__)
        stored = conn.scalar(select(runs.c.summary).where(runs.c.run_id == run_id).with_for_update())
        if stored is None:
            raise QaiError("nightly.run_not_found", f"no nightly run {run_id}", status=404)
        att = Attestation(step, path, sha, first_index)
        summary = dict(stored)
        summary["lineage"] = [*summary.get("lineage", []), att.to_json()]
        conn.execute(update(runs).where(runs.c.run_id == run_id).values(summary=summary))
        found.append(att)

    svc.ledger.append([LedgerWrite([entry], before=before)])
    return found[0]


def verify_attestation(svc: Services, att: Mapping[str, Any]) -> dict[str, Any]:
    """The statement of one step, after every check; raises ``nightly.lineage_*`` on the first failure."""
    entry = svc.ledger.entry(int(att["ledger_index"]))
    if entry.type != ENTRY_TYPE or entry.sha256 != att["sha256"] or entry.path != att["path"]:
        raise QaiError("nightly.lineage_not_ledgered", f"ledger entry {att['ledger_index']} is not the statement of "
                       f"step {att['step']}", status=409, details={"step": att["step"]})
    data = svc.objects.get(att["path"])
    if hashlib.sha256(data).hexdigest() != att["sha256"]:
        raise QaiError("nightly.lineage_tampered", f"the statement of step {att['step']} does not match its ledger "
                       "entry", status=409, details={"step": att["step"], "path": att["path"]})
    envelope = parse_envelope(data)
    if envelope.payload_type != PAYLOAD_TYPE:
        raise QaiError("nightly.lineage_tampered", f"payload type {envelope.payload_type}", status=409)
    verify_envelope(envelope, svc.kms.public_key(LINEAGE_KEY), at=entry.time)
    stmt: dict[str, Any] = json.loads(envelope.payload_bytes())
    if stmt.get("_type") != STATEMENT_TYPE or stmt.get("predicateType") != PREDICATE_TYPE:
        raise QaiError("nightly.lineage_tampered", "not a nightly-step in-toto statement", status=409)
    changed = [s["name"] for s in stmt["subject"]
               if hashlib.sha256(svc.objects.get(s["name"])).hexdigest() != s["digest"]["sha256"]]
    if changed:
        raise QaiError("nightly.lineage_subject_changed", f"{len(changed)} output(s) of step {att['step']} changed "
                       "after they were attested", status=409, details={"subjects": changed})
    return stmt


def verify_all(svc: Services, attestations: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [verify_attestation(svc, a) for a in attestations]


def chain(svc: Services, ref: str, *, decision_limit: int = 1000) -> dict[str, Any]:
    """``qai audit lineage``: for a nightly run id or a model version (``em-policy/3`` or ``3``),
    the chain calibration snapshot → dataset → model version → the decisions that used it, with
    every statement verified (the first failure raises). A run's every successful step must have
    its statement."""
    from sqlalchemy import select

    from em_policy.nightly.models import NightlyRunRow

    with svc.db.read() as s:
        rows = s.scalars(select(NightlyRunRow).order_by(NightlyRunRow.scheduled_for, NightlyRunRow.started_at)).all()
    model: str | None = None
    if ref.startswith("nr-"):
        runs = [r for r in rows if r.run_id == ref]
        if not runs:
            raise QaiError("nightly.run_not_found", f"no nightly run {ref}", status=404)
        model = (runs[0].summary.get("retrain") or {}).get("candidate")
    else:
        model = ref if "/" in ref else f"em-policy/{ref}"
        producer = [r for r in rows if (r.summary.get("retrain") or {}).get("candidate") == model]
        if not producer:
            raise QaiError("nightly.lineage_unknown_model", f"no nightly run trained {model}", status=404)
        datasets = set(producer[0].summary["retrain"]["datasets"])
        runs = [r for r in rows if r.summary.get("dataset") in datasets or r.run_id == producer[0].run_id]
    out_runs = []
    for r in runs:
        atts = r.summary.get("lineage", [])
        statements = verify_all(svc, atts)
        attested = {st["predicate"]["step"] for st in statements}
        unattested = [s["name"] for s in r.steps if s["status"] == "ok" and s["name"] not in attested]
        if unattested:
            raise QaiError("nightly.lineage_incomplete", f"run {r.run_id}: steps {unattested} have no statement",
                           status=409, details={"run_id": r.run_id, "steps": unattested})
        by_step = {st["predicate"]["step"]: st for st in statements}
        out_runs.append({
            "run_id": r.run_id, "status": r.status, "at": r.scheduled_for.isoformat(),
            "statements": [{"step": a["step"], "ledger_index": a["ledger_index"], "subjects": len(st["subject"])}
                           for a, st in zip(atts, statements, strict=True)],
            "snapshots": by_step.get("refresh", {}).get("predicate", {}).get("outputs", {}).get("snapshots", {}),
            "dataset": by_step.get("store", {}).get("predicate", {}).get("outputs", {}).get("dataset"),
            "model": by_step.get("retrain", {}).get("predicate", {}).get("outputs", {}).get("candidate"),
        })
    result: dict[str, Any] = {"ref": ref, "verified": True, "runs": out_runs, "model": None, "decisions": []}
    if model is not None:
        result["model"] = _model_link(svc, model)
        result["decisions"] = _decisions_using(svc, model, decision_limit)
    return result


def _model_link(svc: Services, model: str) -> dict[str, Any]:
    from em_policy import registry

    name, version = model.split("/", 1)
    mv = registry.resolve(svc, version, name)
    registry.verified_statement(svc, mv)
    return {"version": model, "sha256": mv.sha256, "ledger_index": mv.ledger_index,
            "dataset_sha256": mv.dataset_sha256, "aliases": list(mv.aliases)}


def _decisions_using(svc: Services, model: str, limit: int) -> list[dict[str, Any]]:
    """Scheduler decisions whose chosen prediction came from ``model``, each read from its signed
    document and checked against its ledgered digest (the newest ``limit``)."""
    from sqlalchemy import select

    from scheduler.service import DecisionRow

    with svc.db.read() as s:
        rows = s.scalars(select(DecisionRow).where(DecisionRow.chosen_backend.is_not(None))
                         .order_by(DecisionRow.created_at.desc()).limit(limit)).all()
    out = []
    for row in rows:
        data = svc.ledger.object_bytes(row.decision_manifest_path)
        if hashlib.sha256(data).hexdigest() != row.decision_sha256:
            raise QaiError("nightly.lineage_tampered", f"decision {row.id} does not match its digest", status=409)
        document = json.loads(parse_envelope(data).payload_bytes())
        chosen = document.get("decision", {}).get("chosen") or {}
        if chosen.get("model_version") == model:
            out.append({"decision_id": row.id, "job_id": row.job_id, "backend_id": row.chosen_backend,
                        "ledger_index": row.ledger_index})
    return out
