"""One nightly run: refresh calibrations, run the curated workload, store it, measure drift,
retrain if drift says so, publish the dashboard and the alerts.

Every step is recorded on the run's row (status, seconds, error) and emits a signed in-toto
statement (``lineage``). A backend that fails does not fail the run: it is listed as missing with
its reason and the run ends ``partial``. A step that fails as a whole fails the run; its row says
which and why, and the next run starts from the stored state, not from anything this one left
half done: every write of a step is one transaction (rows with their ledger entry) or a
content-addressed object nothing refers to yet.

Runs are one at a time: the run's row is inserted under the ``nightly`` write lock only when no
other row is ``running`` with a fresh heartbeat (a partial unique index says the same), and a
``running`` row whose heartbeat has stopped belongs to a process that died: it is marked failed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from em_policy.nightly.drift import BackendDrift, Thresholds, calibration_errors, judge, prediction_drift, psi
from em_policy.nightly.lineage import attest
from em_policy.nightly.models import NightlyRunRow
from em_policy.policy import TrainConfig
from harness.calibration import CalibrationSnapshot
from harness.run import RunConfig
from sdk.canonical import canonical_json
from sdk.errors import QaiError

if TYPE_CHECKING:
    import pandas as pd

    from em_policy.policy import PolicyModel
    from orchestrator.services import Services

_log = logging.getLogger("qai.nightly")

STEPS = ("refresh", "workload", "store", "drift", "retrain", "publish")
# The curated workload is the harness's default run (docs/harness.md): 3 families × 2-6 qubits × 7
# methods, 4000 shots, seed 0. Fixed seed: a night's rows differ from the last only where a
# calibration changed, which is what drift compares.
CURATED = RunConfig()
NIGHTLY_TRAIN = TrainConfig(holdout_backends=(), rankers=("rf",), ensemble=3)
SnapshotSource = Callable[[str, datetime], CalibrationSnapshot]


def catalog_source(backend_id: str, now: datetime) -> CalibrationSnapshot:
    """The catalog's calibration (real IBM snapshots shipped with qiskit-ibm-runtime). A vendor's
    live calibration API plugs in here, as another ``SnapshotSource``."""
    from harness.catalog import catalog_snapshot

    return catalog_snapshot(backend_id)


@dataclass(frozen=True)
class NightlyConfig:
    backends: tuple[str, ...] = ()  # () = every catalog backend the database lists as online
    workload: RunConfig = CURATED
    train: TrainConfig = NIGHTLY_TRAIN
    thresholds: Thresholds = field(default_factory=Thresholds)
    webhook_url: str | None = None
    report_url: str | None = None  # the link alerts carry, e.g. https://qai.example/v1/reports/latest
    missing_runs_alert: int = 2  # alert once a backend has been missing for more than this many runs
    lease_seconds: float = 600.0
    workers: int | None = None
    force_retrain: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"backends": list(self.backends), "workload": self.workload.to_json(), "train": self.train.to_json(),
                "thresholds": self.thresholds.to_json(), "webhook_url": self.webhook_url,
                "missing_runs_alert": self.missing_runs_alert, "force_retrain": self.force_retrain}


def code_versions() -> dict[str, str]:
    from importlib.metadata import version

    from harness.tasks import HARNESS_VERSION

    return {"qai": version("qai"), "harness": HARNESS_VERSION, "qiskit": version("qiskit"),
            "qiskit-aer": version("qiskit-aer"), "mitiq": version("mitiq"), "scikit-learn": version("scikit-learn")}


# --------------------------------------------------------------------------------------- the lease


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def begin(svc: Services, run_id: str, scheduled_for: datetime, lease_seconds: float, *, again: bool = False
          ) -> NightlyRunRow:
    """Insert the run's ``running`` row, or refuse: ``nightly.already_running`` (409) while another
    run holds a fresh lease, ``nightly.already_done`` (409) when a run for ``scheduled_for`` finished
    (unless ``again``). A stale ``running`` row is marked failed first."""
    now = datetime.now(UTC)
    with svc.db.write(lock="nightly") as s:
        for other in s.scalars(select(NightlyRunRow).where(NightlyRunRow.status == "running")):
            if other.heartbeat_at >= now - timedelta(seconds=lease_seconds):
                raise QaiError("nightly.already_running", f"nightly run {other.run_id} is running ({other.holder})",
                               status=409, details={"run_id": other.run_id, "holder": other.holder})
            other.status, other.finished_at = "failed", now
            other.error = (f"crashed: no heartbeat since {other.heartbeat_at.isoformat()} "
                           f"(lease {lease_seconds:.0f} s); marked failed by {run_id}")
        s.flush()  # the stale row leaves 'running' before the new one takes the unique slot
        done = s.scalars(select(NightlyRunRow).where(NightlyRunRow.scheduled_for == scheduled_for,
                                                     NightlyRunRow.status.in_(("ok", "partial")))).first()
        if done is not None and not again:
            raise QaiError("nightly.already_done", f"nightly run {done.run_id} already served "
                           f"{scheduled_for.isoformat()}", status=409, details={"run_id": done.run_id})
        row = NightlyRunRow(run_id=run_id, scheduled_for=scheduled_for, started_at=now, heartbeat_at=now,
                            status="running", holder=_holder(), steps=[], summary={})
        s.add(row)
    return row


@contextmanager
def heartbeat(svc: Services, run_id: str, every: float) -> Iterator[None]:
    """Refresh the run's lease every ``every`` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                with svc.db.write() as s:
                    row = s.get(NightlyRunRow, run_id)
                    if row is not None and row.status == "running":
                        row.heartbeat_at = datetime.now(UTC)
            except Exception:  # a missed beat is retried; the lease is several beats long
                _log.warning("nightly heartbeat failed", exc_info=True)

    thread = threading.Thread(target=beat, name=f"nightly-heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _update(svc: Services, run_id: str, **values: Any) -> None:
    with svc.db.write() as s:
        row = s.get(NightlyRunRow, run_id)
        assert row is not None
        for k, v in values.items():
            if k == "summary":
                v = {**row.summary, **v}  # keep what attest() added to it (the lineage list)
            setattr(row, k, v)


# --------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    svc: Services
    config: NightlyConfig
    run_id: str
    at: datetime  # the run's logical time (the cron fire, or a test's fake clock)
    steps: list[dict[str, Any]] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    out: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {"name": name, "status": "running", "seconds": 0.0, "error": None}
        self.steps.append(record)
        started = time.perf_counter()
        try:
            yield record
            if record["status"] == "running":
                record["status"] = "ok"
        except Exception as exc:
            record["status"] = "failed"
            record["error"] = f"{exc.code}: {exc.message}" if isinstance(exc, QaiError) else repr(exc)
            self.alerts.append({"kind": "step_failed", "backend_id": None, "metric": name, "value": None,
                                "threshold": None, "message": f"step {name} failed: {record['error']}"})
            raise
        finally:
            record["seconds"] = round(time.perf_counter() - started, 3)
            _update(self.svc, self.run_id, steps=list(self.steps))

    def attest(self, step: str, subjects: Mapping[str, str], **predicate: Any) -> None:
        attest(self.svc, self.run_id, step, subjects, {"versions": code_versions(), **predicate})


def run_once(svc: Services, config: NightlyConfig | None = None, *, at: datetime | None = None,
             scheduled_for: datetime | None = None, source: SnapshotSource = catalog_source, again: bool = False,
             quiet: bool = True) -> dict[str, Any]:
    """One nightly run; returns its summary. ``at`` is the run's logical time (default now)."""
    config = config or NightlyConfig()
    at = (at or datetime.now(UTC)).astimezone(UTC)
    run_id = f"nr-{at.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"
    begin(svc, run_id, scheduled_for or at, config.lease_seconds, again=again)
    run = Run(svc, config, run_id, at)
    status, error = "failed", None
    with heartbeat(svc, run_id, max(1.0, config.lease_seconds / 4)):
        try:
            _steps(run, source, quiet)
            status = "partial" if run.missing else "ok"
        except Exception as exc:
            error = f"{exc.code}: {exc.message}" if isinstance(exc, QaiError) else repr(exc)
            _log.exception("nightly run %s failed", run_id)
            try:  # the dashboard and the alerts matter most when a run fails
                if not any(s["name"] == "publish" for s in run.steps):
                    publish(run, status="failed")
            except Exception:
                _log.exception("nightly run %s could not publish its failure", run_id)
        finally:
            summary = {**run.out, "missing": run.missing, "alerts": run.alerts, "at": at.isoformat()}
            _update(svc, run_id, status=status, error=error, finished_at=datetime.now(UTC), summary=summary)
    return {"run_id": run_id, "status": status, "error": error, "steps": run.steps, **summary}


def _steps(run: Run, source: SnapshotSource, quiet: bool) -> None:
    with run.step("refresh"):
        snapshots = refresh(run, source)
    with run.step("workload"):
        outputs = workload(run, snapshots, quiet)
    with run.step("store"):
        frame = store(run, snapshots, outputs)
    with run.step("drift") as record:
        current = champion(run.svc)  # loaded once: drift measures it, retraining has to beat it
        drifts = drift(run, frame, snapshots, current)
        if drifts is None:
            record["status"] = "skipped"
    with run.step("retrain") as record:
        if not retrain(run, frame, drifts, current):
            record["status"] = "skipped"
    with run.step("publish"):
        publish(run, status="partial" if run.missing else "ok")


# --------------------------------------------------------------------------------------- 1. refresh


def online_backends(svc: Services, config: NightlyConfig) -> tuple[list[str], dict[str, str]]:
    """The backends to run on, and those left out with why (status other than online)."""
    from harness.catalog import catalog
    from harness.models import BackendRow

    ids = list(config.backends) or [b.backend_id for b in catalog()]
    with svc.db.read() as s:
        status = {r.backend_id: r.status for r in s.scalars(select(BackendRow).where(BackendRow.backend_id.in_(ids)))}
    off = {b: f"backends.{status[b]}: the backend is {status[b]}" for b in ids if status.get(b, "online") != "online"}
    return [b for b in ids if b not in off], off


def refresh(run: Run, source: SnapshotSource) -> list[CalibrationSnapshot]:
    """Each backend's calibration from ``source``, imported: a changed one gets a new snapshot id,
    and the old one stays (snapshots are never updated in place)."""
    from harness.calibration import pinned
    from harness.service import ensure_catalog_rows

    ids, off = online_backends(run.svc, run.config)
    run.missing.update(off)
    snapshots, subjects = [], {}
    for backend_id in ids:
        try:
            snap = pinned(source(backend_id, run.at))
            ensure_catalog_rows(run.svc, [snap])
        except Exception as exc:  # one vendor's failure is that backend's, not the run's
            run.missing[backend_id] = (f"{exc.code}: {exc.message}" if isinstance(exc, QaiError)
                                       else f"calibration refresh failed: {exc!r}")
            continue
        data = canonical_json(snap.to_json())
        path = f"nightly/calibration/{hashlib.sha256(data).hexdigest()}.json"
        _put(run.svc, path, data)
        subjects[path] = hashlib.sha256(data).hexdigest()
        snapshots.append(snap)
    if len(snapshots) < 2:
        raise QaiError("nightly.too_few_backends", f"{len(snapshots)} backend(s) refreshed; drift and training need "
                       "two", status=503, details={"missing": run.missing})
    run.out["snapshots"] = {s.backend_id: s.id for s in snapshots}
    run.attest("refresh", subjects, inputs={"backends": ids, "source": getattr(source, "__name__", str(source))},
               outputs={"snapshots": run.out["snapshots"]}, missing=dict(run.missing))
    return snapshots


def _put(svc: Services, path: str, data: bytes) -> None:
    from orchestrator.objects import put_once

    put_once(svc.objects, path, data)


# --------------------------------------------------------------------------------------- 2. workload


def workload(run: Run, snapshots: Sequence[CalibrationSnapshot], quiet: bool) -> list[Any]:
    """The curated workload on every refreshed backend. A backend none of whose tasks ran is missing."""
    from harness.run import AdapterConfig, build_tasks, run_tasks
    from sdk.output import progress

    tasks = build_tasks(run.config.workload, snapshots)
    with progress(quiet) as bar:
        job = bar.add_task("nightly workload", total=len(tasks))
        outputs = run_tasks(tasks, AdapterConfig(), workers=run.config.workers, on_done=lambda _o: bar.advance(job))
    by_backend: dict[str, list[dict[str, Any]]] = {}
    for out in outputs:
        for r in out.rows:
            by_backend.setdefault(r["backend_id"], []).append(r)
    for snap in snapshots:
        rows = by_backend.get(snap.backend_id, [])
        if rows and all(r["status"] != "ok" for r in rows):
            codes = sorted({str(r["error_code"]) for r in rows})
            run.missing[snap.backend_id] = f"every task failed ({', '.join(codes)})"
    return outputs


# --------------------------------------------------------------------------------------- 3. store


def dataset_dir(svc: Services) -> Path:
    return svc.settings.home / "nightly" / "datasets"


def store(run: Run, snapshots: Sequence[CalibrationSnapshot], outputs: Sequence[Any]) -> pd.DataFrame:
    """Parquet, ``em_results`` and the signed dataset manifest (one ledgered transaction, see
    ``harness.service.persist_run``), plus the aggregated snapshot of the night."""
    import pandas as pd

    from harness.run import read_parquet, sorted_rows
    from harness.service import persist_run, summarize

    rows = sorted_rows(outputs)
    directory = dataset_dir(run.svc)
    directory.mkdir(parents=True, exist_ok=True)
    record = persist_run(run.svc, run.config.workload, rows, outputs, snapshots,
                         local_path=str(directory / f"{run.run_id}.parquet"))
    aggregate = {"run_id": run.run_id, "at": run.at.isoformat(), "dataset": record.run_id,
                 "by_backend_method": summarize(rows), "missing": dict(run.missing)}
    data = canonical_json(aggregate)
    aggregate_path = f"nightly/aggregates/{hashlib.sha256(data).hexdigest()}.json"
    _put(run.svc, aggregate_path, data)
    histograms = {r["raw_histogram_path"]: r["raw_histogram_path"].rsplit("/", 1)[1].split(".")[0]
                  for r in read_parquet(run.svc.objects.get(record.parquet_path)).to_pylist()
                  if r.get("raw_histogram_path")}
    run.attest("workload", histograms, inputs={"snapshots": run.out["snapshots"]},
               parameters=run.config.workload.to_json(), missing=dict(run.missing))
    run.attest("store", {record.parquet_path: record.parquet_sha256,
                         record.dataset_manifest_path: hashlib.sha256(
                             run.svc.objects.get(record.dataset_manifest_path)).hexdigest(),
                         aggregate_path: hashlib.sha256(data).hexdigest()},
               inputs={"snapshots": run.out["snapshots"]},
               outputs={"dataset": record.run_id, "rows": record.rows, "failed_rows": record.failed_rows,
                        "ledger_index": record.ledger_index})
    run.out.update(dataset=record.run_id, dataset_parquet=record.parquet_path, parquet_sha256=record.parquet_sha256,
                   aggregate=aggregate["by_backend_method"], local_parquet=record.local_parquet)
    frame = pd.DataFrame(rows)
    return frame[frame["status"] == "ok"].reset_index(drop=True)


# --------------------------------------------------------------------------------------- 4. drift


@dataclass(frozen=True)
class Champion:
    version: str  # "em-policy/3"
    model: PolicyModel
    holdout_mae: float | None


def champion(svc: Services) -> Champion | None:
    from em_policy import registry
    from em_policy.bundle import loads

    try:
        mv = registry.resolve(svc)
    except QaiError as exc:
        if exc.code == "em_policy.model_unavailable":
            return None
        raise
    return Champion(f"{mv.name}/{mv.version}", loads(registry.load_bundle(svc, mv)),
                    mv.metrics.get("nightly_holdout_mae"))


def decisions(model: PolicyModel, frame: pd.DataFrame, config: TrainConfig) -> pd.DataFrame:
    """The model's decisions on every group of ``frame``, scored against what was observed, with
    each group's split under ``config`` (so held-out circuits can be selected)."""
    import pandas as pd

    from em_policy.policy import history_features, outcomes, prepare, with_mlqem

    prep = prepare(frame, config)
    prep = with_mlqem(prep, pd.Series(model.mitigate(prep.groups.reset_index()), index=prep.groups.index))
    hist = history_features(prep, model.history)
    res = outcomes(model, prep, hist, prep.groups["split"].notna())
    split = prep.groups["split"].reset_index()
    return res.merge(split, on=["circuit_id", "observable", "calibration_snapshot_id"], how="left")


def drift(run: Run, frame: pd.DataFrame, snapshots: Sequence[CalibrationSnapshot], current: Champion | None
          ) -> dict[str, BackendDrift] | None:
    """Per backend, the champion's prediction drift and the calibration's feature drift. None
    when there is no champion yet (nothing to drift from)."""
    from harness.backends import get_snapshot

    if current is None:
        run.out["drift"] = {}
        return None
    res = decisions(current.model, frame, replace(run.config.train, holdout_backends=()))
    by_backend = prediction_drift(res)
    trained = current.model.metadata.get("training_snapshots", [])
    out: dict[str, BackendDrift] = {}
    for snap in snapshots:
        if snap.backend_id in run.missing:
            continue
        base_ids = sorted(s for s in trained if s.split("@", 1)[0] == snap.backend_id)
        shift = None
        if base_ids:  # the latest calibration of this backend the champion trained on
            base = get_snapshot(run.svc.db, base_ids[-1]) if base_ids[-1] != snap.id else snap
            shift = psi(calibration_errors(base), calibration_errors(snap))
        out[snap.backend_id] = judge(snap.backend_id, by_backend.get(snap.backend_id), shift,
                                     run.config.thresholds, current.holdout_mae)
    mae_limit = run.config.thresholds.mae(current.holdout_mae)
    limits = {"mae": mae_limit, "bias": run.config.thresholds.bias, "feature_shift": run.config.thresholds.psi}
    for d in out.values():
        for metric in d.over:
            value = getattr(d, metric)
            run.alerts.append({"kind": "drift", "backend_id": d.backend_id, "metric": metric, "value": value,
                               "threshold": limits[metric],
                               "message": f"{d.backend_id}: {metric} {value:.4f} is over its threshold "
                                          f"{limits[metric]:.4f} (champion {current.version})"})
    predicted = (res[res["observed_fidelity"].notna()]
                 .groupby(["backend_id", "method"])[["expected_fidelity", "observed_fidelity"]].mean().reset_index())
    run.out.update(
        champion=current.version, thresholds={**run.config.thresholds.to_json(), "mae_limit": mae_limit},
        drift={b: d.to_json() for b, d in sorted(out.items())},
        predicted_vs_observed=[{"backend_id": r.backend_id, "method": r.method, "predicted": float(r.expected_fidelity),
                                "observed": float(r.observed_fidelity)} for r in predicted.itertuples()])
    run.attest("drift", {}, inputs={"dataset": run.out["dataset"], "parquet_sha256": run.out["parquet_sha256"],
                                    "champion": current.version},
               parameters=run.config.thresholds.to_json(), outputs={"drift": run.out["drift"]})
    return out


# --------------------------------------------------------------------------------------- 5. retrain


def training_frame(svc: Services, tonight: tuple[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """Every stored nightly dataset up to tonight's, in run order: where two measure the same
    (circuit, observable, snapshot, method), the later one counts. Returns the frame and the
    harness dataset run ids it was built from."""
    import pandas as pd

    from em_policy.dataset import GROUP_KEY
    from harness.run import read_parquet

    with svc.db.read() as s:
        rows = s.scalars(select(NightlyRunRow).order_by(NightlyRunRow.scheduled_for, NightlyRunRow.started_at)).all()
        datasets = [(r.summary["dataset"], r.summary["dataset_parquet"]) for r in rows
                    if r.summary.get("dataset") and r.status in ("ok", "partial")]
    datasets.append(tonight)  # (harness run id, Parquet key) of this run, not finished yet
    frames = [read_parquet(svc.objects.get(path)).to_pandas() for _, path in datasets]
    frame = pd.concat(frames, ignore_index=True)
    frame = frame[frame["status"] == "ok"].drop_duplicates([*GROUP_KEY, "method"], keep="last")
    return frame.reset_index(drop=True), [d for d, _ in datasets]


def _mae(res: pd.DataFrame) -> float | None:
    seen = res[res["observed_fidelity"].notna()]
    if seen.empty:
        return None
    return float((seen["expected_fidelity"] - seen["observed_fidelity"]).abs().mean())


def retrain(run: Run, frame: pd.DataFrame, drifts: Mapping[str, BackendDrift] | None, current: Champion | None
            ) -> bool:
    """Train a candidate when drift is over a threshold (or there is no champion yet); promote it
    only if it beats the champion on the post-drift holdout: tonight's held-out circuits on the
    drifted backends (every backend when none drifted). Returns whether a candidate was trained."""
    from em_policy import registry
    from em_policy.bundle import dumps
    from em_policy.dataset import load
    from em_policy.policy import fit
    from em_policy.training import register_fitted

    drifted = sorted(b for b, d in (drifts or {}).items() if d.over)
    if drifts is not None and not drifted and not run.config.force_retrain:
        run.out["retrain"] = {"trained": False, "reason": "no drift over its threshold"}
        return False
    data, datasets = training_frame(run.svc, (run.out["dataset"], run.out["dataset_parquet"]))
    with tempfile.TemporaryDirectory(prefix="qai-nightly-") as tmp:
        path = Path(tmp, "training.parquet")
        data.to_parquet(path, index=False)
        blob = path.read_bytes()
        data, dataset_sha256, _ = load([path])
    training_path = f"nightly/training/{hashlib.sha256(blob).hexdigest()}.parquet"
    _put(run.svc, training_path, blob)
    fitted = fit(data, run.config.train, dataset_sha256=dataset_sha256)

    # the post-drift holdout: circuits held out of both models' training, on tonight's data
    holdout_backends = drifted or sorted(frame["backend_id"].unique())

    def holdout_mae(model: PolicyModel) -> float | None:
        res = decisions(model, frame, run.config.train)
        return _mae(res[(res["split"] == "holdout_circuits") & res["backend_id"].isin(holdout_backends)])

    candidate_mae = holdout_mae(fitted.model)
    champion_mae = holdout_mae(current.model) if current is not None else None
    better = current is None or (candidate_mae is not None and champion_mae is not None
                                 and candidate_mae < champion_mae)
    extra = {} if candidate_mae is None else {"nightly_holdout_mae": candidate_mae}
    mv = register_fitted(run.svc, fitted, dumps(fitted.model), dataset_sha256, run.config.train, extra)
    version = f"{mv.name}/{mv.version}"
    outcome: dict[str, Any] = {
        "trained": True, "reason": ("no champion yet" if current is None else
                                    f"drift on {', '.join(drifted)}" if drifted else "forced"),
        "candidate": version, "candidate_holdout_mae": candidate_mae,
        "champion": current.version if current else None, "champion_holdout_mae": champion_mae,
        "holdout_backends": holdout_backends, "promoted": False, "datasets": datasets,
        "training_frame": {"path": training_path, "sha256": hashlib.sha256(blob).hexdigest(), "rows": len(data)}}
    if better:
        registry.promote(run.svc, mv.version)
        outcome["promoted"] = True
    else:  # never silently: the run says so, and so does an alert
        outcome["not_promoted_because"] = (f"its holdout MAE {candidate_mae} does not beat the champion's "
                                           f"{champion_mae}")
        run.alerts.append({"kind": "model_not_promoted", "backend_id": None, "metric": "holdout_mae",
                           "value": candidate_mae, "threshold": champion_mae,
                           "message": f"{version} was trained but not promoted: {outcome['not_promoted_because']}"})
    run.out["retrain"] = outcome
    run.out["model_version"] = version if better else (current.version if current else None)
    run.attest("retrain", {mv.bundle_path: mv.sha256},
               inputs={"datasets": datasets, "training_frame": outcome["training_frame"],
                       "champion": outcome["champion"]},
               parameters=run.config.train.to_json(),
               outputs={k: v for k, v in outcome.items() if k not in ("datasets", "training_frame")}
               | {"model_ledger_index": mv.ledger_index})
    return True


# --------------------------------------------------------------------------------------- 6. publish


def report_data(svc: Services, run: Run, status: str) -> dict[str, Any]:
    """The dashboard's input: this run and every earlier one (em_policy.nightly.report.render)."""
    from em_policy import registry
    from scheduler.service import DecisionRow

    with svc.db.read() as s:
        rows = s.scalars(select(NightlyRunRow).order_by(NightlyRunRow.scheduled_for, NightlyRunRow.started_at)).all()
        decisions_by_backend = {str(b): int(n) for b, n in s.execute(
            select(DecisionRow.chosen_backend, func.count()).where(DecisionRow.chosen_backend.is_not(None))
            .group_by(DecisionRow.chosen_backend))}
    current = {**run.out, "missing": run.missing}
    history = []
    for r in rows:
        summary = current if r.run_id == run.run_id else r.summary
        if r.run_id != run.run_id and r.status not in ("ok", "partial"):
            continue
        fidelity: dict[str, dict[str, float]] = {}
        multiplier: dict[str, list[float]] = {}
        for a in summary.get("aggregate", []):
            if a["mean_fidelity"] is not None:
                fidelity.setdefault(a["backend_id"], {})[a["method"]] = a["mean_fidelity"]
                multiplier.setdefault(a["method"], []).append(a["mean_shot_multiplier"])
        day = datetime.fromisoformat(summary.get("at", r.scheduled_for.isoformat())).date().isoformat()
        history.append({"run_id": r.run_id, "day": day,
                        "model_version": summary.get("model_version") or summary.get("champion"),
                        "fidelity": fidelity,
                        "shot_multiplier": {m: sum(v) / len(v) for m, v in sorted(multiplier.items())},
                        "drift": {b: {k: d[k] for k in ("mae", "bias", "feature_shift")}
                                  for b, d in summary.get("drift", {}).items()},
                        "missing": summary.get("missing", {})})
    try:
        versions = registry.list_versions(svc)
    except QaiError:
        versions = []
    models = [{"version": f"{v.name}/{v.version}", "created_at": v.created_at, "promoted": bool(v.aliases),
               "holdout_mae": v.metrics.get("nightly_holdout_mae"), "champion": "champion" in v.aliases}
              for v in versions]
    thresholds = run.out.get("thresholds") or {**run.config.thresholds.to_json(),
                                                "mae_limit": run.config.thresholds.mae(None)}
    return {"run_id": run.run_id, "started_at": run.at.isoformat(), "status": status,
            "model_version": run.out.get("model_version") or run.out.get("champion"),
            "thresholds": {"mae": thresholds["mae_limit"], "bias": thresholds["bias"],
                           "feature_shift": thresholds["psi"]},
            "history": history, "predicted_vs_observed": run.out.get("predicted_vs_observed", []),
            "models": models, "scheduler_decisions": dict(sorted(decisions_by_backend.items())),
            "steps": [dict(s) for s in run.steps], "alerts": list(run.alerts)}


def missing_streaks(svc: Services, run: Run) -> dict[str, int]:
    """For each backend missing tonight: how many runs in a row (tonight included) it has been missing."""
    with svc.db.read() as s:
        earlier = s.scalars(select(NightlyRunRow).where(NightlyRunRow.run_id != run.run_id,
                                                        NightlyRunRow.status.in_(("ok", "partial")))
                            .order_by(NightlyRunRow.scheduled_for.desc(), NightlyRunRow.started_at.desc())).all()
    out = {}
    for backend in run.missing:
        n = 1
        for r in earlier:
            if backend not in r.summary.get("missing", {}):
                break
            n += 1
        out[backend] = n
    return out


def publish(run: Run, *, status: str) -> None:
    """The dashboard (object store and ``<home>/reports/<run_id>/``), the alerts (webhook and
    gauges) and the publish statement."""
    from em_policy.nightly import alerts
    from em_policy.nightly.report import render

    streaks = missing_streaks(run.svc, run)
    for backend, n in sorted(streaks.items()):
        if n > run.config.missing_runs_alert:
            run.alerts.append({"kind": "backend_missing", "backend_id": backend, "metric": "missing_runs",
                               "value": float(n), "threshold": float(run.config.missing_runs_alert),
                               "message": f"{backend} has been missing for {n} runs: {run.missing[backend]}"})
    files = render(report_data(run.svc, run, status))
    subjects = {}
    local = run.svc.settings.home / "reports" / run.run_id
    local.mkdir(parents=True, exist_ok=True)
    for name, data in sorted(files.items()):
        path = f"nightly/reports/{run.run_id}/{name}"
        _put(run.svc, path, data)
        subjects[path] = hashlib.sha256(data).hexdigest()
        (local / name).write_bytes(data)
    run.out["report"] = {"path": f"nightly/reports/{run.run_id}/index.html", "local": str(local / "index.html")}
    sent = alerts.deliver(run.alerts, run_id=run.run_id, url=run.config.webhook_url,
                          link=run.config.report_url or run.out["report"]["local"])
    run.out["webhook"] = sent
    run.out["missing_streaks"] = streaks  # the services' /metrics restore the gauges from the summary
    alerts.export(run.run_id, status, run.steps, run.out.get("drift", {}), streaks, run.alerts,
                  predicted_vs_observed=run.out.get("predicted_vs_observed", []))
    run.attest("publish", subjects, inputs={"dataset": run.out.get("dataset"), "status": status},
               outputs={"alerts": run.alerts, "webhook": sent})


__all__ = ["CURATED", "STEPS", "NightlyConfig", "run_once"]
