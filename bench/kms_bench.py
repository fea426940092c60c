"""KMS signing throughput, measured next to the raw ML-DSA-65 rate in the same run.

    make bench     # or: .venv/bin/python bench/kms_bench.py [--seconds 5] [--clients 16] [--workers 2]

Prints, for each suite, signs/s through the Python API (one call per signature, and batches of
100 via ``sign_many``) and over REST (``wrk`` with concurrent connections against
``qai serve kms --workers 2``, single signs and ``sign-batch`` of 50), each as a
ratio to the raw ML-DSA-65 rate of ``cryptography`` on this machine in this run. Absolute figures
on a shared 2-core machine are noise; the ratios are the result.

Targets (issue 2): the ML-DSA-65+ECDSA-P256 suite at >= 0.7x the raw ML-DSA-65 rate through the
Python API, and >= 300 signs/s over REST with concurrent clients.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import mldsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving import qai_serve
from orchestrator.auth import Principal, Role, create_tenant, issue_token
from orchestrator.services import build_services
from orchestrator.settings import Settings

SUITES = ("ML-DSA-65+ECDSA-P256", "ML-DSA-44+Ed25519", "ML-DSA-87+ECDSA-P256",
          "SLH-DSA-SHA2-128f+ECDSA-P256")
MESSAGE = b'{"job_id":"00000000-0000-4000-8000-000000000001","tenant":"bench"}' * 4


def rate(fn, seconds: float, per_call: int = 1) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += per_call
    return n / elapsed


RAW_KEY = mldsa.MLDSA65PrivateKey.generate()


def raw_mldsa65() -> None:
    RAW_KEY.sign(MESSAGE)


def paired(fn, per_call: int, seconds: float, rounds: int = 5) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(rate of fn, median ratio to raw ML-DSA-65), measured in alternating slices.

    The machine's speed drifts from second to second; alternating short slices of the baseline
    and the candidate and taking the median ratio cancels most of that drift.
    """
    ratios, rates = [], []
    for _ in range(rounds):
        base = rate(raw_mldsa65, seconds / rounds)
        got = rate(fn, seconds / rounds, per_call)
        ratios.append(got / base)
        rates.append(got)
    return statistics.median(rates), statistics.median(ratios)


def rest_rate(url: str, token: str, key: str, seconds: float, clients: int, batch: int) -> float:
    """Signs/s over HTTP, driven by wrk (a C load generator: a Python client would eat the cores)."""
    item = {"message": base64.b64encode(MESSAGE).decode()}
    body = item if batch == 1 else {"items": [item] * batch}
    path = f"/v1/keys/{key}/sign" if batch == 1 else f"/v1/keys/{key}/sign-batch"
    httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {token}"}).raise_for_status()
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(json.dumps(body))}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {token}"\n'
            "function response(status, headers, body)\n"
            '  if status ~= 200 then error("HTTP " .. status .. ": " .. body) end\n'
            "end\n"
        )
    out = subprocess.run(
        ["wrk", "-t2", f"-c{clients}", f"-d{int(seconds)}s", "-s", script.name, url + path],
        capture_output=True, text=True, check=True,
    ).stdout
    os.unlink(script.name)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None or "Non-2xx" in out:
        raise SystemExit(f"wrk failed:\n{out}")
    return float(match.group(1)) * batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/kms_bench.py needs wrk (apt-get install wrk; `make bench` does it)")

    home = Path(tempfile.mkdtemp(prefix="qai-kms-bench-"))
    env = {**os.environ, "QAI_HOME": str(home)}
    settings = Settings(home=home)
    svc = build_services(settings)
    admin = Principal.system("bench")
    create_tenant(svc.db, "bench")
    for suite in SUITES:
        svc.kms.create_key(f"bench.{suite.lower().replace('+', '.')}", tenant="bench", suite=suite,
                           principal=admin)
    token = issue_token(svc.db, role=Role.SIGNER, tenant="bench").token
    signer = Principal(subject="bench", role=Role.SIGNER, tenant="bench")

    raw = rate(raw_mldsa65, args.seconds)
    print(f"raw ML-DSA-65 (cryptography, 1 thread): {raw:8.1f} signs/s  [baseline 1.00x]")
    results: dict[str, dict[str, float]] = {}
    for suite in SUITES:
        key = f"bench.{suite.lower().replace('+', '.')}"
        single, single_x = paired(lambda k=key: svc.kms.sign(k, principal=signer, message=MESSAGE), 1,
                                  args.seconds)
        batched, batched_x = paired(
            lambda k=key: svc.kms.sign_many(k, principal=signer, items=[MESSAGE] * 100), 100, args.seconds)
        results[suite] = {"python_single": single, "python_single_ratio": single_x,
                          "python_batch100": batched, "python_batch100_ratio": batched_x}
        print(f"{suite:30} python API: {single:8.1f}/s ({single_x:4.2f}x)   "
              f"batch of 100: {batched:8.1f}/s ({batched_x:4.2f}x)")
    svc.close()
    raw = rate(raw_mldsa65, args.seconds)  # the REST ratios use the baseline measured next to them

    with qai_serve("kms", "--workers", str(args.workers), env=env) as url:
        for suite in SUITES:
            key = f"bench.{suite.lower().replace('+', '.')}"
            single = rest_rate(url, token, key, args.seconds, args.clients, 1)
            batch = rest_rate(url, token, key, args.seconds, max(2, args.clients // 4), 50)
            results[suite].update(rest_single=single, rest_batch50=batch)
            print(f"{suite:30} REST ({args.clients} clients, {args.workers} workers): {single:8.1f}/s "
                  f"({single / raw:4.2f}x)   sign-batch of 50: {batch:8.1f}/s ({batch / raw:4.2f}x)")
    main_suite = results["ML-DSA-65+ECDSA-P256"]
    verdict = {
        "python_api_ratio": round(main_suite["python_single_ratio"], 3),
        "python_api_batch_ratio": round(main_suite["python_batch100_ratio"], 3),
        "python_api_target_0.7x": main_suite["python_single_ratio"] >= 0.7,
        "rest_signs_per_s": round(main_suite["rest_single"], 1),
        "rest_target_300": main_suite["rest_single"] >= 300,
    }
    print(json.dumps({"raw_mldsa65": round(raw, 1), "suites": results, "verdict": verdict}, indent=2))


if __name__ == "__main__":
    main()
