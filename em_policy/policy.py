"""The EM policy: which mitigation method to run, at what cost, with what expected fidelity.

Three learned parts, fit on the harness's groups (one group = one circuit and observable measured
on one calibration snapshot with every method):

- the **ranker** (a random forest or XGBoost classifier, whichever validates better) predicts
  which method is best for the features and the shot budget;
- the **regressor** (an ensemble of MLPs, 64/32 ReLU) predicts every method's expected post-EM
  fidelity and shot multiplier; the ensemble's spread is its uncertainty;
- the **confidence** is a logistic calibration of (ranker probability, ensemble spread) to the
  probability that the choice is *right*: within ``right_tolerance`` of the oracle's fidelity.

The label of a (group, budget) is the method with the best fidelity among those whose shot
multiplier fits the budget; methods within ``tie_tolerance`` of the best count as tied, and a tie
goes to the cheaper method (lower multiplier). ML-QEM's fidelity on training groups comes from
leave-one-backend-out predictions, so the ranker learns how ML-QEM does on a backend it has not
seen, which is how it is used.

Validation is leave-one-backend-out over the training backends throughout: the policy must be
right on backends it has never seen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

from em_policy.dataset import GROUP_KEY, ML_QEM, UNMITIGATED, group_frame, pivot, split
from em_policy.features import (
    CIRCUIT_FEATURES,
    DEVICE_FEATURES,
    HISTORY_FEATURES,
    OBSERVABLE_FEATURES,
    POLICY_FEATURES,
    History,
    add_derived,
    matrix,
)
from em_policy.mlqem import MLQEM
from sdk.errors import QaiError

Array = np.ndarray[Any, Any]

# Cheapest first: the order ties are broken in after the shot multiplier. unmitigated and ml-qem
# both cost 1x at run time; ml-qem also carries its amortised training shots, so it comes second.
METHOD_ORDER = ("unmitigated", "ml-qem", "readout", "zne-linear-global", "zne-exp-global", "zne-richardson-global",
                "zne-poly2-global", "zne-linear-gate", "zne-exp-gate", "zne-richardson-gate", "zne-poly2-gate")
FIXED_COST = frozenset({UNMITIGATED, ML_QEM})  # multiplier exactly 1 by definition
BUDGET_RATIOS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
UNLIMITED_RATIO = 4096.0  # a budget ratio beyond every multiplier the harness measures
RANGE_FEATURES = CIRCUIT_FEATURES + DEVICE_FEATURES + OBSERVABLE_FEATURES
# Confidence is multiplied by this outside the training range. On the harness data, decisions with
# a feature out of range were right about 0.87 times as often as the others (held-out circuits on
# training backends, docs/em-policy-report.md).
OUT_OF_RANGE_CONFIDENCE = 0.85


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    holdout_backends: tuple[str, ...] = ("fake_nairobi", "fake_kyiv")
    holdout_circuit_fraction: float = 0.3
    mlqem_kind: str = "rf"
    rankers: tuple[str, ...] = ("rf", "xgb")
    ensemble: int = 5
    tie_tolerance: float = 0.005
    right_tolerance: float = 0.02  # the regret target: a choice within it is "right"
    amortization_jobs: int = 10_000
    supports_days_before: int = 365  # snapshots calibrated this long before the oldest training one are refused

    def __post_init__(self) -> None:
        if not 0 < self.holdout_circuit_fraction < 1:
            raise QaiError("em_policy.bad_config", "holdout_circuit_fraction must be within (0, 1)", status=422)
        if self.ensemble < 2:
            raise QaiError("em_policy.bad_config", "the regressor ensemble needs at least 2 members", status=422)
        if set(self.rankers) - {"rf", "xgb"} or not self.rankers:
            raise QaiError("em_policy.bad_config", f"rankers must be rf and/or xgb, got {self.rankers}", status=422)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def cost_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def budget_feature(ratio: float) -> float:
    return math.log2(max(1.0, min(float(ratio), UNLIMITED_RATIO)))


# ------------------------------------------------------------------------------------------------ labels


def feasible(multipliers: Mapping[str, float], ratio: float) -> list[str]:
    return [m for m, s in multipliers.items() if math.isfinite(s) and s <= ratio * (1 + 1e-9)]


def best_method(fidelity: Mapping[str, float], multiplier: Mapping[str, float], ratio: float, tie: float) -> str:
    """The label: the best fidelity within the budget; near-ties go to the cheaper method."""
    options = [m for m in feasible(multiplier, ratio) if math.isfinite(fidelity.get(m, math.nan))]
    if not options:
        return UNMITIGATED
    top = max(fidelity[m] for m in options)
    tied = [m for m in options if fidelity[m] >= top - tie]
    return min(tied, key=lambda m: (multiplier[m], cost_rank(m), m))


def oracle(fidelity: Mapping[str, float], multiplier: Mapping[str, float], ratio: float) -> float:
    options = [fidelity[m] for m in feasible(multiplier, ratio) if math.isfinite(fidelity.get(m, math.nan))]
    return max(options) if options else fidelity[UNMITIGATED]


def achieved(method: str, fidelity: Mapping[str, float], multiplier: Mapping[str, float], ratio: float) -> float:
    """What a choice achieves: its fidelity if it ran within budget; a method over budget (or one that
    failed on this group) falls back to the unmitigated run."""
    f, s = fidelity.get(method, math.nan), multiplier.get(method, math.nan)
    if math.isfinite(f) and math.isfinite(s) and s <= ratio * (1 + 1e-9):
        return f
    return fidelity[UNMITIGATED]


# -------------------------------------------------------------------------------------- the fitted parts


@dataclass
class Ranker:
    kind: str  # rf | xgb
    classes: tuple[str, ...]
    model: Any  # CompiledForest (rf) or CompiledBooster (xgb): both predict_proba like their library
    source: bytes | None = None  # xgb: the booster's own JSON, kept in the bundle

    def proba(self, x: Array) -> Array:
        return np.asarray(self.model.predict_proba(x), dtype=np.float64)


@dataclass
class Regressor:
    """Ensemble of MLPs; outputs per member: fidelity per method, then log shot multiplier per method,
    standardised (``y_mean``/``y_std``)."""

    methods: tuple[str, ...]
    x_mean: Array
    x_std: Array
    y_mean: Array
    y_std: Array
    members: list[Any]  # CompiledMLP
    _stacked: list[tuple[Array, Array]] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        # The members share one architecture (ReLU hidden layers, identity output): their weights
        # stacked, the ensemble is one batched matrix product per layer instead of one per member.
        first = self.members[0]
        if all(m.activation == "relu" and m.out_activation == "identity" and len(m.coefs) == len(first.coefs)
               for m in self.members):
            self._stacked = [(np.stack([m.coefs[i] for m in self.members]),
                              np.stack([m.intercepts[i] for m in self.members])[:, None, :])
                             for i in range(len(first.coefs))]

    def _forward(self, z: Array) -> Array:
        """Every member's outputs, (members, rows, outputs)."""
        if not self._stacked:
            return np.stack([np.asarray(m.predict(z)).reshape(len(z), -1) for m in self.members])
        h = z
        for i, (w, b) in enumerate(self._stacked):
            h = np.matmul(h, w) + b
            if i < len(self._stacked) - 1:
                np.maximum(h, 0.0, out=h)
        return h

    def predict(self, x: Array) -> tuple[Array, Array, Array]:
        """(fidelity mean, fidelity std, shot multiplier) per row and method."""
        z = (x - self.x_mean) / self.x_std
        outs = self._forward(z) * self.y_std + self.y_mean
        k = len(self.methods)
        fid = np.clip(outs[:, :, :k], 0.0, 1.0)
        mult = np.exp(outs[:, :, k:].mean(axis=0))
        for j, m in enumerate(self.methods):
            if m in FIXED_COST:
                mult[:, j] = 1.0
        return fid.mean(axis=0), fid.std(axis=0), np.maximum(mult, 1.0)


