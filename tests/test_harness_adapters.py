"""Vendor adapters against the mock vendors, served by real uvicorn servers on loopback ports.

Time is a fake clock shared by the client (``execute``'s ``sleep`` and ``clock``) and the vendor
(queue delays, token bucket): a retry after ``Retry-After: 3`` costs milliseconds, and nothing
depends on how fast the machine is. The simulations themselves run for real.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import httpx
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister, transpile
from qiskit_ibm_runtime.fake_provider import FakeManilaV2

from harness.adapters import (
    BRAKET_STATES,
    IBM_STATES,
    Adapter,
    AdapterError,
    BraketLikeAdapter,
    IbmLikeAdapter,
    JobState,
    LocalAerAdapter,
    RetryPolicy,
    execute,
    make_adapter,
    parse_retry_after,
    remote_runner,
    retry_policy,
)
from harness.calibration import CalibrationSnapshot, scaled, snapshot_from_backend
from harness.execution import ExecutionRequest, ExecutionResult, circuit_to_b64, run_local
from harness.noise import active_qubits, compact_circuit
from harness.vendors import BRAKET_NAMES, IBM_NAMES, NO_FAULTS, FaultProfile, Vendor, create_vendor_app
from sdk.errors import QaiError
from tests.conftest import LiveServer

KINDS = ("ibm-like", "braket-like")


class FakeClock:
    """Seconds that pass only when someone sleeps. Each sleep also yields a little real time, so
    the vendor's background simulations progress while the client polls."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds
        time.sleep(0.002)


@pytest.fixture(scope="module")
def snap() -> CalibrationSnapshot:
    return snapshot_from_backend(FakeManilaV2())


def _request(snap: CalibrationSnapshot, circuit: QuantumCircuit, *, shots: int = 2000,
             seed: int = 11) -> ExecutionRequest:
    device = transpile(circuit, FakeManilaV2(), seed_transpiler=1)
    physical = active_qubits(device)
    return ExecutionRequest(snap.backend_id, snap.id, tuple(physical), compact_circuit(device, physical), shots, seed)


def _ghz() -> QuantumCircuit:
    qc = QuantumCircuit(3)
    qc.h(0)
    qc.cx(0, 1)
    qc.cx(1, 2)
    qc.measure_all()
    return qc


def _two_registers(snap: CalibrationSnapshot) -> ExecutionRequest:
    """A compact device-basis circuit with two classical registers (built by hand: compact_circuit
    keeps one): counts keys carry a space, which every adapter must reproduce."""
    a, b = ClassicalRegister(2, "a"), ClassicalRegister(1, "b")
    qc = QuantumCircuit(QuantumRegister(3, "q"), a, b)
    qc.x(0)
    qc.sx(1)
    qc.cx(1, 2)
    qc.measure([0, 1], a)
    qc.measure(2, b)
    return ExecutionRequest(snap.backend_id, snap.id, (0, 1, 2), qc, 1500, 5)


@pytest.fixture(scope="module")
def request_(snap: CalibrationSnapshot) -> ExecutionRequest:
    return _request(snap, _ghz())


@pytest.fixture(scope="module")
def reference(snap: CalibrationSnapshot, request_: ExecutionRequest) -> ExecutionResult:
    return run_local(snap, request_)


@contextmanager
def vendor(kind: str, snap: CalibrationSnapshot, faults: FaultProfile = NO_FAULTS, *, seed: int = 0,
           clock: FakeClock | None = None, **kw: Any) -> Iterator[tuple[str, Vendor]]:
    app = create_vendor_app(kind, {snap.backend_id: snap}, faults, seed=seed,  # type: ignore[arg-type]
                            clock=clock or time.monotonic, **kw)
    with LiveServer(app) as server:
        yield server.url, app.state.vendor


def _adapter(kind: str, url: str, **kw: Any) -> Adapter:
    return IbmLikeAdapter(url, **kw) if kind == "ibm-like" else BraketLikeAdapter(url, **kw)


def _run(adapter: Adapter, request: ExecutionRequest, clock: FakeClock, **policy: Any) -> ExecutionResult:
    defaults: dict[str, Any] = {"base_delay": 0.05, "max_delay": 0.5, "poll_interval": 0.05, "job_timeout": 600.0}
    return execute(adapter, request, RetryPolicy(**{**defaults, **policy}), sleep=clock.sleep, clock=clock)


def _fails(adapter: Adapter, request: ExecutionRequest, clock: FakeClock, **policy: Any) -> AdapterError:
    with pytest.raises(AdapterError) as info:
        _run(adapter, request, clock, **policy)
    return info.value


