"""Dispatch and execution on real services: PostgreSQL with S3 over HTTP (moto's server) and the
embedded default (SQLite with a local directory); the machine's real Redis (127.0.0.1:6379) and the
in-process queue; real ``qai worker`` processes killed with SIGKILL mid-job; a real mock vendor API.

Redis is shared (db 0): every test uses its own key prefix and deletes its keys. A missing Redis
fails the tests; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from harness.backends import import_snapshot
from harness.catalog import backend_info, catalog_snapshot
from harness.methods import parse_method
from harness.models import EmResultRow
from harness.vendors import NO_FAULTS, FaultProfile, create_vendor_app
from orchestrator.app import create_app
from orchestrator.auth import Principal, Role, issue_token
from orchestrator.db import Database
from orchestrator.jobs import ManifestRow
from orchestrator.ledger import LedgerEntryRow
from orchestrator.services import Services
from orchestrator.settings import Settings
from scheduler.dispatch import LocalQueue, RedisQueue, cancel, close_dispatch, dispatch, job_queue, start_dispatch
from scheduler.service import Scheduler
from scheduler.worker import WORKER_KEY, Worker, claim_job, job_execution, verify_result
from sdk.client import Client
from sdk.dsse import parse_envelope, verify_envelope
from sdk.errors import QaiError
from sdk.ledger import verify_receipt
from sdk.manifest import sign_manifest
from tests.conftest import LiveServer, storage_settings
from tests.ledger_helpers import ledger_services
from tests.test_manifest import manifest

REDIS_URL = os.environ.get("QAI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parent.parent
WAIT = 180.0  # generous: a status is waited for, never timed
LOCAL_BACKEND = "fake_manila"  # local-aer adapter
VENDOR_BACKEND = "fake_nairobi"  # ibm-like adapter: served by the mock vendor in the crash tests


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required at {REDIS_URL} and is not reachable: {exc}", pytrace=False)
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    import redis

    prefix = f"qai-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{{{prefix}}}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _services(settings: Settings, db: Database, overrides: dict[str, Any]) -> Iterator[Services]:
    gen = ledger_services(settings, db, **overrides)
    svc = next(gen)
    for backend in (LOCAL_BACKEND, VENDOR_BACKEND):
        import_snapshot(svc.db, catalog_snapshot(backend), backend_info(backend))
    try:
        yield svc
    finally:
        close_dispatch(svc)
        gen.close()


@pytest.fixture
def overrides() -> dict[str, Any]:
    """Settings of the test's services; a test parametrizes it to change them."""
    return {}


@pytest.fixture(params=["postgresql+s3", "sqlite+local"])
def svc(request: pytest.FixtureRequest, settings: Settings, overrides: dict[str, Any]) -> Iterator[Services]:
    """Services on both engines, with the in-process queue unless ``overrides`` names Redis."""
    settings, db = storage_settings(request, settings, "dispatch")
    if overrides.get("redis_url"):
        overrides = {**overrides, "redis_prefix": request.getfixturevalue("redis_prefix")}
    yield from _services(settings, db, overrides)


@pytest.fixture
def vendor() -> Iterator[LiveServer]:
    """A mock IBM-like vendor serving the crash tests' backend. Its jobs wait in its queue for an
    hour until a test lifts the delay (``vendor.app.state.vendor.faults = NO_FAULTS``)."""
    app = create_vendor_app("ibm-like", {VENDOR_BACKEND: catalog_snapshot(VENDOR_BACKEND)},
                            FaultProfile(queue_delay_seconds=(3600.0, 3600.0)), seed=0)
    server = LiveServer(app)
    server.app = app  # type: ignore[attr-defined]
    with server:
        yield server