# What else says how hard a decision is: how much budget there is to spend (more room, more ways
# to be wrong), how much mitigation has helped similar circuits here, and how noisy the device and
# how big the circuit are.
CONFIDENCE_CONTEXT = ("log2_budget_ratio", "hist_best_fidelity", "hist_unmitigated_fidelity", "dev_2q_error",
                      "feat_transpiled_2q_count")
_CONTEXT_INDEX = [POLICY_FEATURES.index(c) for c in CONFIDENCE_CONTEXT]


@dataclass
class Confidence:
    """P(right | ranker probability, ensemble spread, context): a logistic calibration on
    standardised inputs, fit on leave-one-backend-out decisions."""

    coef: tuple[float, ...]
    intercept: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @staticmethod
    def inputs(p: Array, spread: Array, x: Array) -> Array:
        """``x``: policy feature rows (POLICY_FEATURES order)."""
        p = np.clip(p, 1e-4, 1 - 1e-4)
        context = x[:, _CONTEXT_INDEX].astype(np.float64)
        context[:, 3] = np.log(np.maximum(context[:, 3], 1e-6))
        context[:, 4] = np.log1p(np.maximum(context[:, 4], 0))
        return np.column_stack([np.log(p / (1 - p)), np.log(spread + 1e-4), context])

    def __call__(self, p: Array, spread: Array, x: Array) -> Array:
        """One confidence per row, each the same whatever rows it is asked with: the inputs, the
        standardisation and the logistic are elementwise, and each row's logit is its own dot
        product. A matrix product over the batch sums a row's terms in an order that depends on
        the batch's size (BLAS blocks rows), which moved the last bits of a quarter of the rows.
        The rows are made contiguous first: BLAS sums a strided vector in another order too."""
        z = np.ascontiguousarray((self.inputs(p, spread, x) - np.asarray(self.mean)) / np.asarray(self.std))
        coef = np.asarray(self.coef)
        logit = np.array([np.dot(row, coef) for row in z], dtype=np.float64).reshape(len(z)) + self.intercept
        return np.asarray(1 / (1 + np.exp(-logit)), dtype=np.float64)