# --- the same counts everywhere -------------------------------------------------------------

@pytest.mark.parametrize("registers", [1, 2])
def test_every_adapter_returns_the_same_counts(snap: CalibrationSnapshot, registers: int) -> None:
    request = _request(snap, _ghz()) if registers == 1 else _two_registers(snap)
    clock = FakeClock()
    local = _run(LocalAerAdapter({snap.id: snap}), request, clock)
    assert local == replace(run_local(snap, request), attempts=1, vendor_job_id=local.vendor_job_id,
                            extra=local.extra)
    assert sum(local.counts.values()) == request.shots and len(local.counts) > 1
    faults = FaultProfile(queue_delay_seconds=(0.5, 2.0))
    for kind in KINDS:
        with vendor(kind, snap, faults, clock=clock) as (url, _):
            got = _run(_adapter(kind, url), request, clock)
        assert got.counts == local.counts, kind
        assert (got.shots, got.simulation_method, got.attempts) == (local.shots, local.simulation_method, 1)
        assert got.extra["adapter"] == kind and got.extra["calibration_id"] == snap.id
        assert got.vendor_job_id
    assert all(key.count(" ") == registers - 1 for key in local.counts)


def test_local_adapter_finds_snapshots_by_id_in_any_mapping_or_callable(
        snap: CalibrationSnapshot, request_: ExecutionRequest, reference: ExecutionResult) -> None:
    for source in ({snap.backend_id: snap}, {snap.id: snap}, lambda i: snap if i == snap.id else None):
        adapter = make_adapter("local-aer", snapshots=source)
        handle = adapter.submit(request_)
        assert adapter.status(handle) is JobState.DONE
        assert adapter.result(handle).counts == reference.counts


# --- faults, retries and backoff --------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_rate_limits_and_transient_errors_are_retried_with_identical_counts(
        kind: str, snap: CalibrationSnapshot, request_: ExecutionRequest, reference: ExecutionResult) -> None:
    faults = FaultProfile(rate_limit=0.3, transient_error=0.3, job_failure=0.2, queue_delay_seconds=(0.2, 2.0),
                          retry_after_seconds=3)
    clock = FakeClock()
    # seed 4: the first submission to either vendor is refused (the draws are per stream, reproducible)
    with vendor(kind, snap, faults, seed=4, clock=clock) as (url, backend):
        result = _run(_adapter(kind, url), request_, clock, max_attempts=12)
        jobs = len(backend.jobs)
    assert result.counts == reference.counts
    assert result.attempts > 1
    codes = {h["code"] for h in result.extra["history"]}
    assert {"adapter.rate_limited", "adapter.vendor_error"} <= codes
    assert codes <= {"adapter.rate_limited", "adapter.vendor_error", "adapter.job_failed"}
    assert jobs <= result.attempts  # refused submissions left no job behind
    # Retry-After: 3 was honoured although the backoff never exceeds max_delay=0.5
    assert max(clock.sleeps) >= 3


@pytest.mark.parametrize("kind", KINDS)
def test_token_bucket_answers_429_with_retry_after_and_execute_waits(
        kind: str, snap: CalibrationSnapshot, request_: ExecutionRequest, reference: ExecutionResult) -> None:
    clock = FakeClock()
    faults = FaultProfile(bucket_rate=2.0, bucket_burst=2, queue_delay_seconds=(1.0, 1.0))
    path = "/v1/jobs/nope" if kind == "ibm-like" else "/quantum-tasks/nope"
    with vendor(kind, snap, faults, clock=clock) as (url, _):
        with httpx.Client(base_url=url) as raw:
            statuses = [raw.get(path) for _ in range(3)]
            assert [r.status_code for r in statuses] == [404, 404, 429]
            assert statuses[2].headers["Retry-After"] == "1"
            assert raw.get("/healthz").status_code == 200  # probes are not rate limited
        clock.sleep(1.0)  # the bucket refills
        result = _run(_adapter(kind, url), request_, clock)
    assert result.counts == reference.counts
    assert any(h["code"] == "adapter.rate_limited" for h in result.extra["history"])  # polls were throttled


