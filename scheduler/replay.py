"""Replay: recompute a stored decision from its recorded inputs, and re-derive those inputs.

Two depths, because two kinds of reader replay:

* **Offline** (the auditor, ``qai audit verify``): the signed document alone. ``decide`` runs
  again over the recorded inputs with the recorded plugins, and the canonical JSON of the result
  must equal the recorded body byte for byte (:func:`replay_document`).
* **Against the platform** (``qai scheduler replay``, ``POST /v1/decisions/{id}/replay``): also
  re-derive the inputs from their sources. The job fields come again from the signed manifest;
  every calibration snapshot is re-read by its content-derived id (an edited snapshot no longer
  hashes to it); every prediction is recomputed by the model version it names, on that snapshot.

The tenant's policy and a backend's catalog entry (price, availability, queue) are recorded, not
re-derived: they change legitimately after a decision, and the signed record is what held then.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from orchestrator import metrics
from scheduler.engine import SchedulingError, coselects, decide
from scheduler.plugins import resolve
from sdk.canonical import canonical_json
from sdk.dsse import parse_envelope
from sdk.errors import QaiError
from sdk.ledger import IndexedEntry
from sdk.signing import parse_keyid

if TYPE_CHECKING:
    from orchestrator.services import Services

MAX_DIFFERENCES = 50


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class ReplayReport:
    decision_id: str
    identical: bool  # the recomputed body equals the recorded one, byte for byte
    differences: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.identical and all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"decision_id": self.decision_id, "ok": self.ok, "identical": self.identical,
                "differences": self.differences, "checks": [asdict(c) for c in self.checks]}


def diff(recorded: Any, recomputed: Any, path: str = "$") -> list[dict[str, Any]]:
    """Where two JSON values differ, as ``{"path", "recorded", "recomputed"}``, depth first."""
    if isinstance(recorded, dict) and isinstance(recomputed, dict):
        out = []
        for k in sorted(set(recorded) | set(recomputed)):
            out += diff(recorded.get(k, "<absent>"), recomputed.get(k, "<absent>"), f"{path}.{k}")
        return out
    if isinstance(recorded, list) and isinstance(recomputed, list) and len(recorded) == len(recomputed):
        return [d for i, (a, b) in enumerate(zip(recorded, recomputed, strict=True))
                for d in diff(a, b, f"{path}[{i}]")]
    if canonical_json(recorded) == canonical_json(recomputed):
        return []
    return [{"path": path, "recorded": recorded, "recomputed": recomputed}]


def replay_document(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Recompute the decision body from the document's inputs; its differences from the recorded
    body (none: byte-identical canonical JSON)."""
    inputs = document["inputs"]
    plugins = resolve([p["name"] for p in inputs["profile"]["plugins"]])
    recomputed = decide(inputs, plugins)
    if canonical_json(recomputed) == canonical_json(document["decision"]):
        return []
    return diff(document["decision"], recomputed)[:MAX_DIFFERENCES] or [
        {"path": "$", "recorded": "<canonical bytes differ>", "recomputed": "<canonical bytes differ>"}]


def audit_replay(entry: IndexedEntry, obj: bytes) -> None:
    """The auditor's hook for ``scheduler-decision`` entries. Their signatures are already checked
    under a key of the entry's tenant; a decision must also be signed by the scheduler's own key
    (not, say, the workers'), with the decision payload type."""
    from scheduler.service import DECISION_PAYLOAD_TYPE, SCHEDULER_KEY

    envelope = parse_envelope(obj)
    signers = {parse_keyid(sig.keyid)[0] for sig in envelope.signatures}
    if envelope.payload_type != DECISION_PAYLOAD_TYPE or signers != {SCHEDULER_KEY}:
        raise QaiError("scheduler.decision_tampered", f"a scheduler decision must be a {DECISION_PAYLOAD_TYPE} "
                       f"signed by {SCHEDULER_KEY}, not {envelope.payload_type} by {sorted(signers)}", status=409)
    document = orjson.loads(envelope.payload_bytes())  # as the scheduler read its inputs back
    try:
        differences = replay_document(document)
    except (SchedulingError, KeyError, TypeError) as exc:
        raise QaiError("scheduler.replay_mismatch", f"decision {document.get('decision_id')} cannot be "
                       f"recomputed: {exc}", status=409) from exc
    if differences:
        first = differences[0]
        raise QaiError("scheduler.replay_mismatch",
                       f"decision {document.get('decision_id')} does not replay: {first['path']} was "
                       f"{json.dumps(first['recorded'])[:80]}, recomputes to {json.dumps(first['recomputed'])[:80]}",
                       status=409, details={"differences": differences})


def replay(svc: Services, decision_id: str, *, deep: bool = True) -> ReplayReport:
    """Replay a stored decision (see the module docstring); its signature and ledger entry are
    checked first (``scheduler.decision_tampered``)."""
    from scheduler.service import scheduler

    s = scheduler(svc)
    row = s.row(decision_id)  # a decision that does not exist is not a replay failure
    try:
        document = s.load(row)
    except QaiError as exc:
        if exc.code == "scheduler.decision_tampered":
            _failed("tampered")
        raise
    try:
        differences = replay_document(document)
    except (QaiError, SchedulingError, KeyError, TypeError, ValueError) as exc:
        reason = exc.message if isinstance(exc, QaiError) else f"{type(exc).__name__}: {exc}"
        differences = [{"path": "$", "recorded": "<decision>", "recomputed": f"<cannot recompute: {reason}>"}]
    report = ReplayReport(decision_id, not differences, differences)
    if deep:
        report.checks = rederive(svc, document)
    if report.ok:
        metrics.SCHEDULER_REPLAYS.labels("ok").inc()
    else:
        _failed("mismatch" if differences else "rederive")
    return report


