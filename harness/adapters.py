"""Vendor adapters: one interface through which the harness runs an ``ExecutionRequest``.

Three adapters implement it:

* ``local-aer`` runs ``run_local`` in-process (the reference every other adapter must match);
* ``ibm-like`` and ``braket-like`` are HTTP clients of two vendor APIs of different shapes
  (``harness.vendors`` serves mocks of both, with injectable faults).

``execute`` drives one request through an adapter: submit, poll, fetch the result, retrying with
exponential backoff on rate limits, transient vendor errors, connection failures, client timeouts
and jobs that do not finish in time (those are cancelled first). Permanent errors (unknown backend,
calibration mismatch, malformed payload) are never retried. The seed travels with every
submission, so the counts do not depend on how many attempts a result took.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Literal, NamedTuple, Protocol, Self, runtime_checkable
from urllib.parse import quote

import httpx
from qiskit import QuantumCircuit
from qiskit.result.postprocess import format_counts

from harness.calibration import CalibrationSnapshot
from harness.execution import ExecutionRequest, ExecutionResult, run_local
from sdk.errors import QaiError

AdapterKind = Literal["local-aer", "ibm-like", "braket-like"]
ADAPTER_KINDS: tuple[AdapterKind, ...] = ("local-aer", "ibm-like", "braket-like")


class JobState(StrEnum):
    """The one set of job states every adapter reports; vendor names are mapped onto it."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class Attempt(NamedTuple):
    """One failure on the way to a result (or to giving up): which submission, what went wrong."""

    attempt: int
    code: str
    message: str
    handle: str | None = None  # the vendor job, when the failure happened after it was accepted


class AdapterError(QaiError):
    """A failed adapter call or a failed ``execute``.

    ``retryable`` tells ``execute`` whether another submission can help; ``retry_after`` is the
    vendor's ``Retry-After`` in seconds. On an error raised by ``execute``, ``attempts`` is the
    number of submissions made and ``history`` every failure met, in order.
    """

    def __init__(self, code: str, message: str, *, status: int = 502, retryable: bool = False,
                 retry_after: float | None = None, attempts: int = 0, history: list[Attempt] | None = None,
                 details: dict[str, Any] | None = None) -> None:
        self.retryable = retryable
        self.retry_after = retry_after
        self.attempts = attempts
        self.history: list[Attempt] = list(history or [])
        merged = dict(details or {})
        merged.setdefault("retryable", retryable)
        if attempts:
            merged["attempts"] = attempts
            merged["history"] = [h._asdict() for h in self.history]
        super().__init__(code, message, status=status, details=merged)


# Errors the adapters raise, by cause. Retryable ones name transient conditions.
def _rate_limited(message: str, retry_after: float | None) -> AdapterError:
    return AdapterError("adapter.rate_limited", message, status=429, retryable=True, retry_after=retry_after)


def _vendor_error(message: str, retry_after: float | None = None) -> AdapterError:
    return AdapterError("adapter.vendor_error", message, status=502, retryable=True, retry_after=retry_after)


@runtime_checkable
class Adapter(Protocol):
    """Submit one execution and follow it to its result."""

    @property
    def name(self) -> str: ...

    def submit(self, request: ExecutionRequest) -> str:
        """Hand the request to the vendor; returns the vendor's job handle."""
        ...

    def status(self, handle: str) -> JobState: ...

    def result(self, handle: str) -> ExecutionResult:
        """The result of a ``done`` job; a failed or cancelled job raises ``AdapterError``."""
        ...

    def cancel(self, handle: str) -> None:
        """Cancel a queued or running job; a job already finished is left as it is."""
        ...

    def close(self) -> None: ...


# --- local-aer ---------------------------------------------------------------------------------

SnapshotSource = Mapping[str, CalibrationSnapshot] | Callable[[str], CalibrationSnapshot | None]


@dataclass
class _LocalJob:
    request: ExecutionRequest
    snap: CalibrationSnapshot
    state: JobState = JobState.QUEUED
    result: ExecutionResult | None = None
    error: str | None = None


