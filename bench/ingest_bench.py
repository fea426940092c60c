"""Job ingest throughput and latency, next to the crypto-bound limit measured in the same run.

    make bench-ingest   # or: .venv/bin/python bench/ingest_bench.py [--seconds 10] [--clients 8]

(a) **crypto-bound limit**: one ML-DSA-65 sign plus one verify per job with ``cryptography``, on
    every core (one process per core) — no HSM, no HTTP, no database.
(b) **end to end**: ``qai serve`` (PostgreSQL, a fresh database; SoftHSM; local object directory)
    and ``--clients`` threads using the SDK's batch calls: ``--batch`` manifests signed through the
    KMS in one request (``POST /v1/keys/{k}/sign-batch``, audited) and submitted in one
    (``POST /v1/jobs/batch``: each verified, indexed, ledgered, outboxed), with the uploader moving
    envelopes to the object store meanwhile. jobs/s, and p50/p99 of a batch's latency. (b) signs
    with ML-DSA-65 alone (``pqc-required``), the work (a) measures; (b-hybrid) with the default
    hybrid suite, ML-DSA-65 plus ECDSA-P256 in the HSM, which adds an HSM signature and a
    verification per job; (b1) is hybrid with one job per request, for reference.
(c) **single-job latency at half of (b)'s rate**: once the uploader has drained what (b) left in
    the outbox, background batches paced to half of (b)'s rate, from a process of their own (so
    the probe's client does not share a GIL with them), while a probe submits single jobs (one
    sign request, one POST) back to back; their p99, and that of each request.

Targets (issue 4): (b) >= 0.4 x (a), and (c) p99 <= 100 ms.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import cast

import httpx
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving import qai_serve
from orchestrator.auth import Principal, Role, create_tenant, issue_token
from orchestrator.services import build_services
from orchestrator.settings import Settings
from sdk.client import Client
from sdk.dsse import envelope_from_bundle, pae
from sdk.manifest import PAYLOAD_TYPE, RunManifest, new_manifest
from sdk.signing import SignatureBundle

PG_URL = os.environ.get("QAI_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parent.parent
QASM = 'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[2] q;\nbit[2] c;\nh q[0];\ncx q[0], q[1];\nc = measure q;\n'


def _crypto_worker(seconds: float) -> int:
    from cryptography.hazmat.primitives.asymmetric import mldsa

    key = mldsa.MLDSA65PrivateKey.generate()
    pub = key.public_key()
    msg = new_manifest(tenant="bench", qasm=QASM, shots=1000).to_bytes()
    n, stop = 0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        pub.verify(key.sign(msg), msg)
        n += 1
    return n


def crypto_limit(seconds: float) -> float:
    cores = os.cpu_count() or 1
    with ProcessPoolExecutor(cores) as pool:
        start = time.perf_counter()
        total = sum(pool.map(_crypto_worker, [seconds] * cores))
        return total / (time.perf_counter() - start)


def drain_outbox(db_url: str, timeout: float = 600.0) -> float:
    """Seconds until the server's uploader has moved every envelope to the object store."""
    engine = create_engine(db_url)
    start = time.perf_counter()
    try:
        while True:
            with engine.connect() as conn:
                pending = conn.execute(text("SELECT count(*) FROM manifests WHERE envelope IS NOT NULL "
                                            "AND uploaded_at IS NULL")).scalar_one()
            if pending == 0:
                return time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                raise SystemExit(f"the outbox still holds {pending} envelopes after {timeout:.0f} s")
            time.sleep(0.5)
    finally:
        engine.dispose()


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


# The suite (a) measures, and the default hybrid one: key name, suite, crypto mode.
PQC = ("bench.pqc", "ML-DSA-65", "pqc-required")
HYBRID = ("bench.hybrid", "ML-DSA-65+ECDSA-P256", "hybrid")


def _manifest(key: tuple[str, str, str]) -> RunManifest:
    return new_manifest(tenant="bench", qasm=QASM, shots=1000, job_id=uuid.uuid4(), pqc_suite=key[1],
                        crypto_mode=key[2])  # type: ignore[arg-type]


