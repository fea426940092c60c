"""Co-selecting the EM method: the ``value`` profile scores every method the policy predicts within
the shot budget on every backend and takes the best (backend, method) pair; decisions taken without
it (the default profile, or recorded before the knob existed) come out as before."""

from __future__ import annotations

import copy
import json
import math
import random
from typing import Any

import pytest

from scheduler.engine import DEFAULT_CONFIG, PRIORITY_CLASSES, config_hash, decide, profile
from scheduler.plugins import BUILTIN, OPTIONAL, resolve
from scheduler.service import tenant_profile
from sdk.canonical import canonical_json
from sdk.errors import QaiError
from tests.test_scheduler_engine import _backend, _inputs, _random_inputs

VALUE_PLUGINS = [*(p for p in BUILTIN if p.kind == "filter"), *OPTIONAL,
                 *(p for p in BUILTIN if p.name == "qkd-preference")]
ZNE = {"method": "zne-linear", "params": {"scale_factors": [1, 3]}, "shot_multiplier": 3.0,
       "expected_fidelity": 0.9, "estimated_seconds": 30.0}
RAW = {"method": "unmitigated", "params": {}, "shot_multiplier": 1.0, "expected_fidelity": 0.88,
       "estimated_seconds": 10.0}


def _with_options(name: str, *options: dict[str, Any], **over: Any) -> dict[str, Any]:
    first = options[0]
    return _backend(name, prediction={**first, "options": list(options)}, **over)


def _value(backends: list[dict[str, Any]], config: dict[str, Any] | None = None, **job: Any) -> dict[str, Any]:
    return {**_inputs(backends, **job), "profile": profile(VALUE_PLUGINS, {"em_coselect": 1, **(config or {})})}


def _utility(inputs: dict[str, Any], backend: dict[str, Any], option: dict[str, Any]) -> float:
    config, job = inputs["profile"]["config"], inputs["job"]
    cost = backend["cost_per_shot"] * job["shots"] * option["shot_multiplier"]
    wait = config["wait_cost_usd_per_second"] * config["wait_weight"][job["priority_class"]] * (
        backend["queue_wait_seconds"] + option["estimated_seconds"])
    return float(config["fidelity_value_usd"] * option["expected_fidelity"] - cost - wait)


def test_the_value_profile_picks_the_method_worth_its_price() -> None:
    # ZNE's +0.02 fidelity is worth 2 USD at 100 USD per unit: it pays for itself at 0.4 USD of shots
    # a run (x3), not at 4 USD (x3)
    cheap = decide(_value([_with_options("a", ZNE, RAW, cost_per_shot=0.0001)]), VALUE_PLUGINS)
    assert cheap["chosen"]["em_method"] == "zne-linear" and cheap["chosen"]["estimated_seconds"] == 30.0
    dear = decide(_value([_with_options("a", ZNE, RAW, cost_per_shot=0.001)]), VALUE_PLUGINS)
    chosen = dear["chosen"]
    assert (chosen["em_method"], chosen["em_params"], chosen["shot_multiplier"]) == ("unmitigated", {}, 1.0)
    assert chosen["expected_fidelity"] == 0.88 and chosen["estimated_seconds"] == 10.0
    row = dear["backends"][0]
    assert row["em_method"] == "unmitigated" and "unmitigated" in dear["rationale"]
    assert chosen["policy_em_method"] == "zne-linear"  # whose confidence the decision carries
    assert row["terms"]["utility_usd"] == pytest.approx(100 * 0.88 - 4.0 - 0.001 * (60 + 10))
    # the same inputs without em_coselect: the policy's method, whatever it costs
    plain = decide({**_inputs([_with_options("a", ZNE, RAW, cost_per_shot=0.001)]),
                    "profile": profile(VALUE_PLUGINS, {})}, VALUE_PLUGINS)
    assert plain["chosen"]["em_method"] == "zne-linear" and "estimated_seconds" not in plain["chosen"]


