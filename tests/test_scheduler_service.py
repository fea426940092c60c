"""Scheduling stored jobs over real HTTP, on PostgreSQL+S3 and on the embedded default: decisions are
signed, stored, ledgered and replayable; bad input and tampering are caught with their own codes."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import func, inspect, select, text

from orchestrator import migrate
from orchestrator.app import create_app
from orchestrator.auth import Principal, Role, create_tenant, issue_token
from orchestrator.db import Database
from orchestrator.jobs import ManifestRow
from orchestrator.models import Tenant
from orchestrator.services import Services
from scheduler.replay import replay, replay_document
from scheduler.service import (
    DECISION_PAYLOAD_TYPE,
    SCHEDULER_KEY,
    DecisionRow,
    backlog_statement,
    scheduler,
)
from sdk.audit import ServerSource, audit
from sdk.canonical import canonical_json
from sdk.client import Client
from sdk.dsse import envelope_bytes, envelope_from_bundle, pae
from sdk.errors import QaiError
from sdk.ledger import SYSTEM_TENANT, verify_receipt
from sdk.manifest import sign_manifest
from tests.conftest import LiveServer
from tests.policy_data import dataset
from tests.test_jobs import svc  # noqa: F401  (the PostgreSQL+S3 and SQLite+local fixture)
from tests.test_manifest import manifest
from tests.test_policy import GHZ3, SMALL

CATALOG = 9  # backends in harness.catalog


@pytest.fixture(scope="session")
def data_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dataset(tmp_path_factory.getbasetemp().parent)


@pytest.fixture
def ready(svc: Services, data_path: Path) -> Iterator[Services]:  # noqa: F811
    """Services with the catalog imported and a champion policy model."""
    from em_policy.training import train_and_register
    from harness.backends import import_catalog

    import_catalog(svc.db)
    assert train_and_register([str(data_path)], SMALL, quiet=True, svc=svc)["promoted"]
    yield svc


def _submit(services: Services, **fields: Any) -> str:
    m = manifest(job_id=str(uuid.uuid4()), circuit={"qasm": GHZ3}, artifact_hash=_hash(GHZ3), **fields)
    signer = Principal(subject="t", role=Role.SIGNER, tenant=m.tenant)
    env = sign_manifest(m, lambda msg: services.kms.sign(f"{m.tenant}.manifests", principal=signer, message=msg))
    return services.jobs.submit(env.to_bytes(), Principal(subject="t", role=Role.SUBMITTER, tenant=m.tenant)).job_id


def _wait_for(c: httpx.Client, job_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == status:
            return dict(job)
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.2)


def _hash(qasm: str) -> str:
    from sdk.manifest import qasm_sha256

    return qasm_sha256(qasm)


def _counts(services: Services) -> tuple[int, int]:
    """Decision rows and decision ledger entries (the embedded worker ledgers results meanwhile)."""
    with services.db.read() as s:
        rows = int(s.scalar(select(func.count()).select_from(DecisionRow)) or 0)
    entries = services.ledger.entries(0, services.ledger.size())
    return rows, sum(e.type == "scheduler-decision" for e in entries)


def test_schedule_sign_ledger_replay_and_reject_over_http(ready: Services) -> None:
    services = ready
    create_tenant(services.db, "org-pinned", crypto_policy={"allowed_backends": ["fake_nairobi"]})
    services.kms.create_key("org-pinned.manifests", tenant="org-pinned", principal=Principal.system("test"))
    token = issue_token(services.db, role=Role.SUBMITTER, tenant="org-a").token
    pinned_token = issue_token(services.db, role=Role.SUBMITTER, tenant="org-pinned").token
    other = issue_token(services.db, role=Role.SUBMITTER, tenant="org-b").token
    auditor = issue_token(services.db, role=Role.AUDITOR, tenant=None).token
    job_id = _submit(services, crypto_mode="hybrid", priority_class="critical")
    with LiveServer(create_app(services)) as srv, httpx.Client(base_url=srv.url, timeout=120,
                                                          headers={"Authorization": f"Bearer {token}"}) as c:
        r = c.post("/v1/schedule", json={"job_id": job_id})
        assert r.status_code == 201, r.text
        out = r.json()
        body = out["decision"]
        chosen = body["chosen"]
        # every backend is judged by every filter, with a reason for each reject
        assert len(body["backends"]) == CATALOG
        for row in body["backends"]:
            assert [f["plugin"] for f in row["filters"]][:2] == ["crypto-mode", "tenant-allow-list"]
            assert all("reason" in f for f in row["filters"] if f["verdict"] == "reject")
        eligible = [b for b in body["backends"] if b["eligible"]]
        assert chosen["backend_id"] == max(eligible, key=lambda b: b["score"])["backend_id"]
        assert chosen["model_version"] == "em-policy/1" and chosen["em_method"]
        assert 0 < body["confidence"] <= 1 and body["rationale"].startswith(chosen["backend_id"])
        # GHZ3 fits every catalog device and every link carries hybrid: a backend is out only where the
        # small test model cannot predict (its calibration is outside the model's training range)
        for b in body["backends"]:
            if not b["eligible"]:
                rejects = [f for f in b["filters"] if f["verdict"] == "reject"]
                assert [f["plugin"] for f in rejects] == ["prediction"] and "em_policy." in rejects[0]["reason"]
        # the embedded worker runs it on the chosen backend with the chosen method; the job shows it
        job = _wait_for(c, job_id, "completed")
        assert job["decisions"] == [out["decision_id"]]
        assert job["execution"]["backend_id"] == chosen["backend_id"]
        assert job["execution"]["em_method"] == chosen["em_method"]
        assert job["execution"]["result"]["ledger_index"] > out["receipt"]["index"]
        # idempotent: the same job gets the same decision back
        again = c.post("/v1/schedule", json={"job_id": job_id})
        assert again.status_code == 200 and again.json()["decision_id"] == out["decision_id"], again.text
        assert {k: v for k, v in again.json().items() if k != "created"} == {k: v for k, v in out.items()
                                                                             if k not in ("created", "receipt")} | {
            "receipt": again.json()["receipt"]}

        # the stored, signed document holds every input and the same body
        got = c.get(f"/v1/decisions/{out['decision_id']}")
        assert got.status_code == 200, got.text
        doc = got.json()["document"]
        assert doc["decision"] == body and doc["job_id"] == job_id
        inputs = doc["inputs"]
        assert inputs["job"]["manifest_sha256"] and inputs["job"]["num_qubits"] == 3
        assert inputs["seed"] == 42 and inputs["profile"]["config_hash"].startswith("sha256:")
        assert {b["calibration_snapshot_id"] for b in inputs["backends"]} == {
            b["calibration_snapshot_id"] for b in body["backends"]}
        assert c.get("/v1/decisions", params={"job_id": job_id}).json()["decisions"] == [out["decision_id"]]
        # replay: byte-identical body, and every input re-derived from its source
        rep = c.post(f"/v1/decisions/{out['decision_id']}/replay").json()
        assert rep["ok"] and rep["identical"], rep
        names = [ch["name"] for ch in rep["checks"]]
        assert names.count("job") == 1 and sum(n.startswith("snapshot:") for n in names) == CATALOG
        assert sum(n.startswith("prediction:") for n in names) == CATALOG

        # a signed manifest can be scheduled in one call
        m = manifest(job_id=str(uuid.uuid4()), circuit={"qasm": GHZ3}, artifact_hash=_hash(GHZ3))
        signer = Principal(subject="t", role=Role.SIGNER, tenant="org-a")
        env = sign_manifest(m, lambda msg: services.kms.sign("org-a.manifests", principal=signer, message=msg))
        r2 = c.post("/v1/schedule", json={"envelope": json.loads(env.to_bytes())})
        assert r2.status_code == 201 and r2.json()["job_id"] == str(m.job_id)

        # nothing fits: 422 listing every backend and why; the decision is still recorded and ledgered
        pqc = _submit(services, tenant="org-pinned", crypto_mode="pqc-required",
                      pqc_suite="ML-DSA-65+ECDSA-P256")
        before = _counts(services)
        r3 = c.post("/v1/schedule", json={"job_id": pqc}, headers={"Authorization": f"Bearer {pinned_token}"})
        assert r3.status_code == 422, r3.text
        err = r3.json()["error"]
        assert err["code"] == "scheduler.no_backend"
        listed = {b["backend_id"]: b["reasons"] for b in err["details"]["backends"]}
        assert len(listed) == CATALOG and all(listed.values())
        assert any("tenant-allow-list" in r for r in listed["fake_manila"])
        assert any("crypto-mode" in r for r in listed["fake_nairobi"])  # nairobi has no pqc-required link
        assert _counts(services) == (before[0] + 1, before[1] + 1)

        # bad input: each with its code, and nothing written
        before = _counts(services)
        for payload, status, code in (
            ({"job_id": str(uuid.uuid4())}, 404, "job.not_found"),
            ({"job_id": job_id, "envelope": {}}, 422, "request.invalid"),
            ({}, 422, "request.invalid"),
            ({"envelope": {"payload": "x"}}, 422, "dsse.malformed"),
        ):
            bad = c.post("/v1/schedule", json=payload)
            assert (bad.status_code, bad.json()["error"]["code"]) == (status, code), (payload, bad.text)
        foreign = c.post("/v1/schedule", json={"job_id": job_id}, headers={"Authorization": f"Bearer {other}"})
        assert foreign.status_code == 404
        assert c.get(f"/v1/decisions/{out['decision_id']}",
                     headers={"Authorization": f"Bearer {other}"}).status_code == 404
        assert c.get(f"/v1/decisions/{uuid.uuid4()}").json()["error"]["code"] == "scheduler.decision_not_found"
        assert _counts(services) == before

        # the receipt proves the decision is in the log; the offline auditor replays every decision
        services.ledger.checkpoint()
        with Client(srv.url, auditor) as a:
            verify_receipt(a.ledger_receipt(out["receipt"]["index"]), a.ledger_key())
            report = audit(ServerSource(a), trusted_keys={k.name: k for k in a.list_keys()}, workers=1)
        assert report.ok, report.failures


def test_replay_detects_changed_inputs(ready: Services) -> None:
    services = ready
    job_id = _submit(services)
    decision = scheduler(services).schedule(job_id, Principal.system("test"))
    assert replay(services, decision.decision_id).ok

    # 1. a scheduler that recorded one input but decided on another: the body no longer recomputes
    doc = json.loads(canonical_json(decision.document))
    chosen = doc["decision"]["chosen"]["backend_id"]
    backend = next(b for b in doc["inputs"]["backends"] if b["backend_id"] == chosen)
    backend["prediction"]["expected_fidelity"] *= 0.5
    differences = replay_document(doc)
    assert differences and all(d["path"].startswith("$.") for d in differences)
    assert any("expected_fidelity" in d["path"] or "score" in d["path"] for d in differences)
    # ... which the offline auditor reports even when the forged document is properly signed
    payload = canonical_json(doc)
    bundle = services.kms.sign(SCHEDULER_KEY, principal=Principal.system("test"),
                          message=pae(DECISION_PAYLOAD_TYPE, payload))
    forged = envelope_bytes(envelope_from_bundle(DECISION_PAYLOAD_TYPE, payload, bundle))
    index = services.ledger.append_object("scheduler-decision", SYSTEM_TENANT, forged).index
    # ... and a decision signed by another system key (the workers', say) is refused as such
    services.kms.create_key("qai.other", tenant=SYSTEM_TENANT, principal=Principal.system("test"))
    payload2 = canonical_json(json.loads(canonical_json(decision.document)))
    other = envelope_bytes(envelope_from_bundle(DECISION_PAYLOAD_TYPE, payload2, services.kms.sign(
        "qai.other", principal=Principal.system("test"), message=pae(DECISION_PAYLOAD_TYPE, payload2))))
    other_index = services.ledger.append_object("scheduler-decision", SYSTEM_TENANT, other).index
    services.ledger.checkpoint()
    auditor = issue_token(services.db, role=Role.AUDITOR, tenant=None).token
    with LiveServer(create_app(services)) as srv, Client(srv.url, auditor) as a:
        report = audit(ServerSource(a), trusted_keys={k.name: k for k in a.list_keys()}, workers=1)
    assert [(f.code, f.index) for f in report.failures] == [("scheduler.replay_mismatch", index),
                                                            ("scheduler.decision_tampered", other_index)]

    # 2. a calibration value changed under a recorded snapshot id: replay names the backend
    snapshot_id = backend["calibration_snapshot_id"]
    _lift_append_only(services, "calibration_snapshots")  # as someone with write access to the database would
    with services.db.write() as s:
        s.execute(text("UPDATE calibration_snapshots SET raw_metrics = :m WHERE id = :i"),
                  {"m": json.dumps(_tweaked_metrics(services, snapshot_id)), "i": snapshot_id})
    rep = replay(services, decision.decision_id)
    assert rep.identical and not rep.ok  # the body still recomputes from what was recorded...
    bad = [c for c in rep.checks if not c.ok]
    assert [c.name for c in bad] == [f"snapshot:{chosen}"] and "calibration.id_mismatch" in bad[0].detail

    # 3. the index row edited (it steers the backlog and dispatch): refused against the signed document
    _lift_append_only(services, "scheduler_decisions")
    with services.db.write() as s:
        s.execute(text("UPDATE scheduler_decisions SET run_seconds = 0.001 WHERE id = :i"),
                  {"i": decision.decision_id})
    with pytest.raises(Exception) as edited:
        replay(services, decision.decision_id)
    assert getattr(edited.value, "code", None) == "scheduler.decision_tampered"
    assert edited.value.details["fields"] == ["run_seconds"]  # type: ignore[attr-defined]

    # 4. the stored decision object rewritten: reading it fails, with its own code
    row = scheduler(services).row(decision.decision_id)
    services.objects.put(row.decision_manifest_path, forged, overwrite=True)
    with pytest.raises(Exception) as caught:
        replay(services, decision.decision_id)
    assert getattr(caught.value, "code", None) == "scheduler.decision_tampered"


def _lift_append_only(services: Services, table: str) -> None:
    with services.db.write() as s:
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER {table}_append_only"))
            return
        names = s.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = :t"),
                          {"t": table}).scalars().all()
        for name in names:
            s.execute(text(f'DROP TRIGGER "{name}"'))


def _tweaked_metrics(services: Services, snapshot_id: str) -> dict[str, Any]:
    with services.db.read() as s:
        raw = s.execute(text("SELECT raw_metrics FROM calibration_snapshots WHERE id = :i"),
                        {"i": snapshot_id}).scalar_one()
    metrics = json.loads(raw) if isinstance(raw, str) else dict(raw)
    metrics["t1"] = [v * 0.9 for v in metrics["t1"]]
    return metrics


def test_a_key_of_the_wrong_tenant_refuses_and_writes_nothing(ready: Services) -> None:
    services = ready
    services.kms.create_key(SCHEDULER_KEY, tenant="org-b", principal=Principal.system("test"))
    job_id = _submit(services)
    before = _counts(services)
    with pytest.raises(Exception) as caught:
        scheduler(services).schedule(job_id, Principal.system("test"))
    assert getattr(caught.value, "code", None) == "scheduler.bad_key"
    assert _counts(services) == before
    with services.db.read() as s:
        assert s.scalar(select(ManifestRow.status).where(ManifestRow.job_id == job_id)) == "pending"


def test_queue_wait_counts_only_work_a_job_cannot_overtake(ready: Services) -> None:
    """Workers take priority classes strictly in order: a critical job waits behind no background
    work qai has queued, a background job behind all of it."""
    services = ready
    system = Principal.system("test")
    first = scheduler(services).schedule(_submit(services, priority_class="background"), system)
    chosen = first.body["chosen"]["backend_id"]
    run = next(b for b in first.document["inputs"]["backends"]
               if b["backend_id"] == chosen)["prediction"]["estimated_seconds"]
    assert run > 0
    urgent = scheduler(services).schedule(_submit(services, priority_class="critical"), system)
    later = scheduler(services).schedule(_submit(services, priority_class="background"), system)

    def wait(d: Any) -> float:
        return float(next(b for b in d.document["inputs"]["backends"] if b["backend_id"] == chosen)
                     ["queue_wait_seconds"])

    base = wait(first)  # nothing was queued yet: the catalog's mean wait alone
    assert wait(urgent) == base
    assert wait(later) >= base + run
    with services.db.read() as s:  # no worker runs in this process: all three wait in the queue
        statuses = s.scalars(select(ManifestRow.status).where(ManifestRow.job_id.in_(
            [first.job_id, urgent.job_id, later.job_id]))).all()
    assert sorted(statuses) == ["queued"] * 3


def test_concurrent_schedules_of_one_job_record_one_decision(ready: Services) -> None:
    import threading

    services = ready
    job_id = _submit(services)
    barrier = threading.Barrier(4)
    results: list[Any] = []

    def call() -> None:
        barrier.wait()
        try:
            results.append(scheduler(services).schedule(job_id, Principal.system("test")).decision_id)
        except Exception as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, str) for r in results), results
    assert len(set(results)) == 1
    with services.db.read() as s:
        chosen = s.scalars(select(DecisionRow.id).where(DecisionRow.job_id == job_id,
                                                        DecisionRow.chosen_backend.is_not(None))).all()
        assert chosen == [results[0]]
        assert s.scalar(select(ManifestRow.status).where(ManifestRow.job_id == job_id)) == "queued"


def test_bad_profiles_policies_and_manifests_are_refused_with_their_codes(ready: Services) -> None:
    services = ready
    system = Principal.system("test")
    cases = [
        ("org-noc", {"scheduler": {"plugins": ["tenant-allow-list", "qkd", "status", "capability", "prediction",
                                               "sla", "v1-score"]}}, "scheduler.bad_profile"),
        ("org-cfg", {"scheduler": {"config": {"wait_weight": {"critical": 1.0}}}}, "scheduler.bad_profile"),
        ("org-cfg2", {"scheduler": {"config": {"tie_tolerance": "small"}}}, "scheduler.bad_profile"),
        ("org-qkd", {"qkd": "require"}, "tenant.bad_policy"),
    ]
    for tenant, policy, code in cases:
        create_tenant(services.db, tenant)
        with services.db.write() as s:  # stored as it is: a policy written before it was validated
            stored = s.get(Tenant, tenant)
            assert stored is not None
            stored.crypto_policy = policy
        services.kms.create_key(f"{tenant}.manifests", tenant=tenant, principal=system)
        job_id = _submit(services, tenant=tenant)
        before = _counts(services)
        with pytest.raises(Exception) as caught:
            scheduler(services).schedule(job_id, system)
        assert getattr(caught.value, "code", None) == code, (tenant, caught.value)
        assert _counts(services) == before
    # an unknown minimum crypto mode stored in a policy fails closed already at ingest
    create_tenant(services.db, "org-min")
    services.kms.create_key("org-min.manifests", tenant="org-min", principal=system)
    with services.db.write() as s:
        stored = s.get(Tenant, "org-min")
        assert stored is not None
        stored.crypto_policy = {"min_crypto_mode": "quantum"}
    with pytest.raises(Exception) as refused:
        _submit(services, tenant="org-min")
    assert getattr(refused.value, "code", None) == "policy.crypto_mode"
    # a deadline without a UTC offset is read as UTC, not a 500
    naive = _submit(services, sla={"deadline": "2099-01-01T00:00:00"})
    decision = scheduler(services).schedule(naive, system)
    assert decision.document["inputs"]["job"]["deadline_seconds"] > 0
    assert replay(services, decision.decision_id).ok


def test_the_catalog_is_read_again_on_a_thread_once_stale(svc: Services,  # noqa: F811
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Stale-while-revalidate: a catalog past its TTL answers the request that finds it while a
    thread reads it again; a job this process queues during that read is counted in the new one;
    a failed read leaves the old catalog in use until it is too old, then the request reads it
    and raises what the read raises."""
    from harness.backends import import_catalog, import_snapshot, set_status
    from harness.catalog import catalog, catalog_snapshot
    from scheduler.service import BACKENDS_MAX_AGE_SECONDS, BACKENDS_TTL_SECONDS, Scheduler

    import_catalog(svc.db)
    now = [100.0]
    sched = Scheduler(svc, clock=lambda: now[0])
    first = sched.catalog()
    backend = first.backends[0]["backend_id"]
    set_status(svc.db, backend, "offline")

    def status(cat: Any) -> str:
        return str(next(b["status"] for b in cat.backends if b["backend_id"] == backend))

    now[0] += BACKENDS_TTL_SECONDS - 0.01
    assert sched.catalog() is first and sched._reader is None  # fresh: nothing is read

    real_backlog = sched.backlog

    def backlog_while_a_job_is_queued() -> dict[tuple[str, str], float]:
        out = real_backlog()
        sched._queued(backend, "standard", 7.0)  # one of this process's decisions lands during the read
        return out

    sched.backlog = backlog_while_a_job_is_queued  # type: ignore[method-assign]
    now[0] += 0.02
    assert sched.catalog() is first  # stale: answered at once from the catalog in use
    reader = sched._reader
    assert reader is not None
    reader.join(timeout=60)
    fresh = sched.catalog()
    assert fresh is not first and status(fresh) == "offline" and status(first) == "online"
    assert fresh.ahead_of(backend, "standard") == 7.0 == first.ahead_of(backend, "standard")
    assert sched._queued_meanwhile is None

    def failing_backlog() -> dict[tuple[str, str], float]:
        raise QaiError("db.unavailable", "the database went away", status=503)

    sched.backlog = failing_backlog  # type: ignore[method-assign]
    now[0] = fresh.read_at + BACKENDS_TTL_SECONDS
    assert sched.catalog() is fresh
    assert sched._reader is not reader
    sched._reader.join(timeout=60)
    assert "reading the backend catalog failed" in caplog.text
    assert sched.catalog() is fresh  # still within the maximum age: the last good read serves
    sched._reader.join(timeout=60)
    now[0] = fresh.read_at + BACKENDS_MAX_AGE_SECONDS
    with pytest.raises(QaiError) as err:  # too old to use: read in the request, which gets the error
        sched.catalog()
    assert err.value.code == "db.unavailable"
    sched.backlog = real_backlog  # type: ignore[method-assign]
    set_status(svc.db, backend, "online")
    inline = sched.catalog()
    assert inline is not fresh and status(inline) == "online" and inline.read_at == now[0]

    # A read that finds the rows as they were keeps the decoded listing; one changed JSON value
    # (a backend's queue) is decoded afresh.
    now[0] = inline.read_at + BACKENDS_MAX_AGE_SECONDS
    unchanged = sched.catalog()
    assert unchanged is not inline and unchanged.backends is inline.backends
    info = next(i for i in catalog() if i.backend_id == backend)
    import_snapshot(svc.db, catalog_snapshot(backend), dataclasses.replace(info, queue={"mean_wait_seconds": 4321.0}))
    now[0] = unchanged.read_at + BACKENDS_MAX_AGE_SECONDS
    changed = sched.catalog()
    assert changed.backends is not unchanged.backends
    assert next(b["queue"] for b in changed.backends if b["backend_id"] == backend) == {"mean_wait_seconds": 4321.0}
    assert [b for b in changed.backends if b["backend_id"] != backend] == [
        b for b in unchanged.backends if b["backend_id"] != backend]


