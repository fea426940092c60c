"""Training data for the policy engine: harness Parquet rows, split and pivoted.

A *group* is one (circuit, observable, calibration snapshot): the harness measured every method on
it, so a group is one decision the policy could have made. The split is deterministic:

- ``train``: circuits not held out, on backends not held out;
- ``holdout_circuits``: held-out circuits on the training backends;
- ``holdout``: held-out circuits on held-out backends (never seen in any way in training): the
  figures that count;
- ``holdout_history``: training circuits on held-out backends. Never trained on; they stand for
  the past runs on that backend that the history features summarise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sdk.errors import QaiError

GROUP_KEY = ["circuit_id", "observable", "calibration_snapshot_id"]
UNMITIGATED = "unmitigated"
ML_QEM = "ml-qem"
SPLITS = ("train", "holdout_circuits", "holdout", "holdout_history")
REQUIRED_COLUMNS = ("circuit_id", "observable", "calibration_snapshot_id", "backend_id", "method", "status", "ideal",
                    "noisy", "mitigated", "mitigated_fidelity", "shot_multiplier", "shots", "obs_norm", "obs_identity")


@dataclass(frozen=True)
class Dataset:
    rows: pd.DataFrame  # harness rows, status ok, with a ``split`` column
    sha256: str  # of the input Parquet files' bytes, in name order
    files: tuple[str, ...]

    def methods(self) -> list[str]:
        return sorted(self.rows["method"].unique())


def load(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, str, tuple[str, ...]]:
    """Harness Parquet files (or directories of them) as one frame, and the hash of their bytes."""
    import pyarrow.parquet as pq

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.parquet"))
        elif p.exists():
            files.append(p)
        else:
            raise QaiError("em_policy.no_data", f"{p} does not exist", status=404)
    if not files:
        raise QaiError("em_policy.no_data", "no Parquet files in the given paths", status=404)
    digest = hashlib.sha256()
    frames = []
    for f in sorted(files):
        data = f.read_bytes()
        digest.update(hashlib.sha256(data).digest())
        frames.append(pq.read_table(f).to_pandas())
    frame = pd.concat(frames, ignore_index=True)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame]
    if missing:
        raise QaiError("em_policy.bad_data", f"not harness rows of version ≥ 1.0 with observable encodings: missing "
                       f"{missing}", status=422)
    return frame, digest.hexdigest(), tuple(str(f) for f in sorted(files))


def held_out_circuit(circuit_id: str, seed: int, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}|holdout|{circuit_id}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def split(frame: pd.DataFrame, holdout_backends: Sequence[str], *, seed: int, fraction: float) -> pd.DataFrame:
    ok = frame[frame["status"] == "ok"].copy()
    dup = ok.duplicated([*GROUP_KEY, "method"])
    if dup.any():  # e.g. the same seed run twice on one snapshot: which copy counts would be arbitrary
        first = ok.loc[dup, [*GROUP_KEY, "method"]].iloc[0].to_dict()
        raise QaiError("em_policy.bad_data", f"{int(dup.sum())} rows measure a (circuit, observable, snapshot, "
                       "method) that another row already measures: pass each harness run once", status=422,
                       details={"first": {k: str(v) for k, v in first.items()}})
    unknown = sorted(set(holdout_backends) - set(ok["backend_id"]))
    if unknown:
        raise QaiError("em_policy.bad_config", f"held-out backends {unknown} have no rows in the data", status=422)
    if len(set(ok["backend_id"]) - set(holdout_backends)) < 2:
        raise QaiError("em_policy.bad_config", "training needs at least two backends that are not held out", status=422)
    circuit_out = ok["circuit_id"].map(lambda c: held_out_circuit(str(c), seed, fraction))
    backend_out = ok["backend_id"].isin(list(holdout_backends))
    ok["split"] = np.select([~backend_out & ~circuit_out, ~backend_out & circuit_out, backend_out & circuit_out],
                            ["train", "holdout_circuits", "holdout"], default="holdout_history")
    return ok.sort_values([*GROUP_KEY, "method"], kind="stable").reset_index(drop=True)


def pivot(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    """One row per group, one column per method."""
    return rows.pivot_table(index=GROUP_KEY, columns="method", values=column, aggfunc="first").sort_index()


def group_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Per group: the unmitigated row's features (every method's row carries the same ones)."""
    base = rows[rows["method"] == UNMITIGATED].set_index(GROUP_KEY).sort_index()
    if base.empty:
        raise QaiError("em_policy.bad_data", "the data has no unmitigated rows: every group needs one", status=422)
    return base


def summary(rows: pd.DataFrame) -> dict[str, Any]:
    counts = rows[rows["method"] == UNMITIGATED].groupby("split").size().to_dict()
    return {"groups": {s: int(counts.get(s, 0)) for s in SPLITS},
            "backends": sorted(rows["backend_id"].unique()), "methods": sorted(rows["method"].unique())}
