"""Storing a harness run: histograms and Parquet in the object store, ``em_results`` and
``harness_runs`` rows in the database, and a signed dataset manifest in the ledger.

Order matters for "loses nothing". Objects go first: they are content-addressed and write-once,
so a crash leaves at most unreferenced objects. The rows and the ledger entry are then written in
one transaction (a ``LedgerWrite``), so there are never rows without their ledger entry or an
entry without its rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import select

from harness.calibration import CalibrationSnapshot
from harness.run import AdapterConfig, RunConfig, to_parquet
from harness.tasks import HARNESS_VERSION, TaskOutput
from sdk.canonical import canonical_json
from sdk.dsse import envelope_bytes, envelope_from_bundle, pae
from sdk.errors import QaiError
from sdk.ledger import SYSTEM_TENANT, LedgerEntry

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from orchestrator.services import Services

DATASET_PAYLOAD_TYPE = "application/vnd.qai.dataset-manifest.v1+json"
DATASET_ENTRY_TYPE: Literal["em-result"] = "em-result"  # the ledger's entry type for signed harness datasets
HARNESS_KEY = "qai.harness"
RESULT_NAMESPACE = uuid.UUID("0b8f3f8e-6d3e-4d51-8a0f-6a1f53f0d2c4")


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    rows: int
    failed_rows: int
    parquet_path: str
    dataset_manifest_path: str
    ledger_index: int
    parquet_sha256: str
    local_parquet: str | None = None


def with_histograms(rows: Sequence[dict[str, Any]], outputs: Sequence[TaskOutput]
                    ) -> tuple[list[dict[str, Any]], list[tuple[str, bytes]]]:
    """Rows with ``raw_histogram_path`` (content-addressed), and the histogram objects to store."""
    paths: dict[str, str] = {}
    objects: list[tuple[str, bytes]] = []
    for out in outputs:
        path = f"harness/histograms/{hashlib.sha256(out.histogram).hexdigest()}.json"
        paths[out.task_key] = path
        objects.append((path, out.histogram))
    return [dict(r, raw_histogram_path=paths[f"{r['circuit_id']}@{r['calibration_snapshot_id']}"])
            for r in rows], objects


def write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_local(parquet_path: str, rows: Sequence[dict[str, Any]], outputs: Sequence[TaskOutput]) -> None:
    """A run without the platform (``--no-store``): the Parquet file, its histograms beside it."""
    rows, objects = with_histograms(rows, outputs)
    for path, data in objects:
        target = os.path.join(os.path.dirname(parquet_path), path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_atomically(target, data)
    write_atomically(parquet_path, to_parquet(rows, {"qai.harness_version": HARNESS_VERSION}))


@dataclass(frozen=True)
class HarnessRun:
    tasks: int
    seconds: float  # wall clock of the executions
    rows: list[dict[str, Any]]
    record: RunRecord | None  # None when nothing was stored (no services)


def run_harness(svc: Services | None, config: RunConfig, snapshots: Sequence[CalibrationSnapshot], *,
                adapter: AdapterConfig | None = None, workers: int | None = None,
                dask_scheduler: str | None = None, quiet: bool = False, local_path: str | None = None) -> HarnessRun:
    """Run ``config`` on ``snapshots`` with a progress bar, then store it (``svc``) and/or write
    ``local_path``: what ``qai harness run`` and the demo do."""
    from harness.run import build_tasks, run_tasks, sorted_rows
    from sdk.output import progress

    tasks = build_tasks(config, snapshots)
    started = time.perf_counter()
    with progress(quiet) as bar:
        job = bar.add_task("harness", total=len(tasks))
        outputs = run_tasks(tasks, adapter or AdapterConfig(), workers=workers, dask_scheduler=dask_scheduler,
                            on_done=lambda _o: bar.advance(job))
    seconds = time.perf_counter() - started
    rows = sorted_rows(outputs)
    record = None
    if svc is not None:
        record = persist_run(svc, config, rows, outputs, snapshots, local_path=local_path)
    elif local_path is not None:
        write_local(local_path, rows, outputs)
    return HarnessRun(tasks=len(tasks), seconds=seconds, rows=rows, record=record)


def new_run_id(now: datetime) -> str:
    return f"hr-{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"


def harness_key(svc: Services) -> str:
    """The system tenant's key that signs dataset manifests, created on first use."""
    from orchestrator.ledger import system_signing_key

    return system_signing_key(svc.db, svc.kms, HARNESS_KEY, suite=svc.settings.ledger_suite, subject="harness",
                              error_code="harness.bad_key")


