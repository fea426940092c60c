"""Scheduler v1: filter plugins, score plugins, normalisation and selection over recorded inputs.

Modelled on the Kubernetes scheduling framework, cut to what a job needs: every Filter plugin
judges every backend (``pass``, ``reject`` with a reason, or ``skip`` when an earlier reject left
it nothing to judge), the Score plugins multiply into one score per eligible backend, scores are
normalised to the best (1.0), and the highest wins; an exact tie goes to the seeded draw.

``decide(inputs, plugins)`` is a pure function of its inputs: the job's recorded fields, the
tenant's policy, each backend's catalog entry, calibration snapshot id and policy prediction, the
profile (plugin names, versions, config), the seed and the time. Nothing else is read, so a
stored decision replays byte for byte (``scheduler.replay``), and a changed input shows up as a
changed body.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from sdk.canonical import canonical_json

SCHEDULER_VERSION = "1"
CRYPTO_RANK = {"classical": 0, "hybrid": 1, "pqc-required": 2}
PRIORITY_CLASSES = ("critical", "essential", "standard", "background")
QKD_POLICIES = ("required", "preferred", "excluded")

Verdict = Literal["pass", "reject", "skip"]
# A filter: (job, backend, tenant policy, config) -> None to pass, or the reason it rejects.
FilterFn = Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]], str | None]
# A score term: (job, backend, tenant policy, config) -> {term name: factor}; the factors multiply.
ScoreFn = Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]], dict[str, float]]

DEFAULT_CONFIG: dict[str, Any] = {
    # availability_penalty: backends available less than this fraction of the time score lower
    "availability_threshold": 0.9,
    "availability_penalty": 0.5,
    # a job waits wait_weight[class] x (queue wait + run time) / wait_reference_seconds "units" of
    # score: critical work pays for waiting, background work barely does
    "wait_weight": {"critical": 4.0, "essential": 2.0, "standard": 1.0, "background": 0.25},
    "wait_reference_seconds": 600.0,
    "qkd_preferred_bonus": 1.1,
    # v1 ranks on fidelity**fidelity_exponent / cost. 1 is SPEC-001's ratio; a larger exponent buys
    # fidelity with money (fidelity is in [0, 1], so the exponent sharpens the gaps between backends
    # while price stays linear). docs/scheduler-report.md shows the trade on the catalog.
    "fidelity_exponent": 1.0,
    # an exact tie of scores is broken by the seeded draw; closer than this counts as a tie
    "tie_tolerance": 1e-12,
    # 1: score every EM method the policy predicts within the job's shot budget (the prediction's
    # ``options``) on every backend and take the best (backend, method) pair; 0: the policy's method
    "em_coselect": 0,
    # value-score: what one unit of expected post-EM fidelity is worth, and what a second of queue
    # wait plus run time costs (times the class's wait_weight), both in USD
    "fidelity_value_usd": 100.0,
    "wait_cost_usd_per_second": 0.001,
}


@dataclass(frozen=True)
class Plugin:
    """A named, versioned filter or score function. Its version is part of every decision it
    takes part in, so a changed plugin cannot pass for the old one on replay."""

    name: str
    version: str
    kind: Literal["filter", "score"]
    fn: Callable[..., Any]
    needs_prediction: bool = False  # judged only when the backend has a policy prediction
    # Earlier versions of this plugin, as (version, function): a decision recorded under one of them
    # replays with the function that took it, so changing a plugin (and bumping its version) does not
    # make every decision signed before the change fail replay and the audit.
    earlier: tuple[tuple[str, Callable[..., Any]], ...] = ()


class SchedulingError(Exception):
    pass


def config_hash(config: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(dict(config))).hexdigest()


def profile(plugins: Sequence[Plugin], config: Mapping[str, Any], name: str = "default") -> dict[str, Any]:
    """The recorded form of a profile: which plugins, in which order, and their config."""
    merged = {**DEFAULT_CONFIG, **config}
    return {"name": name, "plugins": [{"name": p.name, "version": p.version, "kind": p.kind} for p in plugins],
            "config": merged, "config_hash": config_hash(merged)}


def prefilter(job: Mapping[str, Any], backend: Mapping[str, Any], policy: Mapping[str, Any],
              plugins: Sequence[Plugin], config: Mapping[str, Any]) -> bool:
    """Whether ``backend`` passes every filter that needs no prediction: only those are worth a
    policy call."""
    return all(p.fn(job, backend, policy, config) is None for p in plugins
               if p.kind == "filter" and not p.needs_prediction)


def _judge(job: Mapping[str, Any], backend: Mapping[str, Any], policy: Mapping[str, Any],
           plugins: Sequence[Plugin], config: Mapping[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    verdicts: list[dict[str, Any]] = []
    eligible = True
    for p in plugins:
        if p.kind != "filter":
            continue
        if p.needs_prediction and backend.get("prediction") is None:
            verdicts.append({"plugin": p.name, "verdict": "skip", "reason": "no policy prediction for this backend"})
            continue
        reason = p.fn(job, backend, policy, config)
        verdicts.append({"plugin": p.name, "verdict": "pass" if reason is None else "reject",
                         **({} if reason is None else {"reason": reason})})
        eligible = eligible and reason is None
    return verdicts, eligible


def _score(job: Mapping[str, Any], backend: Mapping[str, Any], policy: Mapping[str, Any],
           plugins: Sequence[Plugin], config: Mapping[str, Any]) -> tuple[dict[str, float], float]:
    terms: dict[str, float] = {}
    score = 1.0
    for p in plugins:
        if p.kind != "score":
            continue
        for name, value in p.fn(job, backend, policy, config).items():
            if name in terms:
                raise SchedulingError(f"score term {name!r} given twice")
            terms[name] = value
            if name.endswith("_factor") or name == "fidelity_per_cost":
                score *= value
    if not math.isfinite(score) or score < 0:
        raise SchedulingError(f"score of {backend['backend_id']} is {score}")
    return terms, score


def as_recorded(recorded_plugins: Sequence[Mapping[str, Any]], plugins: Sequence[Plugin]) -> list[Plugin]:
    """``plugins`` at the versions a decision's inputs were recorded with: the same names and kinds
    in the same order, each at its current version or at one of its ``earlier`` ones. Anything else
    is refused rather than decided by a function the decision was not taken with."""
    recorded = [(p["name"], p["version"], p["kind"]) for p in recorded_plugins]
    out: list[Plugin] = []
    if [(n, k) for n, _, k in recorded] == [(p.name, p.kind) for p in plugins]:
        for (_, version, _), p in zip(recorded, plugins, strict=True):
            fn = p.fn if version == p.version else dict(p.earlier).get(version)
            if fn is None:
                break
            out.append(p if fn is p.fn else replace(p, version=version, fn=fn, earlier=()))
    if len(out) != len(recorded) or len(out) != len(plugins):
        raise SchedulingError(f"the inputs were recorded with plugins {recorded}")
    return out


def decide(inputs: Mapping[str, Any], plugins: Sequence[Plugin], *, inputs_canonical: bytes | None = None
           ) -> dict[str, Any]:
    """The decision body for ``inputs`` (see the module docstring). Deterministic: the same
    inputs and plugins give the same body, byte for byte once canonical. ``inputs_canonical``, the
    inputs' RFC 8785 bytes if the caller has them, saves serialising them again."""
    plugins = as_recorded(inputs["profile"]["plugins"], plugins)
    config = inputs["profile"]["config"]
    if config_hash(config) != inputs["profile"]["config_hash"]:
        raise SchedulingError("the recorded config does not match its hash")
    job, policy = inputs["job"], inputs["tenant_policy"]
    coselect = coselects(config)
    rows = []
    judged: dict[str, Mapping[str, Any]] = {}  # backend id -> the backend as scored (with its chosen method)
    for backend in sorted(inputs["backends"], key=lambda b: b["backend_id"]):
        row: dict[str, Any] = {}
        for view in em_options(backend) if coselect else (backend,):
            filters, eligible = _judge(job, view, policy, plugins, config)
            candidate: dict[str, Any] = {"backend_id": backend["backend_id"],
                                         "calibration_snapshot_id": backend.get("calibration_snapshot_id"),
                                         "filters": filters, "eligible": eligible}
            if eligible:
                candidate["terms"], candidate["score"] = _score(job, view, policy, plugins, config)
                if coselect:
                    candidate["em_method"] = view["prediction"]["method"]
            # the first option (the policy's own method) stands for a backend no option fits, and
            # wins ties: another method must score higher by more than the tie tolerance
            if not row or (eligible and (not row["eligible"] or candidate["score"] - row["score"]
                                         > config["tie_tolerance"] * row["score"])):
                row = candidate
                judged[backend["backend_id"]] = view
        rows.append(row)
    eligible_rows = [r for r in rows if r["eligible"]]
    body: dict[str, Any] = {
        "scheduler_version": SCHEDULER_VERSION, "job_id": job["job_id"],
        "inputs_sha256": "sha256:" + hashlib.sha256(inputs_canonical or canonical_json(dict(inputs))).hexdigest(),
        "backends": rows,
    }
    if not eligible_rows or max(r["score"] for r in eligible_rows) <= 0:
        body.update(chosen=None, confidence=0.0,
                    rationale=f"no backend fits: {len(rows)} considered, {len(eligible_rows)} passed every filter")
        return body
    best = max(r["score"] for r in eligible_rows)
    for r in eligible_rows:
        r["normalized_score"] = r["score"] / best
    tied = sorted(r["backend_id"] for r in eligible_rows if best - r["score"] <= config["tie_tolerance"] * best)
    chosen_id = tied[0] if len(tied) == 1 else random.Random(inputs["seed"]).choice(tied)
    chosen = next(r for r in eligible_rows if r["backend_id"] == chosen_id)
    backend = judged[chosen_id]
    prediction = backend["prediction"]
    others = sorted((r["score"] for r in eligible_rows if r is not chosen), reverse=True)
    runner_up = others[0] if others else 0.0
    margin = min(1.0, (best - runner_up) / (0.1 * best))  # best > 0: checked above
    # The policy's own confidence in its prediction, halved when the runner-up is within 10%:
    # a near tie means another backend was almost as good, so the choice itself is less certain.
    confidence = float(prediction["confidence"]) * (0.5 + 0.5 * margin)
    body.update(
        chosen={"backend_id": chosen_id, "calibration_snapshot_id": backend["calibration_snapshot_id"],
                "em_method": prediction["method"], "em_params": prediction["params"],
                "shot_multiplier": prediction["shot_multiplier"],
                "expected_fidelity": prediction["expected_fidelity"],
                "model_version": prediction["model_version"], "score": chosen["score"],
                "tie_broken_by_seed": len(tied) > 1,
                # co-selected: the method may not be the policy's, so its run time is recorded too,
                # and the policy's own pick (whose confidence the decision's confidence is)
                **({"estimated_seconds": prediction["estimated_seconds"],
                    "policy_em_method": inputs_backend(inputs, chosen_id)["prediction"]["method"]}
                   if coselect else {})},
        confidence=round(confidence, 12),
        rationale=(f"{chosen_id} scores highest of {len(eligible_rows)} eligible backends "
                   f"({len(rows) - len(eligible_rows)} filtered): expected post-EM fidelity "
                   f"{prediction['expected_fidelity']:.3f} with {prediction['method']} at "
                   f"{prediction['shot_multiplier']:.2f}x shots; runner-up at "
                   f"{runner_up / best:.3f} of its score"),
    )
    return body


def inputs_backend(inputs: Mapping[str, Any], backend_id: str) -> Mapping[str, Any]:
    return next(b for b in inputs["backends"] if b["backend_id"] == backend_id)


def coselects(config: Mapping[str, Any]) -> bool:
    """Whether a profile co-selects the EM method (``em_coselect``; configs recorded before the
    knob existed lack it and do not)."""
    return bool(config.get("em_coselect", 0))


def em_options(backend: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The backend once per EM method its prediction offers (``prediction.options``, the policy's
    own method first), each view carrying that method's prediction; the backend alone when it has
    no prediction or no options."""
    p = backend.get("prediction")
    if not p or not p.get("options"):
        return [backend]
    return [{**backend, "prediction": {**p, **option}} for option in p["options"]]


def rejections(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every backend a decision ruled out, with the reasons of its rejecting filters."""
    return [{"backend_id": r["backend_id"],
             "reasons": [f"{f['plugin']}: {f['reason']}" for f in r["filters"] if f["verdict"] == "reject"]}
            for r in body["backends"] if not r["eligible"]]