@dataclass
class Decision:
    method: str
    shot_multiplier: float
    expected_fidelity: float
    confidence: float
    alternatives: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


@dataclass
class PolicyModel:
    """Everything a prediction needs, in served (compiled) form."""

    methods: tuple[str, ...]
    ranker: Ranker
    regressor: Regressor
    confidence: Confidence
    mlqem: Any  # CompiledForest predicting the scaled correction ideal − noisy from MLQEM_FEATURES
    mlqem_features: tuple[str, ...]
    history: History
    ranges: dict[str, tuple[float, float]]
    metadata: dict[str, Any]

    # ---------------------------------------------------------------------------------------- serving

    def range_check(self, row: Mapping[str, float]) -> list[str]:
        """Features outside the training range: a warning each. Far outside (beyond one range width
        past either end) is refused, since nothing in training says what the model does there."""
        warnings = []
        for name, (lo, hi) in self.ranges.items():
            value = float(row[name])
            width = max(hi - lo, 1e-9 + abs(hi) * 0.1)
            if not math.isfinite(value) or value < lo - width or value > hi + width:
                raise QaiError("em_policy.features_out_of_range",
                               f"{name} = {value:g} is far outside the training range [{lo:g}, {hi:g}]", status=422,
                               details={"feature": name, "value": value if math.isfinite(value) else str(value),
                                        "min": lo, "max": hi})
            if value < lo or value > hi:
                warnings.append(f"{name} = {value:.4g} is outside the training range [{lo:.4g}, {hi:.4g}]")
        return warnings

    def with_history(self, row: Mapping[str, float], snapshot_id: str) -> dict[str, float]:
        u, b, n = self.history.lookup(snapshot_id, float(row["feat_transpiled_2q_count"]))
        return {**row, "hist_unmitigated_fidelity": u, "hist_best_fidelity": b, "hist_count": float(n)}

    def decide(self, rows: Sequence[Mapping[str, float]], ratios: Sequence[float],
               warnings: Sequence[Sequence[str]] | None = None, out_of_range: Sequence[bool] | None = None,
               *, alternatives: bool = True) -> list[Decision]:
        """``rows`` carry POLICY_FEATURES except the budget; ``ratios`` = shot budget / shots;
        ``out_of_range`` lowers the confidence of those rows (their ``warnings`` say why). Without
        ``alternatives`` each decision's list of the other methods is left empty: the rest of a
        decision does not depend on it, and for a caller that does not read it (the scheduler,
        unless it may co-select methods) sorting the other methods' dicts is work for nothing."""
        x = matrix(rows, POLICY_FEATURES[:-1])
        x = np.column_stack([x, [budget_feature(r) for r in ratios]])
        proba = self.ranker.proba(x)
        fid, spread, mult = self.regressor.predict(x[:, :-1])  # the regressor does not see the budget
        index = {m: j for j, m in enumerate(self.methods)}
        p_all = np.zeros((len(rows), len(self.methods)))
        for c, cls in enumerate(self.ranker.classes):
            p_all[:, index[cls]] = proba[:, c]
        # The per-row choices read Python floats, converted once per matrix: the same doubles, so the
        # same comparisons and values (checked against the indexing version over 53,017 rows), at
        # 2.0-2.1 instead of 2.15-2.25 ms for 34 rows.
        p_rows, fid_rows, std_rows, mult_rows = p_all.tolist(), fid.tolist(), spread.tolist(), mult.tolist()
        ranks = [cost_rank(m) for m in self.methods]
        within: list[list[int]] = []
        chosen: list[int] = []
        for i, ratio in enumerate(ratios):
            p_i, fid_i, mult_i = p_rows[i], fid_rows[i], mult_rows[i]
            limit = ratio * (1 + 1e-9)
            ok = [j for j in range(len(self.methods)) if mult_i[j] <= limit]
            within.append(ok)
            # the ranker's favourite within budget; the regressor's when the ranker gives them all 0
            chosen.append(max(ok, key=lambda j: (p_i[j], fid_i[j], -ranks[j])))
        every = np.arange(len(rows))
        confidences = self.confidence(p_all[every, chosen], spread[every, chosen], x).tolist()  # row by row alike
        out = []
        for i, (ok, j, conf) in enumerate(zip(within, chosen, confidences, strict=True)):
            p_i, fid_i, std_i, mult_i = p_rows[i], fid_rows[i], std_rows[i], mult_rows[i]
            notes = list(warnings[i]) if warnings else []
            if out_of_range is not None and out_of_range[i]:
                conf *= OUT_OF_RANGE_CONFIDENCE
            if float(rows[i]["hist_count"]) == 0:
                notes.append("no history for this calibration snapshot: the decision rests on the circuit and "
                             "device features alone")
            others: list[dict[str, Any]] = sorted(({
                "method": m, "probability": p_i[k], "expected_fidelity": fid_i[k], "fidelity_std": std_i[k],
                "shot_multiplier": mult_i[k], "within_budget": k in ok} for k, m in enumerate(self.methods) if k != j),
                key=lambda a: (-a["probability"], -a["expected_fidelity"], a["method"])) if alternatives else []
            out.append(Decision(self.methods[j], mult_i[j], fid_i[j], conf, others, notes))
        return out

    def mitigate(self, rows: pd.DataFrame) -> Array:
        """ML-QEM's mitigated values for harness rows with ``noisy`` (clipped to the observable's range)."""
        from em_policy.features import unscaled

        frame = add_derived(rows)
        correction = np.asarray(self.mlqem.predict(matrix(frame, self.mlqem_features)))  # ideal − noisy, scaled
        value = unscaled(frame["noisy_scaled"].to_numpy(float) + correction,
                         frame["obs_identity"].to_numpy(float), frame["obs_norm"].to_numpy(float))
        return np.asarray(np.clip(value, frame["obs_min"].to_numpy(float), frame["obs_max"].to_numpy(float)),
                          dtype=np.float64)


