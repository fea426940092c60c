"""Mock QPU vendors: an IBM-Runtime-shaped and an Amazon-Braket-shaped HTTP API over ``run_local``.

They stand in for real vendors in the harness and its tests, and behave like them where it
matters to a client: jobs are accepted, wait in a queue, run in the background and finish later;
the two APIs differ in routes, payloads, status names, error bodies and counts format; requests
are rate limited per client (token bucket, 429 with ``Retry-After``); and a ``FaultProfile``
injects, from a seed, random 429s, transient 5xx, slow responses, failed jobs and jobs that never
finish. A request for an unknown backend (404) or for another calibration than the vendor's
current one (409) is refused; a malformed one gets 422.

Randomness is drawn per (stream, index) from the seed, not from one shared generator: the faults
met by the n-th submission do not depend on how many status polls happened before it.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import json
import math
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from harness.adapters import BRAKET_PROGRAM, request_problem
from harness.calibration import CalibrationSnapshot
from harness.execution import ExecutionRequest, ExecutionResult, circuit_from_b64, run_local
from sdk.errors import QaiError

VendorKind = Literal["ibm-like", "braket-like"]
BRAKET_DEVICE_PREFIX = "arn:aws:braket:::device/qpu/mock/"
BRAKET_TASK_PREFIX = "arn:aws:braket:mock:000000000000:quantum-task/"


@dataclass(frozen=True)
class FaultProfile:
    """What can go wrong at the vendor, as probabilities per request (or per job) and ranges of
    seconds. The token bucket (``bucket_rate`` requests/second refilled, ``bucket_burst`` deep)
    is per client: the bearer token / API key, or the client address."""

    rate_limit: float = 0.0  # a request answered 429 regardless of the bucket
    transient_error: float = 0.0  # a request answered 500, 502 or 503
    job_failure: float = 0.0  # an accepted job ends ERROR/FAILED
    stall: float = 0.0  # an accepted job starts running and never finishes (until cancelled)
    queue_delay_seconds: tuple[float, float] = (0.0, 0.0)  # vendor clock, uniform in the range
    response_delay_seconds: tuple[float, float] = (0.0, 0.0)  # wall clock, before each job API answer
    retry_after_seconds: int = 1  # on the injected 429s and 503s
    bucket_rate: float | None = None  # None: no token bucket
    bucket_burst: int = 20

    def __post_init__(self) -> None:
        for name in ("rate_limit", "transient_error", "job_failure", "stall"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise QaiError("vendor.bad_faults", f"{name} must be a probability", status=422)
        for name in ("queue_delay_seconds", "response_delay_seconds"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high:
                raise QaiError("vendor.bad_faults", f"{name} must be a range 0 <= min <= max", status=422)
        if self.bucket_rate is not None and (self.bucket_rate <= 0 or self.bucket_burst < 1):
            raise QaiError("vendor.bad_faults", "bucket_rate must be > 0 and bucket_burst >= 1", status=422)


NO_FAULTS = FaultProfile()


class VendorError(Exception):
    """An HTTP error in the vendor's own shape (rendered per vendor kind)."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


# The mock's internal states and their names in each API.
IBM_NAMES = {"created": "INITIALIZING", "queued": "QUEUED", "running": "RUNNING", "done": "DONE",
             "failed": "ERROR", "cancelled": "CANCELLED"}
BRAKET_NAMES = {"created": "CREATED", "queued": "QUEUED", "running": "RUNNING", "done": "COMPLETED",
                "failed": "FAILED", "cancelled": "CANCELLED"}
_ACTIVE = ("created", "queued", "running")

_BRAKET_ERROR_TYPES = {400: "ValidationException", 401: "AccessDeniedException", 403: "AccessDeniedException",
                       404: "ResourceNotFoundException", 409: "ConflictException", 422: "ValidationException",
                       429: "ThrottlingException", 503: "ServiceUnavailableException"}


@dataclass
class _Job:
    id: str
    request: ExecutionRequest
    snap: CalibrationSnapshot
    due: float  # vendor clock time the job leaves the queue
    stall: bool
    fail: bool
    client_token: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    state: str = "created"
    result: ExecutionResult | None = None
    reason: str | None = None
    future: Future[ExecutionResult] | None = None


