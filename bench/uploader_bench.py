"""Outbox uploader throughput to S3: requests in flight at once (``QAI_S3_CONCURRENCY``) against one
after another, measured in the same run.

A moto S3 server runs in a process of its own (a real HTTP S3 API; its CPU does not share the
uploader's GIL), with an Object Lock bucket per run as production uses. Each run fills a fresh
embedded database's ``object_outbox`` with ``--objects`` decision-sized envelopes (seeded random
bytes at their content-addressed paths) and times ``Uploader.drain()``: per object a HEAD, a
conditional PUT with COMPLIANCE retention and a GET that checks the sha256, then the batch's row
deletes. Runs alternate between the two settings, so drift on a shared machine hits both alike.

    .venv/bin/python bench/uploader_bench.py [--objects 300] [--size 98000] [--concurrency 8] [--rounds 2]
                                             [--latency-ms 0]

``--latency-ms`` holds each request that long in the server, for the round trip to a real S3 region
that loopback lacks: with it the run says what concurrency buys against a remote store.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import create_bucket, moto_s3  # noqa: E402


def one_run(endpoint: str, bucket: str, objects: int, size: int, concurrency: int, seed: int) -> float:
    """Objects per second drained from a fresh outbox of ``objects`` envelopes."""
    from pydantic import SecretStr

    from orchestrator.db import Database, insert_rows, utcnow
    from orchestrator.migrate import upgrade
    from orchestrator.objects import make_object_store
    from orchestrator.outbox import OBJECT_OUTBOX, Uploader
    from orchestrator.settings import Settings

    create_bucket(endpoint, bucket)
    home = Path(tempfile.mkdtemp(prefix="qai-uploader-bench-"))
    settings = Settings(home=home, s3_bucket=bucket, s3_endpoint_url=endpoint, s3_concurrency=concurrency,
                        s3_access_key_id=SecretStr("bench"), s3_secret_access_key=SecretStr("bench"))
    db = Database(settings.resolved_database_url)
    upgrade(db)
    rng = random.Random(seed)
    rows = []
    for _ in range(objects):
        data = rng.randbytes(size)
        digest = hashlib.sha256(data).hexdigest()
        rows.append({"path": f"scheduler/decisions/{digest}", "sha256": digest, "data": data, "created_at": utcnow()})
    with db.write() as s:
        insert_rows(s, OBJECT_OUTBOX, rows)
    uploader = Uploader(db, make_object_store(settings))
    start = time.perf_counter()
    uploader.drain(timeout=3600)
    elapsed = time.perf_counter() - start
    assert uploader.pending() == 0
    db.dispose()
    return objects / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=300)
    parser.add_argument("--size", type=int, default=98_000, help="bytes per envelope (a 50-backend decision: 97 kB)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="hold each S3 request this long in the server (a real region's round trip)")
    args = parser.parse_args()
    rates: dict[int, list[float]] = {1: [], args.concurrency: []}
    with moto_s3(args.latency_ms) as endpoint:
        for r in range(args.rounds):
            for c in rates:
                rate = one_run(endpoint, f"bench-{r}-{c}", args.objects, args.size, c, seed=r)
                rates[c].append(rate)
                print(f"round {r + 1}, concurrency {c:2d}: {rate:7.1f} objects/s", flush=True)
    base, ours = statistics.median(rates[1]), statistics.median(rates[args.concurrency])
    print(f"{args.objects} envelopes of {args.size} bytes to S3 (moto in its own process, {args.latency_ms:g} ms "
          f"added per request), medians of {args.rounds}:")
    print(f"  one request at a time (baseline)   {base:7.1f} objects/s")
    print(f"  {args.concurrency} in flight (QAI_S3_CONCURRENCY)   {ours:7.1f} objects/s   ratio {ours / base:.2f}x")


if __name__ == "__main__":
    main()
