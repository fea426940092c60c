"""The ``qai`` CLI as a user runs it: separate processes on an embedded default of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def qai(tmp_path: Path):  # type: ignore[no-untyped-def]
    env = {**os.environ, "QAI_HOME": str(tmp_path / ".qai")}
    env.pop("SOFTHSM2_CONF", None)

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "sdk.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        if ok:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    return run


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def test_key_commands_end_to_end(qai, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert _json(qai("tenants", "create", "org-a", "--json")) == {"name": "org-a"}
    doc = _json(qai("keys", "create", "org-a.m", "--tenant", "org-a", "--json"))
    assert doc["suite"] == "ML-DSA-65+ECDSA-P256" and doc["versions"][0]["version"] == 1
    assert [k["name"] for k in _json(qai("keys", "list", "--json"))] == ["org-a.m"]
    assert "ML-DSA-65" in qai("keys", "show", "org-a.m").stdout
    assert len(_json(qai("keys", "rotate", "org-a.m", "--json"))["versions"]) == 2
    revoked = _json(qai("keys", "revoke", "org-a.m", "--version", "1", "--reason", "drill", "--json"))
    assert revoked["versions"][0]["state"] == "revoked"
    pem = qai("keys", "export-public", "org-a.m", "--format", "pem").stdout
    assert pem.count("-----BEGIN PUBLIC KEY-----") == 2
    out = tmp_path / "key.json"
    qai("keys", "export-public", "org-a.m", "--out", str(out))
    exported = json.loads(out.read_text())
    assert [v["version"] for v in exported["versions"]] == [1, 2]
    assert "private" not in out.read_text() and "sealed" not in out.read_text()
    audit = _json(qai("kms", "audit", "verify", "--json"))
    assert audit["ok"] is True and audit["records"] >= 3
    objects = _json(qai("kms", "token-objects", "--json"))
    assert objects and all(o["never_extractable"] and not o["extractable"] for o in objects)
    # the dev PIN was generated once, private to the user
    assert oct((tmp_path / ".qai" / "hsm-pin.json").stat().st_mode & 0o777) == "0o600"


def test_errors_have_codes_and_exit_status(qai) -> None:  # type: ignore[no-untyped-def]
    proc = qai("keys", "create", "k", "--tenant", "ghost", "--json", ok=False)
    assert proc.returncode == 2
    assert _json(proc)["error"]["code"] == "tenant.not_found"
    qai("tenants", "create", "org-a")
    proc = qai("keys", "create", "k", "--tenant", "org-a", "--suite", "RSA-2048", ok=False)
    assert proc.returncode == 2 and "crypto.unknown_algorithm" in proc.stderr


def test_selftest_covers_every_suite(qai) -> None:  # type: ignore[no-untyped-def]
    rows = _json(qai("kms", "selftest", "--json"))
    algs = {a for r in rows for a in r["algorithms"]}
    assert algs == {"ML-DSA-44", "ML-DSA-65", "ML-DSA-87", "SLH-DSA-SHA2-128s", "SLH-DSA-SHA2-128f",
                    "ML-KEM-768", "ML-KEM-1024", "ECDSA-P256", "Ed25519"}
    assert all(r["verified"] and r["tamper_rejected"] for r in rows)


def test_tokens_and_help(qai) -> None:  # type: ignore[no-untyped-def]
    qai("tenants", "create", "org-a")
    issued = _json(qai("tokens", "issue", "--role", "signer", "--tenant", "org-a", "--json"))
    assert issued["token"].startswith("qai_") and issued["role"] == "signer"
    assert _json(qai("tokens", "revoke", issued["token_id"], "--json")) == {"revoked": issued["token_id"]}
    helptext = qai("--help").stdout
    for cmd in ("serve", "keys", "kms", "tenants", "tokens", "demo", "db", "ledger", "audit", "backends", "harness",
                "nightly", "report", "tls"):
        assert cmd in helptext


def test_demo_ends_with_an_offline_audit_of_its_ledger(qai) -> None:  # type: ignore[no-untyped-def]
    out = _json(qai("demo", "--json"))
    assert out["offline_verify"]["tampered"].startswith("rejected")
    assert [j["shots"] for j in out["jobs"]] == [1000, 2000, 4000]  # Qiskit on Aer through sdk.instrument
    assert all(j["uploaded"] and j["s3_path"].startswith("manifests/") for j in out["jobs"])
    assert out["manifest_verified_offline"]["tampered"] == "rejected (signature.invalid)"
    assert out["ledger"]["receipt_verified"] and out["ledger"]["checkpoint_size"] == 3
    # a scheduled job: a signed decision, run by the embedded worker, a signed result; replayable
    sched = out["scheduled"]
    assert sched["status"] == "completed" and sched["replay_ok"] and sched["attempts"] == 1
    assert sched["chosen"]["backend_id"] and sched["model_version"] == "em-policy/1"
    assert sched["result_ledger_index"] > sched["decision_ledger_index"]
    # one hybrid and one fallback handshake, each with its signed hello verified
    hybrid, fallback = out["tls"]
    assert hybrid.startswith("hybrid handshake: X25519MLKEM768") and "signed hello verified" in hybrid
    assert fallback.startswith("fallback handshake: x25519") and "signed hello verified" in fallback
    audit = out["ledger_audit"]
    # three instrumented jobs, the harness dataset, the training dataset, the model version, its
    # promotion, the scheduled job, its decision (replayed by the auditor) and its result
    size = sched["result_ledger_index"] + 1
    assert audit["ok"] and audit["entries"] == size == 10 and audit["signatures_verified"] == size
    assert "--bundle" in audit["command"]
    assert out["harness"]["rows"] > 0 and out["harness"]["ledger_index"] == 3
    assert _json(qai("harness", "verify", out["harness"]["run_id"], "--json"))["verified"] is True
    replayed = _json(qai("scheduler", "replay", sched["decision_id"], "--json"))
    assert replayed["ok"] and replayed["identical"]
    status = _json(qai("ledger", "status", "--json"))
    assert status["tree_size"] == size and status["uncovered"] == 0
    assert _json(qai("ledger", "checkpoint", "--json"))["created"] is False


def test_audit_verify_fails_on_a_tampered_bundle(qai, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    qai("demo", "--json")
    bundle = tmp_path / ".qai" / "audit-bundle"
    keys = tmp_path / ".qai" / "trusted-keys.json"
    lines = (bundle / "entries.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["tenant"] = "someone-else"
    lines[1] = json.dumps(row)
    (bundle / "entries.jsonl").write_text("\n".join(lines) + "\n")
    proc = qai("audit", "verify", "--bundle", str(bundle), "--keys", str(keys), ok=False)
    assert proc.returncode == 1
    assert "first failure" in proc.stdout and "entry 1" in proc.stdout