@pytest.fixture(params=["postgresql+s3", "sqlite+local"])
def crash_svc(request: pytest.FixtureRequest, settings: Settings, vendor: LiveServer, redis_prefix: str,
              redis_url: str, overrides: dict[str, Any]) -> Iterator[Services]:
    """Services for the crash tests: Redis, short leases, and the mock vendor for ibm-like backends."""
    settings, db = storage_settings(request, settings, "dispatch")
    yield from _services(settings, db, {"redis_url": redis_url, "redis_prefix": redis_prefix,
                                        "worker_lease_seconds": 2.0,
                                        "worker_vendor_urls": {"ibm-like": vendor.url}, **overrides})


# ----------------------------------------------------------------------------------------- helpers


BELL = 'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[2] q;\nbit[2] c;\nh q[0];\ncx q[0], q[1];\nc = measure q;\n'


def chosen_for(svc: Services, backend: str, method: str = "zne-linear-global") -> dict[str, Any]:
    try:
        params = parse_method(method).parameters()
    except QaiError:  # a method the worker must refuse
        params = {}
    return {"backend_id": backend, "calibration_snapshot_id": catalog_snapshot(backend).id, "em_method": method,
            "em_params": params, "shot_multiplier": 3.0, "expected_fidelity": 0.9, "model_version": "em-policy/1",
            "score": 1.0, "tie_broken_by_seed": False}


def submit(svc: Services, *, priority: str = "standard", shots: int = 2000) -> str:
    """A signed Bell-state job of org-a, submitted: ``pending``."""
    from sdk.manifest import qasm_sha256

    job_id = str(uuid.uuid4())
    m = manifest(job_id=job_id, circuit={"qasm": BELL}, artifact_hash=qasm_sha256(BELL), shots=shots,
                 priority_class=priority, seed=1234)
    signer = Principal(subject="t", role=Role.SIGNER, tenant="org-a")
    body = sign_manifest(m, lambda msg: svc.kms.sign("org-a.manifests", principal=signer, message=msg)).to_bytes()
    svc.jobs.submit(body, Principal(subject="s", role=Role.SUBMITTER, tenant="org-a"))
    return job_id


def decide(svc: Services, job_id: str, chosen: dict[str, Any]) -> str:
    """A signed, stored and ledgered decision choosing ``chosen`` for the job, recorded by the
    scheduler's own code (without the EM policy, which these tests do not train). Recording it
    queues the job too, as the scheduler does; ``dispatch`` after it is idempotent."""
    with svc.db.read() as s:
        row = s.get(ManifestRow, job_id)
        assert row is not None
        s.expunge(row)
    inputs = {"job": {"job_id": job_id, "tenant": row.tenant, "manifest_sha256": row.envelope_sha256,
                      "priority_class": row.priority_class},
              "backends": [{"backend_id": chosen["backend_id"], "prediction": {"estimated_seconds": 1.0}}]}
    body = {"job_id": job_id, "backends": [], "chosen": chosen, "confidence": 0.9, "rationale": "test"}
    scheduler = Scheduler(svc)
    scheduler.signing_key()  # first: a decision is verified as of its time, which must not precede its key
    return scheduler._record(row, inputs, body, datetime.now(UTC)).decision_id


def scheduled(svc: Services, backend: str = LOCAL_BACKEND, method: str = "zne-linear-global",
              priority: str = "standard", **dispatch_kw: Any) -> tuple[str, str]:
    job_id = submit(svc, priority=priority)
    chosen = chosen_for(svc, backend, method)
    decision_id = decide(svc, job_id, chosen)
    dispatch(svc, job_id, decision_id, chosen, priority, **dispatch_kw)
    return job_id, decision_id


def status(svc: Services, job_id: str) -> str:
    with svc.db.read() as s:
        return str(s.scalar(select(ManifestRow.status).where(ManifestRow.job_id == job_id)))


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_status(svc: Services, job_id: str, *wanted: str) -> str:
    wait_for(f"job {job_id} to become {'/'.join(wanted)}", lambda: status(svc, job_id) in wanted)
    return status(svc, job_id)