def test_a_method_that_meets_the_deadline_makes_its_backend_eligible() -> None:
    slow = {**ZNE, "estimated_seconds": 4000.0}
    inputs = _value([_with_options("a", slow, RAW)], deadline_seconds=3600.0)
    body = decide(inputs, VALUE_PLUGINS)
    assert body["chosen"]["em_method"] == "unmitigated"
    assert {f["plugin"]: f["verdict"] for f in body["backends"][0]["filters"]}["sla"] == "pass"
    # the policy's method alone (no co-selection) misses the deadline: nothing fits
    alone = decide({**inputs, "profile": profile(VALUE_PLUGINS, {})}, VALUE_PLUGINS)
    assert alone["chosen"] is None
    sla = next(f for f in alone["backends"][0]["filters"] if f["plugin"] == "sla")
    assert sla["verdict"] == "reject" and sla["reason"].startswith("would finish in about 4060 s")


def test_the_policys_method_wins_a_tie() -> None:
    twin = {**ZNE, "method": "zne-richardson"}  # the same figures under another name
    body = decide(_value([_with_options("a", ZNE, twin)]), VALUE_PLUGINS)
    assert body["chosen"]["em_method"] == "zne-linear"
    nearly = {**twin, "expected_fidelity": ZNE["expected_fidelity"] + 1e-15}  # within the tie tolerance
    assert decide(_value([_with_options("a", ZNE, nearly)]), VALUE_PLUGINS)["chosen"]["em_method"] == "zne-linear"
    better = {**twin, "expected_fidelity": ZNE["expected_fidelity"] + 1e-6}
    assert decide(_value([_with_options("a", ZNE, better)]), VALUE_PLUGINS)["chosen"]["em_method"] == "zne-richardson"


def test_the_best_pair_over_backends_and_methods_is_chosen() -> None:
    rng = random.Random(11)
    for _ in range(200):
        backends = []
        for i in range(rng.randint(1, 8)):
            options = [{"method": m, "params": {}, "shot_multiplier": rng.choice([1.0, 2.0, 3.0, 5.0]),
                        "expected_fidelity": rng.uniform(0.5, 1.0), "estimated_seconds": rng.uniform(1, 900)}
                       for m in rng.sample(["unmitigated", "zne-linear", "zne-exp", "ml-qem"], rng.randint(1, 3))]
            backends.append(_with_options(f"b{i}", *options, cost_per_shot=rng.choice([0.0, 0.0001, 0.001]),
                                          queue_wait_seconds=rng.expovariate(1 / 300)))
        inputs = _value(backends, priority_class=rng.choice(PRIORITY_CLASSES))
        body = decide(inputs, VALUE_PLUGINS)
        best = max(_utility(inputs, b, o) for b in backends for o in b["prediction"]["options"])
        b = next(b for b in backends if b["backend_id"] == body["chosen"]["backend_id"])
        o = next(o for o in b["prediction"]["options"] if o["method"] == body["chosen"]["em_method"])
        assert math.isclose(_utility(inputs, b, o), best, rel_tol=1e-9, abs_tol=1e-9)


def test_without_co_selection_options_change_nothing() -> None:
    rng = random.Random(5)
    for _ in range(100):
        inputs = _random_inputs(rng)
        with_options = copy.deepcopy(inputs)
        for b in with_options["backends"]:
            if b.get("prediction"):
                p = b["prediction"]
                b["prediction"]["options"] = [{k: p.get(k, {}) for k in ("method", "params", "shot_multiplier",
                                                                       "expected_fidelity", "estimated_seconds")},
                                              {**RAW, "expected_fidelity": 1.0}]
        plain, optioned = decide(inputs, BUILTIN), decide(with_options, BUILTIN)
        plain.pop("inputs_sha256"), optioned.pop("inputs_sha256")
        assert plain == optioned