def test_the_document_written_around_canonical_inputs_is_its_canonical_json() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from scheduler.service import document_payload

    values = st.recursive(st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=8)
                          | st.floats(allow_nan=False, allow_infinity=False),
                          lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                          max_leaves=20)

    @settings(max_examples=300, deadline=None)
    @given(values, values, st.text(max_size=10))
    def check(inputs: Any, body: Any, created_at: str) -> None:
        doc = {"type": "qai.scheduler.decision.v1", "decision_id": "d", "job_id": "j", "created_at": created_at,
               "inputs": inputs, "decision": body}
        assert document_payload(doc, canonical_json(inputs)) == canonical_json(doc)
        assert document_payload(doc, canonical_json(inputs), canonical_json(body)) == canonical_json(doc)

    check()


def test_a_tenant_policy_with_unknown_values_is_refused(svc: Services) -> None:  # noqa: F811
    for policy in ({"min_crypto_mode": "quantum"}, {"qkd": "require"}, {"allowed_backends": "fake_kyiv"}):
        with pytest.raises(Exception) as caught:
            create_tenant(svc.db, "org-typo", crypto_policy=policy)
        assert getattr(caught.value, "code", None) == "tenant.bad_policy"


def test_a_value_profile_co_selects_the_em_method_and_replays(ready: Services) -> None:
    """A tenant on the value profile: every method the policy predicts within the budget is
    recorded per backend, the decision takes the best (backend, method) pair by the profile's
    utility, the index row carries the chosen method's run time, and the decision replays deeply."""
    from scheduler.plugins import BUILTIN, OPTIONAL

    services = ready
    plugins = [*(p.name for p in BUILTIN if p.kind == "filter"), *(p.name for p in OPTIONAL), "qkd-preference"]
    config = {"em_coselect": 1, "fidelity_value_usd": 100, "wait_cost_usd_per_second": 0.001}
    create_tenant(services.db, "org-value", crypto_policy={"scheduler": {"name": "value", "plugins": plugins,
                                                                         "config": config}})
    services.kms.create_key("org-value.manifests", tenant="org-value", principal=Principal.system("test"))
    job_id = _submit(services, tenant="org-value", shots=1000, shot_budget=100_000)
    decision = scheduler(services).schedule(job_id, Principal.system("test"))
    inputs, body = decision.document["inputs"], decision.document["decision"]
    assert inputs["profile"]["name"] == "value" and inputs["profile"]["config"]["em_coselect"] == 1
    predicted = [b for b in inputs["backends"] if b.get("prediction")]
    assert predicted
    for b in predicted:
        options = b["prediction"]["options"]
        assert options[0]["method"] == b["prediction"]["method"]  # the policy's own first, then by name
        assert [o["method"] for o in options[1:]] == sorted(o["method"] for o in options[1:])
    assert max(len(b["prediction"]["options"]) for b in predicted) > 1  # a real choice of methods
    job, cfg = inputs["job"], inputs["profile"]["config"]

    def utility(b: dict[str, Any], o: dict[str, Any]) -> float:
        wait = cfg["wait_cost_usd_per_second"] * cfg["wait_weight"][job["priority_class"]] * (
            b["queue_wait_seconds"] + o["estimated_seconds"])
        return float(cfg["fidelity_value_usd"] * o["expected_fidelity"]
                     - b["cost_per_shot"] * job["shots"] * o["shot_multiplier"] - wait)

    eligible = {r["backend_id"] for r in body["backends"] if r["eligible"]}
    best = max((utility(b, o), b["backend_id"], o["method"]) for b in predicted if b["backend_id"] in eligible
               for o in b["prediction"]["options"])
    chosen = body["chosen"]
    assert (chosen["backend_id"], chosen["em_method"]) == best[1:]
    option = next(o for b in predicted if b["backend_id"] == chosen["backend_id"]
                  for o in b["prediction"]["options"] if o["method"] == chosen["em_method"])
    assert chosen["estimated_seconds"] == option["estimated_seconds"]
    assert scheduler(services).row(decision.decision_id).run_seconds == option["estimated_seconds"]
    rep = replay(services, decision.decision_id)
    assert rep.ok and rep.identical, [c for c in rep.checks if not c.ok]
    assert any(c.name.startswith("prediction:") for c in rep.checks)  # the options re-derived by the model