def result_entries(svc: Services) -> int:
    with svc.db.read() as s:
        return int(s.scalar(select(func.count()).select_from(LedgerEntryRow)
                            .where(LedgerEntryRow.entry_type == "em-result")) or 0)


def check_result(svc: Services, job_id: str, decision_id: str, *, attempt: int, status_: str) -> dict[str, Any]:
    """The result as an auditor would check it: the ledger entry, the signature (offline, from the
    public key alone), the files, and a receipt under a signed checkpoint."""
    record = verify_result(svc, job_id)
    execution = job_execution(svc, job_id)
    result = execution["result"]
    envelope = parse_envelope(svc.objects.get(result["record_path"]))
    entry = svc.ledger.entry(result["ledger_index"])
    verify_envelope(envelope, svc.kms.public_key(WORKER_KEY), at=entry.time)
    svc.ledger.checkpoint()
    verify_receipt(svc.ledger.receipt(result["ledger_index"]), svc.ledger.checkpoint_key())
    with svc.db.read() as s:
        row = s.get(ManifestRow, job_id)
        assert row is not None
    assert record["job_id"] == job_id and record["status"] == status_ and record["attempt"] == attempt
    assert record["decision"]["id"] == decision_id and record["manifest"]["sha256"] == row.envelope_sha256
    assert entry.type == "em-result"
    return record


def worker_env(svc: Services, **extra: str) -> dict[str, str]:
    """The environment of a ``qai worker`` process on ``svc``'s database, objects, HSM and queue."""
    s = svc.settings
    url = svc.db.url if svc.db.schema is None else f"{svc.db.url}?options=-csearch_path%3D{svc.db.schema}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAI_")}
    env.update({
        "QAI_HOME": str(s.home), "QAI_DATABASE_URL": url, "QAI_PKCS11_MODULE": s.pkcs11_module,
        "QAI_PKCS11_TOKEN_LABEL": s.pkcs11_token_label,
        "QAI_PKCS11_USER_PIN": s.pkcs11_user_pin.get_secret_value() if s.pkcs11_user_pin else "",
        "QAI_PKCS11_SO_PIN": s.pkcs11_so_pin.get_secret_value() if s.pkcs11_so_pin else "",
        "QAI_REDIS_URL": s.redis_url or "", "QAI_REDIS_PREFIX": s.redis_prefix,
        "QAI_WORKER_LEASE_SECONDS": str(s.worker_lease_seconds),
        "QAI_WORKER_VENDOR_URLS": json.dumps(s.worker_vendor_urls),
        "QAI_LEDGER_CHECKPOINT_EVERY": str(s.ledger_checkpoint_every),
        "QAI_LEDGER_CHECKPOINT_INTERVAL_SECONDS": str(s.ledger_checkpoint_interval_seconds),
    })
    if s.s3_bucket:
        env.update({"QAI_S3_BUCKET": s.s3_bucket, "QAI_S3_ENDPOINT_URL": s.s3_endpoint_url or "",
                    "QAI_S3_ACCESS_KEY_ID": "t", "QAI_S3_SECRET_ACCESS_KEY": "t"})
    env.update(extra)
    return env


def start_worker(svc: Services, log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "sdk.cli", "worker", *args], env=worker_env(svc), cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)


def attempts(svc: Services, job_id: str) -> list[tuple[int, str | None]]:
    return [(a["attempt"], a["outcome"]) for a in job_execution(svc, job_id)["attempts"]]


# ------------------------------------------------------------------------------------------- queues