def test_decisions_recorded_before_the_knobs_replay_as_they_were_taken() -> None:
    """A profile recorded before em_coselect and the value-score knobs existed lacks them; its
    decisions still recompute (the engine reads the knobs with defaults that change nothing)."""
    rng = random.Random(8)
    new_keys = ("em_coselect", "fidelity_value_usd", "wait_cost_usd_per_second")
    for _ in range(50):
        inputs = _random_inputs(rng)
        old = copy.deepcopy(inputs)
        for key in new_keys:
            del old["profile"]["config"][key]
        old["profile"]["config_hash"] = config_hash(old["profile"]["config"])
        now, then = decide(inputs, BUILTIN), decide(json.loads(canonical_json(old)), BUILTIN)
        now.pop("inputs_sha256"), then.pop("inputs_sha256")
        assert now == then
    assert all(k in DEFAULT_CONFIG for k in new_keys)


def test_500_random_co_selected_decisions_replay_byte_identically() -> None:
    rng = random.Random(2027)
    switched = 0
    for _ in range(500):
        inputs = _random_inputs(rng)
        for b in inputs["backends"]:
            p = b.get("prediction")
            if p:
                p["params"] = {}
                own = {k: p[k] for k in ("method", "params", "shot_multiplier", "expected_fidelity",
                                         "estimated_seconds")}
                others = [{"method": m, "params": {}, "shot_multiplier": rng.uniform(1, 5),
                           "expected_fidelity": rng.uniform(0.3, 1.0), "estimated_seconds": rng.uniform(1, 600)}
                          for m in sorted({"unmitigated", "zne-exp"} - {p["method"]})[: rng.randint(0, 2)]]
                p["options"] = [own, *others]
        inputs["profile"] = profile(VALUE_PLUGINS, {"em_coselect": 1})
        body = canonical_json(decide(inputs, VALUE_PLUGINS))
        stored = json.loads(canonical_json(inputs))
        assert canonical_json(decide(stored, resolve([p["name"] for p in stored["profile"]["plugins"]]))) == body
        chosen = json.loads(body)["chosen"]
        if chosen is not None:
            backend = next(b for b in inputs["backends"] if b["backend_id"] == chosen["backend_id"])
            switched += chosen["em_method"] != backend["prediction"]["method"]
    assert switched > 20  # the generator exercises methods other than the policy's


def test_a_tenant_profile_names_value_score_or_v1_score_not_both() -> None:
    names = [p.name for p in VALUE_PLUGINS]
    plugins, prof = tenant_profile({"scheduler": {"name": "value", "plugins": names,
                                                  "config": {"em_coselect": 1, "fidelity_value_usd": 50}}})
    assert [p.name for p in plugins] == names and prof["config"]["fidelity_value_usd"] == 50
    for extra in ("v1-score", "wait"):
        with pytest.raises(QaiError) as err:
            tenant_profile({"scheduler": {"plugins": [*names, extra]}})
        assert err.value.code == "scheduler.bad_profile"
    for bad in ({"em_coselect": True}, {"em_coselect": 2}, {"fidelity_value_usd": 0}):
        with pytest.raises(QaiError) as err:
            tenant_profile({"scheduler": {"config": bad}})
        assert err.value.code == "scheduler.bad_profile", bad


def test_utilities_far_apart_never_tie() -> None:
    # costs of hundreds of thousands of USD: an exponential factor would round both to 0 (a tie the
    # seed would break); the value factor keeps them apart
    backends = [_with_options("dear", RAW, cost_per_shot=200.0), _with_options("dearer", RAW, cost_per_shot=100.0)]
    for seed in range(10):
        body = decide(_value(backends, seed=seed), VALUE_PLUGINS)
        assert body["chosen"]["backend_id"] == "dearer" and body["chosen"]["tie_broken_by_seed"] is False
        assert body["chosen"]["policy_em_method"] == "unmitigated"