def submit_one(c: httpx.Client, key: tuple[str, str, str], signed: list[float] | None = None) -> float:
    """One job, one request each way: sign through the KMS, then POST /v1/jobs. ``signed`` gets
    the time the sign request took."""
    t = time.perf_counter()
    payload = _manifest(key).to_bytes()
    r = c.post(f"/v1/keys/{key[0]}/sign", json={"message": base64.b64encode(pae(PAYLOAD_TYPE, payload)).decode()})
    r.raise_for_status()
    if signed is not None:
        signed.append(time.perf_counter() - t)
    env = envelope_from_bundle(PAYLOAD_TYPE, payload, SignatureBundle.model_validate(r.json()))
    r = c.post("/v1/jobs", content=env.to_bytes())
    if r.status_code != 201:
        raise SystemExit(f"submit failed: {r.status_code} {r.text}")
    return time.perf_counter() - t


def submit_batch(c: Client, key: tuple[str, str, str], n: int) -> float:
    """``n`` jobs through the SDK's batch calls: one sign-batch request, one jobs/batch request."""
    t = time.perf_counter()
    results = c.create_jobs([_manifest(key) for _ in range(n)], key[0])
    bad = [r for r in results if r.get("status") != 201]
    if bad or len(results) != n:
        raise SystemExit(f"batch submit failed: {bad[:1]}")
    return time.perf_counter() - t


def paced_load(url: str, token: str, rate: float, seconds: float, threads: int, batch: int,
               out: multiprocessing.Queue[float]) -> None:
    """In a process of its own: ``threads`` clients submitting batches, together paced to
    ``rate`` jobs/s for ``seconds``; puts the rate achieved on ``out``."""
    local = threading.local()

    def paced_batch() -> tuple[int, float]:
        if not hasattr(local, "client"):
            local.client, local.due = Client(url, token, timeout=120), time.perf_counter()
        submit_batch(local.client, PQC, batch)
        local.due += batch * threads / rate
        time.sleep(max(0.0, local.due - time.perf_counter()))
        return batch, 0.0

    out.put(run_load(seconds, threads, paced_batch)[0])


