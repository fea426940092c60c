"""Ledger throughput, proof latency and audit time, each next to a baseline measured in the same run.

    make bench-ledger   # or: .venv/bin/python bench/ledger_bench.py [--entries 1000000] [--signed 100000]

1. **Appends/s on PostgreSQL**, concurrent and batched by the group-commit sequencer (Merkle nodes
   and all): 32 threads appending one entry per call, then 8 threads appending 50 per call.
   Baseline: the same rows INSERTed into a plain table by one connection in batches of 500 (no
   tree, no lock). Target: >= 2,000 appends/s.
2. **Inclusion-proof latency at 1,000,000 entries** (PostgreSQL): p50/p99 over 2,000 random proofs
   through ``Ledger.inclusion_proof``. Baseline: a primary-key lookup of one entry row. Target:
   p99 <= 5 ms.
3. **Full audit of 100,000 signed entries**: ``qai audit``'s engine on an exported bundle, every
   hybrid signature (ML-DSA-65 + ECDSA-P256), every object hash and the tree, on all cores.
   Baseline: a bare loop verifying the same 200,000 signatures with ``cryptography`` on one core.
   Target: <= 60 s.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator import migrate
from orchestrator.auth import Principal, Role, create_tenant
from orchestrator.db import Database, utcnow
from orchestrator.ledger import Ledger, LedgerConfig, LedgerEntryRow, append_entries
from orchestrator.objects import LocalObjectStore
from orchestrator.services import build_services
from orchestrator.settings import Settings
from sdk.audit import BundleSource, audit
from sdk.dsse import envelope_from_bundle, pae
from sdk.ledger import LedgerEntry, sha256_hex

PG_URL = os.environ.get("QAI_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def fresh_schema() -> Database:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    db = Database(PG_URL, schema=schema)
    migrate.upgrade(db)
    return db


def drop_schema(db: Database) -> None:
    db.dispose()
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {db.schema} CASCADE"))
    engine.dispose()


def entry(i: int) -> LedgerEntry:
    data = f"bench object {i}".encode()
    return LedgerEntry(type="dataset", sha256=sha256_hex(data), path=f"bench/{i}", tenant="bench", time=utcnow())


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


# --- 1. appends -------------------------------------------------------------------------------------

def bench_appends(seconds: float, threads: int) -> dict[str, float]:
    db = fresh_schema()
    try:
        with db.write() as s:
            s.execute(text("CREATE TABLE plain_entries (idx BIGINT PRIMARY KEY, entry_type TEXT, sha256 TEXT, "
                           "path TEXT, tenant TEXT, at TIMESTAMPTZ, leaf_hash TEXT)"))
        rows = [{"idx": i, "entry_type": "dataset", "sha256": "0" * 64, "path": f"p/{i}", "tenant": "bench",
                 "at": utcnow(), "leaf_hash": "0" * 64} for i in range(200_000)]
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds and n < len(rows):
            with db.write() as s:
                s.execute(text("INSERT INTO plain_entries VALUES (:idx, :entry_type, :sha256, :path, :tenant, "
                               ":at, :leaf_hash)"), rows[n:n + 500])
            n += 500
        baseline = n / (time.perf_counter() - start)

        ledger = Ledger(db, None, LocalObjectStore(Path(tempfile.mkdtemp())),  # type: ignore[arg-type]
                        LedgerConfig(checkpoint_every=10**12, checkpoint_interval=0))
        ledger.append([entry(0)])  # warm-up

        def run(n_threads: int, per_call: int) -> float:
            stop = time.perf_counter() + seconds
            counts = [0] * n_threads

            def worker(t: int) -> None:
                i = t * 10**8 + per_call * 10**7
                while time.perf_counter() < stop:
                    ledger.append([entry(i + k) for k in range(per_call)])
                    counts[t] += per_call
                    i += per_call

            start = time.perf_counter()
            pool = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
            for th in pool:
                th.start()
            for th in pool:
                th.join()
            return sum(counts) / (time.perf_counter() - start)

        single = run(threads, 1)
        batched = run(8, 50)
        ledger.close()
        with db.read() as s:
            n, hi = s.execute(text("SELECT count(*), max(idx) FROM ledger_entries")).one()
        assert n == hi + 1, "indices are not gapless"
        return {"appends_per_s_single": single, "appends_per_s_batched50": batched,
                "baseline_plain_inserts_per_s": baseline, "ratio_single": single / baseline,
                "ratio_batched": batched / baseline}
    finally:
        drop_schema(db)


# --- 2. proofs at 1M ---------------------------------------------------------------------------------

def bench_proofs(entries: int, samples: int) -> dict[str, float]:
    db = fresh_schema()
    try:
        t0 = time.perf_counter()
        batch = 20_000
        for lo in range(0, entries, batch):
            with db.write(lock="ledger") as s:
                append_entries(s, [entry(i) for i in range(lo, min(entries, lo + batch))])
            print(f"  built {min(entries, lo + batch):>9} entries ({time.perf_counter() - t0:5.0f} s)",
                  end="\r", flush=True)
        print()
        with db.write() as s:
            s.execute(text("ANALYZE"))
        ledger = Ledger(db, None, LocalObjectStore(Path(tempfile.mkdtemp())),  # type: ignore[arg-type]
                        LedgerConfig(checkpoint_interval=0))
        rng = random.Random(6962)
        size = ledger.size()
        proof_ms, lookup_ms = [], []
        for _ in range(samples):
            i = rng.randrange(size)
            t = time.perf_counter()
            ledger.inclusion_proof(i, size)
            proof_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            with db.read() as s:
                s.get(LedgerEntryRow, rng.randrange(size))
            lookup_ms.append((time.perf_counter() - t) * 1000)
        ledger.close()
        return {"entries": size, "proof_p50_ms": statistics.median(proof_ms), "proof_p99_ms": pct(proof_ms, 0.99),
                "baseline_pk_lookup_p99_ms": pct(lookup_ms, 0.99),
                "ratio_p99": pct(proof_ms, 0.99) / pct(lookup_ms, 0.99)}
    finally:
        drop_schema(db)


# --- 3. audit of signed entries -----------------------------------------------------------------------

def bench_audit(signed: int, workers: int) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="qai-ledger-bench-"))
    svc = build_services(Settings(home=home, ledger_checkpoint_every=10_000, ledger_checkpoint_interval_seconds=0))
    admin = Principal.system("bench")
    create_tenant(svc.db, "bench")
    key = svc.kms.create_key("bench.manifests", tenant="bench", principal=admin)
    signer = Principal(subject="bench", role=Role.SIGNER, tenant="bench")
    bundle_dir = home / "bundle"
    bundle_dir.mkdir()
    t0 = time.perf_counter()
    sigs: list[tuple[bytes, bytes, bytes]] = []  # (PAE message, ML-DSA sig, ECDSA sig) for the baseline
    with (bundle_dir / "entries.jsonl").open("w") as f:
        for lo in range(0, signed, 500):
            payloads = [json.dumps({"job": i, "shots": 4000}).encode() for i in range(lo, min(signed, lo + 500))]
            messages = [pae("application/vnd.qai.run-manifest+json", p) for p in payloads]
            bundles = svc.kms.sign_many(key.name, principal=signer, items=messages)
            entries = []
            for i, (p, b) in enumerate(zip(payloads, bundles, strict=True)):
                env = envelope_from_bundle("application/vnd.qai.run-manifest+json", p, b).to_bytes()
                entries.append((LedgerEntry(type="run-manifest", sha256=sha256_hex(env), path=f"m/{lo + i}",
                                            tenant="bench", time=utcnow()), env))
                sigs.append((messages[i], base64.b64decode(b.parts[0].signature),
                             base64.b64decode(b.parts[1].signature)))
            appended = svc.ledger.append([e for e, _ in entries])
            for ie, (_, env) in zip(appended, entries, strict=True):
                row = ie.model_dump(mode="json")
                row["object"] = base64.b64encode(env).decode()
                f.write(json.dumps(row) + "\n")
            print(f"  signed and ledgered {lo + len(payloads):>7} ({time.perf_counter() - t0:5.0f} s)",
                  end="\r", flush=True)
    print()
    svc.ledger.checkpoint()
    notes = [r.note for r in svc.ledger.checkpoints()]
    keys = {k.name: k for k in svc.kms.list_keys(principal=admin)}
    (bundle_dir / "bundle.json").write_text(json.dumps({
        "format": "qai-audit-bundle/1", "origin": svc.ledger.config.origin, "tree_size": signed,
        "keys": [k.model_dump(mode="json") for k in keys.values()], "checkpoints": notes}))
    version = key.versions[0]
    svc.close()

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, mldsa

    ml_pub = mldsa.MLDSA65PublicKey.from_public_bytes(base64.b64decode(version.public_keys["ML-DSA-65"]))
    ec_pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                          base64.b64decode(version.public_keys["ECDSA-P256"]))
    t = time.perf_counter()
    for msg, s1, s2 in sigs:
        ml_pub.verify(s1, msg)
        ec_pub.verify(s2, msg, ec.ECDSA(hashes.SHA256()))
    baseline = time.perf_counter() - t

    t = time.perf_counter()
    report = audit(BundleSource(bundle_dir), trusted_keys=keys, workers=workers)
    elapsed = time.perf_counter() - t
    assert report.ok, report.failures[:3]
    assert report.signatures_verified == signed and report.entries == signed
    return {"entries": signed, "audit_s": elapsed, "workers": workers,
            "baseline_bare_verify_1_core_s": baseline, "ratio": elapsed / baseline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of the append runs")
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--entries", type=int, default=1_000_000, help="ledger size for the proof latency")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--signed", type=int, default=100_000, help="signed entries for the audit")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", choices=["appends", "proofs", "audit"], default=None)
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    if args.only in (None, "appends"):
        r = results["appends"] = bench_appends(args.seconds, args.threads)
        print(f"appends (PostgreSQL): {args.threads} threads x 1 entry per call {r['appends_per_s_single']:7.0f}/s "
              f"({r['ratio_single']:.2f}x);  8 threads x 50 per call {r['appends_per_s_batched50']:7.0f}/s "
              f"({r['ratio_batched']:.2f}x);  plain INSERT baseline {r['baseline_plain_inserts_per_s']:7.0f}/s;  "
              "target >= 2000/s")
    if args.only in (None, "proofs"):
        r = results["proofs"] = bench_proofs(args.entries, args.samples)
        print(f"inclusion proof at {r['entries']:.0f} entries: p50 {r['proof_p50_ms']:.2f} ms, "
              f"p99 {r['proof_p99_ms']:.2f} ms   PK lookup p99 {r['baseline_pk_lookup_p99_ms']:.2f} ms   "
              f"ratio {r['ratio_p99']:.2f}x   target p99 <= 5 ms")
    if args.only in (None, "audit"):
        r = results["audit"] = bench_audit(args.signed, args.workers)
        print(f"full audit of {r['entries']:.0f} signed entries: {r['audit_s']:.1f} s on {args.workers} workers   "
              f"bare verify on 1 core {r['baseline_bare_verify_1_core_s']:.1f} s   ratio {r['ratio']:.2f}x   "
              f"target <= 60 s")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
