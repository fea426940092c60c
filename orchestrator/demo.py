"""``qai demo`` (``make demo``): the end-to-end path on the embedded default, narrated.

Re-runnable: it reuses the tenant and keys it created before. Each later feature adds a step.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from kms.audit import verify_chain
from kms.cli import run_selftest
from orchestrator.app import create_app
from orchestrator.auth import Principal, Role, ensure_tenant, issue_token
from orchestrator.services import Services, require_hsm
from sdk.audit import ServerSource, export_bundle
from sdk.canonical import canonical_json
from sdk.client import Client
from sdk.dsse import Envelope
from sdk.errors import QaiError
from sdk.hooks import instrument
from sdk.ledger import verify_receipt
from sdk.manifest import dump_yaml, verify_manifest
from sdk.output import console, print_json, table
from sdk.signing import KeyDocument, SignatureBundle, verify_bundle

TENANT = "demo-org"
KEY = "demo-org.manifest"


def _step(n: int, title: str, quiet: bool) -> None:
    if not quiet:
        console.rule(f"[bold]{n}. {title}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(svc: Services, *, as_json: bool = False) -> dict[str, Any]:
    quiet = as_json
    out: dict[str, Any] = {}
    admin = Principal.system("demo")

    _step(1, "Embedded default", quiet)
    out["storage"] = {"database": svc.db.url.split("?")[0], "objects": str(svc.settings.objects_dir),
                      "hsm_module": svc.settings.pkcs11_module,
                      "hsm_token": svc.settings.pkcs11_token_label,
                      "softhsm_dir": str(svc.settings.softhsm_dir) if svc.settings.is_softhsm else None}
    if not quiet:
        for k, v in out["storage"].items():
            console.print(f"  {k:12} {v}")

    _step(2, "Tenant and a hybrid signing key (ML-DSA-65 sealed by the HSM + ECDSA P-256 in the HSM)", quiet)
    ensure_tenant(svc.db, TENANT)
    try:
        doc = svc.kms.public_key(KEY)
    except QaiError:
        doc = svc.kms.create_key(KEY, tenant=TENANT, principal=admin)
    out["key"] = {"name": doc.name, "suite": doc.suite, "versions": [v.version for v in doc.versions]}
    if not quiet:
        console.print(f"  key {doc.name}: suite {doc.suite}, versions {out['key']['versions']}")
        objs = require_hsm(svc, "the demo").key_objects()
        table("HSM key objects (pkcs11 attributes)", ["label", "type", "sensitive", "never extractable"],
              [(o.label, o.key_type, o.sensitive, o.never_extractable) for o in objs])

    _step(3, "Sign a run-manifest over REST (real uvicorn server, bearer token with role signer)", quiet)
    manifest = {"job_id": "00000000-0000-4000-8000-000000000001", "tenant": TENANT,
                "crypto_mode": "hybrid", "em_method": "zne-richardson", "shots": 4000}
    payload = canonical_json(manifest)
    token = issue_token(svc.db, role=Role.SIGNER, tenant=TENANT, label="demo").token
    with _serve(svc) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
        resp = client.post(f"/v1/keys/{KEY}/sign", json={"message": base64.b64encode(payload).decode()})
        resp.raise_for_status()
        bundle = SignatureBundle.model_validate(resp.json())
        key_doc = KeyDocument.model_validate(client.get(f"/v1/keys/{KEY}").json())
    out["signature"] = [{"keyid": p.keyid, "bytes": len(base64.b64decode(p.signature))} for p in bundle.parts]
    if not quiet:
        console.print(f"  manifest (RFC 8785): {payload.decode()}")
        for p in out["signature"]:
            console.print(f"  signed by {p['keyid']:36} ({p['bytes']} bytes)")

    _step(4, "Verify offline from the public key document alone (sdk, no server)", quiet)
    version = verify_bundle(bundle, payload, key_doc)
    tampered = json.loads(payload)
    tampered["shots"] = 1
    try:
        verify_bundle(bundle, canonical_json(tampered), key_doc)
        tamper_result = "ACCEPTED (bug)"
    except QaiError as exc:
        tamper_result = f"rejected ({exc.code})"
    out["offline_verify"] = {"version": version.version, "tampered": tamper_result}
    if not quiet:
        console.print(f"  [green]valid[/]: {KEY}@{version.version}, both parts; tampered copy {tamper_result}")

    _step(5, "KMS self-test: every suite and KEM through the HSM", quiet)
    rows = run_selftest()
    out["selftest"] = rows
    if not quiet:
        table("KMS self-test", ["suite", "sign/encap ms", "verified", "tamper rejected"],
              [(r["suite"], r["sign_ms"], r["verified"], r["tamper_rejected"]) for r in rows])

    _step(6, "Audit log: hash chain verification", quiet)
    report = verify_chain(svc.db)
    out["audit"] = {"ok": report.ok, "records": report.records, "head": report.head}
    if not quiet:
        state = "[green]OK[/]" if report.ok else f"[red]BROKEN[/] {report.first_break}"
        console.print(f"  audit chain {state}: {report.records} records, head {report.head[:16]}…")
    if not report.ok:
        raise QaiError("audit.chain_broken", "the KMS audit chain does not verify", status=500,
                       details=report.first_break or {})

    _step(7, "Qiskit on Aer through sdk.instrument: every run signs and submits a run-manifest", quiet)
    signer = issue_token(svc.db, role=Role.SIGNER, tenant=TENANT, label="demo-sdk").token
    auditor = issue_token(svc.db, role=Role.AUDITOR, tenant=None, label="demo-auditor").token
    with _serve(svc) as url, Client(url, signer) as client:
        from qiskit_aer import AerSimulator

        backend = instrument(AerSimulator(), client=client, tenant=TENANT, key=KEY, em_method="none",
                             labels={"demo": "bell-ghz"})
        runs = []
        for circuit, shots in ((_ghz(2), 1000), (_ghz(3), 2000), (_ghz(4), 4000)):
            job = backend.run(circuit, shots=shots)
            runs.append((circuit.num_qubits, shots, job.result().get_counts(), job.qai_manifest))
        svc.uploader.drain()  # the outbox moves envelopes to the object store (a thread does it in `qai serve`)
        stored = [client.get_job(m["job_id"]) for *_, m in runs]
        envelope = Envelope.model_validate(stored[0]["envelope"])
        offline_key = client.key(KEY)  # a public key document: all an offline verifier needs
        svc.ledger.checkpoint()
        receipts = [client.ledger_receipt(j["ledger_index"]) for j in stored]
    checked = verify_manifest(envelope, offline_key)
    forged = json.loads(envelope.payload_bytes())
    forged["shots"] = 1
    try:
        verify_manifest(envelope.model_copy(update={"payload": base64.b64encode(canonical_json(forged)).decode()}),
                        offline_key)
        forged_result = "ACCEPTED (bug)"
    except QaiError as exc:
        forged_result = f"rejected ({exc.code})"
    out["jobs"] = [{"job_id": j["job_id"], "qubits": q, "shots": s, "counts": c, "s3_path": j["s3_path"],
                    "object_store": svc.objects.location, "uploaded": j["uploaded"], "ledger_index": j["ledger_index"]}
                   for (q, s, c, _), j in zip(runs, stored, strict=True)]
    out["manifest_verified_offline"] = {"job_id": str(checked.manifest.job_id),
                                        "key": f"{KEY}@{checked.version.version}", "tampered": forged_result}
    if not quiet:
        table("jobs run through sdk.instrument, stored and ledgered",
              ["job id", "qubits", "shots", "counts", "object", "ledger entry"],
              [(j["job_id"][:8] + "…", j["qubits"], j["shots"], j["counts"], f"{svc.objects.location}{j['s3_path']}",
                j["ledger_index"]) for j in out["jobs"]])
        console.print("  stored manifest (YAML):")
        for line in dump_yaml(checked.manifest).splitlines():
            console.print(f"    {line[:100]}", markup=False)
        console.print(f"  [green]manifest {checked.manifest.job_id} verified offline[/] with the public key of "
                      f"{KEY}@{checked.version.version}; tampered copy {forged_result}")

    _step(8, "EM harness: 3 families × 3 calibrated devices × 4 methods, signed dataset in the ledger", quiet)
    out["harness"] = _harness(svc, quiet)

    _step(9, "Scheduler: a signed decision from the EM policy and the calibrations, a worker runs the job", quiet)
    out["scheduled"] = _schedule(svc, signer, auditor, quiet)

    _step(10, "Dual-stack TLS: a hybrid ML-KEM handshake and a classical fallback, each with a signed hello", quiet)
    from kms.tls import tls_demo

    out["tls"] = tls_demo(svc.db, svc.kms, svc.settings.home / "tls",
                          echo=None if quiet else (lambda line: console.print(f"  {line}", markup=False)))

    _step(11, "Ledger: signed checkpoint, inclusion receipt verified offline, bundle exported", quiet)
    with _serve(svc) as url, Client(url, auditor) as audit_client:
        receipt = receipts[-1]
        ledger_key = audit_client.ledger_key()
        cp = verify_receipt(receipt, ledger_key)
        bundle_dir = svc.settings.home / "audit-bundle"
        if bundle_dir.exists():
            shutil.rmtree(bundle_dir)
        exported = export_bundle(ServerSource(audit_client), bundle_dir)
        keys_file = svc.settings.home / "trusted-keys.json"
        keys_file.write_text(json.dumps([k.model_dump(mode="json") for k in audit_client.list_keys()], indent=1))
    out["ledger"] = {"appended": [r.index for r in receipts], "checkpoint_size": cp.checkpoint.size,
                     "root": cp.checkpoint.root.hex(), "receipt_verified": True, "bundle": str(bundle_dir),
                     "bundle_entries": exported}
    if not quiet:
        console.print(f"  ledger entries {out['ledger']['appended']}; checkpoint of size {cp.checkpoint.size}")
        console.print("  signed checkpoint (C2SP signed note):")
        for line in cp.note.rstrip("\n").split("\n"):
            console.print(f"    {line[:90]}{'…' if len(line) > 90 else ''}", markup=False)
        console.print(f"  [green]receipt of entry {receipt.index} verified offline[/] (leaf, checkpoint, inclusion)")
        console.print(f"  exported {exported} entries to {bundle_dir}")

    _step(12, "Offline audit of the exported bundle (decisions replayed): qai audit verify --bundle", quiet)
    cmd = [sys.executable, "-m", "sdk.cli", "audit", "verify", "--bundle", str(bundle_dir),
           "--keys", str(keys_file), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        verdict = json.loads(proc.stdout)
    except ValueError as exc:
        raise QaiError("demo.audit_failed", f"qai audit verify failed: {proc.stderr[-500:]}", status=500) from exc
    out["ledger_audit"] = {"command": " ".join(["qai", *cmd[3:-1]]), "ok": verdict["ok"],
                           "entries": verdict["entries"], "signatures_verified": verdict["signatures_verified"],
                           "checkpoints": verdict["checkpoints"]}
    if not quiet:
        console.print(f"  $ {out['ledger_audit']['command']}")
        state = "[green]PASS[/]" if verdict["ok"] else f"[red]FAIL[/] {verdict['first_failure']}"
        console.print(f"  {state}: {verdict['entries']} entries, {verdict['signatures_verified']} envelope "
                      f"signatures, {verdict['checkpoints']} checkpoints, root {verdict['root']}")
    if as_json:
        print_json(out)
    if proc.returncode != 0 or not verdict["ok"]:
        raise QaiError("demo.audit_failed", "the exported ledger does not verify", status=500,
                       details={"first_failure": verdict.get("first_failure")})
    return out


def _harness(svc: Services, quiet: bool) -> dict[str, Any]:
    """A small harness workload on real IBM calibrations (5, 127 and 133 qubits), stored and signed."""
    from harness.cli import print_summary
    from harness.run import RunConfig
    from harness.service import resolve_snapshots, run_harness, summarize

    config = RunConfig(qubits=(2, 3), methods=("unmitigated", "readout", "zne-richardson-global",
                                               "zne-linear-gate"), shots=2000, seed=2026)
    snapshots = resolve_snapshots(svc, ["fake_manila", "fake_sherbrooke", "fake_torino"])
    done = run_harness(svc, config, snapshots, workers=2, quiet=quiet)
    rows, record = done.rows, done.record
    assert record is not None  # stored: the services were given
    svc.ledger.checkpoint()  # so the audit of the next steps covers the dataset's entry too
    if not quiet:
        print_summary(summarize(rows))
        console.print(f"  run {record.run_id}: {record.rows} rows in {record.parquet_path}; signed dataset manifest "
                      f"ledgered at index {record.ledger_index}")
    return {"run_id": record.run_id, "rows": record.rows, "parquet": record.parquet_path,
            "ledger_index": record.ledger_index}


def _schedule(svc: Services, signer: str, auditor: str, quiet: bool) -> dict[str, Any]:
    """Train the EM policy on a harness run (unless a champion exists), then a job's whole path:
    signed manifest → signed decision → execution by the embedded worker → signed result."""
    from em_policy import registry
    from em_policy.policy import TrainConfig
    from em_policy.training import train_and_register
    from harness.backends import import_catalog
    from sdk.manifest import new_manifest

    import_catalog(svc.db)  # every catalog device is a candidate, not only the three the harness ran on
    try:
        model = registry.resolve(svc, "champion")
        model_version = f"{model.name}/{model.version}"
    except QaiError:  # first run: a harness dataset big enough to train on (about a minute), then the policy
        from harness.run import RunConfig
        from harness.service import resolve_snapshots, run_harness

        if not quiet:
            console.print("  no policy model yet: a training workload on 4 devices, then training (first run only)")
        config = RunConfig(qubits=(2, 3, 4), circuits_per_family=2, shots=2000, seed=7,
                           methods=("unmitigated", "readout", "zne-linear-global", "zne-richardson-global",
                                    "zne-exp-global"))
        snapshots = resolve_snapshots(svc, ["fake_manila", "fake_nairobi", "fake_guadalupe", "fake_kolkata"])
        record = run_harness(svc, config, snapshots, workers=2, quiet=quiet).record
        assert record is not None
        data = svc.settings.home / "demo-train.parquet"
        data.write_bytes(svc.objects.get(record.parquet_path))
        trained = train_and_register([str(data)], TrainConfig(seed=2026, holdout_backends=("fake_nairobi",),
                                                               ensemble=2), quiet=True, svc=svc)
        model_version = str(trained["version"])
    qasm = ('OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[3] q;\nbit[3] c;\nh q[0];\ncx q[0], q[1];\n'
            'cx q[1], q[2];\nc = measure q;\n')
    manifest = new_manifest(qasm=qasm, tenant=TENANT, shots=2000, crypto_mode="hybrid", em_method="auto",
                            priority_class="essential", sla={"max_latency_seconds": 3600}, seed=2026,
                            labels={"demo": "scheduled"})
    with _serve(svc) as url, Client(url, signer) as client, Client(url, auditor) as reader:
        submitted = client.submit_job(client.sign_manifest(manifest, KEY))
        decided = client.schedule(submitted["job_id"])
        done = client.wait_job(submitted["job_id"], timeout=600)
        svc.ledger.checkpoint()
        decision_receipt = reader.ledger_receipt(decided["receipt"]["index"])
        result_index = done["execution"]["result"]["ledger_index"] if done["execution"]["result"] else None
        result_receipt = reader.ledger_receipt(result_index) if result_index is not None else None
        replayed = reader.replay_decision(decided["decision_id"])
    ledger_key = svc.ledger.checkpoint_key()
    for r in (decision_receipt, result_receipt):
        if r is not None:
            verify_receipt(r, ledger_key)
    body = decided["decision"]
    chosen = body["chosen"]
    out = {"job_id": submitted["job_id"], "decision_id": decided["decision_id"], "model_version": model_version,
           "chosen": chosen, "confidence": body["confidence"], "status": done["status"],
           "decision_ledger_index": decided["receipt"]["index"], "result_ledger_index": result_index,
           "replay_ok": replayed["ok"], "attempts": len(done["execution"]["attempts"])}
    if not quiet:
        rows = sorted(body["backends"], key=lambda b: -b.get("normalized_score", -1.0))
        table(f"decision {decided['decision_id'][:8]}… (policy {model_version})", ["backend", "eligible", "score",
                                                                                 "rejected by"],
              [(b["backend_id"], "yes" if b["eligible"] else "no",
                f"{b['normalized_score']:.3f}" if "normalized_score" in b else "-",
                "; ".join(f"{f['plugin']}: {f['reason']}" for f in b["filters"] if f["verdict"] == "reject")[:70])
               for b in rows])
        console.print(f"  chosen {chosen['backend_id']} ({chosen['calibration_snapshot_id'][:40]}…) with "
                      f"{chosen['em_method']}, x{chosen['shot_multiplier']:.2f} shots, expected fidelity "
                      f"{chosen['expected_fidelity']:.3f}, confidence {body['confidence']:.2f}")
        console.print(f"  {body['rationale']}")
        console.print(f"  job {submitted['job_id'][:8]}… pending → queued → running → [bold]{done['status']}[/] "
                      f"in {out['attempts']} attempt(s); decision ledgered at {out['decision_ledger_index']}, "
                      f"result at {result_index}; both receipts verified offline")
        state = "[green]byte-identical[/]" if replayed["ok"] else "[red]DIFFERS[/]"
        console.print(f"  replay from the recorded inputs: {state}; inputs re-derived: "
                      f"{sum(c['ok'] for c in replayed['checks'])}/{len(replayed['checks'])}")
    if done["status"] != "completed" or not replayed["ok"]:
        raise QaiError("demo.schedule_failed", f"the scheduled job ended {done['status']}", status=500,
                       details={"job": done.get("execution"), "replay": replayed})
    return out


def _ghz(n: int) -> Any:
    from qiskit import QuantumCircuit

    qc = QuantumCircuit(n, n)
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    qc.measure(range(n), range(n))
    return qc


@contextmanager
def _serve(svc: Services) -> Iterator[str]:
    """A real uvicorn server on a free loopback port for the duration of a step."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise QaiError("demo.server_failed", "the demo server did not start", status=500)
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