# ------------------------------------------------------------------------------------------------ fitting


@dataclass
class Prepared:
    """The split data, pivoted: per group its features, and per method fidelity and multiplier."""

    rows: pd.DataFrame
    groups: pd.DataFrame  # features per group (unmitigated row), with split and backend
    fidelity: pd.DataFrame  # group x method
    multiplier: pd.DataFrame
    methods: tuple[str, ...]


def prepare(frame: pd.DataFrame, config: TrainConfig) -> Prepared:
    rows = split(frame, config.holdout_backends, seed=config.seed, fraction=config.holdout_circuit_fraction)
    groups = add_derived(group_frame(rows).reset_index()).set_index(GROUP_KEY)
    fidelity = pivot(rows, "mitigated_fidelity").reindex(groups.index)
    multiplier = pivot(rows, "shot_multiplier").reindex(groups.index)
    methods = tuple(sorted(set(fidelity.columns) | {ML_QEM}, key=lambda m: (cost_rank(m), m)))
    return Prepared(rows, groups, fidelity, multiplier, methods)


def mlqem_out_of_fold(prep: Prepared, config: TrainConfig, kind: str | None = None) -> tuple[pd.Series, MLQEM]:
    """ML-QEM's mitigated value for every group: leave-one-backend-out on training groups (each
    predicted by a model that never saw its backend), the final model (all training groups) elsewhere."""
    kind = kind or config.mlqem_kind
    g = prep.groups.reset_index()
    train = g[g["split"] == "train"]
    values = pd.Series(np.nan, index=prep.groups.index, dtype=float)
    for backend in sorted(train["backend_id"].unique()):
        fit_on = train[train["backend_id"] != backend]
        target = train[train["backend_id"] == backend]
        model = MLQEM(kind=kind, seed=config.seed).fit(fit_on)
        values.loc[target.set_index(GROUP_KEY).index] = model.predict(target)
    final = MLQEM(kind=kind, seed=config.seed).fit(train)
    rest = g[g["split"] != "train"]
    if len(rest):
        values.loc[rest.set_index(GROUP_KEY).index] = final.predict(rest)
    return values, final


