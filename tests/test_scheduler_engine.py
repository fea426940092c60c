"""The scheduler engine on recorded inputs: filters say why, the v1 score ranks, decisions replay."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest

from scheduler.engine import PRIORITY_CLASSES, SchedulingError, decide, prefilter, profile, rejections
from scheduler.plugins import BUILTIN, resolve
from sdk.canonical import canonical_json
from sdk.errors import QaiError

MODES = ("classical", "hybrid", "pqc-required")


def _backend(name: str, **over: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "backend_id": name, "cost_per_shot": 0.0001, "availability": 0.99, "status": "online",
        "queue_wait_seconds": 60.0, "calibration_snapshot_id": f"{name}@20260101T000000Z-000000000000",
        "capabilities": {"crypto_modes": list(MODES), "qkd": False, "max_shots": 100000, "num_qubits": 27},
        "prediction": {"method": "zne-linear", "params": {"scale_factors": [1, 3]}, "shot_multiplier": 2.0,
                       "expected_fidelity": 0.9, "confidence": 0.8, "model_version": "em-policy/1",
                       "estimated_seconds": 10.0},
        "prediction_error": None,
    }
    for key, value in over.items():
        if key in ("prediction", "capabilities") and isinstance(value, dict):
            b[key] = {**b[key], **value}
        else:
            b[key] = value
    return b


def _inputs(backends: list[dict[str, Any]], *, seed: int = 1, policy: dict[str, Any] | None = None,
            **job: Any) -> dict[str, Any]:
    return {
        "job": {"job_id": "00000000-0000-0000-0000-000000000001", "tenant": "org-a", "manifest_sha256": "ab" * 32,
                "crypto_mode": "hybrid", "shots": 4000, "shot_budget": 40000, "priority_class": "standard",
                "num_qubits": 3, "deadline_seconds": None, "backend_id": None, **job},
        "tenant_policy": policy or {}, "backends": backends, "profile": profile(BUILTIN, {}),
        "seed": seed, "now": "2026-11-29T00:00:00+00:00",
    }


def test_best_fidelity_per_cost_wins_and_every_filter_says_why() -> None:
    backends = [
        _backend("cheap-good", cost_per_shot=0.0001),
        _backend("dear", cost_per_shot=0.001),
        _backend("classical-only", capabilities={"crypto_modes": ["classical"]}),
        _backend("small", capabilities={"num_qubits": 2}),
        _backend("down", status="calibrating"),
        _backend("slow", queue_wait_seconds=10_000.0),
        _backend("no-prediction", prediction=None,
                 prediction_error={"code": "em_policy.circuit_too_large", "message": "too big"}),
    ]
    body = decide(_inputs(backends, deadline_seconds=3600.0), BUILTIN)
    assert body["chosen"]["backend_id"] == "cheap-good"
    assert body["chosen"]["em_method"] == "zne-linear" and 0 < body["confidence"] <= 0.8
    reasons = {r["backend_id"]: r["reasons"] for r in rejections(body)}
    assert reasons == {
        "classical-only": ["crypto-mode: supports crypto modes ['classical']; the job needs hybrid"],
        "small": ["capability: has 2 qubits; the circuit uses 3"],
        "down": ["status: is calibrating"],
        "slow": ["sla: would finish in about 10010 s (queue 10000 s); the SLA leaves 3600 s"],
        "no-prediction": ["prediction: the EM policy could not predict for it (em_policy.circuit_too_large: too big)"],
    }
    rows = {r["backend_id"]: r for r in body["backends"]}
    # a backend with no prediction is not judged by filters that need one
    assert {f["plugin"]: f["verdict"] for f in rows["no-prediction"]["filters"]}["sla"] == "skip"
    dear = rows["dear"]
    assert dear["normalized_score"] == pytest.approx(0.1)
    assert dear["terms"]["effective_cost"] == pytest.approx(0.001 * 4000 * 2.0)


def test_tenant_policy_min_mode_allow_list_qkd_and_pinned_backend() -> None:
    backends = [_backend("a", capabilities={"crypto_modes": ["classical", "hybrid"]}),
                _backend("b", capabilities={"qkd": True}), _backend("c")]
    body = decide(_inputs(backends, policy={"min_crypto_mode": "pqc-required"}), BUILTIN)
    assert {r["backend_id"] for r in rejections(body)} == {"a"}
    body = decide(_inputs(backends, policy={"allowed_backends": ["c"]}), BUILTIN)
    assert body["chosen"]["backend_id"] == "c"
    body = decide(_inputs(backends, policy={"qkd": "required"}), BUILTIN)
    assert body["chosen"]["backend_id"] == "b" and len(rejections(body)) == 2
    body = decide(_inputs(backends, policy={"qkd": "preferred"}), BUILTIN)
    assert body["chosen"]["backend_id"] == "b"  # otherwise equal: the QKD link tips it
    body = decide(_inputs(backends, backend_id="a"), BUILTIN)
    assert body["chosen"]["backend_id"] == "a"


def test_no_backend_fits_lists_every_backend_with_its_reason() -> None:
    body = decide(_inputs([_backend("x", status="offline"), _backend("y", capabilities={"max_shots": 100})]),
                  BUILTIN)
    assert body["chosen"] is None and body["confidence"] == 0.0
    assert rejections(body) == [{"backend_id": "x", "reasons": ["status: is offline"]},
                                {"backend_id": "y", "reasons": [
                                    "capability: runs at most 100 shots per circuit; the job asks 4000"]}]


def test_priority_class_weighs_waiting() -> None:
    # "quick" is a bit worse per cost but starts at once; "busy" is better but has a long queue
    backends = [_backend("quick", cost_per_shot=0.00015, queue_wait_seconds=0.0),
                _backend("busy", cost_per_shot=0.0001, queue_wait_seconds=600.0)]
    chosen = {c: decide(_inputs(backends, priority_class=c), BUILTIN)["chosen"]["backend_id"]
              for c in PRIORITY_CLASSES}
    assert chosen == {"critical": "quick", "essential": "quick", "standard": "quick", "background": "busy"}


def test_fidelity_exponent_buys_fidelity_with_money() -> None:
    # "good" has 1.2x the fidelity at 2x the price: SPEC-001's ratio picks "cheap"; an exponent above
    # log 2 / log 1.2 = 3.8 picks "good"
    backends = [_backend("cheap", cost_per_shot=0.0001, prediction={"expected_fidelity": 0.75}),
                _backend("good", cost_per_shot=0.0002, prediction={"expected_fidelity": 0.9})]

    def chosen(config: dict[str, Any]) -> tuple[str, float]:
        inputs = {**_inputs(backends), "profile": profile(BUILTIN, config)}
        body = decide(inputs, BUILTIN)
        row = next(r for r in body["backends"] if r["backend_id"] == body["chosen"]["backend_id"])
        return row["backend_id"], row["terms"]["fidelity_per_cost"]

    assert chosen({})[0] == "cheap"
    assert chosen({"fidelity_exponent": 1.0}) == chosen({})
    assert chosen({"fidelity_exponent": 3.0})[0] == "cheap"
    good, ratio = chosen({"fidelity_exponent": 5.0})
    assert good == "good" and ratio == pytest.approx(0.9 ** 5 / (0.0002 * 4000 * 2.0))


def test_exact_ties_are_broken_by_the_seed_and_recorded() -> None:
    backends = [_backend(f"twin-{i}") for i in range(4)]
    picks = {decide(_inputs(backends, seed=s), BUILTIN)["chosen"]["backend_id"] for s in range(40)}
    assert len(picks) > 1  # the seed decides, not the order
    body = decide(_inputs(backends, seed=5), BUILTIN)
    assert body["chosen"]["tie_broken_by_seed"] is True
    again = decide(_inputs(list(reversed(backends)), seed=5), BUILTIN)
    assert again["chosen"] == body["chosen"] and again["backends"] == body["backends"]  # order does not matter


def _random_inputs(rng: random.Random) -> dict[str, Any]:
    backends = []
    for i in range(rng.randint(1, 12)):
        predicted = rng.random() > 0.1
        backends.append(_backend(
            f"b{i:02d}", cost_per_shot=rng.choice([0.00005, 0.0001, 0.0003, 0.001]) * rng.uniform(0.5, 2),
            availability=rng.uniform(0.7, 1.0), status=rng.choice(["online"] * 6 + ["calibrating", "offline"]),
            queue_wait_seconds=rng.expovariate(1 / 300),
            capabilities={"crypto_modes": rng.sample(MODES, rng.randint(1, 3)), "qkd": rng.random() < 0.3,
                          "num_qubits": rng.choice([5, 7, 16, 27, 127]), "max_shots": rng.choice([20000, 100000])},
            prediction={"method": rng.choice(["none", "zne-linear", "zne-exp", "ml-qem"]),
                        "shot_multiplier": rng.uniform(1, 8), "expected_fidelity": rng.uniform(0.3, 1.0),
                        "confidence": rng.random(), "estimated_seconds": rng.uniform(1, 600)} if predicted else None,
            prediction_error=None if predicted else {"code": "em_policy.circuit_too_large", "message": "x"}))
    policy = rng.choice([{}, {"min_crypto_mode": "hybrid"}, {"qkd": rng.choice(["required", "preferred"])},
                         {"allowed_backends": [b["backend_id"] for b in backends[: len(backends) // 2 + 1]]}])
    return _inputs(backends, seed=rng.randint(0, 2**31), policy=policy,
                   crypto_mode=rng.choice(MODES), shots=rng.choice([1000, 4000, 50000]),
                   priority_class=rng.choice(PRIORITY_CLASSES), num_qubits=rng.randint(1, 20),
                   deadline_seconds=rng.choice([None, 600.0, 3600.0]))


def test_500_random_decisions_replay_byte_identically() -> None:
    """Replay is recomputation from the stored (JSON) inputs: the body must come out byte-identical."""
    rng = random.Random(2026)
    chose = 0
    for _ in range(500):
        inputs = _random_inputs(rng)
        body = canonical_json(decide(inputs, BUILTIN))
        stored = json.loads(canonical_json(inputs))  # what the decision envelope carries
        assert canonical_json(decide(stored, resolve([p.name for p in BUILTIN]))) == body
        chose += json.loads(body)["chosen"] is not None
    assert 100 < chose < 500  # the generator exercises both outcomes


def test_a_changed_input_changes_the_replayed_body() -> None:
    inputs = _random_inputs(random.Random(3))
    body = canonical_json(decide(inputs, BUILTIN))
    changed = copy.deepcopy(inputs)
    changed["backends"][0]["capabilities"]["num_qubits"] += 1  # one calibration-derived value
    assert canonical_json(decide(changed, BUILTIN)) != body  # at least the inputs digest differs


def test_replay_refuses_other_plugins_or_a_tampered_config() -> None:
    inputs = _inputs([_backend("a")])
    with pytest.raises(SchedulingError, match="recorded with plugins"):
        decide(inputs, BUILTIN[:-1])
    tampered = copy.deepcopy(inputs)
    tampered["profile"]["config"]["availability_penalty"] = 0.9
    with pytest.raises(SchedulingError, match="does not match its hash"):
        decide(tampered, BUILTIN)
    with pytest.raises(QaiError) as err:
        resolve(["crypto-mode", "nope"])
    assert err.value.code == "scheduler.unknown_plugin"


def test_prefilter_skips_the_policy_call_for_hopeless_backends() -> None:
    job = _inputs([])["job"]
    config = profile(BUILTIN, {})["config"]
    assert prefilter(job, _backend("a"), {}, BUILTIN, config)
    assert not prefilter(job, _backend("b", status="offline"), {}, BUILTIN, config)
    assert not prefilter(job, _backend("c", capabilities={"crypto_modes": ["classical"]}), {}, BUILTIN, config)
