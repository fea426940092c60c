"""Drift: how far tonight's data has moved from what the serving model was trained and validated on.

Two signals per backend, each against a threshold:

- **prediction drift**: the champion's expected post-EM fidelity against the fidelity tonight's
  harness observed for the method it chose: MAE and bias (mean predicted − observed). The MAE
  threshold scales with the model's own holdout MAE, so a model that was validated at 0.01 alarms
  earlier than one validated at 0.03; bias has a fixed threshold, because a model validated as
  unbiased should stay so.
- **feature drift**: the population stability index (PSI) of the backend's calibration error
  distribution (every gate error and readout error of the snapshot, in log10) against the snapshot
  the champion was trained on. PSI ≥ 0.25 is the usual "significant shift" line (Siddiqi, *Credit
  Risk Scorecards*, 2006). A device whose errors doubled moves every value by log10(2) = 0.3 and
  lands far above it; day-to-day recalibration noise does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from harness.calibration import CalibrationSnapshot

PSI_BINS = 10
PSI_EPSILON = 1e-4  # an empty bin counts as this share, so ln(a/e) stays finite
ERROR_FLOOR = 1e-6  # log10 of a zero error would be -inf: a perfect gate counts as this


@dataclass(frozen=True)
class Thresholds:
    mae_factor: float = 2.0  # × the champion's holdout MAE ...
    mae_floor: float = 0.05  # ... but never below this (a tiny holdout MAE would alarm on noise)
    bias: float = 0.04
    psi: float = 0.25

    def mae(self, holdout_mae: float | None) -> float:
        return self.mae_floor if holdout_mae is None else max(self.mae_floor, self.mae_factor * holdout_mae)

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Thresholds:
        return replace(cls(), **{k: float(v) for k, v in data.items() if k in cls.__dataclass_fields__})


def calibration_errors(snap: CalibrationSnapshot) -> list[float]:
    """log10 of every gate error and readout error of the snapshot."""
    values = [v["error"] for per in snap.gates.values() for v in per.values()]
    values += [p for ro in snap.readout_errors.values() for p in (ro["p01"], ro["p10"])]
    return [math.log10(max(float(v), ERROR_FLOOR)) for v in values]


def psi(expected: Sequence[float], actual: Sequence[float], bins: int = PSI_BINS) -> float:
    """Population stability index of ``actual`` against ``expected``, with bins at the deciles of
    ``expected`` (open at both ends, so values beyond its range fall in the outer bins)."""
    if not expected or not actual:
        raise ValueError("psi needs two non-empty samples")
    edges = np.unique(np.quantile(np.asarray(expected, float), np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=len(edges) + 1) / len(expected)
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=len(edges) + 1) / len(actual)
    e, a = np.maximum(e, PSI_EPSILON), np.maximum(a, PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def prediction_drift(decisions: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per backend: MAE and bias of expected against observed fidelity over the champion's decisions
    (``em_policy.policy.outcomes`` rows), and how many decisions had an observation."""
    out: dict[str, dict[str, float]] = {}
    seen = decisions[decisions["observed_fidelity"].notna()]
    for backend, part in seen.groupby("backend_id", sort=True):
        diff = part["expected_fidelity"].astype(float) - part["observed_fidelity"].astype(float)
        out[str(backend)] = {"mae": float(diff.abs().mean()), "bias": float(diff.mean()), "n": float(len(diff))}
    return out


@dataclass(frozen=True)
class BackendDrift:
    backend_id: str
    mae: float | None
    bias: float | None
    feature_shift: float | None  # PSI against the training snapshot; None for a backend never trained on
    over: tuple[str, ...]  # the metrics above their thresholds

    def to_json(self) -> dict[str, Any]:
        return {"mae": self.mae, "bias": self.bias, "feature_shift": self.feature_shift, "over": list(self.over)}


def judge(backend_id: str, prediction: Mapping[str, float] | None, feature_shift: float | None,
          thresholds: Thresholds, holdout_mae: float | None) -> BackendDrift:
    mae = None if prediction is None else prediction["mae"]
    bias = None if prediction is None else prediction["bias"]
    over = []
    if mae is not None and mae > thresholds.mae(holdout_mae):
        over.append("mae")
    if bias is not None and abs(bias) > thresholds.bias:
        over.append("bias")
    if feature_shift is not None and feature_shift > thresholds.psi:
        over.append("feature_shift")
    return BackendDrift(backend_id, mae, bias, feature_shift, tuple(over))
