"""``qai policy evaluate``: the policy and ML-QEM measured on data they never saw, written as
docs/em-policy-report.md with its plots. Every number in the report comes from this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from em_policy.dataset import GROUP_KEY, ML_QEM, UNMITIGATED
from em_policy.mlqem import MLQEM
from em_policy.policy import (
    BUDGET_RATIOS,
    PolicyModel,
    Prepared,
    TrainConfig,
    achieved,
    history_features,
    oracle,
    outcomes,
    prepare,
    with_mlqem,
    without_history,
)

RICHARDSON = "zne-richardson-global"
RELIABILITY_BINS = 10


def ece(confidence: np.ndarray[Any, Any], right: np.ndarray[Any, Any], bins: int = RELIABILITY_BINS
        ) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error over equal-width bins, and the reliability diagram's points."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total, points = 0.0, []
    for b in range(bins):
        sel = which == b
        if not sel.any():
            continue
        conf, acc = float(confidence[sel].mean()), float(right[sel].mean())
        total += sel.mean() * abs(acc - conf)
        points.append({"bin": b, "count": int(sel.sum()), "confidence": conf, "accuracy": acc})
    return float(total), points


@dataclass
class Evaluation:
    config: TrainConfig
    model_version: str
    dataset_sha256: str
    groups: dict[str, int]
    mlqem_table: pd.DataFrame  # per method: abs error, shots on the holdout
    policy_table: pd.DataFrame  # per strategy: regret, MAE, ECE
    budget_table: pd.DataFrame  # the policy's regret per budget ratio
    reliability: list[dict[str, float]]
    calibrator: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)


def config_of(model: PolicyModel) -> TrainConfig:
    """The training configuration a bundle records: its split is the one evaluation must use."""
    recorded: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in model.metadata["config"].items()}
    return TrainConfig(**recorded)


def _fixed(method: str, prep: Prepared, mask: pd.Series, ratios: Sequence[float]) -> dict[str, float]:
    regrets, over = [], []
    for k in prep.groups.index[mask]:
        fid, mult = prep.fidelity.loc[k].to_dict(), prep.multiplier.loc[k].to_dict()
        for r in ratios:
            regrets.append(oracle(fid, mult, r) - achieved(method, fid, mult, r))
            s = mult.get(method, math.nan)
            over.append(not (math.isfinite(s) and s <= r))
    return {"mean_regret": float(np.mean(regrets)), "over_budget": float(np.mean(over))}


def evaluate(frame: pd.DataFrame, model: PolicyModel, *, model_version: str, dataset_sha256: str,
             calibrator: Callable[[str], dict[str, Any]] | None = None,
             progress: Callable[[str], None] | None = None) -> Evaluation:
    say = progress or (lambda _m: None)
    config = config_of(model)
    prep = prepare(frame, config)
    say("ML-QEM on every group")
    groups = prep.groups.reset_index()
    mitigated = pd.Series(model.mitigate(groups), index=prep.groups.index)
    prep = with_mlqem(prep, mitigated)
    hist = history_features(prep, model.history)
    holdout = prep.groups["split"] == "holdout"
    holdout_circuits = prep.groups["split"] == "holdout_circuits"

    # --- ML-QEM vs ZNE on held-out circuits of held-out backends
    say("ML-QEM baselines (OLS, MLP)")
    rows = prep.rows
    table = []
    hold_rows = rows[(rows["split"] == "holdout")]
    base = hold_rows[hold_rows["method"] == UNMITIGATED].set_index(GROUP_KEY)
    amortized = float(model.metadata["amortized_training_shots"])
    for method in sorted(hold_rows["method"].unique()):
        sel = hold_rows[hold_rows["method"] == method].set_index(GROUP_KEY)
        # a method's cost at equal precision: its multiplier times the unmitigated run's shots
        equal = sel["shot_multiplier"] * base["shots"].reindex(sel.index)
        table.append({"method": method, "groups": len(sel), "mean_abs_error": float(sel["abs_error"].mean()),
                      "executed_shots": float(sel["shots"].mean()), "shots_at_equal_precision": float(equal.mean()),
                      "amortized_training_shots": 0.0})
    train_rows = rows[(rows["split"] == "train") & (rows["method"] == UNMITIGATED)]
    variants: dict[str, np.ndarray[Any, Any]] = {"ml-qem (rf, served)": mitigated.loc[base.index].to_numpy()}
    for kind in ("ols", "mlp"):
        fitted = MLQEM(kind=kind, seed=config.seed).fit(train_rows)
        variants[f"ml-qem ({kind})"] = fitted.predict(base.reset_index())
    for name, values in variants.items():
        table.append({"method": name, "groups": len(base),
                      "mean_abs_error": float(np.mean(np.abs(values - base["ideal"].to_numpy(float)))),
                      "executed_shots": float(base["shots"].mean()),
                      "shots_at_equal_precision": float(base["shots"].mean()) + amortized,
                      "amortized_training_shots": amortized})
    mlqem_table = pd.DataFrame(table).sort_values("mean_abs_error").reset_index(drop=True)

    # --- the policy against fixed strategies, on both held-out sets
    say("policy decisions on held-out data")
    tolerance = config.right_tolerance
    res = outcomes(model, prep, hist, holdout, tolerance=tolerance, check_ranges=True)
    res_circ = outcomes(model, prep, hist, holdout_circuits, tolerance=tolerance, check_ranges=True)
    res_new = outcomes(model, prep, without_history(hist), holdout, tolerance=tolerance, check_ranges=True)
    err, points = ece(res["confidence"].to_numpy(float), res["right"].to_numpy(bool))
    # the same decisions without the out-of-range lowering: how calibrated the confidence itself is
    plain = outcomes(model, prep, hist, holdout, tolerance=tolerance)
    plain_circ = outcomes(model, prep, hist, holdout_circuits, tolerance=tolerance)
    observed = res["observed_fidelity"].notna()
    policy_rows = [{
        "strategy": "policy", "set": "holdout", "mean_regret": float(res["regret"].mean()),
        "expected_fidelity_mae": float((res.loc[observed, "expected_fidelity"]
                                        - res.loc[observed, "observed_fidelity"]).abs().mean()),
        "ece": err, "ece_unlowered": ece(plain["confidence"].to_numpy(float), plain["right"].to_numpy(bool))[0],
        "over_budget": float(res["over_budget"].mean()), "right": float(res["right"].mean()),
        "warned": float(res["warned"].mean()), "selection_shots": 0.0}, {
        "strategy": "policy", "set": "holdout_circuits", "mean_regret": float(res_circ["regret"].mean()),
        "expected_fidelity_mae": float((res_circ["expected_fidelity"] - res_circ["observed_fidelity"]).abs().mean()),
        "ece": ece(res_circ["confidence"].to_numpy(float), res_circ["right"].to_numpy(bool))[0],
        "ece_unlowered": ece(plain_circ["confidence"].to_numpy(float), plain_circ["right"].to_numpy(bool))[0],
        "over_budget": float(res_circ["over_budget"].mean()), "right": float(res_circ["right"].mean()),
        "warned": float(res_circ["warned"].mean()), "selection_shots": 0.0}]
    policy_rows.append({
        "strategy": "policy, no history (new snapshots)", "set": "holdout",
        "mean_regret": float(res_new["regret"].mean()),
        "expected_fidelity_mae": float((res_new["expected_fidelity"] - res_new["observed_fidelity"]).abs().mean()),
        "ece": ece(res_new["confidence"].to_numpy(float), res_new["right"].to_numpy(bool))[0],
        "over_budget": float(res_new["over_budget"].mean()), "right": float(res_new["right"].mean()),
        "warned": float(res_new["warned"].mean()), "selection_shots": 0.0})
    for method in (UNMITIGATED, RICHARDSON, ML_QEM):
        if method in prep.methods:
            policy_rows.append({"strategy": f"always {method}", "set": "holdout",
                                **_fixed(method, prep, holdout, BUDGET_RATIOS), "selection_shots": 0.0})
    calibrator_rows: list[dict[str, Any]] = []
    if calibrator is not None:
        regrets, over, spent = [], [], 0.0
        for backend in config.holdout_backends:
            say(f"mitiq Calibrator on {backend}")
            choice = calibrator(backend)
            calibrator_rows.append(choice)
            mask = holdout & (prep.groups["backend_id"] == backend)
            fixed = _fixed(choice["method"], prep, mask, BUDGET_RATIOS)
            n = int(mask.sum()) * len(BUDGET_RATIOS)
            regrets.append(fixed["mean_regret"] * n)
            over.append(fixed["over_budget"] * n)
            spent += choice["shots_spent"]
        total = int(holdout.sum()) * len(BUDGET_RATIOS)
        policy_rows.append({"strategy": "mitiq Calibrator", "set": "holdout", "mean_regret": sum(regrets) / total,
                            "over_budget": sum(over) / total, "selection_shots": spent / len(config.holdout_backends)})
    policy_table = pd.DataFrame(policy_rows)
    budget_table = (res.groupby("ratio").agg(mean_regret=("regret", "mean"), right=("right", "mean"),
                                             confidence=("confidence", "mean"))
                    .reset_index())
    chosen = res.groupby("method").size().rename("chosen").reset_index()
    budget_table.attrs["chosen"] = chosen.to_dict("records")

    rf = mlqem_table.set_index("method").loc["ml-qem (rf, served)"]
    rich = mlqem_table.set_index("method").loc[RICHARDSON] if RICHARDSON in set(mlqem_table["method"]) else None
    pol = policy_table.iloc[0]
    targets: dict[str, dict[str, Any]] = {}
    if rich is not None:
        targets["ML-QEM (RF) error / Richardson error ≤ 0.8"] = _target(
            rf["mean_abs_error"] / rich["mean_abs_error"], 0.8)
        targets["ML-QEM (RF) shots / Richardson shots ≤ 1/3 (at equal precision, training amortised)"] = _target(
            rf["shots_at_equal_precision"] / rich["shots_at_equal_precision"], 1 / 3)
        targets["ML-QEM (RF) executed shots / Richardson executed shots (information)"] = {
            "value": float(rf["executed_shots"] / rich["executed_shots"]), "limit": None, "met": None}
    targets["policy mean regret ≤ 0.02"] = _target(pol["mean_regret"], 0.02)
    targets["expected-fidelity MAE ≤ 0.03"] = _target(pol["expected_fidelity_mae"], 0.03)
    targets["ECE ≤ 0.05"] = _target(pol["ece"], 0.05)
    return Evaluation(config=config, model_version=model_version, dataset_sha256=dataset_sha256,
                      groups={s: int((prep.groups["split"] == s).sum()) for s in
                              ("train", "holdout_circuits", "holdout", "holdout_history")},
                      mlqem_table=mlqem_table, policy_table=policy_table, budget_table=budget_table,
                      reliability=points, calibrator=calibrator_rows, targets=targets)


def _target(value: float, limit: float) -> dict[str, Any]:  # a target is met at or below its limit
    return {"value": float(value), "limit": limit, "met": bool(value <= limit)}


# ------------------------------------------------------------------------------------------------ report


def plots(ev: Evaluation, directory: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    xs = [p["confidence"] for p in ev.reliability]
    ys = [p["accuracy"] for p in ev.reliability]
    sizes = [20 + 200 * p["count"] / max(1, max(q["count"] for q in ev.reliability)) for p in ev.reliability]
    ax.scatter(xs, ys, s=sizes, color="tab:blue", zorder=3, label="policy (held-out backends)")
    ax.plot(xs, ys, color="tab:blue")
    ax.set_xlabel("confidence")
    ax.set_ylabel("fraction right (regret ≤ tolerance)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Reliability diagram")
    out["reliability"] = _save(fig, directory / "reliability.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    t = ev.mlqem_table
    colours = ["tab:red" if m.startswith("ml-qem") else "tab:blue" for m in t["method"]]
    ax.scatter(t["shots_at_equal_precision"], t["mean_abs_error"], color=colours)
    for _, r in t.iterrows():
        ax.annotate(r["method"], (r["shots_at_equal_precision"], r["mean_abs_error"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("shots at the unmitigated precision (log)")
    ax.set_ylabel("mean |mitigated − ideal|")
    ax.set_title("Accuracy vs cost, held-out circuits on held-out backends")
    out["accuracy_vs_cost"] = _save(fig, directory / "accuracy-vs-cost.png")
    return out


def _save(fig: Any, path: Path) -> str:
    """PNG without the software-version stamp, so equal figures give equal files."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path.name


