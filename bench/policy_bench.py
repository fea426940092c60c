"""EM policy serving speed, against baselines measured in the same run.

(1) In-process: one decision (ranker + 5-MLP regressor + confidence) from the served bundle, one
    row at a time, against the naive way: scikit-learn's RandomForestClassifier.predict_proba on one
    row, for a forest of the same size fit on the same ranker rows. Ratio = naive / served.
(2) HTTP: ``qai serve em-policy`` (uvicorn, one worker) at an open-loop 200 requests/s of
    ``POST /v1/predict`` with precomputed features; latency is measured from each request's
    scheduled send time, so a stall counts in full (no coordinated omission). Then the same with
    OpenQASM bodies of repeated circuits (compiled features are cached per circuit and snapshot).

    .venv/bin/python bench/policy_bench.py --data PARQUET [--bundle FILE] [--seconds 20] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# OpenMP threads (scikit-learn's, XGBoost's) otherwise spin after each call and steal the CPU the next
# call, of either kind, needs: measured calls alternate, so each would slow the other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def in_process(data: list[str], rounds: int, bundle: str | None) -> tuple[dict[str, Any], Any, bytes]:
    import pandas as pd
    from sklearn.ensemble import RandomForestClassifier

    from em_policy.bundle import dumps, loads
    from em_policy.dataset import load
    from em_policy.evaluate import config_of
    from em_policy.policy import (
        BUDGET_RATIOS,
        TrainConfig,
        all_labels,
        design,
        fit,
        history_features,
        prepare,
        with_mlqem,
    )

    frame, sha, _ = load(data)
    blob = Path(bundle).read_bytes() if bundle else dumps(fit(frame, TrainConfig(), dataset_sha256=sha).model)
    model = loads(blob)  # exactly what the service serves
    prep = prepare(frame, config_of(model))
    prep = with_mlqem(prep, pd.Series(model.mitigate(prep.groups.reset_index()), index=prep.groups.index))
    hist = history_features(prep, model.history)
    train = prep.groups["split"] == "train"
    x, index = design(prep, hist, train, BUDGET_RATIOS)
    labels = all_labels(prep, TrainConfig().tie_tolerance)
    naive = RandomForestClassifier(n_estimators=200, min_samples_leaf=2, random_state=0, n_jobs=1)
    naive.fit(x, [labels[i] for i in index])
    holdout = prep.groups["split"] == "holdout"
    rows = [model.with_history(r, str(k[2])) for k, r in
            zip(prep.groups.index[holdout], prep.groups.loc[holdout].to_dict("records"), strict=True)]
    xh, _ = design(prep, hist, holdout, [64])

    served, baseline = [], []
    for i in range(rounds):  # interleaved, so drift in machine speed hits both alike
        row = rows[i % len(rows)]
        t = time.perf_counter()
        model.decide([row], [64.0])
        served.append(time.perf_counter() - t)
        t = time.perf_counter()
        naive.predict_proba(xh[i % len(xh)].reshape(1, -1))
        baseline.append(time.perf_counter() - t)
    if model.ranker.kind == "rf":  # the served forest gives sklearn's numbers
        from em_policy.fastpath import CompiledForest

        assert np.array_equal(CompiledForest.from_sklearn(naive).predict_proba(xh), naive.predict_proba(xh))
    result = {"served_p50_ms": 1e3 * statistics.median(served), "served_p99_ms": 1e3 * pct(served, 99),
              "naive_rf_p50_ms": 1e3 * statistics.median(baseline), "naive_rf_p99_ms": 1e3 * pct(baseline, 99),
              "ranker": model.ranker.kind}
    result["speedup_p50"] = result["naive_rf_p50_ms"] / result["served_p50_ms"]
    return result, prep, blob


async def open_loop(url: str, bodies: list[dict[str, Any]] | None, token: str, rate: float, seconds: float
                    ) -> dict[str, Any]:
    """``bodies`` None: GET /healthz, the baseline (the same server, client and machine, no work)."""
    import httpx

    latencies: list[float] = []
    errors = 0
    # A fixed set of senders, each with its own connection, takes requests off a queue at their
    # scheduled times: thousands of coroutines waiting on one client's pool would make the load
    # generator itself the bottleneck on these 2 cores.
    senders = 32
    clients = [httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
               for _ in range(senders)]
    try:
        for b in (bodies or [])[:20]:  # warm-up: model load, feature cache
            await clients[0].post("/v1/predict", json=b)
        n = int(rate * seconds)
        queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
        start = time.perf_counter() + 0.2

        async def produce() -> None:
            for i in range(n):
                scheduled = start + i / rate
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                queue.put_nowait((i, scheduled))
            for _ in range(senders):
                queue.put_nowait(None)

        async def send(client: httpx.AsyncClient) -> None:
            nonlocal errors
            while (item := await queue.get()) is not None:
                i, scheduled = item
                r = await (client.get("/healthz") if bodies is None else
                           client.post("/v1/predict", json=bodies[i % len(bodies)]))
                latencies.append(time.perf_counter() - scheduled)  # from the scheduled time: stalls count
                if r.status_code != 200:
                    errors += 1

        await asyncio.gather(produce(), *(send(c) for c in clients))
    finally:
        for c in clients:
            await c.aclose()
    return {"requests": len(latencies), "errors": errors, "p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * pct(latencies, 99), "max_ms": 1e3 * max(latencies)}


def http(prep: Any, blob: bytes, rate: float, seconds: float, workers: int) -> dict[str, Any]:
    from bench.serving import qai_serve
    from em_policy.bundle import loads
    from em_policy.registry import promote, register
    from harness.backends import import_catalog
    from orchestrator.auth import Role, issue_token
    from orchestrator.services import build_services
    from orchestrator.settings import Settings

    home = Path(tempfile.mkdtemp(prefix="qai-policy-bench-"))
    env = {**os.environ, "QAI_HOME": str(home)}
    settings = Settings(home=home)
    svc = build_services(settings)
    try:
        import_catalog(svc.db)
        meta = loads(blob).metadata
        mv = register(svc, blob, params={}, metrics={}, dataset_sha256=meta["dataset_sha256"], metadata={})
        promote(svc, mv.version)
        token = issue_token(svc.db, role=Role.AUDITOR, tenant=None).token
    finally:
        svc.close()
    holdout = prep.groups["split"] == "holdout"
    feature_bodies = []
    for key, row in zip(prep.groups.index[holdout], prep.groups.loc[holdout].to_dict("records"), strict=True):
        from em_policy.service import FEATURE_INPUT

        feature_bodies.append({"features": {k: float(row[k]) for k in FEATURE_INPUT},
                               "calibration_snapshot_id": str(key[2]), "shot_budget": 256_000, "shots": 4000})
    qasm_bodies = [{"qasm": GHZ.format(n=n, body=_ghz(n)), "backend_id": b, "shot_budget": 256_000}
                   for n in (2, 3, 4) for b in ("fake_nairobi", "fake_kyiv")]
    with qai_serve("em-policy", "--workers", str(workers), env=env) as url:
        baseline = asyncio.run(open_loop(url, None, token, rate, seconds))
        features = asyncio.run(open_loop(url, feature_bodies, token, rate, seconds))
        qasm = asyncio.run(open_loop(url, qasm_bodies, token, rate, seconds))
    return {"baseline GET /healthz": baseline, "features": features, "qasm_repeated": qasm}


GHZ = 'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[{n}] q;\nh q[0];\n{body}'


def _ghz(n: int) -> str:
    return "".join(f"cx q[{i}], q[{i + 1}];\n" for i in range(n - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="harness Parquet (repeatable)")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--bundle", help="a trained policy bundle (default: train one on --data first)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of qai serve em-policy")
    args = parser.parse_args()
    print("preparing the policy (the served bundle) and the naive forest ...", flush=True)
    proc, prep, blob = in_process(args.data, args.rounds, args.bundle)
    print(f"(1) in-process, one decision per call, ranker {proc['ranker']}:")
    print(f"    served bundle      p50 {proc['served_p50_ms']:.3f} ms   p99 {proc['served_p99_ms']:.3f} ms")
    print(f"    naive sklearn RF   p50 {proc['naive_rf_p50_ms']:.3f} ms   p99 {proc['naive_rf_p99_ms']:.3f} ms")
    print(f"    speed-up (p50)     {proc['speedup_p50']:.1f}x   (target >= 10x)")
    h = http(prep, blob, args.rate, args.seconds, args.workers)
    base = h["baseline GET /healthz"]
    for name, r in h.items():
        print(f"(2) HTTP {name}, {args.rate:.0f} req/s open loop, {args.workers} workers, {r['requests']} requests, "
              f"{r['errors']} errors: p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  max {r['max_ms']:.1f} ms"
              f"  (p99 {r['p99_ms'] / base['p99_ms']:.2f}x the baseline's; target p99 <= 15 ms)")


if __name__ == "__main__":
    main()
