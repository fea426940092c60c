"""SDK hooks against a real server: Qiskit's Aer backend and SamplerV2 through ``sdk.instrument``,
the generic ``sdk.run_manifest``, and the async client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from qiskit import QuantumCircuit, qasm3
from qiskit_aer import AerSimulator
from qiskit_aer.primitives import SamplerV2
from typer.testing import CliRunner

import sdk
from orchestrator.app import create_app
from orchestrator.auth import Role, issue_token
from orchestrator.db import Database
from orchestrator.services import Services
from orchestrator.settings import Settings
from sdk.cli import app as qai
from sdk.dsse import Envelope
from sdk.ledger import verify_receipt
from sdk.manifest import new_manifest, parse_manifest
from tests.conftest import LiveServer
from tests.ledger_helpers import ledger_services


@pytest.fixture
def server(settings: Settings, sqlite_db: Database) -> Iterator[tuple[Services, LiveServer, str]]:
    for svc in ledger_services(settings, sqlite_db, ledger_checkpoint_every=1):
        token = issue_token(svc.db, role=Role.SIGNER, tenant="org-a").token
        with LiveServer(create_app(svc)) as srv:
            yield svc, srv, token


def bell() -> QuantumCircuit:
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    return qc


def _stored_manifest(client: sdk.Client, job_id: str) -> sdk.RunManifest:
    job = client.get_job(job_id)
    return parse_manifest(Envelope.model_validate(job["envelope"]).payload_bytes())


def test_instrumented_aer_backend(server: tuple[Services, LiveServer, str]) -> None:
    svc, srv, token = server
    with sdk.Client(srv.url, token) as client:
        backend = sdk.instrument(AerSimulator(), client=client, tenant="org-a", key="org-a.manifests",
                                 em_method="none", labels={"experiment": "bell"})
        job = backend.run(bell(), shots=500)
        counts = job.result().get_counts()
        assert sum(counts.values()) == 500 and set(counts) <= {"00", "11"}
        m = _stored_manifest(client, job.qai_manifest["job_id"])
        assert m.circuit.qasm == qasm3.dumps(bell()) and m.shots == 500 and m.labels == {"experiment": "bell"}
        assert m.backend_id == "aer_simulator"
        # the recorded seed replays the run exactly
        replay = AerSimulator().run(bell(), shots=500, seed_simulator=m.seed).result().get_counts()
        assert replay == counts
        assert client.verify_manifest(Envelope.model_validate(client.get_job(str(m.job_id))["envelope"])).manifest == m
        verify_receipt(job.qai_manifest["receipt"], svc.ledger.checkpoint_key())
        assert backend.num_qubits == AerSimulator().num_qubits  # everything else passes through


def test_instrumented_sampler_and_generic_hook(server: tuple[Services, LiveServer, str]) -> None:
    _, srv, token = server
    with sdk.Client(srv.url, token) as client:
        sampler = sdk.instrument(SamplerV2(), client=client, tenant="org-a", key="org-a.manifests", shots=256)
        job = sampler.run([bell()])
        assert sum(job.result()[0].data.c.get_counts().values()) == 256
        assert _stored_manifest(client, job.qai_manifest["job_id"]).shots == 256
        with sdk.run_manifest(client=client, tenant="org-a", key="org-a.manifests", qasm="OPENQASM 3.0;",
                              shots=10, seed=7, em_method="zne-richardson") as m:
            assert m.manifest["seed"] == 7
        stored = _stored_manifest(client, m.job_id)
        assert stored.em_method == "zne-richardson" and stored.circuit.qasm == "OPENQASM 3.0;"
        assert client.list_jobs()["jobs"][-1]["job_id"] == m.job_id


def test_async_client(server: tuple[Services, LiveServer, str]) -> None:
    _, srv, token = server

    async def go() -> dict[str, object]:
        async with sdk.AsyncClient(srv.url, token) as client:
            out = await client.create_job(new_manifest(tenant="org-a", qasm="OPENQASM 3.0;", shots=5),
                                          "org-a.manifests")
            return await client.get_job(str(out["job_id"]))

    job = asyncio.run(go())
    assert job["tenant"] == "org-a" and job["status"] == "pending"


def test_manifest_and_jobs_cli(server: tuple[Services, LiveServer, str], tmp_path: Path) -> None:
    svc, srv, token = server
    run = CliRunner().invoke
    qasm = tmp_path / "bell.qasm"
    qasm.write_text(qasm3.dumps(bell()))
    r = run(qai, ["manifest", "create", str(qasm), "--tenant", "org-a", "--shots", "300", "--seed", "11",
                  "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    conn = ["--server", srv.url, "--token", token]
    r = run(qai, ["manifest", "sign", str(tmp_path / "m.json"), "--key", "org-a.manifests", *conn,
                  "--out", str(tmp_path / "m.dsse.json")])
    assert r.exit_code == 0, r.output
    key_file = tmp_path / "key.json"
    key_file.write_text(svc.kms.public_key("org-a.manifests").model_dump_json())
    r = run(qai, ["manifest", "verify", str(tmp_path / "m.dsse.json"), "--key", str(key_file), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["valid"] is True, r.output
    tampered = json.loads((tmp_path / "m.dsse.json").read_text())
    tampered["signatures"] = tampered["signatures"][:1]  # drop the classical half: a downgrade
    (tmp_path / "bad.json").write_text(json.dumps(tampered))
    r = run(qai, ["manifest", "verify", str(tmp_path / "bad.json"), "--key", str(key_file), "--json"])
    assert r.exit_code == 2 and json.loads(r.stdout)["error"]["code"] == "signature.missing_part"
    r = run(qai, ["manifest", "show", str(tmp_path / "m.dsse.json")])
    assert r.exit_code == 0 and "shots: 300" in r.stdout and "seed: 11" in r.stdout
    r = run(qai, ["jobs", "submit", str(tmp_path / "m.dsse.json"), *conn, "--json"])
    assert r.exit_code == 0, r.output
    job_id = json.loads(r.stdout)["job_id"]
    r = run(qai, ["jobs", "get", job_id, *conn, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["tenant"] == "org-a"
    r = run(qai, ["jobs", "list", *conn, "--json"])
    assert [j["job_id"] for j in json.loads(r.stdout)["jobs"]] == [job_id]
    # several files go in one batch; a rejected one is reported and fails the command, alone
    for i in (2, 3):
        r = run(qai, ["manifest", "create", str(qasm), "--tenant", "org-a", "--shots", "300", "--out",
                      str(tmp_path / f"m{i}.json")])
        assert r.exit_code == 0, r.output
        r = run(qai, ["manifest", "sign", str(tmp_path / f"m{i}.json"), "--key", "org-a.manifests", *conn,
                      "--out", str(tmp_path / f"m{i}.dsse.json")])
        assert r.exit_code == 0, r.output
        signed = json.loads((tmp_path / f"m{i}.dsse.json").read_text())
        (tmp_path / f"m{i}.dsse.yaml").write_text(yaml.safe_dump(signed))
    files = [str(tmp_path / f) for f in ("m.dsse.json", "m2.dsse.yaml", "bad.json", "m3.dsse.yaml")]
    r = run(qai, ["jobs", "submit", *files, *conn, "--json"])
    assert r.exit_code == 1, r.output
    assert [x["status"] for x in json.loads(r.stdout)["results"]] == [200, 201, 422, 201]
    r = run(qai, ["jobs", "list", *conn, "--json"])
    assert len(json.loads(r.stdout)["jobs"]) == 3