def _md(frame: pd.DataFrame, floats: str = "{:.4f}") -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                cells.append("—" if math.isnan(v) else floats.format(v))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(ev: Evaluation, *, command: str, figures_dir: str) -> str:
    c = ev.config
    lines = [
        "# EM policy report",
        "",
        f"Written by `{command}`; every number below comes from that command. Model `{ev.model_version}`, "
        f"dataset sha256 `{ev.dataset_sha256[:16]}…`, seed {c.seed}.",
        "",
        "## Data and split",
        "",
        f"Held-out backends (no model is trained on them; their training circuits feed only the history "
        f"features, as a backend's past nightly runs would): {', '.join(c.holdout_backends)}. The row "
        "*policy, no history* blanks even that: a calibration snapshot nothing has run on. Held-out circuits: "
        f"{c.holdout_circuit_fraction:.0%} of circuit ids, by a seeded hash. Groups (circuit × observable × "
        "snapshot):",
        "",
        _md(pd.DataFrame([ev.groups])),
        "",
        "`holdout` (held-out circuits on held-out backends) is the set every target is measured on.",
        "",
        "## ML-QEM vs ZNE on held-out circuits of held-out backends",
        "",
        "Mean |mitigated − ideal| per observable. `executed_shots`: what the method ran (the harness's "
        "`shots`: every scale factor at the job's shots). `shots_at_equal_precision`: what it costs to reach "
        "the unmitigated run's standard error (`shot_multiplier` × the unmitigated shots, "
        "[em-metrics.md](em-metrics.md#shots-and-cost)); for ML-QEM the unmitigated shots plus its training "
        "shots amortised over 10,000 jobs (`amortized_training_shots`). ML-QEM (OLS) and (MLP) are trained "
        "here on the same training groups, for comparison; the served model is the forest.",
        "",
        _md(ev.mlqem_table),
        "",
        f"![accuracy vs cost]({figures_dir}/accuracy-vs-cost.png)",
        "",
        "## Policy on held-out data",
        "",
        "Averaged over every group and the budget ratios "
        f"{', '.join(str(r) for r in BUDGET_RATIOS)} (shot budget / job shots). Regret = oracle-best fidelity "
        "within the budget − the fidelity the choice achieved (a choice over budget or failing achieves the "
        f"unmitigated fidelity). *Right* = regret ≤ {c.right_tolerance}; the confidence predicts it. `ece` is "
        "the served confidence (lowered ×0.85 where a feature is outside the training range, `warned`); "
        "`ece_unlowered` the same decisions without that lowering. `selection_shots`: shots spent to choose, per "
        "backend.",
        "",
        _md(ev.policy_table),
        "",
    ]
    if ev.calibrator:
        lines += ["mitiq Calibrator's choices (it runs its own benchmark circuits on each backend to choose):", "",
                  _md(pd.DataFrame([{k: v for k, v in r.items() if k in ("backend_id", "method", "circuits_executed",
                                                                          "shots_spent")} for r in ev.calibrator])),
                  ""]
    lines += [
        "Policy regret per budget ratio (held-out backends):",
        "",
        _md(ev.budget_table),
        "",
        "Methods the policy chose (held-out backends, all budgets): "
        + ", ".join(f"{r['method']} {r['chosen']}" for r in ev.budget_table.attrs.get("chosen", [])) + ".",
        "",
        f"![reliability diagram]({figures_dir}/reliability.png)",
        "",
        "## Targets",
        "",
        _md(pd.DataFrame([{"target": k, "value": v["value"],
                           "met": "—" if v["met"] is None else ("yes" if v["met"] else "**no**")}
                          for k, v in ev.targets.items()])),
        "",
    ]
    return "\n".join(lines)