@pytest.mark.parametrize("kind", KINDS)
def test_stalled_jobs_time_out_are_cancelled_and_exhaust_the_attempts(
        kind: str, snap: CalibrationSnapshot, request_: ExecutionRequest) -> None:
    clock = FakeClock()
    with vendor(kind, snap, FaultProfile(stall=1.0), clock=clock) as (url, _):
        adapter = _adapter(kind, url)
        err = _fails(adapter, request_, clock, max_attempts=3, job_timeout=2.0, poll_interval=0.25)
        assert err.code == "adapter.retries_exhausted" and err.status == 503
        assert err.attempts == 3 and err.details["last_code"] == "adapter.timeout"
        assert [(h.attempt, h.code) for h in err.history] == [(i, "adapter.timeout") for i in (1, 2, 3)]
        handles = [h.handle for h in err.history]
        assert len(set(handles)) == 3 and all(handles)
        for handle in handles:
            assert handle is not None
            assert adapter.status(handle) is JobState.CANCELLED  # cancelled on the vendor
        raw = httpx.get(f"{url}/v1/jobs/{handles[0]}" if kind == "ibm-like"
                        else f"{url}/quantum-tasks/{handles[0]}")
        assert raw.json()["status"] == "CANCELLED"
    assert err.details["history"][0] == {"attempt": 1, "code": "adapter.timeout", "message": err.history[0].message,
                                         "handle": handles[0]}


@pytest.mark.parametrize("kind", KINDS)
def test_failed_jobs_are_retried_then_reported(kind: str, snap: CalibrationSnapshot,
                                               request_: ExecutionRequest) -> None:
    clock = FakeClock()
    with vendor(kind, snap, FaultProfile(job_failure=1.0), clock=clock) as (url, _):
        err = _fails(_adapter(kind, url), request_, clock, max_attempts=2)
    assert err.code == "adapter.retries_exhausted"
    assert [h.code for h in err.history] == ["adapter.job_failed"] * 2
    assert "injected" in err.history[0].message


@pytest.mark.parametrize("kind", KINDS)
def test_client_timeouts_and_connection_errors_are_retried(kind: str, snap: CalibrationSnapshot,
                                                           request_: ExecutionRequest) -> None:
    clock = FakeClock()
    with vendor(kind, snap, FaultProfile(response_delay_seconds=(0.3, 0.3))) as (url, _):
        err = _fails(_adapter(kind, url, timeout=0.05), request_, clock, max_attempts=2)
    assert [h.code for h in err.history] == ["adapter.client_timeout"] * 2
    # the server is gone now: nothing listens on its port
    err = _fails(_adapter(kind, url, timeout=1.0), request_, clock, max_attempts=3)
    assert err.code == "adapter.retries_exhausted" and err.attempts == 3
    assert [h.code for h in err.history] == ["adapter.connection_error"] * 3
    assert len(clock.sleeps) >= 2  # it backed off between attempts


# --- permanent errors -------------------------------------------------------------------------