class LocalAerAdapter:
    """``run_local`` behind the adapter interface. A job runs, synchronously, the first time its
    status or result is asked for, so a queued job can still be cancelled; the result is the same
    whenever it runs (the seed is in the request)."""

    name = "local-aer"

    def __init__(self, snapshots: SnapshotSource) -> None:
        self._snapshots = snapshots
        self._jobs: dict[str, _LocalJob] = {}
        self._lock = threading.Lock()

    def _snapshot(self, snapshot_id: str) -> CalibrationSnapshot | None:
        if callable(self._snapshots):
            return self._snapshots(snapshot_id)
        # Keyed by snapshot id, or by anything else (a vendor's backend -> snapshot map): match the id.
        snap = self._snapshots.get(snapshot_id)
        return snap or next((s for s in self._snapshots.values() if s.id == snapshot_id), None)

    def submit(self, request: ExecutionRequest) -> str:
        snap = self._snapshot(request.snapshot_id)
        if snap is None:
            raise AdapterError("adapter.calibration_mismatch", f"no calibration {request.snapshot_id} loaded",
                               status=409)
        if snap.backend_id != request.backend_id:
            raise AdapterError("adapter.calibration_mismatch",
                               f"calibration {snap.id} is of {snap.backend_id}, not {request.backend_id}", status=409)
        problem = request_problem(request.circuit, request.physical, request.shots, request.seed, snap.num_qubits)
        if problem:
            raise AdapterError("adapter.invalid_request", problem, status=422)
        handle = f"local-{uuid.uuid4().hex}"
        with self._lock:
            self._jobs[handle] = _LocalJob(request, snap)
        return handle

    def _job(self, handle: str) -> _LocalJob:
        job = self._jobs.get(handle)
        if job is None:
            raise AdapterError("adapter.unknown_job", f"no job {handle}", status=404)
        return job

    def _run(self, job: _LocalJob) -> None:
        with self._lock:
            if job.state is not JobState.QUEUED:
                return
            job.state = JobState.RUNNING
        try:
            job.result = run_local(job.snap, job.request)
            job.state = JobState.DONE
        except Exception as exc:  # the simulator's own failure: report it as the job's
            job.error = f"{type(exc).__name__}: {exc}"
            job.state = JobState.FAILED

    def status(self, handle: str) -> JobState:
        job = self._job(handle)
        self._run(job)
        return job.state

    def result(self, handle: str) -> ExecutionResult:
        job = self._job(handle)
        self._run(job)
        if job.state is JobState.CANCELLED:
            raise AdapterError("adapter.cancelled", f"job {handle} was cancelled", status=409)
        if job.result is None:
            # the simulator fails the same way every time for the same request: not retryable
            raise AdapterError("adapter.job_failed", f"job {handle} failed: {job.error}")
        return replace(job.result, vendor_job_id=handle, extra={**job.result.extra, "adapter": self.name})

    def cancel(self, handle: str) -> None:
        job = self._job(handle)
        with self._lock:
            if job.state is JobState.QUEUED:
                job.state = JobState.CANCELLED

    def close(self) -> None:
        pass


def request_problem(circuit: QuantumCircuit, physical: tuple[int, ...] | list[int], shots: int, seed: int,
                    num_qubits: int, max_shots: int = 10**6) -> str | None:
    """Why a request cannot run on a ``num_qubits`` device, or None. Shared by the local adapter
    and the mock vendors, so that they refuse the same requests."""
    if not 0 < shots <= max_shots:
        return f"shots must be in 1..{max_shots}, got {shots}"
    if not 0 <= seed < 2**63:
        return f"seed must be in 0..2^63-1, got {seed}"
    if len(set(physical)) != len(physical) or not all(0 <= q < num_qubits for q in physical):
        return f"physical qubits {list(physical)} are not distinct qubits of a {num_qubits}-qubit device"
    if circuit.num_qubits != len(physical):
        return f"circuit has {circuit.num_qubits} qubits, {len(physical)} physical qubits given"
    if circuit.num_clbits == 0:
        return "circuit measures nothing"
    return None


