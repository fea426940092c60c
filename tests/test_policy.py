"""The EM policy engine on real harness data: labels, training, determinism, the bundle, ML-QEM as
a harness method, and /v1/predict over real HTTP with every bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from em_policy.bundle import dumps, loads
from em_policy.dataset import load
from em_policy.evaluate import ece
from em_policy.mlqem import MLQEM
from em_policy.policy import (
    BUDGET_RATIOS,
    POLICY_FEATURES,
    TrainConfig,
    achieved,
    best_method,
    budget_feature,
    fit,
    matrix,
    oracle,
    prepare,
)
from harness.catalog import catalog_snapshot
from orchestrator.app import create_app
from orchestrator.auth import Role, issue_token
from orchestrator.services import Services
from sdk.errors import QaiError
from tests.conftest import LiveServer
from tests.policy_data import BACKENDS, CONFIG, HOLDOUT, dataset
from tests.test_jobs import svc  # noqa: F401  (the PostgreSQL+S3 and SQLite+local fixture)

SMALL = TrainConfig(seed=3, holdout_backends=HOLDOUT, ensemble=2)
GHZ3 = """OPENQASM 3.0;
include "stdgates.inc";
qubit[3] q;
bit[3] c;
h q[0];
cx q[0], q[1];
cx q[1], q[2];
c = measure q;
"""


@pytest.fixture(scope="session")
def data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dataset(tmp_path_factory.getbasetemp().parent)


@pytest.fixture(scope="session")
def frame(data_path: Path) -> pd.DataFrame:
    return load([data_path])[0]


@pytest.fixture(scope="session")
def fitted(frame: pd.DataFrame) -> Any:
    return fit(frame, SMALL, dataset_sha256="test")


# ------------------------------------------------------------------------------------------- pure parts


def test_labels_respect_the_budget_and_break_ties_towards_the_cheaper_method() -> None:
    fid = {"unmitigated": 0.90, "ml-qem": 0.903, "zne-linear-global": 0.95, "zne-richardson-global": 0.97}
    mult = {"unmitigated": 1.0, "ml-qem": 1.0, "zne-linear-global": 9.0, "zne-richardson-global": 57.0}
    assert best_method(fid, mult, 1, tie=0.005) == "unmitigated"  # ml-qem is within the tie: the cheaper wins
    assert best_method(fid, mult, 1, tie=0.0) == "ml-qem"
    assert best_method(fid, mult, 16, tie=0.005) == "zne-linear-global"
    assert best_method(fid, mult, 64, tie=0.005) == "zne-richardson-global"
    assert best_method(fid, mult, 64, tie=0.05) == "zne-linear-global"  # 0.95 ties 0.97 at 0.05: cheaper
    assert oracle(fid, mult, 16) == 0.95
    # a choice over budget achieves what the unmitigated run achieves
    assert achieved("zne-richardson-global", fid, mult, 16) == 0.90
    assert achieved("zne-linear-global", fid, mult, 16) == 0.95
    failed = dict(fid, **{"zne-linear-global": math.nan})  # the method failed on this group
    assert best_method(failed, mult, 16, tie=0.0) == "ml-qem"
    assert achieved("zne-linear-global", failed, mult, 16) == 0.90


def test_ece_of_calibrated_and_overconfident_scores() -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 20000)
    right = rng.uniform(0, 1, 20000) < conf
    assert ece(conf, right)[0] < 0.02
    assert ece(np.full(1000, 0.9), np.arange(1000) < 500)[0] == pytest.approx(0.4)


# ------------------------------------------------------------------------------------------- training


def test_the_same_run_twice_is_refused(frame: pd.DataFrame) -> None:
    with pytest.raises(QaiError) as e:
        prepare(pd.concat([frame, frame.iloc[:3]], ignore_index=True), SMALL)
    assert e.value.code == "em_policy.bad_data" and e.value.status == 422


def test_split_holds_backends_and_circuits_out(frame: pd.DataFrame) -> None:
    prep = prepare(frame, SMALL)
    g = prep.groups.reset_index()
    assert set(g.loc[g["split"].isin(["holdout", "holdout_history"]), "backend_id"]) == set(HOLDOUT)
    assert not set(g.loc[g["split"] == "train", "backend_id"]) & set(HOLDOUT)
    train_circuits = set(g.loc[g["split"] == "train", "circuit_id"])
    assert not train_circuits & set(g.loc[g["split"].isin(["holdout", "holdout_circuits"]), "circuit_id"])
    assert (g["split"] == "holdout").sum() > 0 and (g["split"] == "holdout_circuits").sum() > 0
    assert set(prep.methods) == set(CONFIG.methods) | {"ml-qem"}


def test_mlqem_learns_the_ideal_value(frame: pd.DataFrame) -> None:
    prep = prepare(frame, SMALL)
    g = prep.groups.reset_index()
    train, test = g[g["split"] == "train"], g[g["split"] == "holdout_circuits"]

    def error(model: MLQEM, rows: pd.DataFrame) -> float:
        return float(np.mean(np.abs(model.predict(rows) - rows["ideal"])))

    noisy_train = float(np.mean(np.abs(train["noisy"] - train["ideal"])))
    for kind in ("ols", "rf", "mlp"):
        model = MLQEM(kind=kind, seed=1).fit(train)
        pred = model.predict(test)
        assert np.all(pred >= test["obs_min"].to_numpy() - 1e-12) and np.all(pred <= test["obs_max"].to_numpy() + 1e-12)
        if kind in ("ols", "rf"):  # they learn the noise of the data they saw (the held-out figures: the report)
            assert error(model, train) < 0.5 * noisy_train

    # A known noise law on the real circuits' features: each value shrinks towards c0 by a factor set
    # by the device and circuit. On circuits it never saw, the forest undoes it far better than nothing.
    rng = np.random.default_rng(5)

    def shrunk(rows: pd.DataFrame) -> pd.DataFrame:
        out = rows.copy()
        factor = np.clip(rows["dev_circuit_fidelity"].to_numpy(float) ** 0.7, 0.05, 1)
        c0 = rows["obs_identity"].to_numpy(float)
        noisy = c0 + factor * (rows["ideal"].to_numpy(float) - c0) + rng.normal(0, 0.005, len(rows))
        out["noisy"] = np.clip(noisy, rows["obs_min"], rows["obs_max"])
        return out

    synthetic_train, synthetic_test = shrunk(train), shrunk(test)
    forest = MLQEM(kind="rf", seed=1).fit(synthetic_train)
    noisy_test = float(np.mean(np.abs(synthetic_test["noisy"] - synthetic_test["ideal"])))
    assert error(forest, synthetic_test) < 0.6 * noisy_test
    with pytest.raises(QaiError) as e:
        MLQEM(kind="gnn")
    assert e.value.code == "em_policy.bad_config"


def test_training_is_deterministic_and_the_bundle_round_trips(frame: pd.DataFrame, fitted: Any) -> None:
    again = fit(frame, SMALL, dataset_sha256="test")
    first, second = dumps(fitted.model), dumps(again.model)
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    restored = loads(first)
    rows = [restored.with_history(r, str(k[2])) for k, r in
            zip(fitted.prep.groups.index[:20], fitted.prep.groups.iloc[:20].to_dict("records"), strict=True)]
    ratios = [BUDGET_RATIOS[i % len(BUDGET_RATIOS)] for i in range(len(rows))]
    a = fitted.model.decide(rows, ratios)
    b = restored.decide(rows, ratios)
    assert [dataclasses.asdict(x) for x in a] == [dataclasses.asdict(x) for x in b]
    for d in a:
        assert d.method in fitted.model.methods and 0 <= d.confidence <= 1 and 0 <= d.expected_fidelity <= 1
        assert d.shot_multiplier >= 1
    other = fit(frame, dataclasses.replace(SMALL, seed=4), dataset_sha256="test")
    assert dumps(other.model) != first  # the seed matters: it is not ignored somewhere
    # the chosen method always fits the budget by the regressor's own multiplier estimate
    for d, r in zip(a, ratios, strict=True):
        assert d.shot_multiplier <= r * (1 + 1e-9)


def test_validation_and_metadata(fitted: Any) -> None:
    meta = fitted.model.metadata
    assert meta["ranker"] in ("rf", "xgb") and meta["validation"]["ranker"] == meta["ranker"]
    assert {"rf_mean_regret", "xgb_mean_regret"} <= meta["validation"].keys()
    assert set(meta["training_backends"]) == set(BACKENDS) - set(HOLDOUT)
    assert meta["training_shots"] > 0 and meta["amortized_training_shots"] == meta["training_shots"] / 10_000
    lo, hi = fitted.model.ranges["dev_2q_error"]
    assert 0 < lo < hi < 0.2


def test_the_confidence_of_a_row_is_the_same_alone_and_in_any_batch(fitted: Any) -> None:
    # decide() scores every row's chosen method in one call: a row's confidence must not depend on
    # the rows asked with it (the scheduler asks about 50 backends at once, the REST batch any mix).
    model = fitted.model
    keys, records = fitted.prep.groups.index[:60], fitted.prep.groups.iloc[:60].to_dict("records")
    rows = [model.with_history(r, str(k[2])) for k, r in zip(keys, records, strict=True)]
    x = np.column_stack([matrix(rows, POLICY_FEATURES[:-1]), [budget_feature(BUDGET_RATIOS[i % len(BUDGET_RATIOS)])
                                                              for i in range(len(rows))]])
    p = model.ranker.proba(x)[:, 0]
    spread = model.regressor.predict(x[:, :-1])[1][:, 0]
    alone = [float(model.confidence(p[i:i + 1], spread[i:i + 1], x[i:i + 1])[0]) for i in range(len(rows))]
    for size in (2, 7, 34, 60):
        batched = [c for start in range(0, len(rows), size)
                   for c in model.confidence(p[start:start + size], spread[start:start + size],
                                             x[start:start + size]).tolist()]
        assert batched == alone  # exact: == on floats
    assert len(set(alone)) > 10 and all(0 < c < 1 for c in alone)  # the rows differ: the comparison means something


def test_out_of_range_features_warn_or_are_refused(fitted: Any) -> None:
    model = fitted.model
    row = fitted.prep.groups.iloc[0].to_dict()
    assert model.range_check(row) == []
    lo, hi = model.ranges["dev_2q_error"]
    warned = model.range_check(dict(row, dev_2q_error=hi + 0.5 * (hi - lo)))
    assert len(warned) == 1 and "dev_2q_error" in warned[0]
    with pytest.raises(QaiError) as e:
        model.range_check(dict(row, dev_2q_error=hi + 3 * (hi - lo)))
    assert e.value.code == "em_policy.features_out_of_range" and e.value.status == 422
    snap = str(fitted.prep.groups.index[0][2])
    plain = model.decide([model.with_history(row, snap)], [64.0])[0]
    lowered = model.decide([model.with_history(row, snap)], [64.0], [warned], [True])[0]
    assert lowered.confidence == pytest.approx(plain.confidence * 0.85) and lowered.warnings == warned
    noted = model.decide([model.with_history(row, snap)], [64.0], [["latency"]], [False])[0]
    assert noted.confidence == plain.confidence  # only the training range lowers it


# ------------------------------------------------------------------------------------ ml-qem in the harness


def test_mlqem_is_a_harness_method(fitted: Any, tmp_path: Path) -> None:
    from harness.run import RunConfig, build_tasks
    from harness.tasks import local_runner, run_task

    bundle = tmp_path / "policy.zip"
    bundle.write_bytes(dumps(fitted.model))
    with pytest.raises(QaiError) as e:
        RunConfig(methods=("unmitigated", "ml-qem"))
    assert e.value.code == "harness.method_unavailable"
    config = RunConfig(families=("random",), qubits=(3,), methods=("unmitigated", "ml-qem"), shots=2000, seed=11,
                       mlqem_bundle=str(bundle), mlqem_version="em-policy/test")
    snap = catalog_snapshot("fake_nairobi")
    task = build_tasks(config, [snap])[0]
    out = run_task(task, local_runner({snap.id: snap}))
    rows = {(r["observable"], r["method"]): r for r in out.rows}
    for (obs, method), r in rows.items():
        assert r["status"] == "ok", r
        if method != "ml-qem":
            continue
        base = rows[(obs, "unmitigated")]
        assert r["shot_multiplier"] == 1.0 and r["shots"] == base["shots"]  # the unmitigated executions only
        assert r["amortized_training_shots"] == fitted.model.metadata["amortized_training_shots"]
        expected = fitted.model.mitigate(pd.DataFrame([base]))[0]
        assert r["mitigated"] == pytest.approx(expected, abs=1e-12)
        assert '"model_version":"em-policy/test"' in r["parameters"]
    bundle.write_bytes(b"changed")  # the bound model changed under the run: refused, not silently used
    from harness.tasks import _MODELS

    _MODELS.clear()
    changed = run_task(task, local_runner({snap.id: snap}))
    assert {r["error_code"] for r in changed.rows if r["method"] == "ml-qem"} == {"harness.model_changed"}


# --------------------------------------------------------------------------------------- /v1/predict


@pytest.fixture
def trained(svc: Services, data_path: Path) -> Iterator[Services]:  # noqa: F811
    from harness.backends import import_catalog

    import_catalog(svc.db)
    yield svc


def _post(srv: LiveServer, path: str, body: Any, token: dict[str, str]) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=token, timeout=60)


def test_predict_over_http(trained: Services, data_path: Path, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    from em_policy.training import train_and_register

    services = trained
    token = {"Authorization": f"Bearer {issue_token(services.db, role=Role.AUDITOR, tenant=None).token}"}
    with LiveServer(create_app(services)) as srv:
        # no model yet: a clear 503, never a made-up answer
        r = _post(srv, "/v1/predict", {"qasm": GHZ3, "backend_id": "fake_manila", "shot_budget": 40000}, token)
        assert r.status_code == 503 and r.json()["error"]["code"] == "em_policy.model_unavailable"

        result = train_and_register([str(data_path)], SMALL, quiet=True, svc=services)
        assert result["promoted"] and result["version"] == "em-policy/1"

        good = {"qasm": GHZ3, "backend_id": "fake_nairobi", "shots": 4000, "shot_budget": 400000}
        r = _post(srv, "/v1/predict", good, token)
        assert r.status_code == 200, r.text
        p = r.json()
        assert p["method"] in result_methods(services) and p["model_version"] == "em-policy/1"
        assert 0 <= p["confidence"] <= 1 and 0 <= p["expected_fidelity"] <= 1 and p["shot_multiplier"] >= 1
        assert p["estimated_shots"] == math.ceil(4000 * p["shot_multiplier"]) <= 400000
        assert {a["method"] for a in p["alternatives"]} | {p["method"]} == set(result_methods(services))
        assert p["features"]["feat_num_qubits"] == 3 and p["features"]["feat_measurements"] == 3
        assert p["calibration_snapshot_id"] == catalog_snapshot("fake_nairobi").id
        if p["method"].startswith("zne-"):
            assert p["params"]["scale_factors"]
        # the same request twice: the same answer
        assert _post(srv, "/v1/predict", good, token).json() == p
        # a tight budget leaves only the 1x methods
        tight = _post(srv, "/v1/predict", dict(good, shot_budget=4000), token).json()
        assert tight["method"] in ("unmitigated", "ml-qem") and tight["shot_multiplier"] == 1.0

        # precomputed features give the same decision as the QASM they came from
        feats = _post(srv, "/v1/predict", {"features": p["features"], "backend_id": "fake_nairobi",
                                           "shot_budget": 400000}, token).json()
        assert (feats["method"], feats["confidence"]) == (p["method"], p["confidence"])

        # a batch: the model runs once over it; each answer is the single request's (the numbers to
        # the last bits or so: matrix against one-row arithmetic), each error its own, in order
        items = [dict(good, backend_id=b) for b in ("fake_nairobi", "fake_manila", "fake_guadalupe", "fake_kolkata")]
        items[2:2] = [dict(good, qasm="OPENQASM 2.0; qreg"), dict(good, shot_budget=100)]
        singles = [_post(srv, "/v1/predict", i, token).json() for i in items]
        from em_policy.service import PolicyService

        each = PolicyService.predict_each
        calls: list[int] = []

        def counted(self: PolicyService, requests: list[Any], **kw: Any) -> Any:
            calls.append(len(requests))
            return each(self, requests, **kw)
        monkeypatch.setattr(PolicyService, "predict_each", counted)
        batch = _post(srv, "/v1/predict:batch", {"requests": items}, token)
        monkeypatch.undo()
        assert calls == [len(items)]  # one run over the whole batch, errors included
        assert batch.status_code == 200
        results = batch.json()["results"]
        assert [r["error"]["code"] for r in results[2:4]] == ["em_policy.invalid_qasm", "em_policy.invalid_budget"]
        assert results[2:4] == singles[2:4]

        def same(a: dict[str, Any], b: dict[str, Any]) -> None:
            assert a.keys() == b.keys() and a["method"] == b["method"]
            for k in a:
                if isinstance(a[k], float):
                    assert math.isclose(a[k], b[k], rel_tol=1e-12, abs_tol=1e-15), k
                elif k == "alternatives":
                    for x, y in zip(a[k], b[k], strict=True):
                        same(x, y)
                else:
                    assert a[k] == b[k], k
        for r, single in zip(results, singles, strict=True):
            if "error" in single:
                assert r == single
            else:
                same(r["prediction"], single)
        assert sum("error" not in single for single in singles) >= 3

        # a server-side error met on one request (its snapshot unreadable) is answered in its place
        snapshot = PolicyService.snapshot

        def unreadable(self: PolicyService, backend_id: str | None, snapshot_id: str | None) -> Any:
            if backend_id == "fake_manila":
                raise QaiError("calibration.unreadable", "the snapshot cannot be read", status=503)
            return snapshot(self, backend_id, snapshot_id)
        monkeypatch.setattr(PolicyService, "snapshot", unreadable)
        partial = _post(srv, "/v1/predict:batch", {"requests": items}, token).json()["results"]
        monkeypatch.undo()
        assert partial[1]["error"]["code"] == "calibration.unreadable"
        assert partial[:1] + partial[2:] == results[:1] + results[2:]

        # an error that is no one request's (a bug, say) is looked for one request at a time
        def broken(self: PolicyService, requests: list[Any], **kw: Any) -> Any:
            if len(requests) > 1 or requests[0].backend_id == "fake_guadalupe":
                raise RuntimeError("boom")
            return each(self, requests, **kw)
        monkeypatch.setattr(PolicyService, "predict_each", broken)
        isolated = _post(srv, "/v1/predict:batch", {"requests": items}, token).json()["results"]
        monkeypatch.undo()
        assert isolated[4]["error"]["code"] == "internal.error" and "boom" not in json.dumps(isolated[4])
        one_by_one = [r.get("prediction", r) for r in isolated]  # the singles' very bits
        assert one_by_one[:4] + one_by_one[5:] == singles[:4] + singles[5:]

        old = dataclasses.replace(catalog_snapshot("fake_manila"), created_at=datetime(2015, 1, 1, tzinfo=UTC))
        from harness.backends import import_snapshot

        import_snapshot(services.db, old)
        huge = dict(p["features"], dev_2q_error=5.0)
        for body, status, code in (
            (dict(good, qasm="OPENQASM 3.0; qubit[2] q; h q[5];"), 422, "em_policy.invalid_qasm"),
            (dict(good, qasm="not qasm at all"), 422, "em_policy.invalid_qasm"),
            (dict(good, backend_id="fake_nowhere"), 404, "backends.unknown_backend"),
            (dict(good, shot_budget=-5), 422, "em_policy.invalid_budget"),
            (dict(good, shot_budget=100), 422, "em_policy.invalid_budget"),
            ({**{k: v for k, v in good.items() if k != "backend_id"}, "calibration_snapshot_id": old.id}, 422,
             "em_policy.snapshot_unsupported"),
            ({"features": huge, "backend_id": "fake_nairobi", "shot_budget": 400000}, 422,
             "em_policy.features_out_of_range"),
            ({"features": {"feat_num_qubits": 3}, "backend_id": "fake_nairobi", "shot_budget": 400000}, 422,
             "em_policy.bad_features"),
            (dict(good, observable={"ZZ": 1.0}), 422, "em_policy.invalid_observable"),
            (dict(good, observable={}), 422, "em_policy.invalid_observable"),
            (dict(good, observable={"ZZI": 1e308, "ZIZ": 1e308}), 422, "em_policy.invalid_observable"),
            (dict(good, shot_budget=10**400), 422, "em_policy.invalid_budget"),
            (dict(good, shots=10**400, shot_budget=10**400), 422, "em_policy.invalid_budget"),
            (dict(good, latency_budget_seconds=-1.0), 422, "em_policy.invalid_budget"),
            (dict(good, qasm=GHZ3 + "h q[0];\n"), 422, "em_policy.invalid_qasm"),  # a gate after measurement
            (dict(good, features=p["features"]), 422, "em_policy.bad_request"),  # both, though the QASM is cached
            ({**{k: v for k, v in good.items() if k != "backend_id"}, "calibration_snapshot_id": "fake_x@1"}, 404,
             "calibration.not_found"),
            (dict(good, backend_id="fake_manila", qasm=GHZ3.replace("[3]", "[7]")), 422,
             "em_policy.circuit_too_large"),
            (dict(good, surprise=1), 422, "request.invalid"),
        ):
            r = _post(srv, "/v1/predict", body, token)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)
        r = httpx.post(srv.url + "/v1/predict", json=good, timeout=30)
        assert r.status_code == 401
        commented = _post(srv, "/v1/predict", dict(good, qasm="// a GHZ state\n/* three qubits */\n" + GHZ3), token)
        assert commented.json()["method"] == p["method"]  # comments may precede the header

        # a calibration nothing has run on yet: answered, with the missing history said
        fresh = dataclasses.replace(catalog_snapshot("fake_nairobi"), created_at=datetime(2026, 11, 1, tzinfo=UTC))
        import_snapshot(services.db, fresh)
        new = _post(srv, "/v1/predict", {**{k: v for k, v in good.items() if k != "backend_id"},
                                         "calibration_snapshot_id": fresh.id}, token).json()
        assert any("no history" in w for w in new["warnings"]) and 0 <= new["expected_fidelity"] <= 1

        # slightly outside the training range: answered, with the confidence lowered and a warning
        lo, hi = loads_champion(services).ranges["dev_readout_error"]
        edge = dict(p["features"], dev_readout_error=hi + 0.3 * (hi - lo))
        w = _post(srv, "/v1/predict", {"features": edge, "backend_id": "fake_nairobi", "shot_budget": 400000},
                  token).json()
        assert any("dev_readout_error" in x for x in w["warnings"]) and w["confidence"] < 0.85


def test_a_circuit_on_a_snapshot_is_worked_out_once_per_model(trained: Services, data_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from em_policy.api import policy_service
    from em_policy.policy import PolicyModel
    from em_policy.service import PolicyService, Prediction, PredictRequest
    from em_policy.training import train_and_register
    from harness.catalog import catalog

    services = trained
    assert train_and_register([str(data_path)], SMALL, quiet=True, svc=services)["promoted"]
    service = policy_service(services)
    reqs = [PredictRequest(qasm=GHZ3, backend_id=b.backend_id, shots=4000, shot_budget=400000) for b in catalog()]

    def answers(predictions: list[Any]) -> list[Any]:
        return [(p.code, p.message, p.details) if isinstance(p, QaiError) else p.model_dump() for p in predictions]

    first = service.predict_each(reqs)
    # some backends answered, some refused (the small model's training range): both are remembered
    assert {isinstance(p, QaiError) for p in first} == {True, False}
    checks: list[int] = []
    range_check = PolicyModel.range_check
    monkeypatch.setattr(PolicyModel, "range_check", lambda self, row: checks.append(1) or range_check(self, row))
    again = service.predict_each(reqs)
    assert checks == [] and answers(again) == answers(first)  # remembered, bit for bit
    # a refusal is raised afresh, not the same object again
    assert all(a is not b for a, b in zip(again, first, strict=True) if isinstance(a, QaiError))
    # the request's own checks still come first: a bad budget is that, on a remembered circuit too
    refused = next(r for r, p in zip(reqs, first, strict=True) if isinstance(p, QaiError))
    bad = service.predict_each([refused.model_copy(update={"shot_budget": 100})])[0]
    assert isinstance(bad, QaiError) and bad.code == "em_policy.invalid_budget"
    # nothing remembered: the same answers worked out again
    cold = PolicyService(services).predict_each(reqs)
    assert len(checks) == sum(not isinstance(p, QaiError) or p.code == "em_policy.features_out_of_range"
                              for p in cold)
    assert answers(cold) == answers(first)

    # the scheduler's plain dicts are exactly what validation makes of them, type for type
    plain = service.predict_each_plain(reqs)
    assert len(plain) == len(reqs)
    for p, validated in zip(plain, first, strict=True):
        if isinstance(p, QaiError):
            assert isinstance(validated, QaiError) and p.code == validated.code
            continue
        assert not isinstance(validated, QaiError)
        _same_typed(p, validated.model_dump())
        _same_typed(Prediction.model_validate(p).model_dump(), p)
    shared = [p["params"] for p in plain if not isinstance(p, QaiError)]
    assert len({id(x) for x in shared}) == len(shared)  # each prediction's params its own dict

    # without the alternatives or the features, a prediction lacks those keys and nothing else moves
    for alternatives, features in ((False, False), (True, False), (False, True)):
        lean = service.predict_each_plain(reqs, alternatives=alternatives, features=features)
        dropped = {k for k, kept in (("alternatives", alternatives), ("features", features)) if not kept}
        for p, whole in zip(lean, plain, strict=True):
            if isinstance(p, QaiError):
                assert isinstance(whole, QaiError) and (p.code, p.details) == (whole.code, whole.details)
                continue
            assert not isinstance(whole, QaiError)
            _same_typed(p, {k: v for k, v in whole.items() if k not in dropped})
    # and the features each call's predictions carry are copies of their own, not shared between calls
    again = service.predict_each_plain(reqs)
    answered = [(a, b) for a, b in zip(again, plain, strict=True) if not isinstance(a, QaiError)]
    assert answered and all(a["features"] is not b["features"] for a, b in answered)


def _same_typed(a: Any, b: Any) -> None:
    """Equal, and of the same type all the way down (5 == 5.0, but one is not the other); the
    order of keys aside (a decision is canonical JSON)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            _same_typed(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same_typed(x, y)
    else:
        assert a == b


def test_a_served_model_is_renewed_by_its_alias_alone_and_replaced_on_promotion(
        trained: Services, data_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the TTL a server asks only which version the alias names (one registry read); the full
    resolve (run, ledger) and the bundle load happen only when that version changed."""
    from em_policy import registry
    from em_policy.service import ALIAS_TTL_SECONDS, PolicyService
    from em_policy.training import train_and_register

    services = trained
    assert train_and_register([str(data_path)], SMALL, quiet=True, svc=services)["promoted"]
    service = PolicyService(services)
    version, model = service.model()
    assert version == "em-policy/1"
    full: list[str] = []
    resolve = registry.resolve
    monkeypatch.setattr(registry, "resolve", lambda s, ref, *a: full.append(ref) or resolve(s, ref, *a))

    def expire() -> None:
        loaded = service._loaded
        assert loaded is not None
        service._loaded = dataclasses.replace(loaded, resolved_at=loaded.resolved_at - ALIAS_TTL_SECONDS)

    expire()
    assert service._resolve() == (version, model) and full == []  # same version: renewed, nothing re-read
    assert service._loaded is not None and time.monotonic() - service._loaded.resolved_at < ALIAS_TTL_SECONDS
    current = registry.resolve(services, "champion")
    again = registry.register(services, registry.load_bundle(services, current), params={}, metrics=current.metrics,
                              dataset_sha256=current.dataset_sha256, metadata={})
    registry.promote(services, again.version)
    full.clear()
    expire()
    new_version, new_model = service._resolve()
    assert (new_version, full) == (f"em-policy/{again.version}", ["champion"]) and new_model is not model


def test_the_alias_check_reads_mlflows_sqlite_table_and_agrees_with_its_client(
        trained: Services, data_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A server's periodic alias check reads MLflow's own alias table (one indexed read, not nine ORM
    queries holding the GIL); it gives the client's answer as the alias moves, and leaves to the
    client what it cannot read."""
    from em_policy import registry
    from em_policy.training import train_and_register

    services = trained
    assert train_and_register([str(data_path)], SMALL, quiet=True, svc=services)["promoted"]
    first = registry.resolve(services, "champion")

    def by_client(ref: str) -> int | None:
        entity = registry._version_entity(registry._client(services.settings), registry.MODEL_NAME, ref)
        return None if entity is None else int(entity.version)

    def answers(ref: str) -> list[bool]:
        return [registry.points_at(services, v, ref) for v in (1, 2, 3)]

    assert answers("champion") == [v == by_client("champion") for v in (1, 2, 3)] == [v == first.version
                                                                                      for v in (1, 2, 3)]
    again = registry.register(services, registry.load_bundle(services, first), params={}, metrics=first.metrics,
                              dataset_sha256=first.dataset_sha256, metadata={})
    registry.promote(services, again.version)
    assert by_client("champion") == again.version != first.version
    assert answers("champion") == [v == again.version for v in (1, 2, 3)]
    assert answers("no-such-alias") == [False] * 3 and by_client("no-such-alias") is None

    # the table, not the client, answered
    monkeypatch.setattr(registry, "_client", lambda settings: pytest.fail("the client was asked"))
    assert answers("champion") == [v == again.version for v in (1, 2, 3)]
    # a store without MLflow's table is left to the client
    other = tmp_path / "not-mlflow.db"
    sqlite3.connect(other).close()
    assert registry._alias_in_sqlite(other, registry.MODEL_NAME, "champion") is False


def test_the_alias_table_read_follows_a_store_made_again_and_leaves_mlflows_rules_to_it(tmp_path: Path) -> None:
    from em_policy.registry import _alias_in_sqlite

    db = tmp_path / "mlflow.db"

    def store(*rows: tuple[str, str, int]) -> None:
        db.unlink(missing_ok=True)
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE registered_model_aliases (alias TEXT, version INTEGER, name TEXT, "
                         "workspace TEXT)")
            conn.executemany("INSERT INTO registered_model_aliases VALUES (?, ?, ?, 'default')", rows)
        conn.close()

    store(("champion", 1, "m"))
    assert _alias_in_sqlite(db, "m", "champion") == 1 and _alias_in_sqlite(db, "m", "other") is None
    store(("champion", 2, "m"))  # a new file at the same path: read afresh, not through the old connection
    assert _alias_in_sqlite(db, "m", "champion") == 2
    store(("champion", 2, "m"), ("champion", 3, "m"))  # two workspaces: the client decides
    assert _alias_in_sqlite(db, "m", "champion") is False
    assert _alias_in_sqlite(db, "m", "latest") is False  # MLflow's newest-version rule, not a row
    db.unlink()
    assert _alias_in_sqlite(db, "m", "champion") is False


def test_predictions_with_refusals_leave_no_cyclic_garbage(trained: Services, data_path: Path) -> None:
    """A refusal kept with its traceback holds the frame that made the results, so every request,
    prediction and alternative of the call waited for the cycle collector (2 ms pauses every few
    decisions); without it they are freed when the call returns."""
    import gc

    from em_policy.api import policy_service
    from em_policy.service import Alternative, Prediction, PredictRequest
    from em_policy.training import train_and_register
    from harness.catalog import catalog

    assert train_and_register([str(data_path)], SMALL, quiet=True, svc=trained)["promoted"]
    service = policy_service(trained)
    reqs = [PredictRequest(qasm=GHZ3, backend_id=b.backend_id, shots=4000, shot_budget=400000) for b in catalog()]
    for _ in range(2):  # cold (computed) and warm (remembered) refusals alike
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            answers = service.predict_each(reqs)
            assert {type(a) for a in answers} == {Prediction, QaiError}  # some refused, some answered
            assert all(a.__traceback__ is None for a in answers if isinstance(a, QaiError))
            del answers
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, (Prediction, Alternative, PredictRequest, QaiError))]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert left == []


def result_methods(services: Services) -> list[str]:
    return list(loads_champion(services).methods)


def loads_champion(services: Services) -> Any:
    from em_policy import registry

    return loads(registry.load_bundle(services, registry.resolve(services, "champion")))