def run_load(seconds: float, clients: int, work: Callable[[], tuple[int, float]]) -> tuple[float, list[float]]:
    """``clients`` threads calling ``work`` (-> jobs done, latency) for ``seconds``; jobs/s and
    the per-job latencies (a batch's latency counts once per job in it)."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < stop:
            n, lat = work()
            with lock:
                latencies.extend([lat] * n)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - start), latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="uvicorn workers of qai serve")
    ap.add_argument("--batch", type=int, default=100, help="jobs per sign-batch and jobs/batch request in (b)")
    ap.add_argument("--paced-rate", type=float, default=None,
                    help="run (c) alone, its background load paced to this many jobs/s (skips (a) and (b))")
    args = ap.parse_args()


    db_name = f"qai_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {db_name}"))
    db_url = PG_URL.rsplit("/", 1)[0] + f"/{db_name}"
    home = Path(tempfile.mkdtemp(prefix="qai-ingest-bench-")) / ".qai"
    svc = build_services(Settings(home=home, database_url=db_url))
    create_tenant(svc.db, "bench")
    for name, suite, _ in (PQC, HYBRID):
        svc.kms.create_key(name, tenant="bench", suite=suite, principal=Principal.system("bench"))
    token = issue_token(svc.db, role=Role.SIGNER, tenant="bench").token
    svc.close()
    env = {**os.environ, "QAI_HOME": str(home), "QAI_DATABASE_URL": db_url}
    results: dict[str, float] = {}
    try:
        with qai_serve("--workers", str(args.workers), env=env) as url:
            headers = {"Authorization": f"Bearer {token}"}
            local = threading.local()

            def sdk_client() -> Client:
                if not hasattr(local, "c"):
                    local.c = Client(url, token, timeout=120)
                return cast(Client, local.c)

            def http_client() -> httpx.Client:
                if not hasattr(local, "h"):
                    local.h = httpx.Client(base_url=url, headers=headers, timeout=60)
                return cast(httpx.Client, local.h)

            for key in (PQC, HYBRID):  # warm-up
                submit_batch(sdk_client(), key, args.batch)
                for _ in range(10):
                    submit_one(http_client(), key)

            # The machine's speed drifts (shared cores): (a) is measured right before (b), on the same
            # cores, with the server warm and idle. (After (b) the uploader is still draining.)
            limit = crypto_limit(args.seconds) if args.paced_rate is None else float("nan")
            results.update(crypto_limit_jobs_per_s=limit, batch=args.batch)
            print(f"(a) crypto-bound limit (ML-DSA-65 sign + verify, {os.cpu_count()} cores): {limit:8.1f} jobs/s")
            runs = [("b", PQC, "batches", "target >= 0.4x"), ("b-hybrid", HYBRID, "batches", "default suite"),
                    ("b1", HYBRID, "single", "one job per request")] if args.paced_rate is None else []
            for label, key, mode, note in runs:
                if mode == "batches":
                    rate, lat = run_load(args.seconds, args.clients,
                                         lambda key=key: (args.batch, submit_batch(sdk_client(), key, args.batch)))
                    shape = f"{args.clients} clients x batches of {args.batch}"
                else:
                    rate, lat = run_load(args.seconds, args.clients,
                                         lambda key=key: (1, submit_one(http_client(), key)))
                    shape = f"{args.clients} clients, one job per request"
                p50, p99 = statistics.median(lat) * 1000, pct(lat, 0.99) * 1000
                results.update({f"{label}_jobs_per_s": rate, f"{label}_p50_ms": p50, f"{label}_p99_ms": p99,
                                f"{label}_ratio": rate / limit})
                print(f"({label}) {key[1]}, {shape}: {rate:8.1f} jobs/s  p50 {p50:.1f} ms  p99 {p99:.1f} ms  "
                      f"ratio to (a) {rate / limit:.2f}x  ({note})")
            rate = results["b_jobs_per_s"] if args.paced_rate is None else 2 * args.paced_rate
            # (b)'s runs leave thousands of envelopes in the outbox. (c) measures the service at half
            # of (b)'s rate, not while it also drains a backlog: wait for the uploader (it has
            # usually caught up during (b1) already; the time is printed).
            waited = drain_outbox(db_url)
            results.update(outbox_drain_s=waited)
            print(f"outbox drained in {waited:.1f} s before (c)")

            # (c): background batches paced to half of (b)'s rate from another process, and one probe
            # client here submitting single jobs back to back; the probe's latencies are (c).
            ctx = multiprocessing.get_context("spawn")
            rates: multiprocessing.Queue[float] = ctx.Queue()
            loader = ctx.Process(target=paced_load, args=(url, token, rate / 2, args.seconds + 2.0,
                                                          max(1, args.clients - 1), args.batch, rates))
            loader.start()
            time.sleep(1.0)  # the loader process is up and pacing before the probe starts
            probe: list[float] = []
            signs: list[float] = []
            stop = time.perf_counter() + args.seconds
            while time.perf_counter() < stop:
                probe.append(submit_one(http_client(), PQC, signs))
            loader.join()
            achieved = rates.get() + len(probe) / args.seconds
            posts = [p - s for p, s in zip(probe, signs, strict=True)]
            results.update(sign_p99_ms=pct(signs, 0.99) * 1000, post_p99_ms=pct(posts, 0.99) * 1000)
            results.update(paced_jobs_per_s=achieved, single_p50_ms=statistics.median(probe) * 1000,
                           single_p99_ms=pct(probe, 0.99) * 1000)
            print(f"(c) single jobs while the service ingests {achieved:.1f} jobs/s (half of (b)): "
                  f"p50 {results['single_p50_ms']:.1f} ms  p99 {results['single_p99_ms']:.1f} ms  "
                  f"(target p99 <= 100 ms); sign request p99 {results['sign_p99_ms']:.1f} ms, "
                  f"POST p99 {results['post_p99_ms']:.1f} ms")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE {db_name} WITH (FORCE)"))
        admin.dispose()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
