"""``qai worker --http-port``: liveness, readiness and metrics of a real worker, and the
``qai_backend_runs_total`` counter it keeps.

Real services throughout: PostgreSQL with S3 over HTTP (moto's server), the machine's Redis, a real
mock vendor API, the worker's own uvicorn server on a loopback port, and a real ``qai worker``
process. The heartbeat is aged through the worker's injectable clock (its monotonic clock plus an
offset the test moves forward), never by sleeping; a wedged loop is a real one: the worker's claim
blocks on a PostgreSQL row lock the test holds.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text
from typer.testing import CliRunner

from harness.catalog import catalog_snapshot
from harness.vendors import NO_FAULTS, FaultProfile, create_vendor_app
from orchestrator.jobs import ManifestRow
from orchestrator.services import Services
from orchestrator.settings import Settings
from scheduler.dispatch import RedisQueue
from scheduler.worker import Worker, job_execution
from scheduler.worker_http import WorkerHttp
from sdk.errors import QaiError
from tests.conftest import LiveServer, free_port, storage_settings
from tests.test_dispatch import (  # noqa: F401  (redis_url, redis_prefix: fixtures)
    LOCAL_BACKEND,
    VENDOR_BACKEND,
    WAIT,
    _services,
    redis_prefix,
    redis_url,
    scheduled,
    start_worker,
    status,
    wait_for,
    wait_status,
)

IDLE_ALLOWANCE = 30.0  # max(3 x the default 1 s poll, 30 s)


class SkewClock:
    """``time.monotonic`` plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def overrides() -> dict[str, Any]:
    """Settings of the test's services; a test parametrizes it to change them."""
    return {}


@pytest.fixture(params=["postgresql+s3"])
def svc(request: pytest.FixtureRequest, settings: Settings, redis_url: str,  # noqa: F811
        redis_prefix: str, overrides: dict[str, Any]) -> Iterator[Services]:  # noqa: F811
    """Services as deployed: PostgreSQL, S3 over HTTP and the Redis queue (a prefix of the test's own)."""
    settings, db = storage_settings(request, settings, "worker-health")
    yield from _services(settings, db, {"redis_url": redis_url, "redis_prefix": redis_prefix, **overrides})


@dataclasses.dataclass
class HeldVendor:
    """A mock IBM-like vendor whose jobs wait an hour of its own clock in its queue."""

    server: LiveServer
    app: FastAPI
    clock: SkewClock

    @property
    def url(self) -> str:
        return self.server.url

    def release(self) -> None:
        """Run the job waiting in the queue, and every later submission at once (a job makes one
        vendor submission per circuit execution)."""
        self.app.state.vendor.faults = NO_FAULTS
        self.clock.advance(3600.0)


@pytest.fixture
def vendor() -> Iterator[HeldVendor]:
    clock = SkewClock()
    app = create_vendor_app("ibm-like", {VENDOR_BACKEND: catalog_snapshot(VENDOR_BACKEND)},
                            FaultProfile(queue_delay_seconds=(3600.0, 3600.0)), seed=0, clock=clock)
    with LiveServer(app) as server:
        yield HeldVendor(server, app, clock)


@pytest.fixture
def recalibrated_vendor() -> Iterator[LiveServer]:
    """A mock IBM-like vendor whose device was recalibrated since the decision: every submission of
    the decided snapshot is refused (409, ``adapter.calibration_mismatch``), a failure on the backend."""
    snap = catalog_snapshot(VENDOR_BACKEND)
    newer = dataclasses.replace(snap, created_at=snap.created_at + timedelta(days=1))
    assert newer.id != snap.id
    with LiveServer(create_vendor_app("ibm-like", {VENDOR_BACKEND: newer}, seed=0)) as server:
        yield server


def probe(http: WorkerHttp | str, path: str) -> httpx.Response:
    base = http if isinstance(http, str) else f"http://{http.host}:{http.port}"
    return httpx.get(base + path, timeout=60)


def wait_healthz(http: WorkerHttp, code: int) -> dict[str, Any]:
    wait_for(f"/healthz to answer {code}", lambda: probe(http, "/healthz").status_code == code)
    body: dict[str, Any] = probe(http, "/healthz").json()
    return body


def runs(backend_id: str, outcome: str) -> float:
    """This process's ``qai_backend_runs_total`` sample (0 before the first run on the backend)."""
    return REGISTRY.get_sample_value("qai_backend_runs_total", {"backend_id": backend_id, "outcome": outcome}) or 0.0


# --------------------------------------------------------------------------------------- probes