def with_mlqem(prep: Prepared, mitigated: pd.Series) -> Prepared:
    g = prep.groups
    norm = g["obs_norm"].astype(float)
    fidelity = prep.fidelity.copy()
    fidelity[ML_QEM] = 1 - (mitigated - g["ideal"].astype(float)).abs() / (2 * norm)
    multiplier = prep.multiplier.copy()
    multiplier[ML_QEM] = 1.0
    return Prepared(prep.rows, g, fidelity[list(prep.methods)], multiplier[list(prep.methods)], prep.methods)


def history_of(prep: Prepared) -> History:
    """History from training circuits only (on every backend): the circuits evaluated never feed it."""
    visible = prep.groups["split"].isin(["train", "holdout_history"])
    frame = prep.groups.loc[visible, ["feat_transpiled_2q_count"]].copy()
    frame["unmitigated_fidelity"] = prep.fidelity.loc[visible, UNMITIGATED]
    frame["best_fidelity"] = prep.fidelity.loc[visible].max(axis=1)
    return History.from_groups(frame.reset_index())


def history_features(prep: Prepared, history: History) -> pd.DataFrame:
    """Per group; a group that is itself in the history is left out of its own (leave-one-out)."""
    out = []
    visible = prep.groups["split"].isin(["train", "holdout_history"])
    best = prep.fidelity.max(axis=1)
    for key, row in prep.groups.iterrows():
        exclude = (float(prep.fidelity.at[key, UNMITIGATED]), float(best.at[key])) if visible.at[key] else None
        u, b, n = history.lookup(str(key[2]), float(row["feat_transpiled_2q_count"]), exclude=exclude)
        out.append((u, b, float(n)))
    return pd.DataFrame(out, index=prep.groups.index, columns=list(HISTORY_FEATURES))


def without_history(hist: pd.DataFrame) -> pd.DataFrame:
    """The history features of a snapshot nothing has been measured on yet (a new calibration)."""
    from em_policy.features import MISSING_HISTORY

    out = hist.copy()
    out["hist_unmitigated_fidelity"] = MISSING_HISTORY
    out["hist_best_fidelity"] = MISSING_HISTORY
    out["hist_count"] = 0.0
    return out


def design(prep: Prepared, hist: pd.DataFrame, mask: pd.Series, ratios: Sequence[float]
           ) -> tuple[Array, list[tuple[Any, float]]]:
    """Ranker rows: every selected group at every budget ratio."""
    base = pd.concat([prep.groups.loc[mask], hist.loc[mask]], axis=1)
    x0 = matrix(base, POLICY_FEATURES[:-1])
    keys = list(base.index)
    xs, index = [], []
    for r in ratios:
        xs.append(np.column_stack([x0, np.full(len(x0), budget_feature(r))]))
        index += [(k, float(r)) for k in keys]
    return np.vstack(xs), index


def all_labels(prep: Prepared, tie: float) -> dict[tuple[Any, float], str]:
    """The label of every (group, budget ratio), computed once."""
    fid = prep.fidelity.to_dict("index")
    mult = prep.multiplier.to_dict("index")
    return {(k, float(r)): best_method(fid[k], mult[k], r, tie) for k in prep.groups.index for r in BUDGET_RATIOS}