def test_a_decision_waits_in_the_outbox_and_is_read_from_it_until_uploaded(ready: Services,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.outbox import OutboxObjectRow

    services = ready  # no app: no uploader runs but the test's own
    job_id = _submit(services)
    services.uploader.drain()  # the job's envelope: only the decision's is pending below
    decision = scheduler(services).schedule(job_id, Principal.system("test"))
    row = scheduler(services).row(decision.decision_id)
    # committed with the decision's row and ledger entry, not yet in the object store
    assert services.objects.list("scheduler/decisions/") == []
    with services.db.read() as s:
        held = s.get(OutboxObjectRow, row.decision_manifest_path)
        assert held is not None and held.sha256 == row.decision_sha256
        signed = bytes(held.data)
    assert services.uploader.pending() == 1
    assert scheduler(services).get(decision.decision_id, Principal.system("test"))["storage"]["mode"] == "outbox"
    # readers do not see the difference: the verified document, the ledger API's bytes, replay
    assert scheduler(services).load(row) == decision.document
    assert services.ledger.object_bytes(row.decision_manifest_path) == signed
    assert replay(services, decision.decision_id).ok

    # a copy edited in the database, its digest column too, is refused when read and never uploaded:
    # its path names the true content. It does not hold back the next decision's upload either.
    from orchestrator.outbox import Uploader
    from sdk.ledger import sha256_hex

    forged = signed.replace(b'"payload":"', b'"payload":"e')
    with services.db.write() as s:
        s.execute(text("UPDATE object_outbox SET data = :d, sha256 = :h WHERE path = :p"),
                  {"d": forged, "h": sha256_hex(forged), "p": row.decision_manifest_path})
    with pytest.raises(Exception) as caught:
        scheduler(services).load(row)
    assert getattr(caught.value, "code", None) == "scheduler.decision_tampered"
    job2 = _submit(services)
    second = scheduler(services).row(scheduler(services).schedule(job2, Principal.system("test")).decision_id)
    one_at_a_time = Uploader(services.db, services.objects, batch=1)
    for _ in range(4):  # batches of one: job2's envelope, then the second decision past the refused one
        one_at_a_time.run_once()
    assert services.objects.list("scheduler/decisions/") == [second.decision_manifest_path]
    assert set(one_at_a_time.refused) == {row.decision_manifest_path} and one_at_a_time.pending() == 1
    with pytest.raises(QaiError) as stuck:
        one_at_a_time.drain(timeout=600)  # fails at once: only the refused copy is left
    assert stuck.value.code == "outbox.stuck" and stuck.value.details["refused"] == [row.decision_manifest_path]

    with services.db.write() as s:
        s.execute(text("UPDATE object_outbox SET data = :d, sha256 = :h WHERE path = :p"),
                  {"d": signed, "h": row.decision_sha256, "p": row.decision_manifest_path})
    monkeypatch.setattr("orchestrator.outbox.REFUSED_RETRY_SECONDS", 0.0)  # the mended row is looked at again
    one_at_a_time.drain()
    assert services.objects.get(row.decision_manifest_path) == signed
    with services.db.read() as s:
        assert s.get(OutboxObjectRow, row.decision_manifest_path) is None
    assert services.uploader.pending() == 0 and scheduler(services).load(row) == decision.document
    stored = scheduler(services).get(decision.decision_id, Principal.system("test"))["storage"]
    assert stored["mode"] == "write-once" and stored["location"].endswith(row.decision_manifest_path)


def _status_index(db: Database) -> list[str]:
    found = {ix["name"]: ix["column_names"] for ix in inspect(db.engine).get_indexes("manifests")}
    return list(found["ix_manifests_status"])


def test_the_backlog_reads_manifests_through_its_index_alone(db: Database) -> None:
    """Migration 0011: ``ix_manifests_status`` holds all the backlog reads of ``manifests``, so SQLite
    does not read each queued job's row, envelope and all (1.42 against 0.36 ms with 400 queued).
    It downgrades to the one-column index and upgrades again."""
    assert _status_index(db) == ["status", "priority_class", "job_id"]
    if db.dialect == "sqlite":
        sql = str(backlog_statement().compile(dialect=db.engine.dialect, compile_kwargs={"literal_binds": True}))
        with db.engine.connect() as c:
            plan = [str(row[-1]) for row in c.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
        assert any("manifests USING COVERING INDEX ix_manifests_status" in step for step in plan), plan
    cfg = migrate.alembic_config()
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0010")
    assert _status_index(db) == ["status"]
    migrate.upgrade(db)
    assert _status_index(db) == ["status", "priority_class", "job_id"]