@pytest.fixture(params=["redis", "local"])
def queue(request: pytest.FixtureRequest) -> Iterator[LocalQueue | RedisQueue]:
    if request.param == "local":
        yield LocalQueue()
        return
    q = RedisQueue(request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix"))
    yield q
    q.close()


def test_queue_is_idempotent_and_takes_the_highest_class_first(queue: LocalQueue | RedisQueue) -> None:
    assert queue.pop(0.0) is None
    assert queue.enqueue("b1", "background") and queue.enqueue("s1", "standard")
    assert queue.enqueue("c1", "critical") and queue.enqueue("s2", "standard")
    assert not queue.enqueue("s1", "standard")  # already waiting: nothing changes
    assert queue.backlog() == {"critical": 1, "essential": 0, "standard": 2, "background": 1}
    assert queue.waiting(["s1", "s2", "zz"]) == {"s1", "s2"}
    assert queue.remove("s2") and not queue.remove("s2")
    order = [queue.pop(0.0) for _ in range(3)]
    assert [(d.job_id, d.priority_class) for d in order if d] == [("c1", "critical"), ("s1", "standard"),
                                                                   ("b1", "background")]
    assert queue.pop(0.0) is None and queue.waiting(["s1"]) == set()
    assert queue.enqueue("s1", "standard")  # taken, so it can be enqueued again
    with pytest.raises(QaiError) as err:
        queue.enqueue("x", "urgent")
    assert err.value.code == "dispatch.bad_priority"


def test_a_blocked_pop_wakes_on_enqueue(queue: LocalQueue | RedisQueue) -> None:
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(queue.pop(30.0)))
    t.start()
    time.sleep(0.3)  # let the consumer block first; the assertion below does not depend on it
    queue.enqueue("j1", "essential")
    t.join(timeout=WAIT)
    assert got and got[0] is not None and got[0].job_id == "j1"


def test_missing_redis_fails_loudly() -> None:
    q = RedisQueue("redis://127.0.0.1:1/0", "qai-test-none", socket_timeout=2.0)
    with pytest.raises(QaiError) as err:
        q.enqueue("j", "standard")
    assert err.value.code == "dispatch.queue_unavailable" and err.value.status == 503
    q.close()


# ------------------------------------------------------------------------------------- end to end


def test_embedded_default_runs_a_job_end_to_end(svc: Services) -> None:
    """In-process queue and worker thread: pending → queued → completed, visible over HTTP and the
    SDK, with the signed result record, histograms, Parquet and em_results rows."""
    token = issue_token(svc.db, role=Role.SUBMITTER, tenant="org-a").token
    start_dispatch(svc)  # what qai serve does at start-up
    job_id, decision_id = scheduled(svc)
    assert wait_status(svc, job_id, "completed", "failed") == "completed", job_execution(svc, job_id)
    record = check_result(svc, job_id, decision_id, attempt=1, status_="completed")
    execution = record["execution"]
    assert execution["backend_id"] == LOCAL_BACKEND and execution["adapter"] == "local-aer"
    assert execution["calibration_snapshot_id"] == catalog_snapshot(LOCAL_BACKEND).id
    assert execution["em_method"] == "zne-linear-global" and execution["em_params"]["scale_factors"] == [1.0, 2.0, 3.0]
    [result] = record["results"]
    assert result["observable"] == "ZZ" and result["status"] == "ok" and result["ideal"] == pytest.approx(1.0)
    assert result["mitigated"] > result["noisy"] - 0.05  # ZNE moved the Bell parity towards 1, not away
    kinds = {f["kind"]: f for f in record["files"]}
    histogram = json.loads(svc.objects.get(kinds["histogram"]["path"]))
    assert histogram["job_id"] == job_id and histogram["decision_id"] == decision_id
    base = next(e for e in histogram["executions"] if e["label"] == "base/ZZ")
    assert sum(base["counts"].values()) == 2000 and set(base["counts"]) <= {"00", "01", "10", "11"}
    with svc.db.read() as s:
        rows = list(s.scalars(select(EmResultRow).where(EmResultRow.job_id == job_id)))
    assert [(r.em_method, r.status, r.parquet_path) for r in rows] == [("zne-linear-global", "ok",
                                                                        kinds["parquet"]["path"])]
    assert attempts(svc, job_id) == [(1, "completed")]
    with LiveServer(create_app(svc)) as srv, Client(srv.url, token) as c:
        assert c.get_job(job_id)["status"] == "completed"