def test_a_running_worker_is_live_and_ready_and_serves_metrics(svc: Services) -> None:
    w = Worker(svc, name="health", clock=SkewClock())
    with WorkerHttp(w, free_port()) as http:
        before = probe(http, "/healthz")
        assert before.status_code == 503 and before.json()["reason"] == "not_running"  # run() not entered yet
        w.start()
        try:
            body = wait_healthz(http, 200)
            assert body["status"] == "ok" and body["in_job"] is False
            assert body["allowed_seconds"] == IDLE_ALLOWANCE
            ready = probe(http, "/readyz")
            assert ready.status_code == 200
            assert ready.json() == {"status": "ready", "checks": {"database": "ok", "queue": "ok"}}

            job_id, _ = scheduled(svc)
            assert wait_status(svc, job_id, "completed", "failed") == "completed", job_execution(svc, job_id)
            scraped = probe(http, "/metrics")
            assert scraped.status_code == 200 and scraped.headers["content-type"] == CONTENT_TYPE_LATEST
            families = {f.name: f for f in text_string_to_metric_families(scraped.text)}
            assert {"qai_backend_runs", "qai_signatures", "qai_ledger_appended_entries"} <= set(families)
            ok = [s for s in families["qai_backend_runs"].samples
                  if s.name == "qai_backend_runs_total" and s.labels == {"backend_id": LOCAL_BACKEND, "outcome": "ok"}]
            assert ok and ok[0].value >= 1
            assert probe(http, "/healthz").status_code == 200  # still live after the job
        finally:
            w.close()
        stopped = probe(http, "/healthz")
        assert stopped.status_code == 503 and stopped.json()["reason"] == "not_running"


def test_a_wedged_loop_fails_liveness_and_recovers(svc: Services) -> None:
    """The worker's claim of a job blocks on a row lock the test holds (as behind a stuck
    transaction): the loop stops going round. Once the heartbeat is older than the idle allowance,
    /healthz answers 503; when the lock goes, the job runs and /healthz answers 200 again."""
    clock = SkewClock()
    w = Worker(svc, name="wedged", clock=clock)
    job_id, _ = scheduled(svc)  # queued before the worker starts, so it is claimed under the lock
    with svc.db.sessions() as locker, WorkerHttp(w, free_port()) as http:
        locker.begin()
        locker.execute(select(ManifestRow).where(ManifestRow.job_id == job_id).with_for_update())
        pid = locker.execute(text("SELECT pg_backend_pid()")).scalar_one()
        w.start()
        try:
            wait_for("the worker's claim to wait for the test's lock", lambda: blocked_by(svc, pid) > 0)
            body = probe(http, "/healthz").json()
            assert body["status"] == "ok" and body["in_job"] is False  # not aged yet
            clock.advance(IDLE_ALLOWANCE + 5)
            stale = probe(http, "/healthz")
            assert stale.status_code == 503, stale.text
            assert stale.json()["reason"] == "stale" and stale.json()["heartbeat_age_seconds"] > IDLE_ALLOWANCE
            assert probe(http, "/readyz").status_code == 200  # the services answer: wedged, not unready
            locker.rollback()
            assert wait_status(svc, job_id, "completed", "failed") == "completed"
            assert wait_healthz(http, 200)["reason"] == "ok"
        finally:
            if locker.in_transaction():
                locker.rollback()
            w.close()


def blocked_by(svc: Services, pid: int) -> int:
    with svc.db.read() as s:
        return int(s.execute(text("SELECT count(*) FROM pg_stat_activity WHERE :p = ANY(pg_blocking_pids(pid))"),
                             {"p": pid}).scalar_one())


@pytest.mark.parametrize("overrides", [{"worker_job_timeout_seconds": 600.0}])
def test_a_long_job_is_live_until_it_outlasts_its_timeout(svc: Services, vendor: HeldVendor) -> None:
    """While a job runs the loop waits for it, by design: the allowance grows by the job timeout.
    Held past timeout and allowance, the worker is wedged (an execution that ignores its deadline)."""
    svc.settings = svc.settings.model_copy(update={"worker_vendor_urls": {"ibm-like": vendor.url}})
    clock = SkewClock()
    w = Worker(svc, name="long", clock=clock)
    with WorkerHttp(w, free_port()) as http:
        w.start()
        try:
            job_id, _ = scheduled(svc, backend=VENDOR_BACKEND)
            wait_for("the job to be in hand", lambda: probe(http, "/healthz").json()["in_job"] is True)
            clock.advance(10 * IDLE_ALLOWANCE)  # far past the idle allowance, within the job's
            body = probe(http, "/healthz").json()
            assert body["status"] == "ok" and body["allowed_seconds"] == IDLE_ALLOWANCE + 600.0
            clock.advance(600.0)
            wedged = probe(http, "/healthz")
            assert wedged.status_code == 503
            assert wedged.json()["reason"] == "stale" and wedged.json()["in_job"] is True
            vendor.release()
            assert wait_status(svc, job_id, "completed", "failed") == "completed", job_execution(svc, job_id)
            assert wait_healthz(http, 200)["in_job"] is False
        finally:
            vendor.release()
            w.close()


