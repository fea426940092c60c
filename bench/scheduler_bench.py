"""Scheduling latency over HTTP with 50 backends, against baselines measured in the same run.

``qai serve`` (uvicorn, one worker, the embedded default unless QAI_DATABASE_URL says otherwise)
with 50 registered backends: the 9 catalog devices plus 41 derived from them (the same calibration,
error rates scaled by a seeded factor, prices and queues varied). Jobs are submitted first; then
each ``POST /v1/schedule`` reads the catalog and backlog, asks the EM policy for all 50 backends
(one batch), runs the filter and score plugins, signs the decision (ML-DSA-65 + ECDSA P-256 through
the KMS), stores it and ledgers it. Requests are sent one after another (closed loop), so each
latency is the service's own, and timed at the client.

Baselines, in the same server and run: ``GET /healthz`` (the HTTP floor) and
``POST /v1/predict:batch`` for the same 50 backends (the policy call alone). The ratio of the two
p99s says what deciding, signing and ledgering add to the prediction the decision needs.

    .venv/bin/python bench/scheduler_bench.py [--data PARQUET] [--jobs 400] [--warmup 40]
                                              [--s3 [--s3-latency-ms MS]]

``--s3`` puts the object store on S3 (a moto server in its own process, an Object Lock bucket);
the database is the embedded default unless QAI_DATABASE_URL says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/policy_bench.py

BACKENDS = 50
GHZ = 'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[{n}] q;\nh q[0];\n{body}'


def ghz(n: int) -> str:
    return GHZ.format(n=n, body="".join(f"cx q[{i}], q[{i + 1}];\n" for i in range(n - 1)))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def derived_backends(seed: int) -> list[tuple[Any, Any]]:
    """(snapshot, info) of the 41 backends derived from the catalog devices."""
    from harness.catalog import catalog, catalog_snapshot

    rng = random.Random(seed)
    base = catalog()
    out = []
    for i in range(BACKENDS - len(base)):
        info = base[i % len(base)]
        snap = catalog_snapshot(info.backend_id)
        new_id = f"{info.backend_id}-d{i:02d}"
        scale = rng.uniform(0.8, 1.25)
        gates = {g: {q: {**v, "error": min(0.5, v["error"] * scale)} for q, v in per.items()}
                 for g, per in snap.gates.items()}
        out.append((dataclasses.replace(snap, backend_id=new_id, gates=gates),
                    dataclasses.replace(info, backend_id=new_id,
                                        cost_per_shot=round(info.cost_per_shot * rng.uniform(0.7, 1.4) + 1e-5, 8),
                                        queue={**info.queue,
                                               "mean_wait_seconds": round(rng.uniform(1, 1800), 1)})))
    return out


def prepare(home: Path, data: str, jobs: int) -> tuple[str, list[str], list[dict[str, Any]]]:
    """Register the backends, train and promote a policy, submit ``jobs`` jobs. Returns a token,
    the job ids and the 50 predict requests of the baseline."""
    from em_policy.policy import TrainConfig
    from em_policy.training import train_and_register
    from harness.backends import import_catalog, import_snapshot, list_backends
    from orchestrator.auth import Principal, Role, create_tenant, issue_token
    from orchestrator.services import build_services
    from orchestrator.settings import Settings
    from sdk.manifest import new_manifest, sign_manifest

    svc = build_services(Settings(home=home))
    try:
        import_catalog(svc.db)
        for snap, info in derived_backends(seed=11):
            import_snapshot(svc.db, snap, info)
        assert len(list_backends(svc.db)) == BACKENDS
        config = TrainConfig(seed=3, holdout_backends=("fake_nairobi",), ensemble=2)
        result = train_and_register([data], config, quiet=True, svc=svc)
        assert result["promoted"], result
        create_tenant(svc.db, "bench")
        svc.kms.create_key("bench.manifests", tenant="bench", principal=Principal.system("bench"))
        signer = Principal(subject="bench", role=Role.SIGNER, tenant="bench")
        envelopes = []
        for k in range(jobs):
            m = new_manifest(qasm=ghz(2 + k % 3), tenant="bench", crypto_mode="hybrid", em_method="auto",
                             pqc_suite="ML-DSA-65+ECDSA-P256", shots=4000, seed=k,
                             priority_class=("critical", "essential", "standard", "background")[k % 4])
            envelopes.append(sign_manifest(m, lambda msg: svc.kms.sign("bench.manifests", principal=signer,
                                                                       message=msg)).model_dump(mode="json"))
        submitted = svc.jobs.submit_many(envelopes, Principal.system("bench"))
        ids = [s.job_id for s in submitted if not isinstance(s, BaseException)]
        assert len(ids) == jobs
        token = issue_token(svc.db, role=Role.ADMIN, tenant=None).token
        predict = [{"qasm": ghz(3), "calibration_snapshot_id": b["last_calibration_id"], "shots": 4000,
                    "shot_budget": 4000 * 4096} for b in list_backends(svc.db)]
    finally:
        svc.close()
    return token, ids, predict


def timed(client: httpx.Client, method: str, path: str, body: Any | None, expect: tuple[int, ...]) -> float:
    start = time.perf_counter()
    r = client.request(method, path, json=body)
    elapsed = (time.perf_counter() - start) * 1000
    if r.status_code not in expect:
        raise SystemExit(f"{method} {path} -> {r.status_code}: {r.text[:300]}")
    return elapsed


def summary(name: str, values: list[float]) -> dict[str, Any]:
    return {"name": name, "n": len(values), "p50_ms": pct(values, 50), "p99_ms": pct(values, 99),
            "max_ms": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="harness Parquet to train the policy on (default: the test dataset, "
                                       "generated on first use, about a minute)")
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--s3", action="store_true",
                        help="object store: S3 (a moto server in its own process) instead of the local directory")
    parser.add_argument("--s3-latency-ms", type=float, default=0.0,
                        help="with --s3: hold each S3 request this long (a real region's round trip)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.s3:
            from bench.serving import create_bucket, moto_s3

            endpoint = stack.enter_context(moto_s3(args.s3_latency_ms))
            create_bucket(endpoint, "qai-scheduler-bench")
            os.environ.update({"QAI_S3_BUCKET": "qai-scheduler-bench", "QAI_S3_ENDPOINT_URL": endpoint,
                               "QAI_S3_ACCESS_KEY_ID": "bench", "QAI_S3_SECRET_ACCESS_KEY": "bench"})
        run(args)
        if args.s3:
            # qai serve's uploader child outlives it by up to a parent poll (uvicorn re-raises the
            # SIGTERM before the server's own clean-up): keep S3 up until the child has gone
            from orchestrator.uploader_process import PARENT_POLL_SECONDS

            time.sleep(PARENT_POLL_SECONDS + 0.5)


def run(args: argparse.Namespace) -> None:
    from bench.serving import qai_serve

    data = args.data
    if data is None:
        from tests.policy_data import dataset

        cache = ROOT / ".qai" / "bench-data"
        cache.mkdir(parents=True, exist_ok=True)
        data = str(dataset(cache))
    home = Path(tempfile.mkdtemp(prefix="qai-scheduler-bench-"))
    print(f"preparing {BACKENDS} backends, a policy and {args.jobs} jobs in {home} ...", flush=True)
    token, ids, predict = prepare(home, data, args.jobs)
    # Workers run elsewhere in production; an embedded one here would execute the scheduled jobs in
    # the measured process and time the simulator, not the scheduler.
    env = {**os.environ, "QAI_HOME": str(home), "QAI_WORKER_EMBEDDED": "false"}
    with qai_serve("all", "--workers", "1", env=env) as url, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        warm, measured = ids[:args.warmup], ids[args.warmup:]
        for job_id in warm:  # first use of each circuit on each snapshot compiles it
            timed(c, "POST", "/v1/schedule", {"job_id": job_id}, (201,))
        for _ in range(5):
            timed(c, "POST", "/v1/predict:batch", {"requests": predict}, (200,))
        schedule, health, batch = [], [], []
        for job_id in measured:  # interleaved, so drift on a shared machine hits all three alike
            schedule.append(timed(c, "POST", "/v1/schedule", {"job_id": job_id}, (201,)))
            health.append(timed(c, "GET", "/healthz", None, (200,)))
            batch.append(timed(c, "POST", "/v1/predict:batch", {"requests": predict}, (200,)))
        sample = c.post("/v1/schedule", json={"job_id": measured[0]}).json()["decision"]
    eligible = sum(b["eligible"] for b in sample["backends"])
    print(f"{len(measured)} decisions over {len(sample['backends'])} backends ({eligible} eligible in a sample), "
          f"one uvicorn worker, closed loop:")
    rows = [summary("POST /v1/schedule", schedule), summary("baseline GET /healthz", health),
            summary("baseline POST /v1/predict:batch (50)", batch)]
    for r in rows:
        print(f"  {r['name']:<40} p50 {r['p50_ms']:7.2f} ms   p99 {r['p99_ms']:7.2f} ms   max {r['max_ms']:7.1f} ms")
    print(f"  schedule p99 / predict:batch p99 = {rows[0]['p99_ms'] / rows[2]['p99_ms']:.2f}x;  "
          f"schedule p99 / healthz p99 = {rows[0]['p99_ms'] / rows[1]['p99_ms']:.1f}x  (target: schedule p99 <= 20 ms)")


if __name__ == "__main__":
    main()