@pytest.mark.parametrize("overrides", [{"worker_embedded": False}])  # the app may start dispatch at start-up
def test_status_moves_through_queued_and_cancel_is_honoured(svc: Services) -> None:
    """Until a worker runs, a dispatched job waits ``queued``; a cancelled one is dropped by the
    worker that takes it off the queue, and is never run."""
    token = issue_token(svc.db, role=Role.SUBMITTER, tenant="org-a").token
    first, _ = scheduled(svc)
    second, second_decision = scheduled(svc)
    with LiveServer(create_app(svc)) as srv, Client(srv.url, token) as c:
        assert c.get_job(first)["status"] == c.get_job(second)["status"] == "queued"
        assert cancel(svc, first) and not cancel(svc, first)  # the second call finds it cancelled
        job_queue(svc).enqueue(first, "standard")  # a stale delivery of the cancelled job
        assert Worker(svc).run(burst=True) == 1  # only the second job was claimed
        assert c.get_job(first)["status"] == "cancelled" and c.get_job(second)["status"] == "completed"
    assert job_execution(svc, first)["result"] is None and attempts(svc, first) == []
    assert result_entries(svc) == 1
    with pytest.raises(QaiError) as err:
        cancel(svc, second)
    assert err.value.code == "dispatch.not_cancellable" and err.value.status == 409
    with pytest.raises(QaiError) as err:  # dispatched once: another decision cannot queue it again
        dispatch(svc, second, str(uuid.uuid4()), chosen_for(svc, LOCAL_BACKEND), "standard")
    assert err.value.code == "dispatch.bad_status"
    dispatch(svc, second, second_decision, chosen_for(svc, LOCAL_BACKEND), "standard")  # same decision: a no-op