def fit_ranker(kind: str, x: Array, y: Sequence[str], seed: int) -> Ranker:
    from em_policy.fastpath import CompiledForest

    classes = tuple(sorted(set(y), key=lambda m: (cost_rank(m), m)))
    if kind == "rf":
        from sklearn.ensemble import RandomForestClassifier

        rf = RandomForestClassifier(n_estimators=200, min_samples_leaf=2, random_state=seed, n_jobs=1)
        rf.fit(x, np.array([classes.index(v) for v in y]))
        forest = CompiledForest.from_sklearn(rf)
        # sklearn's classes_ are the label indices present; map back to method names
        return Ranker("rf", tuple(classes[int(c)] for c in rf.classes_), forest)
    import xgboost as xgb

    from em_policy.fastpath import CompiledBooster

    if len(classes) < 3:  # softprob needs three classes; with two, the forest is the ranker
        raise QaiError("em_policy.not_enough_data", f"XGBoost ranking needs 3+ distinct labels, got {classes}",
                       status=422)
    clf = xgb.XGBClassifier(n_estimators=200, max_depth=5, learning_rate=0.1, subsample=0.8, colsample_bytree=0.8,
                            random_state=seed, n_jobs=1, tree_method="hist", objective="multi:softprob")
    clf.fit(x, np.array([classes.index(v) for v in y]))
    booster = clf.get_booster()
    return Ranker("xgb", classes, CompiledBooster.from_booster(booster), bytes(booster.save_raw("json")))


def fit_regressor(prep: Prepared, x: Array, keys: Sequence[Any], config: TrainConfig) -> Regressor:
    from sklearn.neural_network import MLPRegressor

    from em_policy.fastpath import CompiledMLP

    fid = prep.fidelity.loc[keys]
    mult = prep.multiplier.loc[keys]
    # A method that failed on a group (an exp fit across its asymptote) has no fidelity there; the
    # regressor learns the unmitigated value in its place, i.e. "no better than doing nothing".
    fid = fid.apply(lambda col: col.fillna(fid[UNMITIGATED]))
    mult = mult.apply(lambda col: col.fillna(col.median() if col.notna().any() else 1.0))
    y = np.column_stack([fid.to_numpy(float), np.log(np.maximum(mult.to_numpy(float), 1.0))])
    x_mean, x_std = x.mean(axis=0), x.std(axis=0)
    x_std = np.where(x_std > 0, x_std, 1.0)
    y_mean, y_std = y.mean(axis=0), y.std(axis=0)
    y_std = np.where(y_std > 0, y_std, 1.0)
    z, t = (x - x_mean) / x_std, (y - y_mean) / y_std
    members = []
    for k in range(config.ensemble):
        rng = np.random.default_rng(config.seed * 1000 + k)
        sample = rng.integers(0, len(z), len(z))  # a bootstrap sample: members disagree where data is thin
        mlp = MLPRegressor(hidden_layer_sizes=(64, 32), activation="relu", alpha=1e-3, max_iter=1500,
                           early_stopping=True, random_state=config.seed * 1000 + k)
        mlp.fit(z[sample], t[sample])
        members.append(CompiledMLP.from_sklearn(mlp))
    return Regressor(prep.methods, x_mean, x_std, y_mean, y_std, members)


def fit_confidence(p: Array, spread: Array, x: Array, right: Array) -> Confidence:
    from sklearn.linear_model import LogisticRegression

    raw = Confidence.inputs(p, spread, x)
    mean, std = raw.mean(axis=0), raw.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    k = raw.shape[1]
    if right.all() or not right.any():  # one class only: the base rate is all there is to say
        rate = float(np.clip(right.mean(), 1e-3, 1 - 1e-3))
        return Confidence((0.0,) * k, math.log(rate / (1 - rate)), tuple(mean), tuple(std))
    lr = LogisticRegression(C=1.0).fit((raw - mean) / std, right.astype(int))
    return Confidence(tuple(float(c) for c in lr.coef_[0]), float(lr.intercept_[0]), tuple(float(m) for m in mean),
                      tuple(float(s) for s in std))


@dataclass
class Fitted:
    model: PolicyModel
    prep: Prepared
    hist: pd.DataFrame
    validation: dict[str, Any]