class Vendor:
    """The state behind one mock vendor: jobs, per-client buckets and the fault draws."""

    def __init__(self, kind: VendorKind, snapshots: Mapping[str, CalibrationSnapshot], faults: FaultProfile, *,
                 seed: int, clock: Callable[[], float], token: str | None, max_shots: int, workers: int) -> None:
        self.kind = kind
        self.snapshots = dict(snapshots)  # backend id -> the vendor's current calibration
        self.faults = faults
        self.seed = seed
        self.clock = clock
        self.token = token
        self.max_shots = max_shots
        self.workers = workers
        self.jobs: dict[str, _Job] = {}
        self.client_tokens: dict[str, str] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self._counters: dict[str, int] = {}
        # re-entrant: a future that is already done runs its callback (which locks) at once
        self._lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    # lifecycle

    def start(self) -> None:
        with self._lock:
            if self._executor is not None:
                return
            self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"{self.kind}-qpu")
            self._stop.clear()
            # Queue delays run on ``clock``, which may be a test's fake clock: check often, in real time.
            self._ticker = threading.Thread(target=self._tick, name=f"{self.kind}-queue", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._ticker = None

    def _tick(self) -> None:
        while not self._stop.wait(0.005):
            self.advance()

    # randomness

    def draw(self, stream: str) -> random.Random:
        """A generator for the next event of ``stream``, independent of every other stream."""
        with self._lock:
            n = self._counters.get(stream, 0)
            self._counters[stream] = n + 1
        return random.Random(f"{self.seed}|{self.kind}|{stream}|{n}")

    # gate: authentication, rate limit, injected faults

    def admit(self, client: str, stream: str) -> tuple[VendorError | None, float]:
        """The error to answer instead of serving the request (or None), and the response delay."""
        f = self.faults
        if f.bucket_rate is not None:
            now = self.clock()
            with self._lock:
                tokens, at = self._buckets.get(client, (float(f.bucket_burst), now))
                tokens = min(float(f.bucket_burst), tokens + (now - at) * f.bucket_rate)
                if tokens < 1.0:
                    self._buckets[client] = (tokens, now)
                    wait = max(1, math.ceil((1.0 - tokens) / f.bucket_rate))
                    return VendorError(429, "RATE_LIMITED", f"rate limit of {f.bucket_rate}/s exceeded",
                                       retry_after=wait), 0.0
                self._buckets[client] = (tokens - 1.0, now)
        rng = self.draw(stream)
        limited, broken, which, delay = rng.random(), rng.random(), rng.random(), rng.uniform(
            *f.response_delay_seconds)
        if limited < f.rate_limit:
            return VendorError(429, "RATE_LIMITED", "too many requests (injected)",
                               retry_after=f.retry_after_seconds), delay
        if broken < f.transient_error:
            status = (500, 502, 503)[int(which * 3)]
            return VendorError(status, "INTERNAL_ERROR", f"transient failure {status} (injected)",
                               retry_after=f.retry_after_seconds if status == 503 else None), delay
        return None, delay

    # jobs

    def submit(self, request: ExecutionRequest, snap: CalibrationSnapshot, client_token: str | None) -> _Job:
        with self._lock:
            if client_token is not None and client_token in self.client_tokens:
                return self.jobs[self.client_tokens[client_token]]  # idempotent, as Braket's clientToken
        rng = self.draw("job")
        stall, fail = rng.random() < self.faults.stall, rng.random() < self.faults.job_failure
        delay = rng.uniform(*self.faults.queue_delay_seconds)
        job_id = (BRAKET_TASK_PREFIX + str(uuid.uuid4())) if self.kind == "braket-like" else uuid.uuid4().hex[:20]
        job = _Job(job_id, request, snap, due=self.clock() + delay, stall=stall, fail=fail,
                   client_token=client_token)
        with self._lock:
            self.jobs[job_id] = job
            if client_token is not None:
                self.client_tokens[client_token] = job_id
        self.start()
        self.advance()
        return job

    def advance(self) -> None:
        """Move jobs along: created → queued at once, queued → running when due."""
        now = self.clock()
        with self._lock:
            for job in self.jobs.values():
                if job.state == "created":
                    job.state = "queued"
                elif job.state == "queued" and now >= job.due:
                    job.state = "running"
                    if not job.stall and self._executor is not None:  # a stalled job is stuck running
                        job.future = self._executor.submit(run_local, job.snap, job.request)
                        job.future.add_done_callback(functools.partial(self._finish, job))

    def _finish(self, job: _Job, fut: Future[ExecutionResult]) -> None:
        with self._lock:
            if job.state != "running":  # cancelled meanwhile: the result is dropped
                return
            if fut.cancelled():
                job.state, job.reason = "cancelled", "cancelled"
            elif fut.exception() is not None:
                exc = fut.exception()
                job.state, job.reason = "failed", f"{type(exc).__name__}: {exc}"
            elif job.fail:
                job.state, job.reason = "failed", "transient device fault (injected)"
            else:
                job.state, job.result = "done", fut.result()

    def job(self, job_id: str) -> _Job:
        self.advance()
        job = self.jobs.get(job_id)
        if job is None:
            raise VendorError(404, "JOB_NOT_FOUND", f"no job {job_id}")
        return job

    def cancel(self, job_id: str) -> _Job:
        job = self.job(job_id)
        with self._lock:
            if job.state not in _ACTIVE:
                raise VendorError(409, "JOB_NOT_CANCELLABLE", f"job {job_id} is already {job.state}")
            job.state, job.reason = "cancelled", "cancelled by the client"
            if job.future is not None:
                job.future.cancel()  # a running simulation finishes, but its result is dropped
        return job

    def delete(self, job_id: str) -> None:
        job = self.job(job_id)
        with self._lock:
            if job.state in _ACTIVE:
                job.state = "cancelled"
                if job.future is not None:
                    job.future.cancel()
            self.jobs.pop(job_id, None)

    def check(self, backend_id: str, calibration_id: str) -> CalibrationSnapshot:
        snap = self.snapshots.get(backend_id)
        if snap is None:
            raise VendorError(404, "BACKEND_NOT_FOUND", f"no backend {backend_id!r}")
        if snap.id != calibration_id:
            raise VendorError(409, "CALIBRATION_MISMATCH",
                              f"{backend_id} is calibrated as {snap.id}, not {calibration_id}")
        return snap

    def build(self, snap: CalibrationSnapshot, calibration_id: str, qpy_b64: str, physical: list[int], shots: int,
              seed: int) -> ExecutionRequest:
        """The request to run, or 422 for a payload that does not decode or does not fit the device."""
        try:
            circuit = circuit_from_b64(qpy_b64)
        except (binascii.Error, ValueError, TypeError, EOFError) as exc:
            raise VendorError(422, "INVALID_PROGRAM", f"program is not base64 QPY of one circuit: {exc}") from exc
        except Exception as exc:  # QPY raises its own error types on corrupt data
            raise VendorError(422, "INVALID_PROGRAM", f"program does not load: {type(exc).__name__}") from exc
        problem = request_problem(circuit, physical, shots, seed, snap.num_qubits, self.max_shots)
        if problem:
            raise VendorError(422, "INVALID_REQUEST", problem)
        return ExecutionRequest(snap.backend_id, calibration_id, tuple(physical), circuit, shots, seed)


def _memory(counts: dict[str, int]) -> dict[str, int]:
    """qiskit's formatted keys (registers separated by spaces) → the bare memory bitstring."""
    return {k.replace(" ", ""): v for k, v in counts.items()}


# --- request bodies ----------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class IbmParams(_Strict):
    circuits: list[str]
    shots: int
    seed_simulator: int
    initial_layout: list[int]


class IbmJobIn(_Strict):
    program_id: Literal["sampler"]
    backend: str
    calibration_id: str
    params: IbmParams


class BraketTaskIn(_Strict):
    action: str  # JSON text, as in Braket's CreateQuantumTask
    deviceArn: str  # Braket's field names, camelCase
    deviceParameters: str
    shots: int
    clientToken: str
    outputS3Bucket: str | None = None
    outputS3KeyPrefix: str | None = None


class BraketCancelIn(_Strict):
    clientToken: str


# --- the app ------------------------------------------------------------------------------------

def create_vendor_app(kind: VendorKind, snapshots: Mapping[str, CalibrationSnapshot], faults: FaultProfile = NO_FAULTS,
                      *, seed: int, token: str | None = None, clock: Callable[[], float] = time.monotonic,
                      max_shots: int = 100_000, workers: int = 2) -> FastAPI:
    """A mock vendor serving ``snapshots`` (backend id → current calibration).

    ``token``: if set, requests must carry it (IBM-like: ``Authorization: Bearer``, Braket-like:
    ``X-Api-Key``). ``clock`` drives queue delays and the token bucket; tests pass a fake one that
    their ``sleep`` advances. ``app.state.vendor`` is the ``Vendor`` behind the API.
    """
    if kind not in ("ibm-like", "braket-like"):
        raise QaiError("vendor.unknown_kind", f"unknown vendor {kind!r}", status=422,
                       details={"kinds": ["ibm-like", "braket-like"]})
    vendor = Vendor(kind, snapshots, faults, seed=seed, clock=clock, token=token, max_shots=max_shots,
                    workers=workers)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        vendor.start()
        yield
        vendor.stop()

    app = FastAPI(title=f"mock {kind} QPU vendor", lifespan=lifespan)
    app.state.vendor = vendor
    render = _ibm_error if kind == "ibm-like" else _braket_error

    @app.exception_handler(VendorError)
    async def _vendor_error(_: Request, exc: VendorError) -> JSONResponse:
        return render(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return render(VendorError(422, "INVALID_REQUEST", f"{where}: {first.get('msg', 'invalid request')}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return render(VendorError(exc.status_code, "HTTP_ERROR", str(exc.detail)))

    @app.middleware("http")
    async def gate(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path == "/healthz":
            return await call_next(request)
        header = "authorization" if kind == "ibm-like" else "x-api-key"
        presented = request.headers.get(header)
        if token is not None:
            expected = f"Bearer {token}" if kind == "ibm-like" else token
            if presented != expected:
                status = 401 if kind == "ibm-like" else 403
                return render(VendorError(status, "UNAUTHORIZED", "missing or wrong credentials"))
        client = presented or (request.client.host if request.client else "unknown")
        error, delay = vendor.admit(client, _stream(request.method, request.url.path))
        if delay > 0:
            await asyncio.sleep(delay)
        if error is not None:
            return render(error)
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "vendor": kind, "backends": {b: s.id for b, s in vendor.snapshots.items()}}

    if kind == "ibm-like":
        _ibm_routes(app, vendor)
    else:
        _braket_routes(app, vendor)
    return app


def _stream(method: str, path: str) -> str:
    """Which draw stream a request belongs to: submissions, polls, results and cancels apart."""
    if method == "POST" and path.rstrip("/") in ("/v1/jobs", "/quantum-tasks"):
        return "submit"
    if method == "DELETE" or path.endswith("/cancel"):
        return "cancel"
    if path.endswith(("/results", "/result")):
        return "result"
    return "status"


def _ibm_error(exc: VendorError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    body = {"errors": [{"code": exc.code, "message": exc.message, "solution": "", "more_info": ""}],
            "trace": uuid.uuid4().hex}
    return JSONResponse(body, status_code=exc.status, headers=headers)


def _braket_error(exc: VendorError) -> JSONResponse:
    kind = _BRAKET_ERROR_TYPES.get(exc.status, "InternalServiceException")
    headers = {"x-amzn-ErrorType": kind, "x-amzn-RequestId": str(uuid.uuid4())}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse({"message": exc.message, "reason": exc.code}, status_code=exc.status, headers=headers)


def _ibm_routes(app: FastAPI, vendor: Vendor) -> None:
    def view(job: _Job) -> dict[str, Any]:
        return {"id": job.id, "backend": job.request.backend_id, "status": IBM_NAMES[job.state],
                "reason": job.reason, "created": job.created_at, "calibration_id": job.request.snapshot_id}

    @app.post("/v1/jobs", status_code=201)
    def submit(body: IbmJobIn) -> dict[str, Any]:
        snap = vendor.check(body.backend, body.calibration_id)
        if len(body.params.circuits) != 1:
            raise VendorError(422, "INVALID_REQUEST", "exactly one circuit per job")
        p = body.params
        request = vendor.build(snap, body.calibration_id, p.circuits[0], p.initial_layout, p.shots, p.seed_simulator)
        job = vendor.submit(request, snap, None)
        return {"id": job.id, "backend": body.backend}

    @app.get("/v1/jobs/{job_id}")
    def status(job_id: str) -> dict[str, Any]:
        return view(vendor.job(job_id))

    @app.get("/v1/jobs/{job_id}/results")
    def results(job_id: str) -> dict[str, Any]:
        job = vendor.job(job_id)
        if job.state != "done" or job.result is None:
            raise VendorError(409, "JOB_NOT_COMPLETED", f"job {job_id} is {IBM_NAMES[job.state]}")
        res, circuit = job.result, job.request.circuit
        return {"results": [{"data": {"counts": {hex(int(k, 2)): v for k, v in _memory(res.counts).items()}},
                             "shots": res.shots,
                             "header": {"memory_slots": circuit.num_clbits,
                                        "creg_sizes": [[r.name, r.size] for r in circuit.cregs]},
                             "metadata": {"simulation_method": res.simulation_method,
                                          "seed_simulator": job.request.seed}}],
                "metadata": {"backend": job.request.backend_id, "calibration_id": job.request.snapshot_id}}

    @app.post("/v1/jobs/{job_id}/cancel", status_code=204)
    def cancel(job_id: str) -> Response:
        vendor.cancel(job_id)
        return Response(status_code=204)

    @app.delete("/v1/jobs/{job_id}", status_code=204)
    def delete(job_id: str) -> Response:
        vendor.delete(job_id)
        return Response(status_code=204)


def _braket_routes(app: FastAPI, vendor: Vendor) -> None:
    def view(job: _Job) -> dict[str, Any]:
        return {"quantumTaskArn": job.id, "status": BRAKET_NAMES[job.state], "failureReason": job.reason,
                "deviceArn": BRAKET_DEVICE_PREFIX + job.request.backend_id, "shots": job.request.shots,
                "createdAt": job.created_at}

    @app.post("/quantum-tasks", status_code=201)
    def create(body: BraketTaskIn) -> dict[str, Any]:
        if not body.deviceArn.startswith(BRAKET_DEVICE_PREFIX):
            raise VendorError(404, "DEVICE_NOT_FOUND", f"no device {body.deviceArn}")
        try:
            action, params = json.loads(body.action), json.loads(body.deviceParameters)
            if action.get("braketSchemaHeader") != BRAKET_PROGRAM:
                raise VendorError(422, "INVALID_ACTION", f"action must be a {BRAKET_PROGRAM} program")
            source, physical = action["source"], action["physicalQubits"]
            calibration, seed = params["calibrationId"], params["seed"]
            if not (isinstance(source, str) and isinstance(calibration, str) and isinstance(seed, int)
                    and isinstance(physical, list) and all(isinstance(q, int) for q in physical)):
                raise TypeError("wrong field types")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VendorError(422, "INVALID_ACTION", f"action/deviceParameters malformed: {exc}") from exc
        snap = vendor.check(body.deviceArn.removeprefix(BRAKET_DEVICE_PREFIX), calibration)
        request = vendor.build(snap, calibration, source, physical, body.shots, seed)
        return {"quantumTaskArn": vendor.submit(request, snap, body.clientToken).id}

    # the ARN holds '/' and ':', hence path parameters; the suffixed routes come first
    @app.get("/quantum-tasks/{arn:path}/result")
    def result(arn: str) -> dict[str, Any]:
        job = vendor.job(arn)
        if job.state != "done" or job.result is None:
            raise VendorError(409, "TASK_NOT_COMPLETED", f"task {arn} is {BRAKET_NAMES[job.state]}")
        res = job.result
        return {"measurementCounts": {k[::-1]: v for k, v in _memory(res.counts).items()},  # bit 0 leftmost
                "measuredQubits": list(job.request.physical),
                "taskMetadata": {"id": arn, "shots": res.shots,
                                 "deviceId": BRAKET_DEVICE_PREFIX + job.request.backend_id,
                                 "deviceParameters": {"calibrationId": job.request.snapshot_id,
                                                      "seed": job.request.seed}},
                "additionalMetadata": {"simulationMethod": res.simulation_method}}

    @app.put("/quantum-tasks/{arn:path}/cancel")
    def cancel(arn: str, body: BraketCancelIn) -> dict[str, Any]:
        job = vendor.cancel(arn)
        return {"quantumTaskArn": job.id, "cancellationStatus": BRAKET_NAMES[job.state]}

    @app.get("/quantum-tasks/{arn:path}")
    def status(arn: str) -> dict[str, Any]:
        return view(vendor.job(arn))


def serve_vendor(kind: VendorKind, snapshots: Mapping[str, CalibrationSnapshot], faults: FaultProfile = NO_FAULTS,
                 host: str = "127.0.0.1", port: int = 8100, seed: int = 0, *, token: str | None = None) -> None:
    """Run a mock vendor in the foreground (uvicorn) until interrupted."""
    import uvicorn

    uvicorn.run(create_vendor_app(kind, snapshots, faults, seed=seed, token=token), host=host, port=port,
                log_level="info")


__all__ = ["BRAKET_NAMES", "IBM_NAMES", "NO_FAULTS", "FaultProfile", "Vendor", "VendorError", "VendorKind",
           "create_vendor_app", "serve_vendor"]