def test_concurrent_claims_run_a_job_once(svc: Services) -> None:
    """Eight workers race to claim one job: the guarded ``queued → running`` lets exactly one win."""
    job_id, _ = scheduled(svc)
    barrier = threading.Barrier(8)
    claims: list[Any] = []

    def race(k: int) -> None:
        barrier.wait()
        claims.append(claim_job(svc, job_id, f"racer-{k}"))

    threads = [threading.Thread(target=race, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT)
    won = [c for c in claims if c is not None]
    assert len(claims) == 8 and len(won) == 1 and won[0].attempt == 1
    assert status(svc, job_id) == "running" and attempts(svc, job_id) == [(1, None)]


@pytest.mark.parametrize("overrides", [{"redis_url": REDIS_URL, "worker_redeliver_after_seconds": 0.0}])
def test_redis_queue_runs_jobs_and_redelivers_a_lost_enqueue(svc: Services) -> None:
    """On Redis: jobs run in priority order; a job whose queue entry was lost (Redis data loss) is
    still ``queued`` in the database, and the sweep puts it back on the queue."""
    background, _ = scheduled(svc, priority="background")
    critical, _ = scheduled(svc, priority="critical")
    lost, _ = scheduled(svc)
    queue = job_queue(svc)
    assert isinstance(queue, RedisQueue) and queue.backlog()["critical"] == 1
    assert queue.remove(lost)  # as if Redis had lost it
    assert Worker(svc).run(burst=True) == 3
    for job in (background, critical, lost):
        assert status(svc, job) == "completed", json.dumps(job_execution(svc, job), default=str)
    order = sorted((background, critical, lost), key=lambda j: job_execution(svc, j)["result"]["ledger_index"])
    assert order == [critical, lost, background]  # by class; the lost one was back on the queue in time


def test_a_job_that_cannot_run_fails_with_a_signed_record(svc: Services) -> None:
    """A method the harness does not know: the job fails with that error's code, and the failure is
    signed and ledgered like a result."""
    job_id, decision_id = scheduled(svc, method="zne-cubic-global")
    assert Worker(svc).run(burst=True) == 1
    assert status(svc, job_id) == "failed"
    record = check_result(svc, job_id, decision_id, attempt=1, status_="failed")
    assert record["error"]["code"] == "harness.bad_method" and record["results"] == []
    assert attempts(svc, job_id) == [(1, "failed")]


# ------------------------------------------------------------------------------------------ crashes


def _kill_mid_job(svc: Services, job_id: str, log_path: Path) -> None:
    """Start ``qai worker``, wait until it runs the job (the vendor holds it in its queue), SIGKILL it."""
    proc = start_worker(svc, log_path)
    try:
        wait_for("the worker to start the job", lambda: status(svc, job_id) == "running" or proc.poll() is not None)
        assert proc.poll() is None, log_path.read_text()
        assert attempts(svc, job_id) == [(1, None)]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert status(svc, job_id) == "running"  # the dead worker's lease has not been reaped yet


def test_killed_worker_job_is_completed_by_a_retry(crash_svc: Services, vendor: LiveServer, tmp_path: Path) -> None:
    svc = crash_svc
    job_id, decision_id = scheduled(svc, backend=VENDOR_BACKEND)
    _kill_mid_job(svc, job_id, tmp_path / "worker-1.log")
    vendor.app.state.vendor.faults = NO_FAULTS  # type: ignore[attr-defined]  # the vendor runs jobs again
    proc = start_worker(svc, tmp_path / "worker-2.log", "--max-jobs", "1")
    try:
        assert proc.wait(timeout=WAIT) == 0, (tmp_path / "worker-2.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status(svc, job_id) == "completed"
    assert attempts(svc, job_id) == [(1, "lost"), (2, "completed")]
    record = check_result(svc, job_id, decision_id, attempt=2, status_="completed")
    assert record["execution"]["adapter"] == "ibm-like" and record["results"][0]["status"] == "ok"
    assert result_entries(svc) == 1  # the killed attempt left no result behind


def test_killed_worker_on_its_last_attempt_fails_the_job(crash_svc: Services, tmp_path: Path) -> None:
    svc = crash_svc
    # the scheduler queues a job with QAI_WORKER_MAX_ATTEMPTS attempts: one here
    svc.settings = svc.settings.model_copy(update={"worker_max_attempts": 1})
    job_id, decision_id = scheduled(svc, backend=VENDOR_BACKEND)
    _kill_mid_job(svc, job_id, tmp_path / "worker.log")
    start_dispatch(svc)  # as in qai serve: no worker is alive, the server's reaper finds the expired lease
    assert wait_status(svc, job_id, "failed", "completed") == "failed"
    assert attempts(svc, job_id) == [(1, "lost")]
    record = check_result(svc, job_id, decision_id, attempt=1, status_="failed")
    assert record["error"]["code"] == "worker.lost" and "stopped renewing its lease" in record["error"]["message"]
    assert job_execution(svc, job_id)["error"]["code"] == "worker.lost"


@pytest.mark.parametrize("overrides", [{"worker_job_timeout_seconds": 5.0}])
def test_a_job_past_its_timeout_fails_and_a_live_lease_is_never_reaped(crash_svc: Services) -> None:
    """The vendor never runs the job: the worker gives up at the job timeout. Meanwhile the reaper
    runs every second against a 2 s lease; the worker's renewals keep it from taking the job."""
    svc = crash_svc
    job_id, decision_id = scheduled(svc, backend=VENDOR_BACKEND)
    start_dispatch(svc)
    assert Worker(svc).run(burst=True) == 1
    assert status(svc, job_id) == "failed" and attempts(svc, job_id) == [(1, "timeout")]
    record = check_result(svc, job_id, decision_id, attempt=1, status_="failed")
    assert record["error"]["code"] == "worker.timeout" and record["execution"]["adapter"] == "ibm-like"