def _permanent_cases(snap: CalibrationSnapshot, request: ExecutionRequest) -> list[tuple[ExecutionRequest, str]]:
    other = scaled(snap, gate_error=0.5)
    return [
        (replace(request, backend_id="fake_nowhere"), "adapter.unknown_backend"),
        (replace(request, snapshot_id=replace(other, backend_id=snap.backend_id).id), "adapter.calibration_mismatch"),
        (replace(request, shots=0), "adapter.invalid_request"),
        (replace(request, physical=(*request.physical[:-1], 99)), "adapter.invalid_request"),
        (replace(request, physical=request.physical[:-1]), "adapter.invalid_request"),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_permanent_errors_are_not_retried(kind: str, snap: CalibrationSnapshot, request_: ExecutionRequest) -> None:
    clock = FakeClock()
    with vendor(kind, snap, clock=clock) as (url, backend):
        adapter = _adapter(kind, url)
        for bad, code in _permanent_cases(snap, request_):
            err = _fails(adapter, bad, clock)
            assert err.code == code and err.attempts == 1 and len(err.history) == 1, (code, err)
            assert err.history[0].code == code and err.history[0].handle is None
        assert clock.sleeps == [] and backend.jobs == {}
    with vendor(kind, snap, token="s3cret") as (url, _):
        err = _fails(_adapter(kind, url, token="wrong"), request_, clock)
        assert err.code == "adapter.rejected" and err.attempts == 1
        assert _run(_adapter(kind, url, token="s3cret"), request_, clock).attempts == 1


def test_local_adapter_refuses_the_same_requests(snap: CalibrationSnapshot, request_: ExecutionRequest) -> None:
    clock = FakeClock()
    adapter = LocalAerAdapter({snap.id: snap})
    for bad, code in _permanent_cases(snap, request_):
        err = _fails(adapter, bad, clock)
        # locally, a snapshot of another backend is a calibration mismatch too
        assert err.code in (code, "adapter.calibration_mismatch") and err.attempts == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("kind", KINDS)
def test_vendor_validates_payloads(kind: str, snap: CalibrationSnapshot, request_: ExecutionRequest) -> None:
    good = request_.circuit_b64()
    not_qpy = base64.b64encode(b"QISKIT but not really").decode()
    too_many = replace(request_, shots=100_001)
    with vendor(kind, snap) as (url, backend), httpx.Client(base_url=url) as raw:
        for program, shots in (("%%%not base64", 100), (not_qpy, 100), (good, 0), (good, too_many.shots)):
            path, body = _raw_submit(kind, snap, request_, program, shots)
            response = raw.post(path, json=body)
            assert response.status_code == 422, response.text
            if kind == "ibm-like":
                assert response.json()["errors"][0]["code"] in ("INVALID_PROGRAM", "INVALID_REQUEST")
            else:
                assert response.headers["x-amzn-ErrorType"] == "ValidationException"
        path, body = _raw_submit(kind, snap, request_, good, 100)
        response = raw.post(path, json={**body, "unexpected": 1})
        assert response.status_code == 422
        assert raw.post(path, json=body).status_code == 201
        assert len(backend.jobs) == 1
        err = _fails(_adapter(kind, url), too_many, FakeClock())
        assert err.code == "adapter.invalid_request"


def _raw_submit(kind: str, snap: CalibrationSnapshot, request: ExecutionRequest, program: str,
                shots: int) -> tuple[str, dict[str, Any]]:
    import json

    if kind == "ibm-like":
        return "/v1/jobs", {"program_id": "sampler", "backend": snap.backend_id, "calibration_id": snap.id,
                            "params": {"circuits": [program], "shots": shots, "seed_simulator": 1,
                                       "initial_layout": list(request.physical)}}
    action = {"braketSchemaHeader": {"name": "qai.qpy_program", "version": "1"}, "source": program,
              "physicalQubits": list(request.physical)}
    return "/quantum-tasks", {"action": json.dumps(action), "deviceArn": BraketLikeAdapter.device_arn(snap.backend_id),
                              "deviceParameters": json.dumps({"calibrationId": snap.id, "seed": 1}),
                              "shots": shots, "clientToken": f"t-{shots}-{len(program)}"}


# --- status, cancel ---------------------------------------------------------------------------

def test_vendor_status_names_map_to_the_common_states() -> None:
    common = {"created": JobState.QUEUED, "queued": JobState.QUEUED, "running": JobState.RUNNING,
              "done": JobState.DONE, "failed": JobState.FAILED, "cancelled": JobState.CANCELLED}
    assert {s: IBM_STATES[n] for s, n in IBM_NAMES.items()} == common
    assert {s: BRAKET_STATES[n] for s, n in BRAKET_NAMES.items()} == common
    assert {s for s in JobState if s.terminal} == {JobState.DONE, JobState.FAILED, JobState.CANCELLED}


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_and_status(kind: str, snap: CalibrationSnapshot, request_: ExecutionRequest,
                           reference: ExecutionResult) -> None:
    clock = FakeClock()
    with vendor(kind, snap, FaultProfile(queue_delay_seconds=(10.0, 10.0)), clock=clock) as (url, _):
        adapter = _adapter(kind, url)
        raw_status = (lambda h: httpx.get(f"{url}/v1/jobs/{h}").json()["status"]) if kind == "ibm-like" else (
            lambda h: httpx.get(f"{url}/quantum-tasks/{h}").json()["status"])
        first, second = adapter.submit(request_), adapter.submit(request_)
        assert adapter.status(first) is JobState.QUEUED
        assert raw_status(first) == "QUEUED"
        adapter.cancel(first)
        assert adapter.status(first) is JobState.CANCELLED and raw_status(first) == "CANCELLED"
        adapter.cancel(first)  # already finished: nothing to do, no error
        with pytest.raises(AdapterError) as info:
            adapter.result(first)
        assert info.value.code == "adapter.cancelled"
        clock.sleep(10.0)  # the second job leaves the queue
        while (state := adapter.status(second)) is not JobState.DONE:
            assert state is JobState.RUNNING
            clock.sleep(0.01)
        assert raw_status(second) == ("DONE" if kind == "ibm-like" else "COMPLETED")
        adapter.cancel(second)  # a finished job stays finished
        assert adapter.status(second) is JobState.DONE
        assert adapter.result(second).counts == reference.counts
        with pytest.raises(AdapterError) as info:
            adapter.status("no-such-job")
        assert info.value.code == "adapter.unknown_job" and not info.value.retryable


@pytest.mark.parametrize("kind", KINDS)
def test_a_job_cancelled_behind_executes_back_is_not_resubmitted(
        kind: str, snap: CalibrationSnapshot, request_: ExecutionRequest) -> None:
    clock = FakeClock()
    with vendor(kind, snap, FaultProfile(queue_delay_seconds=(10.0, 10.0)), clock=clock) as (url, backend):
        operator = _adapter(kind, url)

        def sleep(seconds: float) -> None:  # while execute waits, an operator cancels the job
            for handle in list(backend.jobs):
                operator.cancel(handle)
            clock.sleep(seconds)

        with pytest.raises(AdapterError) as info:
            execute(_adapter(kind, url), request_, RetryPolicy(poll_interval=0.05), sleep=sleep, clock=clock)
        assert info.value.code == "adapter.cancelled" and info.value.attempts == 1
        assert len(backend.jobs) == 1


def test_local_cancel(snap: CalibrationSnapshot, request_: ExecutionRequest) -> None:
    adapter = LocalAerAdapter({snap.id: snap})
    handle = adapter.submit(request_)
    adapter.cancel(handle)
    assert adapter.status(handle) is JobState.CANCELLED
    with pytest.raises(AdapterError) as info:
        adapter.result(handle)
    assert info.value.code == "adapter.cancelled"


# --- policy, parsing, factory -----------------------------------------------------------------

def test_backoff_is_exponential_capped_and_reproducible() -> None:
    import random

    policy = RetryPolicy(base_delay=1.0, max_delay=10.0, multiplier=2.0, jitter=0.25, jitter_seed=5)
    delays = [policy.backoff(a, random.Random(policy.jitter_seed)) for a in range(1, 7)]
    for attempt, delay in enumerate(delays, start=1):
        nominal = min(10.0, 2.0 ** (attempt - 1))
        assert 0.75 * nominal <= delay <= nominal
    run = random.Random(5)
    again = random.Random(5)
    assert [policy.backoff(a, run) for a in (1, 2, 3)] == [policy.backoff(a, again) for a in (1, 2, 3)]
    with pytest.raises(QaiError) as info:
        RetryPolicy(max_attempts=0)
    assert info.value.code == "adapter.bad_policy"


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_make_adapter(snap: CalibrationSnapshot) -> None:
    assert make_adapter("local-aer", snapshots={snap.id: snap}).name == "local-aer"
    for kind, cls in (("ibm-like", IbmLikeAdapter), ("braket-like", BraketLikeAdapter)):
        adapter = make_adapter(kind, url="http://127.0.0.1:9", token="t")
        assert isinstance(adapter, cls) and isinstance(adapter, Adapter) and adapter.name == kind
        adapter.close()
    for kind, kw, code in (("ionq", {}, "adapter.unknown_kind"), ("ibm-like", {}, "adapter.url_required"),
                           ("local-aer", {}, "adapter.snapshots_required")):
        with pytest.raises(QaiError) as info:
            make_adapter(kind, **kw)
        assert info.value.code == code
    with pytest.raises(QaiError) as info:
        FaultProfile(stall=1.5)
    assert info.value.code == "vendor.bad_faults"


def test_circuit_payload_round_trips(request_: ExecutionRequest) -> None:
    from harness.execution import circuit_from_b64

    assert circuit_from_b64(circuit_to_b64(request_.circuit)) == request_.circuit


@pytest.mark.parametrize("kind", KINDS)
def test_remote_runner_from_configuration(kind: str, snap: CalibrationSnapshot, request_: ExecutionRequest,
                                          reference: ExecutionResult) -> None:
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Config:  # the shape of harness.run.AdapterConfig
        kind: str
        url: str | None
        token: str | None = None
        retry: dict[str, float] = field(default_factory=dict)

    clock = FakeClock()
    with vendor(kind, snap, FaultProfile(rate_limit=0.3), seed=4) as (url, _):
        run = remote_runner(Config(kind, url, retry={"max_attempts": 6.0, "base_delay": 0.01, "poll_interval": 0.01}),
                            sleep=clock.sleep)
        result = run(request_)
    assert result.counts == reference.counts and result.attempts > 1
    assert retry_policy({"max_attempts": 3.0}).max_attempts == 3
    with pytest.raises(QaiError) as info:
        retry_policy({"retries": 3})
    assert info.value.code == "adapter.bad_policy"
