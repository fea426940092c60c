"""Job ingest throughput and latency, next to the crypto-bound limit measured in the same run.

    make bench-ingest   # or: .venv/bin/python bench/ingest_bench.py [--seconds 10] [--clients 8]

(a) **crypto-bound limit**: one ML-DSA-65 sign plus one verify per job with ``cryptography``, on
    every core (one process per core) — no HSM, no HTTP, no database.
(b) **end to end**: ``qai serve`` (PostgreSQL, a fresh database; SoftHSM; local object directory)
    and ``--clients`` threads, each job signed through the KMS API (``POST /v1/keys/{k}/sign``,
    hybrid ML-DSA-65 + in-HSM ECDSA) and then submitted (``POST /v1/jobs``: verified, indexed,
    ledgered, outboxed). jobs/s, p50 and p99 per job.
(c) **single-job latency at half of (b)'s rate**: one client paced to half the measured rate, p99.

Targets (issue 4): (b) >= 0.4 x (a), and (c) p99 <= 100 ms.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.auth import Principal, Role, create_tenant, issue_token
from orchestrator.services import build_services
from orchestrator.settings import Settings
from sdk.dsse import envelope_from_bundle, pae
from sdk.manifest import PAYLOAD_TYPE, new_manifest
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


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def submit_one(c: httpx.Client, tenant: str) -> float:
    t = time.perf_counter()
    m = new_manifest(tenant=tenant, qasm=QASM, shots=1000, job_id=uuid.uuid4())
    payload = m.to_bytes()
    r = c.post("/v1/keys/bench.manifests/sign", json={"message": base64.b64encode(pae(PAYLOAD_TYPE, payload)).decode()})
    r.raise_for_status()
    env = envelope_from_bundle(PAYLOAD_TYPE, payload, SignatureBundle.model_validate(r.json()))
    r = c.post("/v1/jobs", content=env.to_bytes())
    if r.status_code != 201:
        raise SystemExit(f"submit failed: {r.status_code} {r.text}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="uvicorn workers of qai serve")
    args = ap.parse_args()

    limit = crypto_limit(args.seconds)
    print(f"(a) crypto-bound limit (ML-DSA-65 sign + verify, {os.cpu_count()} cores): {limit:8.1f} jobs/s")

    db_name = f"qai_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {db_name}"))
    db_url = PG_URL.rsplit("/", 1)[0] + f"/{db_name}"
    home = Path(tempfile.mkdtemp(prefix="qai-ingest-bench-")) / ".qai"
    svc = build_services(Settings(home=home, database_url=db_url))
    create_tenant(svc.db, "bench")
    svc.kms.create_key("bench.manifests", tenant="bench", principal=Principal.system("bench"))
    token = issue_token(svc.db, role=Role.SIGNER, tenant="bench").token
    svc.close()
    env = {**os.environ, "QAI_HOME": str(home), "QAI_DATABASE_URL": db_url}
    port = 8790
    server = subprocess.Popen([sys.executable, "-m", "sdk.cli", "serve", "--port", str(port),
                               "--workers", str(args.workers)], env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    results: dict[str, float] = {"crypto_limit_jobs_per_s": limit}
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            for _ in range(20):
                submit_one(c, "bench")  # warm-up
        latencies: list[float] = []
        lock = threading.Lock()
        stop = time.perf_counter() + args.seconds

        def client() -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
                while time.perf_counter() < stop:
                    lat = submit_one(c, "bench")
                    with lock:
                        latencies.append(lat)

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rate = len(latencies) / (time.perf_counter() - start)
        results.update(e2e_jobs_per_s=rate, e2e_p50_ms=statistics.median(latencies) * 1000,
                       e2e_p99_ms=pct(latencies, 0.99) * 1000, ratio=rate / limit)
        print(f"(b) end to end, {args.clients} clients: {rate:8.1f} jobs/s  p50 {results['e2e_p50_ms']:.1f} ms  "
              f"p99 {results['e2e_p99_ms']:.1f} ms  ratio to (a) {rate / limit:.2f}x  (target >= 0.4x)")

        paced: list[float] = []
        interval = 2.0 / rate
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            nxt = time.perf_counter()
            stop = nxt + args.seconds
            while time.perf_counter() < stop:
                paced.append(submit_one(c, "bench"))
                nxt += interval
                time.sleep(max(0.0, nxt - time.perf_counter()))
        results.update(single_rate_jobs_per_s=1 / interval, single_p50_ms=statistics.median(paced) * 1000,
                       single_p99_ms=pct(paced, 0.99) * 1000)
        print(f"(c) one client paced at {1 / interval:.1f} jobs/s: p50 {results['single_p50_ms']:.1f} ms  "
              f"p99 {results['single_p99_ms']:.1f} ms  (target p99 <= 100 ms)")
    finally:
        server.terminate()
        server.wait(timeout=30)
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE {db_name} WITH (FORCE)"))
        admin.dispose()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