def test_an_unreachable_queue_is_unready_but_live(svc: Services) -> None:
    """Redis down: /readyz answers 503 naming the queue; /healthz stays 200 (the loop goes round,
    retrying the queue: a restart would not bring Redis back)."""
    queue = RedisQueue("redis://127.0.0.1:1/0", "qai-test-none", socket_timeout=2.0)
    w = Worker(svc, queue=queue, name="no-redis", clock=SkewClock())
    with WorkerHttp(w, free_port()) as http:
        w.start()
        try:
            wait_healthz(http, 200)
            ready = probe(http, "/readyz")
            assert ready.status_code == 503
            assert ready.json() == {"status": "not_ready",
                                    "checks": {"database": "ok", "queue": "dispatch.queue_unavailable"}}
            assert probe(http, "/healthz").status_code == 200
        finally:
            w.close()
            queue.close()


def test_a_port_in_use_fails_loudly(svc: Services) -> None:
    """A second server on a port in use: the command fails before the worker takes a job."""
    w = Worker(svc, name="port")
    with WorkerHttp(w, free_port()) as first, pytest.raises(QaiError) as err:
        WorkerHttp(w, first.port).start()
    assert err.value.code == "worker.http_failed" and err.value.details == {"host": "127.0.0.1", "port": first.port}


# ------------------------------------------------------------------------------------------ CLI


def test_worker_help_lists_the_http_options() -> None:
    from sdk.cli import app

    result = CliRunner().invoke(app, ["worker", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    assert "--http-port" in result.output and "--http-host" in result.output


def test_qai_worker_serves_its_probes_and_stops_on_sigterm(svc: Services, tmp_path: Path) -> None:
    """The real command: ``qai worker --http-port`` answers its probes, runs a job, and exits 0 on
    SIGTERM (uvicorn on its thread leaves the worker's signal handlers alone)."""
    port = free_port()
    log_path = tmp_path / "worker.log"
    proc = start_worker(svc, log_path, "--http-port", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        def live() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return probe(base, "/healthz").status_code == 200
            except httpx.TransportError:  # not listening yet
                return False

        wait_for("qai worker's /healthz", live)
        assert probe(base, "/readyz").json()["checks"] == {"database": "ok", "queue": "ok"}
        job_id, _ = scheduled(svc)
        assert wait_status(svc, job_id, "completed", "failed") == "completed", log_path.read_text()
        assert "qai_backend_runs_total" in probe(base, "/metrics").text  # counted in that process
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status(svc, job_id) == "completed"


# ------------------------------------------------------------------------------- backend runs


def test_a_job_that_completes_counts_an_ok_run(svc: Services) -> None:
    ok, error = runs(LOCAL_BACKEND, "ok"), runs(LOCAL_BACKEND, "error")
    job_id, _ = scheduled(svc)
    assert Worker(svc).run(burst=True) == 1
    assert status(svc, job_id) == "completed"
    assert runs(LOCAL_BACKEND, "ok") == ok + 1 and runs(LOCAL_BACKEND, "error") == error


def test_a_job_that_fails_on_its_backend_counts_an_error_run(svc: Services, recalibrated_vendor: LiveServer) -> None:
    svc.settings = svc.settings.model_copy(update={"worker_vendor_urls": {"ibm-like": recalibrated_vendor.url}})
    ok, error = runs(VENDOR_BACKEND, "ok"), runs(VENDOR_BACKEND, "error")
    job_id, _ = scheduled(svc, backend=VENDOR_BACKEND)
    assert Worker(svc).run(burst=True) == 1
    assert status(svc, job_id) == "failed"
    assert job_execution(svc, job_id)["error"]["code"] == "adapter.calibration_mismatch"
    assert runs(VENDOR_BACKEND, "error") == error + 1 and runs(VENDOR_BACKEND, "ok") == ok


def test_a_job_refused_before_it_reaches_the_backend_is_not_counted(svc: Services) -> None:
    """A method the harness does not know fails the job before any execution: not the backend's doing."""
    ok, error = runs(LOCAL_BACKEND, "ok"), runs(LOCAL_BACKEND, "error")
    job_id, _ = scheduled(svc, method="zne-cubic-global")
    assert Worker(svc).run(burst=True) == 1
    assert status(svc, job_id) == "failed"
    assert (runs(LOCAL_BACKEND, "ok"), runs(LOCAL_BACKEND, "error")) == (ok, error)