def _fit_parts(prep: Prepared, hist: pd.DataFrame, mask: pd.Series, kind: str, config: TrainConfig,
               labels: Mapping[tuple[Any, float], str]) -> tuple[Ranker, Regressor]:
    """Every group twice: with its history and without (every new calibration snapshot starts with
    none, and the models must have seen that case)."""
    x_h, index = design(prep, hist, mask, BUDGET_RATIOS)
    x_0, _ = design(prep, without_history(hist), mask, BUDGET_RATIOS)
    x = np.vstack([x_h, x_0])
    ranker = fit_ranker(kind, x, [labels[i] for i in index] * 2, config.seed)
    last = [i for i, (_, r) in enumerate(index) if r == BUDGET_RATIOS[-1]]
    keys = [index[i][0] for i in last]
    # the regressor does not see the budget
    xr = np.vstack([x_h[last][:, :-1], x_0[last][:, :-1]])
    return ranker, fit_regressor(prep, xr, keys * 2, config)


def _shell(prep: Prepared, ranker: Ranker, regressor: Regressor, history: History,
           confidence: Confidence | None = None) -> PolicyModel:
    neutral = Confidence((0.0,) * (2 + len(CONFIDENCE_CONTEXT)), 0.0, (0.0,) * (2 + len(CONFIDENCE_CONTEXT)),
                         (1.0,) * (2 + len(CONFIDENCE_CONTEXT)))
    return PolicyModel(prep.methods, ranker, regressor, confidence or neutral, None, (),
                       history, {}, {})


def outcomes(model: PolicyModel, prep: Prepared, hist: pd.DataFrame, mask: pd.Series,
             ratios: Sequence[float] = BUDGET_RATIOS, tolerance: float = 0.01, check_ranges: bool = False
             ) -> pd.DataFrame:
    """The model's decisions on the selected groups at each budget, scored against what each method
    really achieved there."""
    base = pd.concat([prep.groups.loc[mask], hist.loc[mask]], axis=1)
    records = base.to_dict("records")
    keys = list(base.index)
    rows, budgets, notes, refused, outside = [], [], [], [], []
    for rec in records:
        try:
            warn = model.range_check(rec) if check_ranges else []
            far = False
        except QaiError as err:  # the service would refuse it; evaluation decides anyway and counts it
            warn, far = [err.message], True
        for r in ratios:
            rows.append(rec)
            budgets.append(float(r))
            notes.append(warn)
            refused.append(far)
            outside.append(bool(warn))
    decisions = model.decide(rows, budgets, notes, outside)
    out = []
    i = 0
    for k in keys:
        fid = prep.fidelity.loc[k].to_dict()
        mult = prep.multiplier.loc[k].to_dict()
        for r in ratios:
            d = decisions[i]
            i += 1
            best = oracle(fid, mult, r)
            got = achieved(d.method, fid, mult, r)
            over = not (math.isfinite(mult.get(d.method, math.nan)) and mult[d.method] <= r * (1 + 1e-9))
            out.append({"circuit_id": k[0], "observable": k[1], "calibration_snapshot_id": k[2],
                        "backend_id": prep.groups.at[k, "backend_id"], "ratio": r, "method": d.method,
                        "label": best_method(fid, mult, r, 0.0), "oracle": best, "achieved": got,
                        "regret": best - got, "expected_fidelity": d.expected_fidelity,
                        "observed_fidelity": fid.get(d.method, math.nan), "confidence": d.confidence,
                        "right": best - got <= tolerance, "over_budget": over, "warned": outside[i - 1],
                        "refused": refused[i - 1]})
    return pd.DataFrame(out)


def _raw_scores(model: PolicyModel, prep: Prepared, hist: pd.DataFrame, mask: pd.Series, tolerance: float
                ) -> tuple[Array, Array, Array, Array, pd.DataFrame]:
    """Ranker probability, ensemble spread and feature row of each decision, and whether it was right."""
    res = outcomes(model, prep, hist, mask, tolerance=tolerance)
    base = pd.concat([prep.groups.loc[mask], hist.loc[mask]], axis=1)
    x, _ = design(prep, hist, mask, BUDGET_RATIOS)
    proba = model.ranker.proba(x)
    _, spread, _ = model.regressor.predict(x[:, :-1])
    # design() orders by ratio then group; outcomes() by group then ratio
    n = len(base)
    order = np.array([r * n + g for g in range(n) for r in range(len(BUDGET_RATIOS))])
    methods = res["method"].tolist()
    cls = {c: i for i, c in enumerate(model.ranker.classes)}
    idx = {m: j for j, m in enumerate(model.methods)}
    p = np.array([proba[o, cls[m]] if m in cls else 0.0 for o, m in zip(order, methods, strict=True)])
    s = np.array([spread[o, idx[m]] for o, m in zip(order, methods, strict=True)])
    return p, s, x[order], res["right"].to_numpy(bool), res


