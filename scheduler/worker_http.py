"""``qai worker --http-port``: the worker's probes and metrics on a small HTTP server of its own.

* ``GET /healthz`` (liveness): 200 while the worker loop is running and went round recently, 503
  when it stopped or is wedged. The loop records a heartbeat every time it goes round (an idle
  worker at least every ``QAI_WORKER_POLL_SECONDS``, also while the queue is unreachable: an outage
  is readiness's business, and restarting the worker would not fix it). A job in hand holds the
  loop for up to ``QAI_WORKER_JOB_TIMEOUT_SECONDS`` by design, so while a job runs the allowance
  grows by that timeout: a long job is healthy; a job still held well past its timeout means an
  execution that ignores the attempt's deadline (a hung simulation or vendor call), which only a
  restart clears, and the dead worker's lease then lets another worker retry the job.
* ``GET /readyz`` (readiness): 200 when the database and the worker's queue (Redis when
  ``QAI_REDIS_URL`` is set; the in-process queue always answers) answer, else 503 naming the
  failed checks' error codes, in the same shape as the API services' ``/readyz``.
* ``GET /metrics``: the process's Prometheus exposition through :func:`orchestrator.metrics.metrics_router`,
  the same router and registry the API services serve (``qai_backend_runs_total``, ledger
  appends, …; a worker that signs through a remote KMS has its signatures counted there). The
  worker does not :func:`~orchestrator.metrics.bind` its services: the
  scrape-time database gauges (backlog, queue depth, backend status) are the scheduler's to
  export, and four worker replicas repeating them would only add queries and duplicate series.

Why FastAPI on uvicorn rather than ``http.server``: ``/metrics`` reuses the services' router as it
is (exposition, content type, off-loop database reads), and the probes share the API services'
code path and JSON shapes. uvicorn runs in a daemon thread; off the main thread it installs no
signal handlers, so the CLI's SIGTERM handler still stops the worker after its current job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdk.errors import QaiError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from scheduler.worker import Worker

log = logging.getLogger(__name__)

IDLE_ALLOWANCE_FLOOR = 30.0  # seconds: a maintenance pass against a slow database must not look wedged
START_TIMEOUT = 20.0


@dataclass(frozen=True)
class Liveness:
    ok: bool
    reason: str  # ok, not_running (before run() or after it returned), stale
    heartbeat_age_seconds: float
    allowed_seconds: float
    in_job: bool

    def body(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "unhealthy", "reason": self.reason,
                "heartbeat_age_seconds": round(self.heartbeat_age_seconds, 3),
                "allowed_seconds": self.allowed_seconds, "in_job": self.in_job}


def allowed_seconds(worker: Worker, *, in_job: bool) -> float:
    """How old the heartbeat may get: a few idle polls (at least 30 s), plus the job timeout while a
    job is in hand (the loop waits for the attempt, which ends by that timeout)."""
    settings = worker.svc.settings
    idle = max(3 * settings.worker_poll_seconds, IDLE_ALLOWANCE_FLOOR)
    return idle + settings.worker_job_timeout_seconds if in_job else idle


def liveness(worker: Worker) -> Liveness:
    job_since = worker.job_since  # read once: the loop thread may clear it meanwhile
    in_job = job_since is not None
    age = max(0.0, worker.clock() - worker.heartbeat)
    allowed = allowed_seconds(worker, in_job=in_job)
    if not worker.looping:
        return Liveness(False, "not_running", age, allowed, in_job)
    if age > allowed:
        return Liveness(False, "stale", age, allowed, in_job)
    return Liveness(True, "ok", age, allowed, in_job)


def readiness(worker: Worker) -> dict[str, str]:
    """Each check's result: ``ok`` or the error code it failed with."""
    checks: dict[str, str] = {}
    for name, probe in (("database", worker.svc.db.ping), ("queue", worker.queue.ping)):
        try:
            probe()
            checks[name] = "ok"
        except QaiError as exc:
            checks[name] = exc.code
        except Exception as exc:  # a probe must answer, whatever the client library raised
            log.warning("readiness check %s failed: %s", name, exc)
            checks[name] = f"{name}.error"
    return checks


def create_worker_app(worker: Worker) -> FastAPI:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from orchestrator.metrics import metrics_router

    app = FastAPI(title="qai worker", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        state = liveness(worker)
        return JSONResponse(state.body(), status_code=200 if state.ok else 503)

    @app.get("/readyz")
    def readyz() -> JSONResponse:  # sync: FastAPI runs it on its thread pool, off the event loop
        checks = readiness(worker)
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                            status_code=200 if ready else 503)

    app.include_router(metrics_router())
    return app


class WorkerHttp:
    """The worker's HTTP server on a daemon thread: ``start()`` returns once it listens."""

    def __init__(self, worker: Worker, port: int, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.host, self.port = host, port
        # No access log: a probe every few seconds is noise. No lifespan: the app holds no state.
        config = uvicorn.Config(create_worker_app(worker), host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="qai-worker-http", daemon=True)

    def _serve(self) -> None:
        # uvicorn answers a failed start-up (a port in use) with SystemExit, after logging why;
        # start() sees the thread end and raises
        with contextlib.suppress(SystemExit):
            self.server.run()

    def start(self) -> WorkerHttp:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            # a server that cannot listen fails the command loudly rather than leaving it unprobed
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise QaiError("worker.http_failed", f"the worker's HTTP server did not start on "
                               f"{self.host}:{self.port}", status=500, details={"host": self.host, "port": self.port})
            time.sleep(0.02)
        log.info("worker probes and metrics on http://%s:%d", self.host, self.port)
        return self

    def close(self) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def __enter__(self) -> WorkerHttp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Liveness", "WorkerHttp", "allowed_seconds", "create_worker_app", "liveness", "readiness"]