# --- HTTP adapters ------------------------------------------------------------------------------

def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _HttpAdapter:
    """The transport half both HTTP adapters share: one ``httpx.Client`` and the mapping of
    transport failures and HTTP statuses onto ``AdapterError``."""

    name: str

    def __init__(self, base_url: str, *, timeout: float, headers: dict[str, str]) -> None:
        self._client = httpx.Client(base_url=base_url.rstrip("/"), timeout=httpx.Timeout(timeout), headers=headers)
        # Submitted requests, so results can be shaped like the circuit's registers.
        self._circuits: dict[str, QuantumCircuit] = {}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _vendor_message(self, response: httpx.Response) -> tuple[str, str]:
        """(vendor error code, message) from an error body."""
        raise NotImplementedError

    def _send(self, method: str, path: str, *, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            response = self._client.request(method, path, json=body)
        except httpx.TimeoutException as exc:
            raise AdapterError("adapter.client_timeout", f"{self.name}: {method} {path}: {type(exc).__name__}",
                               status=504, retryable=True) from exc
        except httpx.TransportError as exc:
            raise AdapterError("adapter.connection_error", f"{self.name}: {method} {path}: {type(exc).__name__}: {exc}",
                               status=502, retryable=True) from exc
        if response.status_code < 400:
            return response
        vendor_code, message = self._vendor_message(response)
        text = f"{self.name}: {method} {path}: HTTP {response.status_code} {vendor_code}: {message}"
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        status = response.status_code
        if status == 429:
            raise _rate_limited(text, retry_after)
        if status == 408:
            raise AdapterError("adapter.client_timeout", text, status=504, retryable=True, retry_after=retry_after)
        if status >= 500:
            raise _vendor_error(text, retry_after)
        raise _permanent(status, path, text, vendor_code)

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError as exc:
            raise AdapterError("adapter.bad_response", f"{self.name}: response is not JSON") from exc
        if not isinstance(data, dict):
            raise AdapterError("adapter.bad_response", f"{self.name}: response is not a JSON object")
        return data

    def _counts(self, handle: str, memory_counts: dict[str, int],
                header: dict[str, Any] | None = None) -> dict[str, int]:
        """Counts keyed by the full classical memory as a hex integer → qiskit's bitstrings, split
        into registers exactly as Aer formats them, so every adapter returns the same keys. The
        layout comes from the submitted circuit, else from the vendor's ``header``."""
        circuit = self._circuits.get(handle)
        if not header or not isinstance(header.get("memory_slots"), int):
            header = {"memory_slots": max((int(k, 16).bit_length() for k in memory_counts), default=1)}
        if circuit is not None:
            header = {"memory_slots": circuit.num_clbits,
                      "creg_sizes": [[reg.name, reg.size] for reg in circuit.cregs]}
        return {k: int(v) for k, v in sorted(format_counts(memory_counts, header).items())}


def _permanent(status: int, path: str, text: str, vendor_code: str) -> AdapterError:
    """A 4xx that another attempt would only repeat."""
    details = {"vendor_status": status, "vendor_code": vendor_code}
    submit = path.rstrip("/") in ("/v1/jobs", "/quantum-tasks")
    if status == 404 and submit:
        return AdapterError("adapter.unknown_backend", text, status=404, details=details)
    if status == 404:
        return AdapterError("adapter.unknown_job", text, status=404, details=details)
    if status == 409 and submit:
        return AdapterError("adapter.calibration_mismatch", text, status=409, details=details)
    if status in (400, 413, 422):
        return AdapterError("adapter.invalid_request", text, status=422, details=details)
    return AdapterError("adapter.rejected", text, status=502, details=details)


def _unfinished(handle: str, state: JobState, reason: Any) -> AdapterError:
    """Why a job has no result."""
    if state is JobState.FAILED:
        # a vendor-side job failure (a hardware or software fault there) may not recur: retryable
        return AdapterError("adapter.job_failed", f"job {handle} failed: {reason or 'no reason given'}",
                            retryable=True)
    if state is JobState.CANCELLED:
        return AdapterError("adapter.cancelled", f"job {handle} was cancelled", status=409)
    return AdapterError("adapter.not_finished", f"job {handle} is {state.value}", status=409, retryable=True)


IBM_STATES = {"QUEUED": JobState.QUEUED, "INITIALIZING": JobState.QUEUED, "VALIDATING": JobState.QUEUED,
              "RUNNING": JobState.RUNNING, "DONE": JobState.DONE, "COMPLETED": JobState.DONE,
              "ERROR": JobState.FAILED, "FAILED": JobState.FAILED, "CANCELLED": JobState.CANCELLED}
BRAKET_STATES = {"CREATED": JobState.QUEUED, "QUEUED": JobState.QUEUED, "RUNNING": JobState.RUNNING,
                 # CANCELLING is not terminal yet: the task may still complete
                 "CANCELLING": JobState.RUNNING, "COMPLETED": JobState.DONE, "FAILED": JobState.FAILED,
                 "CANCELLED": JobState.CANCELLED}


def _state(table: Mapping[str, JobState], vendor: Any, name: str) -> JobState:
    state = table.get(str(vendor).upper())
    if state is None:
        raise AdapterError("adapter.bad_response", f"{name}: unknown job status {vendor!r}")
    return state


class IbmLikeAdapter(_HttpAdapter):
    """Client of an IBM-Runtime-shaped API: ``/v1/jobs`` with a base64 QPY payload, bearer token,
    errors as ``{"errors": [{"code", "message"}]}``, counts keyed by hex memory values."""

    name = "ibm-like"

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0) -> None:
        super().__init__(base_url, timeout=timeout, headers={"Authorization": f"Bearer {token}"} if token else {})

    def _vendor_message(self, response: httpx.Response) -> tuple[str, str]:
        try:
            first = response.json()["errors"][0]
            return str(first.get("code", "")), str(first.get("message", ""))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return "", response.text[:200]

    def submit(self, request: ExecutionRequest) -> str:
        body = {"program_id": "sampler", "backend": request.backend_id, "calibration_id": request.snapshot_id,
                "params": {"circuits": [request.circuit_b64()], "shots": request.shots,
                           "seed_simulator": request.seed, "initial_layout": list(request.physical)}}
        handle = self._json(self._send("POST", "/v1/jobs", body=body)).get("id")
        if not isinstance(handle, str) or not handle:
            raise AdapterError("adapter.bad_response", f"{self.name}: submit answered without a job id")
        self._circuits[handle] = request.circuit
        return handle

    def status(self, handle: str) -> JobState:
        data = self._json(self._send("GET", f"/v1/jobs/{quote(handle, safe='')}"))
        return _state(IBM_STATES, data.get("status"), self.name)

    def result(self, handle: str) -> ExecutionResult:
        path = f"/v1/jobs/{quote(handle, safe='')}"
        try:
            data = self._json(self._send("GET", f"{path}/results"))
        except AdapterError as err:
            if err.details.get("vendor_status") != 409:
                raise
            # no results (409): the job's own record says why
            job = self._json(self._send("GET", path))
            raise _unfinished(handle, _state(IBM_STATES, job.get("status"), self.name), job.get("reason")) from err
        try:
            res = data["results"][0]
            counts = self._counts(handle, {str(k): int(v) for k, v in res["data"]["counts"].items()},
                                  res.get("header"))
            shots, meta = int(res["shots"]), dict(data.get("metadata", {}))
            method = str(res["metadata"]["simulation_method"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise AdapterError("adapter.bad_response", f"{self.name}: malformed result: {exc!r}") from exc
        return ExecutionResult(counts=counts, shots=shots, simulation_method=method, vendor_job_id=handle,
                               extra={"adapter": self.name, "calibration_id": meta.get("calibration_id")})

    def cancel(self, handle: str) -> None:
        try:
            self._send("POST", f"/v1/jobs/{quote(handle, safe='')}/cancel")
        except AdapterError as err:
            if err.details.get("vendor_status") != 409:  # 409: already finished, nothing to cancel
                raise


BRAKET_PROGRAM = {"name": "qai.qpy_program", "version": "1"}


class BraketLikeAdapter(_HttpAdapter):
    """Client of an Amazon-Braket-shaped API: ``/quantum-tasks`` addressed by ARN, the program as a
    JSON-string ``action``, errors typed by ``x-amzn-ErrorType``, counts keyed by bitstrings with
    classical bit 0 leftmost (Braket's order, the reverse of qiskit's)."""

    name = "braket-like"

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0) -> None:
        super().__init__(base_url, timeout=timeout, headers={"X-Api-Key": token} if token else {})

    def _vendor_message(self, response: httpx.Response) -> tuple[str, str]:
        kind = response.headers.get("x-amzn-ErrorType", "").split(":")[0]
        try:
            return kind, str(response.json().get("message", ""))
        except (ValueError, AttributeError):
            return kind, response.text[:200]

    @staticmethod
    def device_arn(backend_id: str) -> str:
        return f"arn:aws:braket:::device/qpu/mock/{backend_id}"

    def submit(self, request: ExecutionRequest) -> str:
        action = {"braketSchemaHeader": BRAKET_PROGRAM, "source": request.circuit_b64(),
                  "physicalQubits": list(request.physical)}
        params = {"calibrationId": request.snapshot_id, "seed": request.seed}
        body = {"action": json.dumps(action), "deviceArn": self.device_arn(request.backend_id),
                "deviceParameters": json.dumps(params), "shots": request.shots,
                "clientToken": uuid.uuid4().hex}
        handle = self._json(self._send("POST", "/quantum-tasks", body=body)).get("quantumTaskArn")
        if not isinstance(handle, str) or not handle:
            raise AdapterError("adapter.bad_response", f"{self.name}: submit answered without a task ARN")
        self._circuits[handle] = request.circuit
        return handle

    def _task(self, handle: str) -> dict[str, Any]:
        return self._json(self._send("GET", f"/quantum-tasks/{quote(handle, safe='')}"))

    def status(self, handle: str) -> JobState:
        return _state(BRAKET_STATES, self._task(handle).get("status"), self.name)

    def result(self, handle: str) -> ExecutionResult:
        try:
            data = self._json(self._send("GET", f"/quantum-tasks/{quote(handle, safe='')}/result"))
        except AdapterError as err:
            if err.details.get("vendor_status") != 409:
                raise
            # no result (409): the task's own record says why
            task = self._task(handle)
            raise _unfinished(handle, _state(BRAKET_STATES, task.get("status"), self.name),
                              task.get("failureReason")) from err
        try:
            # bit 0 leftmost → qiskit's integer memory value
            memory = {hex(int(bits[::-1], 2)): int(n) for bits, n in data["measurementCounts"].items()}
            shots = int(data["taskMetadata"]["shots"])
            method = str(data["additionalMetadata"]["simulationMethod"])
            calibration = data["taskMetadata"].get("deviceParameters", {}).get("calibrationId")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AdapterError("adapter.bad_response", f"{self.name}: malformed result: {exc!r}") from exc
        return ExecutionResult(counts=self._counts(handle, memory), shots=shots, simulation_method=method,
                               vendor_job_id=handle, extra={"adapter": self.name, "calibration_id": calibration})

    def cancel(self, handle: str) -> None:
        try:
            self._send("PUT", f"/quantum-tasks/{quote(handle, safe='')}/cancel",
                       body={"clientToken": uuid.uuid4().hex})
        except AdapterError as err:
            if err.details.get("vendor_status") != 409:  # 409: already finished, nothing to cancel
                raise


# --- retries ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """How ``execute`` retries. Delays in seconds; the jitter is drawn from ``jitter_seed``, so a
    run's schedule of delays is reproducible."""

    max_attempts: int = 5  # submissions, the first included
    base_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each backoff is shortened by up to this fraction
    jitter_seed: int = 0
    job_timeout: float = 300.0  # from submission until the job must be done; then it is cancelled
    poll_interval: float = 0.5
    max_retry_after: float = 300.0  # a vendor's Retry-After longer than this is cut to it

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise QaiError("adapter.bad_policy", f"invalid retry policy {self}", status=422)
        if not 0 <= self.jitter <= 1 or self.job_timeout <= 0 or self.poll_interval <= 0:
            raise QaiError("adapter.bad_policy", f"invalid retry policy {self}", status=422)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The pause after failed submission ``attempt`` (1-based)."""
        delay = min(self.max_delay, self.base_delay * self.multiplier ** (attempt - 1))
        return delay * (1 - self.jitter * rng.random())


def execute(adapter: Adapter, request: ExecutionRequest, policy: RetryPolicy | None = None, *,
            sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.monotonic) -> ExecutionResult:
    """Run ``request`` through ``adapter`` to a result, retrying what can succeed on a retry.

    Each attempt is one submission followed by polling until the job is done or ``job_timeout``
    passes (the job is then cancelled and the attempt fails with ``adapter.timeout``). Transient
    failures of status and result calls are retried within the attempt. Between attempts it waits
    the exponential backoff, or the vendor's ``Retry-After`` if that is longer. ``sleep`` and
    ``clock`` are injectable so tests run without waiting.
    """
    policy = policy or RetryPolicy()
    rng = random.Random(policy.jitter_seed)
    history: list[Attempt] = []
    for attempt in range(1, policy.max_attempts + 1):
        handle: str | None = None
        try:
            handle = adapter.submit(request)
            result = _follow(adapter, handle, attempt, policy, history, sleep, clock)
        except AdapterError as err:
            history.append(Attempt(attempt, err.code, err.message, handle))
            if not err.retryable:
                if handle is not None and err.code not in ("adapter.cancelled", "adapter.unknown_job"):
                    _cancel(adapter, handle, attempt, history)  # e.g. a malformed answer: do not leave it running
                raise AdapterError(err.code, err.message, status=err.status, attempts=attempt, history=history,
                                   details={k: v for k, v in err.details.items() if k != "retryable"}) from err
            if attempt < policy.max_attempts:
                sleep(_pause(policy, policy.backoff(attempt, rng), err.retry_after))
            continue
        return replace(result, attempts=attempt, vendor_job_id=handle,
                       extra={**result.extra, "adapter": adapter.name, "history": [h._asdict() for h in history]})
    last = history[-1]
    raise AdapterError("adapter.retries_exhausted",
                       f"{adapter.name}: no result after {policy.max_attempts} attempts; last: {last.code}: "
                       f"{last.message}", status=503, attempts=policy.max_attempts, history=history,
                       details={"last_code": last.code})


def _pause(policy: RetryPolicy, backoff: float, retry_after: float | None) -> float:
    return backoff if retry_after is None else max(backoff, min(retry_after, policy.max_retry_after))


def _follow(adapter: Adapter, handle: str, attempt: int, policy: RetryPolicy, history: list[Attempt],
            sleep: Callable[[float], None], clock: Callable[[], float]) -> ExecutionResult:
    """Poll one accepted job to its result within ``job_timeout``; cancel it when time runs out."""
    deadline = clock() + policy.job_timeout
    state: JobState | None = None
    for poll in itertools.count(1):
        try:
            if state is None or not state.terminal:
                # once finished, only the result is retried: every request counts against a rate limit
                state = adapter.status(handle)
            if state is JobState.DONE or state is JobState.FAILED:
                # result() of a failed job raises the vendor's reason as adapter.job_failed
                return adapter.result(handle)
            if state is JobState.CANCELLED:
                # cancelled by someone else (an operator, the vendor): a decision, not a fault
                raise AdapterError("adapter.cancelled", f"job {handle} was cancelled on the vendor", status=409)
            pause = policy.poll_interval
        except AdapterError as err:
            if not err.retryable or err.code == "adapter.job_failed":
                raise
            if err.code == "adapter.not_finished":
                state = None  # the vendor took it back: follow the status again
            # a failed poll does not lose the job: record it and poll again, within the deadline
            history.append(Attempt(attempt, err.code, f"poll {poll}: {err.message}", handle))
            pause = _pause(policy, policy.poll_interval, err.retry_after)
        remaining = deadline - clock()
        if remaining <= 0:
            _cancel(adapter, handle, attempt, history)
            raise AdapterError("adapter.timeout", f"job {handle} not done within {policy.job_timeout}s; cancelled",
                               status=504, retryable=True)
        sleep(min(pause, remaining))
    raise AssertionError("unreachable")  # itertools.count never ends


def _cancel(adapter: Adapter, handle: str, attempt: int, history: list[Attempt]) -> None:
    """Best effort: a job left running would hold a vendor slot (and bill) for nothing."""
    for _ in range(3):
        try:
            adapter.cancel(handle)
            return
        except AdapterError as err:
            history.append(Attempt(attempt, err.code, f"cancel: {err.message}", handle))
            if not err.retryable:
                return


# --- factory ------------------------------------------------------------------------------------

def make_adapter(kind: str, *, snapshots: SnapshotSource | None = None, url: str | None = None,
                 token: str | None = None, timeout: float = 10.0) -> Adapter:
    """The adapter of ``kind``: ``local-aer`` needs ``snapshots``; the HTTP kinds need ``url``."""
    if kind == "local-aer":
        if snapshots is None:
            raise QaiError("adapter.snapshots_required", "local-aer needs calibration snapshots", status=422)
        return LocalAerAdapter(snapshots)
    if kind in ("ibm-like", "braket-like"):
        if not url:
            raise QaiError("adapter.url_required", f"{kind} needs the vendor's base URL", status=422)
        return IbmLikeAdapter(url, token, timeout) if kind == "ibm-like" else BraketLikeAdapter(url, token, timeout)
    raise QaiError("adapter.unknown_kind", f"unknown adapter {kind!r}", status=422,
                   details={"kinds": list(ADAPTER_KINDS)})


class RemoteConfig(Protocol):
    """Where a run's executions go (``harness.run.AdapterConfig`` has this shape)."""

    @property
    def kind(self) -> str: ...

    @property
    def url(self) -> str | None: ...

    @property
    def token(self) -> str | None: ...

    @property
    def retry(self) -> Mapping[str, float]: ...


_INT_POLICY_FIELDS = ("max_attempts", "jitter_seed")


def retry_policy(fields: Mapping[str, float]) -> RetryPolicy:
    """A ``RetryPolicy`` from configuration (numbers by field name); unknown names are refused."""
    known = set(RetryPolicy.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise QaiError("adapter.bad_policy", f"unknown retry policy fields {unknown}", status=422,
                       details={"fields": sorted(known)})
    # configuration files give numbers; counts must be whole
    values: dict[str, Any] = {k: int(v) if k in _INT_POLICY_FIELDS else float(v) for k, v in fields.items()}
    return RetryPolicy(**values)


def remote_runner(config: RemoteConfig, *, sleep: Callable[[float], None] = time.sleep
                  ) -> Callable[[ExecutionRequest], ExecutionResult]:
    """``execute`` through the vendor adapter ``config`` names, with its retry policy, as a plain
    function of the request (what ``harness.tasks`` runs executions through)."""
    adapter = make_adapter(config.kind, url=config.url, token=config.token)
    policy = retry_policy(config.retry)

    def run(request: ExecutionRequest) -> ExecutionResult:
        return execute(adapter, request, policy, sleep=sleep)

    return run


__all__ = ["ADAPTER_KINDS", "BRAKET_STATES", "IBM_STATES", "Adapter", "AdapterError", "AdapterKind", "Attempt",
           "BraketLikeAdapter", "IbmLikeAdapter", "JobState", "LocalAerAdapter", "RemoteConfig", "RetryPolicy",
           "execute", "make_adapter", "parse_retry_after", "remote_runner", "request_problem", "retry_policy"]
