"""Training as the CLI and the nightly pipeline run it: fit, bundle, register (MLflow, signed,
ledgered), store the feature table, promote."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_policy.bundle import dumps
from em_policy.dataset import load
from em_policy.policy import Fitted, TrainConfig, fit
from sdk.output import progress

if TYPE_CHECKING:
    from em_policy.registry import ModelVersion
    from orchestrator.services import Services

FEATURE_SET_PREFIX = "em-policy/model_features"


def feature_tables(fitted: Fitted, dataset_sha256: str, config: TrainConfig) -> list[tuple[str, bytes]]:
    """The ``model_features`` set: one Parquet file per calibration snapshot (every group measured
    on it, its features, history and per-method fidelity), versioned by snapshot id, dataset and
    training configuration (the split, history and ML-QEM columns depend on it)."""
    from sdk.canonical import canonical_json

    version = f"{dataset_sha256[:16]}-{hashlib.sha256(canonical_json(config.to_json())).hexdigest()[:12]}"
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    prep = fitted.prep
    frame = prep.groups.join(fitted.hist)
    fid = prep.fidelity.add_prefix("fidelity:")
    mult = prep.multiplier.add_prefix("shot_multiplier:")
    frame = frame.join(fid).join(mult).reset_index()
    prefixes = ("feat_", "dev_", "obs_", "hist_", "fidelity:", "shot_multiplier:")
    names = ("circuit_id", "observable", "calibration_snapshot_id", "backend_id", "split", "family")
    keep = [c for c in frame.columns if c.startswith(prefixes) or c in names]
    out = []
    for snap, part in frame[keep].groupby("calibration_snapshot_id", sort=True):
        buf = io.BytesIO()
        table = pa.Table.from_pandas(part.sort_values(["circuit_id", "observable"]), preserve_index=False)
        pq.write_table(table, buf, compression="zstd")
        # object keys take no "@": the snapshot id keeps its backend and time, joined by "_"
        out.append((f"{FEATURE_SET_PREFIX}/{str(snap).replace('@', '_')}/{version}.parquet",
                    buf.getvalue()))
    return out


def register_fitted(svc: Services, fitted: Fitted, bundle: bytes, dataset_sha256: str, config: TrainConfig,
                    extra_metrics: dict[str, float] | None = None) -> ModelVersion:
    """Store the feature tables and register ``bundle`` (``fitted``'s model) with its validation
    figures, plus ``extra_metrics`` (the nightly pipeline's holdout MAE)."""
    from em_policy import registry
    from orchestrator.objects import put_once

    for path, blob in feature_tables(fitted, dataset_sha256, config):
        put_once(svc.objects, path, blob)
    meta = fitted.model.metadata
    metrics = {k: float(v) for k, v in meta["validation"].items() if isinstance(v, float)}
    metrics.update(extra_metrics or {})
    return registry.register(svc, bundle, params=config.to_json(), metrics=metrics, dataset_sha256=dataset_sha256,
                             metadata={k: meta[k] for k in ("ranker", "methods", "training_snapshots",
                                                            "supports_snapshots_since", "training_shots")})


def train_and_register(data: Sequence[str], config: TrainConfig, *, register: bool = True, promote: bool = False,
                       out: Path | None = None, quiet: bool = False, svc: Services | None = None) -> dict[str, Any]:
    frame, dataset_sha256, files = load(data)
    with progress(quiet) as bar:
        task = bar.add_task("training (leave-one-backend-out validation)", total=None)
        fitted = fit(frame, config, dataset_sha256=dataset_sha256)
        bar.update(task, description="bundling")
        bundle = dumps(fitted.model)
    sha = hashlib.sha256(bundle).hexdigest()
    meta = fitted.model.metadata
    result: dict[str, Any] = {"sha256": sha, "bytes": len(bundle), "dataset_sha256": dataset_sha256,
                              "files": list(files), "ranker": meta["ranker"], "validation": meta["validation"],
                              "training_groups": meta["training_groups"]}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(bundle)
        result["bundle"] = str(out)
    if not register:
        return result
    from em_policy import registry

    if svc is None:
        from orchestrator.services import get_services

        svc = get_services()
    mv = register_fitted(svc, fitted, bundle, dataset_sha256, config)
    result.update({"version": f"{mv.name}/{mv.version}", "ledger_index": mv.ledger_index, "run_id": mv.run_id})
    first = not registry.list_versions(svc) or all("champion" not in v.aliases for v in registry.list_versions(svc))
    if promote or first:  # the very first model has nothing to beat; later ones are promoted explicitly
        registry.promote(svc, mv.version)
        result["promoted"] = True
    return result