def _failed(reason: str) -> None:
    metrics.SCHEDULER_REPLAYS.labels("failed").inc()
    metrics.SCHEDULER_REPLAY_FAILURES.labels(reason).inc()


def rederive(svc: Services, document: Mapping[str, Any]) -> list[Check]:
    """Re-derive the recorded job fields, snapshots and predictions from their sources."""
    inputs = document["inputs"]
    job, qasm = _job(svc, inputs)
    checks = [job]
    asked = []  # the backends the policy was asked about, in the order of the original batch
    for b in inputs["backends"]:
        snapshot_id = b.get("calibration_snapshot_id")
        if not snapshot_id:
            continue
        snap = _snapshot(svc, b["backend_id"], snapshot_id)
        checks.append(snap)
        if snap.ok and (b.get("prediction") or b.get("prediction_error")):
            asked.append(b)
    if qasm is not None and asked:
        checks += _predictions(svc, qasm, inputs["job"], asked, options=coselects(inputs["profile"]["config"]))
    return checks


def _job(svc: Services, inputs: Mapping[str, Any]) -> tuple[Check, str | None]:
    """The job fields re-derived from the signed manifest, and the circuit (``None`` if unreadable)."""
    from em_policy.features import parse_qasm
    from orchestrator.jobs import ManifestRow
    from scheduler.service import circuit_qasm, job_fields, scheduler

    job = inputs["job"]
    with svc.db.read() as s:
        row = s.get(ManifestRow, job["job_id"])
        if row is not None:
            s.expunge(row)
    if row is None:
        return Check("job", False, f"job {job['job_id']} is not in the index"), None
    try:
        manifest = scheduler(svc).manifest(row)
        qasm = circuit_qasm(svc, manifest)
    except QaiError as exc:
        return Check("job", False, f"{exc.code}: {exc.message}"), None
    fields = job_fields(manifest, row.envelope_sha256, parse_qasm(qasm).num_qubits, row.submitted_at,
                        datetime.fromisoformat(inputs["now"]))
    differences = diff(job, fields, "$.inputs.job")
    if manifest.seed != inputs["seed"]:
        differences.append({"path": "$.inputs.seed", "recorded": inputs["seed"], "recomputed": manifest.seed})
    return Check("job", not differences, _describe(differences) or "re-derived from the signed manifest"), qasm


def _snapshot(svc: Services, backend_id: str, snapshot_id: str) -> Check:
    from harness.backends import get_snapshot

    try:
        snap = get_snapshot(svc.db, snapshot_id)
    except QaiError as exc:
        return Check(f"snapshot:{backend_id}", False, f"{exc.code}: {exc.message}")
    if snap.backend_id != backend_id:
        return Check(f"snapshot:{backend_id}", False, f"snapshot {snapshot_id} is of {snap.backend_id}")
    return Check(f"snapshot:{backend_id}", True, "content matches its id")


def _predictions(svc: Services, qasm: str, job: Mapping[str, Any], asked: list[Mapping[str, Any]], *,
                 options: bool) -> list[Check]:
    """The predictions recomputed in one batch, as they were made, by the model version they name
    (a decision asks one model about every backend; with only errors recorded, the serving one)."""
    from scheduler.service import Scheduler, scheduler

    versions = {b["prediction"]["model_version"] for b in asked if b.get("prediction")}
    if len(versions) > 1:
        return [Check("predictions", False, f"one decision names several model versions: {sorted(versions)}")]
    version = versions.pop() if versions else None
    again: list[dict[str, Any]] = [{"calibration_snapshot_id": b["calibration_snapshot_id"], "prediction": None,
                                    "prediction_error": None} for b in asked]
    try:
        Scheduler.predict(scheduler(svc).policy(version), qasm, job, again, options=options)
    except QaiError as exc:
        return [Check("predictions", False, f"cannot recompute: {exc.code}: {exc.message}")]
    checks = []
    for b, now in zip(asked, again, strict=True):
        name = f"prediction:{b['backend_id']}"
        recorded = b.get("prediction")
        if recorded is None:
            error = now["prediction_error"]
            ok = error is not None and error["code"] == b["prediction_error"]["code"]
            checks.append(Check(name, ok, "the same error recomputes" if ok else f"recomputes to {now}"))
            continue
        path = f"$.inputs.backends[{b['backend_id']}].prediction"
        differences = [d for d in diff(recorded, now["prediction"], path) if not _close(d)]
        checks.append(Check(name, not differences, _describe(differences) or f"recomputed by {version}"))
    return checks


def _close(d: Mapping[str, Any]) -> bool:
    # The same model on the same features gives the same floats on one platform; allow the last
    # few bits a different BLAS could change, but no more.
    a, b = d["recorded"], d["recomputed"]
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
    return numbers and math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)  # 1 (read back from 1.0) is close to 1.0


def _describe(differences: list[dict[str, Any]]) -> str:
    return "; ".join(f"{d['path']}: recorded {json.dumps(d['recorded'])[:60]}, "
                     f"re-derived {json.dumps(d['recomputed'])[:60]}" for d in differences[:5])