def ensure_catalog_rows(svc: Services, snapshots: Sequence[CalibrationSnapshot]) -> None:
    """Backends and snapshots a run refers to must exist (foreign keys); importing is idempotent."""
    from harness.backends import import_snapshot
    from harness.catalog import backend_info

    for snap in snapshots:
        try:
            import_snapshot(svc.db, snap)
        except QaiError as exc:
            if exc.code != "backends.unknown_backend":
                raise
            import_snapshot(svc.db, snap, backend_info(snap.backend_id))


def persist_run(svc: Services, config: RunConfig, rows: Sequence[dict[str, Any]], outputs: Sequence[TaskOutput],
                snapshots: Sequence[CalibrationSnapshot], *, local_path: str | None = None) -> RunRecord:
    key = harness_key(svc)  # before `now`: the manifest is verified as of its ledger time
    ensure_catalog_rows(svc, snapshots)
    now = datetime.now(UTC)
    run_id = new_run_id(now)

    rows, objects = with_histograms(rows, outputs)
    parquet = to_parquet(rows, {"qai.harness_version": HARNESS_VERSION})
    parquet_path = f"harness/runs/{run_id}/results.parquet"
    objects.append((parquet_path, parquet))
    for err in svc.objects.put_many(objects):
        # content-addressed histograms of an earlier run with equal content are already there
        if err is not None and err.code != "object.exists":
            raise err

    manifest = {
        "type": "qai.harness.dataset.v1", "run_id": run_id, "created_at": now.isoformat(),
        "harness_version": HARNESS_VERSION, "seed": config.seed, "config": config.to_json(),
        "rows": len(rows), "failed_rows": sum(r["status"] != "ok" for r in rows),
        "calibration_snapshots": sorted({s.id for s in snapshots}),
        "files": [{"path": p, "sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for p, b in objects],
    }
    payload = canonical_json(manifest)
    from orchestrator.auth import Principal

    bundle = svc.kms.sign(key, principal=Principal.system("harness"), message=pae(DATASET_PAYLOAD_TYPE, payload))
    envelope = envelope_bytes(envelope_from_bundle(DATASET_PAYLOAD_TYPE, payload, bundle))
    manifest_path = f"harness/runs/{run_id}/dataset-manifest.dsse.json"
    svc.objects.put(manifest_path, envelope)

    entry = LedgerEntry(type=DATASET_ENTRY_TYPE, sha256=hashlib.sha256(envelope).hexdigest(), path=manifest_path,
                        tenant=SYSTEM_TENANT, time=now)

    def before(conn: Connection, first_index: int) -> None:
        """The run's rows, in the ledger entry's transaction."""
        from harness.models import EM_RESULTS, HARNESS_RUNS
        from orchestrator.db import insert_rows

        insert_rows(conn, EM_RESULTS, [_em_result(run_id, r, parquet_path, now) for r in rows])
        insert_rows(conn, HARNESS_RUNS, [{
            "run_id": run_id, "created_at": now, "seed": config.seed, "harness_version": HARNESS_VERSION,
            "config": config.to_json(), "rows": len(rows), "parquet_path": parquet_path,
            "dataset_manifest_path": manifest_path, "ledger_index": first_index}])

    from orchestrator.ledger import LedgerWrite

    indexed = svc.ledger.append([LedgerWrite([entry], before=before)])[0]
    if local_path is not None:  # only a stored run leaves a local copy behind
        write_atomically(local_path, parquet)
    return RunRecord(run_id=run_id, rows=len(rows), failed_rows=int(manifest["failed_rows"]),
                     parquet_path=parquet_path, dataset_manifest_path=manifest_path, ledger_index=indexed.index,
                     parquet_sha256=hashlib.sha256(parquet).hexdigest(), local_parquet=local_path)


def _em_result(run_id: str, r: dict[str, Any], parquet_path: str, now: datetime) -> dict[str, Any]:
    return {
        "result_id": str(uuid.uuid5(RESULT_NAMESPACE, f"{run_id}|{r['job_id']}|{r['observable']}|{r['method']}")),
        "job_id": r["job_id"], "run_id": run_id, "circuit_family": r["family"], "circuit_id": r["circuit_id"],
        "backend_id": r["backend_id"], "calibration_snapshot_id": r["calibration_snapshot_id"],
        "observable": r["observable"], "shots": r["shots"], "unmitigated_fidelity": r["unmitigated_fidelity"],
        "mitigated_fidelity": r["mitigated_fidelity"], "em_method": r["method"],
        "parameters": json.loads(r["parameters"]), "abs_error": r["abs_error"],
        "shot_multiplier": r["shot_multiplier"], "cost_seconds": r["runtime_seconds"], "status": r["status"],
        "error_code": r["error_code"], "created_at": now, "parquet_path": parquet_path,
    }


def verify_run(svc: Services, run_id: str) -> dict[str, Any]:
    """Re-check a stored run: the manifest's signature, and every file against its sha256."""
    from harness.models import HarnessRunRow
    from sdk.dsse import parse_envelope, verify_envelope

    with svc.db.read() as s:
        run = s.scalars(select(HarnessRunRow).where(HarnessRunRow.run_id == run_id)).first()
        if run is None:
            raise QaiError("harness.run_not_found", f"no harness run {run_id}", status=404)
        manifest_path, run_created = run.dataset_manifest_path, run.created_at
    envelope = parse_envelope(svc.objects.get(manifest_path))
    verify_envelope(envelope, svc.kms.public_key(HARNESS_KEY), at=run_created)
    manifest = json.loads(envelope.payload_bytes())
    bad = [f["path"] for f in manifest["files"]
           if hashlib.sha256(svc.objects.get(f["path"])).hexdigest() != f["sha256"]]
    if bad:
        raise QaiError("harness.dataset_tampered", f"{len(bad)} file(s) do not match the signed manifest",
                       status=409, details={"files": bad[:20]})
    return {"run_id": run_id, "files": len(manifest["files"]), "rows": manifest["rows"], "verified": True}


def resolve_snapshots(svc: Services | None, backend_ids: Sequence[str]) -> list[CalibrationSnapshot]:
    """Each backend's current calibration: the latest imported one if the database has the backend,
    else the catalog's (real IBM calibration shipped with qiskit-ibm-runtime)."""
    from harness.backends import get_snapshot
    from harness.catalog import catalog, catalog_snapshot
    from harness.models import BackendRow

    ids = list(backend_ids) or [b.backend_id for b in catalog()]
    if len(set(ids)) != len(ids):
        raise QaiError("harness.bad_config", f"a backend is listed twice: {ids}", status=422)
    out = []
    for backend_id in ids:
        last = None
        if svc is not None:
            with svc.db.read() as s:
                row = s.get(BackendRow, backend_id)
                last = row.last_calibration_id if row is not None else None
        out.append(get_snapshot(svc.db, last) if svc is not None and last else catalog_snapshot(backend_id))
    return out


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, backend): mean abs error, mean fidelity, mean shot multiplier, shots, failures."""
    from statistics import fmean

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["backend_id"]), []).append(r)
    out = []
    for (method, backend), rs in sorted(groups.items()):
        ok = [r for r in rs if r["status"] == "ok"]
        out.append({
            "method": method, "backend_id": backend, "rows": len(rs), "failed": len(rs) - len(ok),
            "mean_abs_error": fmean(r["abs_error"] for r in ok) if ok else None,
            "mean_fidelity": fmean(r["mitigated_fidelity"] for r in ok) if ok else None,
            "mean_shot_multiplier": fmean(r["shot_multiplier"] for r in ok) if ok else None,
            "shots": sum(r["shots"] for r in rs),
        })
    return out
