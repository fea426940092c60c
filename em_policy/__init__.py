"""EM policy engine and ML-QEM: which error-mitigation method to run, at what cost, with what
expected fidelity and confidence. Public API (imported lazily, so ``qai`` starts without sklearn):

- ``MLQEM``: learned error mitigation (OLS, random forest, MLP), fit/predict on harness rows;
- ``TrainConfig``, ``fit``: train the policy; ``dumps``/``loads``: its deterministic bundle;
- ``PolicyService``, ``PredictRequest``, ``Prediction``: predictions as ``POST /v1/predict`` serves them;
- ``registry``: MLflow registration, signing and ledgering of versions.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "MLQEM": "em_policy.mlqem", "TrainConfig": "em_policy.policy", "fit": "em_policy.policy",
    "PolicyModel": "em_policy.policy", "dumps": "em_policy.bundle", "loads": "em_policy.bundle",
    "PolicyService": "em_policy.service", "PredictRequest": "em_policy.service", "Prediction": "em_policy.service",
    "train_and_register": "em_policy.training", "evaluate": "em_policy.evaluate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # PEP 562: import on first use
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'em_policy' has no attribute {name!r}")