def fit(frame: pd.DataFrame, config: TrainConfig, *, dataset_sha256: str = "") -> Fitted:
    """Train every part on the ``train`` split; validate leave-one-backend-out."""
    from em_policy.fastpath import CompiledForest

    prep = prepare(frame, config)
    mitigated, mlqem = mlqem_out_of_fold(prep, config)
    prep = with_mlqem(prep, mitigated)
    history = history_of(prep)
    hist = history_features(prep, history)
    train = prep.groups["split"] == "train"
    backends = sorted(prep.groups.loc[train, "backend_id"].unique())
    labels = all_labels(prep, config.tie_tolerance)

    # Leave-one-backend-out: picks the ranker kind and gives the confidence calibration its data.
    validation: dict[str, Any] = {}
    scores: dict[str, tuple[Array, Array, Array, Array]] = {}
    for kind in config.rankers:
        ps, ss, xs, rs, regrets = [], [], [], [], []
        for b in backends:
            fit_mask = train & (prep.groups["backend_id"] != b)
            val_mask = train & (prep.groups["backend_id"] == b)
            ranker, regressor = _fit_parts(prep, hist, fit_mask, kind, config, labels)
            shell = _shell(prep, ranker, regressor, history)
            for h in (hist, without_history(hist)):
                p, s, x, right, res = _raw_scores(shell, prep, h, val_mask, config.right_tolerance)
                ps.append(p)
                ss.append(s)
                xs.append(x)
                rs.append(right)
                regrets.append(res["regret"].to_numpy())
        scores[kind] = (np.concatenate(ps), np.concatenate(ss), np.vstack(xs), np.concatenate(rs))
        validation[f"{kind}_mean_regret"] = float(np.concatenate(regrets).mean())
    kind = min(config.rankers, key=lambda k: (validation[f"{k}_mean_regret"], k))
    validation["ranker"] = kind
    confidence = fit_confidence(*scores[kind])

    ranker, regressor = _fit_parts(prep, hist, train, kind, config, labels)
    ranges: dict[str, tuple[float, float]] = {}
    for name in RANGE_FEATURES:
        col = prep.groups.loc[train, name].astype(float)
        ranges[name] = (float(col.min()), float(col.max()))
    snapshots = sorted(prep.groups.loc[train].index.get_level_values(2).unique())
    created = [pd.Timestamp(_snapshot_time(s)) for s in snapshots]
    unmitigated_rows = prep.rows[(prep.rows["split"] == "train") & (prep.rows["method"] == UNMITIGATED)]
    training_shots = int(unmitigated_rows["shots"].sum())
    metadata = {
        "dataset_sha256": dataset_sha256, "config": config.to_json(), "methods": list(prep.methods),
        "ranker": kind, "ranker_classes": list(ranker.classes), "validation": validation,
        "training_snapshots": snapshots, "training_backends": backends,
        "supports_snapshots_since": (min(created) - timedelta(days=config.supports_days_before)).isoformat(),
        "training_groups": int(train.sum()), "training_shots": training_shots,
        "amortized_training_shots": training_shots / config.amortization_jobs,
        "mlqem": {"kind": config.mlqem_kind, "features": list(mlqem.features)},
    }
    if config.mlqem_kind != "rf":
        raise QaiError("em_policy.bad_config", "the served ML-QEM model is the random forest (rf)", status=422)
    compiled_mlqem = CompiledForest.from_sklearn(mlqem.model)
    model = PolicyModel(prep.methods, ranker, regressor, confidence, compiled_mlqem, mlqem.features, history,
                        ranges, metadata)
    return Fitted(model, prep, hist, validation)


def _snapshot_time(snapshot_id: str) -> str:
    """``fake_kyiv@20250226T160256Z-…`` carries its calibration time."""
    stamp = snapshot_id.split("@", 1)[1].split("-", 1)[0]
    return f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}+00:00"
