"""ML-QEM: learned error mitigation (Liao et al., "Machine learning for practical quantum error
mitigation", Nature Machine Intelligence 6, 2024).

A regressor maps (circuit features, device-noise features, observable encoding, the noisy
expectation value) to the ideal expectation value. It is trained on harness rows, whose ideal
values come from exact statevector simulation. At run time it costs only the unmitigated shots;
its training shots are an overhead amortised over the jobs it serves, reported separately.

Values are learned in units of the observable's norm around its maximally mixed value
(``features.scaled``), so one model serves energies, cut sizes and parities alike, and the model
learns the *correction* ideal − noisy rather than the ideal value itself: where it knows little
(few similar circuits) a forest then predicts a small correction instead of an average of other
circuits' values. On the harness's held-out backends this halves a forest's error.

Estimators follow scikit-learn's fit/predict and can be passed around; ``kind`` picks OLS (the
baseline), a random forest or an MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from em_policy.features import MLQEM_FEATURES, add_derived, matrix, scaled, unscaled
from sdk.errors import QaiError

if TYPE_CHECKING:
    import pandas as pd

KINDS = ("ols", "rf", "mlp")
Array = np.ndarray[Any, Any]


@dataclass
class MLQEM:
    kind: str = "rf"
    seed: int = 0
    n_estimators: int = 200
    features: tuple[str, ...] = MLQEM_FEATURES
    model: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise QaiError("em_policy.bad_config", f"ML-QEM kind must be one of {KINDS}, got {self.kind!r}", status=422)

    def _estimator(self) -> Any:
        if self.kind == "ols":
            from sklearn.linear_model import LinearRegression

            return LinearRegression()
        if self.kind == "rf":
            from sklearn.ensemble import RandomForestRegressor

            # min_samples_leaf 3: a leaf averages a few circuits, so one noisy histogram does not set it
            return RandomForestRegressor(n_estimators=self.n_estimators, min_samples_leaf=3, max_features=0.5,
                                         random_state=self.seed, n_jobs=1)
        from sklearn.neural_network import MLPRegressor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(64, 32), activation="relu",
                                                            alpha=1e-3, max_iter=2000, early_stopping=True,
                                                            random_state=self.seed))

    def fit(self, rows: pd.DataFrame) -> MLQEM:
        """``rows``: harness rows of the ``unmitigated`` method (one per circuit, observable, snapshot)."""
        frame = add_derived(rows)
        if len(frame) < 10:
            raise QaiError("em_policy.not_enough_data", f"ML-QEM needs at least 10 rows, got {len(frame)}", status=422)
        x = matrix(frame, self.features)
        y = scaled(frame["ideal"].to_numpy(float), frame["obs_identity"].to_numpy(float),
                   frame["obs_norm"].to_numpy(float)) - frame["noisy_scaled"].to_numpy(float)
        self.model = self._estimator().fit(x, y)
        return self

    def correction(self, x: Array) -> Array:
        """The predicted ideal − noisy, in scaled units."""
        if self.model is None:
            raise QaiError("em_policy.model_unavailable", "ML-QEM is not fitted", status=503)
        return np.asarray(self.model.predict(x), dtype=np.float64)

    def predict(self, rows: pd.DataFrame) -> Array:
        """Mitigated expectation values, clipped to the observable's range like every harness method."""
        frame = add_derived(rows)
        x = matrix(frame, self.features)
        value = unscaled(frame["noisy_scaled"].to_numpy(float) + self.correction(x),
                         frame["obs_identity"].to_numpy(float), frame["obs_norm"].to_numpy(float))
        return np.asarray(np.clip(value, frame["obs_min"].to_numpy(float), frame["obs_max"].to_numpy(float)),
                          dtype=np.float64)
