"""The harness end to end: ZNE against Mitiq, physics sanity, reproducibility, Dask, storage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from statistics import fmean
from typing import Any

import pytest
from sqlalchemy import func, select, text

from harness.calibration import CalibrationSnapshot, scaled
from harness.catalog import catalog_snapshot
from harness.circuits import generate
from harness.folding import two_qubit_gate_count
from harness.methods import parse_method
from harness.models import EmResultRow, HarnessRunRow
from harness.run import WALL_CLOCK_COLUMNS, AdapterConfig, RunConfig, build_tasks, read_parquet, run_tasks, sorted_rows
from harness.service import persist_run, verify_run
from harness.tasks import Task, compile_for_device, local_runner, mitiq_cross_check, plan, run_task
from orchestrator.services import Services
from sdk.dsse import parse_envelope, verify_envelope
from sdk.errors import QaiError
from tests.test_jobs import svc  # noqa: F401  (the jobs tests' services on PostgreSQL+S3 and SQLite+local)


@pytest.fixture(scope="module")
def manila() -> CalibrationSnapshot:
    return catalog_snapshot("fake_manila")


@pytest.fixture(scope="module")
def sherbrooke() -> CalibrationSnapshot:
    return catalog_snapshot("fake_sherbrooke")


def _task(snap: CalibrationSnapshot, family: str, n: int, methods: tuple[str, ...], *, shots: int = 2000,
          seed: int = 1, index: int = 0, depth: int | None = None) -> Task:
    spec = generate(family, n, index + 1, seed, depth=depth)[index]
    return Task(spec, snap, tuple(parse_method(m) for m in methods), shots, seed)


def _ok(rows: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    out = [r for r in rows if r["method"] == method]
    assert out and all(r["status"] == "ok" for r in out)
    return out


@pytest.mark.parametrize(("family", "n", "method"), [
    ("trotter", 3, "zne-richardson-global"), ("random", 2, "zne-linear-gate"), ("variational", 4, "zne-exp-global"),
    ("trotter", 2, "zne-poly2-gate"),
])
def test_zne_equals_mitiq_execute_with_zne(sherbrooke: CalibrationSnapshot, family: str, n: int, method: str
                                           ) -> None:
    """Mitiq drives the scale factors and the factory; the harness's value must be the same number."""
    task = _task(sherbrooke, family, n, ("unmitigated", method), shots=1000)
    runner = local_runner({sherbrooke.id: sherbrooke})
    rows = run_task(task, runner).rows
    for name in task.spec.observables:
        row = next(r for r in rows if r["method"] == method and r["observable"] == name)
        assert row["status"] == "ok"
        assert row["mitigated_raw"] == pytest.approx(mitiq_cross_check(task, task.methods[1], name, runner),
                                                     rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("folding", ["global", "gate"])
def test_folding_survives_to_execution(sherbrooke: CalibrationSnapshot, folding: str) -> None:
    """What reaches the simulator at scale λ carries about λ× the base circuit's 2-qubit gates."""
    task = _task(sherbrooke, "trotter", 4, (f"zne-richardson-{folding}@1,2,3,5",))
    compiled = compile_for_device(task.spec, task.snapshot, task.seed)
    executions = {e.label: e.circuit for e in plan(task, compiled, ["ZZZZ"])}
    base = two_qubit_gate_count(executions["base/ZZZZ"])
    assert base > 0
    for scale in (2, 3, 5):
        folded = two_qubit_gate_count(executions[f"{folding}@{scale}/ZZZZ"])
        assert abs(folded / base - scale) <= 0.1 * scale, (scale, folded, base)
    assert set(executions["global@3/ZZZZ" if folding == "global" else "gate@3/ZZZZ"].count_ops()) <= {
        "rz", "sx", "x", "ecr", "measure"}


def test_noisy_error_grows_with_depth_and_two_qubit_error(sherbrooke: CalibrationSnapshot) -> None:
    def mean_error(snap: CalibrationSnapshot, depth: int) -> float:
        errors = []
        for i in range(4):
            rows = run_task(_task(snap, "random", 4, ("unmitigated",), shots=4000, index=i, depth=depth),
                            local_runner({snap.id: snap})).rows
            errors += [r["abs_error"] / (2 * r["obs_norm"]) for r in _ok(rows, "unmitigated")]
        return fmean(errors)

    shallow, deep = mean_error(sherbrooke, 2), mean_error(sherbrooke, 12)
    assert deep > shallow
    worse = scaled(sherbrooke, gate_error=1.0, two_qubit_error=4.0)
    assert mean_error(worse, 6) > mean_error(sherbrooke, 6)


def test_an_ideal_device_gives_zero_error_up_to_shot_noise(sherbrooke: CalibrationSnapshot) -> None:
    ideal = scaled(sherbrooke, gate_error=0.0, readout=0.0, relaxation=False)
    for family in ("random", "trotter", "variational"):
        rows = run_task(_task(ideal, family, 3, ("unmitigated", "zne-linear-global"), shots=20000),
                        local_runner({ideal.id: ideal})).rows
        for r in _ok(rows, "unmitigated"):
            # ±4σ of 20000 shots; a noisy device misses by far more (see the test above)
            assert r["abs_error"] <= 4 * r["obs_norm"] / 20000**0.5 * 2, r
            assert r["unmitigated_fidelity"] > 0.99


def test_richardson_beats_unmitigated_on_trotter_at_moderate_depth(sherbrooke: CalibrationSnapshot) -> None:
    unmitigated, richardson = [], []
    for n in (3, 4):
        for i in range(2):
            rows = run_task(_task(sherbrooke, "trotter", n, ("unmitigated", "zne-richardson-global"), shots=20000,
                                  index=i, depth=3), local_runner({sherbrooke.id: sherbrooke})).rows
            unmitigated += [r["abs_error"] for r in _ok(rows, "unmitigated")]
            richardson += [r["abs_error"] for r in _ok(rows, "zne-richardson-global")]
    assert fmean(richardson) < fmean(unmitigated)


def test_shot_multiplier_follows_the_extrapolation_weights(manila: CalibrationSnapshot) -> None:
    rows = run_task(_task(manila, "random", 2, ("unmitigated", "readout", "zne-richardson-global",
                                                "zne-linear-global")), local_runner({manila.id: manila})).rows
    for r in _ok(rows, "unmitigated"):
        assert r["shot_multiplier"] == 1.0
    for r in _ok(rows, "zne-richardson-global"):
        # Richardson at (1, 2, 3) weighs the values (3, -3, 1): Σγ²σ²/σ₀² ≈ 19 when the variances are
        # alike, times three scale factors
        assert 30 < r["shot_multiplier"] < 90
    assert fmean(r["shot_multiplier"] for r in _ok(rows, "zne-linear-global")) < fmean(
        r["shot_multiplier"] for r in _ok(rows, "zne-richardson-global"))
    for r in _ok(rows, "readout"):
        assert r["shot_multiplier"] > 1.0 and r["shots"] == 3 * 2000


SMALL = RunConfig(families=("random", "trotter"), qubits=(2, 3), methods=("unmitigated", "readout",
                                                                          "zne-richardson-global"),
                  shots=500, seed=7)


def _content(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_COLUMNS} for r in rows]


def test_a_run_replays_identically_and_the_seed_matters(manila: CalibrationSnapshot) -> None:
    tasks = build_tasks(SMALL, [manila])
    first = sorted_rows(run_tasks(tasks, AdapterConfig(), workers=1))
    second = sorted_rows(run_tasks(build_tasks(SMALL, [manila]), AdapterConfig(), workers=2))
    assert _content(first) == _content(second)
    reseeded = RunConfig(**{**SMALL.__dict__, "seed": 8})
    third = sorted_rows(run_tasks(build_tasks(reseeded, [manila]), AdapterConfig(), workers=1))
    assert [r["noisy"] for r in _content(third)] != [r["noisy"] for r in _content(first)]


def test_dask_local_cluster_gives_the_same_rows(manila: CalibrationSnapshot) -> None:
    from dask.distributed import LocalCluster

    tasks = build_tasks(SMALL, [manila])
    local = sorted_rows(run_tasks(tasks, AdapterConfig(), workers=1))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        distributed = sorted_rows(run_tasks(tasks, AdapterConfig(), dask_scheduler=cluster.scheduler_address))
    assert _content(distributed) == _content(local)
    with pytest.raises(QaiError) as e:
        run_tasks(tasks[:1], AdapterConfig(), dask_scheduler="tcp://127.0.0.1:9")
    assert e.value.code == "harness.dask_unreachable"


def test_bad_configurations_are_refused() -> None:
    for kwargs, code in (({"families": ("fractal",)}, "harness.bad_config"), ({"qubits": (1, 2)}, "harness.bad_config"),
                         ({"shots": 0}, "harness.bad_config"), ({"methods": ("zne-magic-global",)},
                                                                 "harness.bad_method"),
                         ({"methods": ("readout", "readout")}, "harness.bad_config"),
                         ({"methods": ("ml-qem",)}, "harness.method_unavailable")):
        with pytest.raises(QaiError) as e:
            RunConfig(**kwargs)  # type: ignore[arg-type]
        assert e.value.code == code, kwargs
    with pytest.raises(QaiError) as e:
        build_tasks(RunConfig(qubits=(8,)), [catalog_snapshot("fake_manila")])  # 5 qubits only
    assert e.value.code == "harness.empty_run"


@pytest.fixture(scope="module")
def small_outputs() -> Iterator[tuple[list[dict[str, Any]], list[Any], list[CalibrationSnapshot]]]:
    snaps = [catalog_snapshot("fake_manila")]
    outputs = run_tasks(build_tasks(SMALL, snaps), AdapterConfig(), workers=1)
    yield sorted_rows(outputs), outputs, snaps


def _counts(s: Services) -> tuple[int, int, int]:
    with s.db.read() as session:
        return (session.scalar(select(func.count()).select_from(EmResultRow)) or 0,
                session.scalar(select(func.count()).select_from(HarnessRunRow)) or 0, s.ledger.size())


def test_a_stored_run_is_indexed_signed_ledgered_and_verifiable(
        svc: Services, small_outputs: tuple[list[dict[str, Any]], list[Any], list[CalibrationSnapshot]],  # noqa: F811
        tmp_path: Path) -> None:
    rows, outputs, snaps = small_outputs
    record = persist_run(svc, SMALL, rows, outputs, snaps, local_path=str(tmp_path / "r.parquet"))
    assert _counts(svc) == (len(rows), 1, 1)
    table = read_parquet(svc.objects.get(record.parquet_path))
    assert table.num_rows == len(rows) == record.rows
    assert (tmp_path / "r.parquet").read_bytes() == svc.objects.get(record.parquet_path)
    for column in ("job_id", "circuit_id", "family", "shots", "raw_histogram_path", "unmitigated_fidelity",
                   "mitigated_fidelity", "method", "parameters", "runtime_seconds", "backend_id",
                   "calibration_snapshot_id", "observable", "ideal", "noisy", "mitigated", "abs_error",
                   "shot_multiplier", "seed", "harness_version"):
        assert column in table.column_names, column
    hist = json.loads(svc.objects.get(table.column("raw_histogram_path")[0].as_py()))
    assert hist["executions"] and all(sum(e["counts"].values()) == SMALL.shots for e in hist["executions"])
    # the ledger entry is the signed dataset manifest, naming every file by its sha256
    entry = svc.ledger.entry(record.ledger_index)
    assert entry.type == "em-result" and entry.path == record.dataset_manifest_path
    envelope = parse_envelope(svc.ledger.object_bytes(entry.path))
    verify_envelope(envelope, svc.kms.public_key("qai.harness"), at=entry.time)
    manifest = json.loads(envelope.payload_bytes())
    assert {"path": record.parquet_path, "sha256": record.parquet_sha256} in [
        {"path": f["path"], "sha256": f["sha256"]} for f in manifest["files"]]
    assert verify_run(svc, record.run_id)["verified"] is True
    with svc.db.read() as session:
        run = session.get(HarnessRunRow, record.run_id)
        assert run is not None and run.ledger_index == record.ledger_index and run.rows == len(rows)
    # a swapped Parquet file no longer matches its signed manifest
    svc.objects.put(record.parquet_path, b"PAR1 forged", overwrite=True)
    with pytest.raises(QaiError) as e:
        verify_run(svc, record.run_id)
    assert e.value.code == "harness.dataset_tampered"


def test_a_failed_store_leaves_no_rows_and_no_ledger_entry(
        svc: Services, small_outputs: tuple[list[dict[str, Any]], list[Any], list[CalibrationSnapshot]],  # noqa: F811
) -> None:
    rows, outputs, snaps = small_outputs
    persist_run(svc, SMALL, rows[:3], outputs, snaps)
    before = _counts(svc)
    # a row that cannot be indexed (unreadable parameters) fails inside the ledger transaction,
    # after the other rows of the run were inserted
    broken = [*rows[:5], {**rows[5], "parameters": "{not json"}]
    with pytest.raises(Exception):  # noqa: B017  (json or database error)
        persist_run(svc, SMALL, broken, outputs, snaps)
    assert _counts(svc) == before
    with svc.db.read() as session:
        assert session.execute(text("SELECT count(*) FROM em_results WHERE status = 'ok'")).scalar() == 3


@pytest.mark.parametrize("kind", ["ibm-like", "braket-like"])
def test_vendor_adapters_give_the_local_rows_and_failures_are_recorded(manila: CalibrationSnapshot, kind: str
                                                                       ) -> None:
    """Through a mock vendor over real HTTP, with injected 429s and 5xx, the rows equal local-aer's;
    a vendor whose jobs never finish yields failed rows with the adapter's code, not a crashed run."""
    from harness.vendors import FaultProfile, create_vendor_app
    from tests.conftest import LiveServer

    config = RunConfig(families=("trotter",), qubits=(2,), methods=("unmitigated", "zne-linear-global"), shots=300,
                       seed=3)
    tasks = build_tasks(config, [manila])
    local = _content(sorted_rows(run_tasks(tasks, AdapterConfig(), workers=1)))
    fast = {"base_delay": 0.001, "max_delay": 0.01, "poll_interval": 0.005, "max_attempts": 30}
    flaky = FaultProfile(rate_limit=0.2, transient_error=0.15, retry_after_seconds=0)
    with LiveServer(create_vendor_app(kind, {manila.backend_id: manila}, flaky, seed=1)) as server:  # type: ignore[arg-type]
        outputs = run_tasks(tasks, AdapterConfig(kind=kind, url=server.url, retry=fast), workers=1)
    remote = _content(sorted_rows(outputs))
    assert remote == local
    assert any(o.attempts > len(json.loads(o.histogram)["executions"]) for o in outputs)  # retries happened

    stalled = FaultProfile(stall=1.0)
    give_up = {**fast, "max_attempts": 2, "job_timeout": 0.05}
    with LiveServer(create_vendor_app(kind, {manila.backend_id: manila}, stalled, seed=1)) as server:  # type: ignore[arg-type]
        rows = sorted_rows(run_tasks(tasks, AdapterConfig(kind=kind, url=server.url, retry=give_up), workers=1))
    assert rows and all(r["status"] == "failed" and r["error_code"] == "adapter.retries_exhausted" for r in rows)
    assert all(r["mitigated"] is None for r in rows)


def test_failed_rows_are_stored_with_their_code(svc: Services, manila: CalibrationSnapshot) -> None:  # noqa: F811
    """A run whose vendor gave up is still a run: its failed rows are indexed with their error code."""
    from harness.vendors import FaultProfile, create_vendor_app
    from tests.conftest import LiveServer

    config = RunConfig(families=("random",), qubits=(2,), methods=("unmitigated",), shots=100, seed=1)
    tasks = build_tasks(config, [manila])
    retry = {"base_delay": 0.001, "poll_interval": 0.005, "max_attempts": 1, "job_timeout": 0.05}
    with LiveServer(create_vendor_app("ibm-like", {manila.backend_id: manila}, FaultProfile(stall=1.0),
                                      seed=1)) as server:
        outputs = run_tasks(tasks, AdapterConfig(kind="ibm-like", url=server.url, retry=retry), workers=1)
    record = persist_run(svc, config, sorted_rows(outputs), outputs, [manila])
    assert record.failed_rows == record.rows > 0
    with svc.db.read() as session:
        codes = session.scalars(select(EmResultRow.error_code).where(EmResultRow.run_id == record.run_id)).all()
    assert set(codes) == {"adapter.retries_exhausted"}


def test_a_coin_flip_readout_fails_the_readout_rows_only(manila: CalibrationSnapshot) -> None:
    from dataclasses import replace

    coin = replace(manila, readout_errors={k: {"p01": 0.49, "p10": 0.49} for k in manila.readout_errors})
    rows = run_task(_task(coin, "random", 2, ("unmitigated", "readout"), shots=2000),
                    local_runner({coin.id: coin})).rows
    assert {r["error_code"] for r in rows if r["method"] == "readout"} == {"readout.singular"}
    assert all(r["status"] == "ok" for r in rows if r["method"] == "unmitigated")


def test_a_task_that_cannot_run_is_recorded_not_fatal(manila: CalibrationSnapshot) -> None:
    from harness.run import execute

    task = _task(manila, "random", 2, ("unmitigated", "readout"))
    out = execute(task, AdapterConfig(kind="carrier-pigeon", url="http://127.0.0.1:9"))
    assert out.rows and {r["error_code"] for r in out.rows} == {"adapter.unknown_kind"}
    assert len(out.rows) == len(task.spec.observables) * 2

    def broken(_request: object) -> Any:
        raise RuntimeError("simulator crashed")

    rows = run_task(task, broken).rows  # type: ignore[arg-type]
    assert {r["error_code"] for r in rows} == {"harness.execution_failed"}


def test_errors_keep_their_code_across_processes() -> None:
    import pickle

    from harness.adapters import AdapterError

    err = pickle.loads(pickle.dumps(AdapterError("adapter.retries_exhausted", "gave up", status=503, attempts=3)))
    assert isinstance(err, AdapterError)
    assert (err.code, err.status, err.attempts, err.details["attempts"]) == ("adapter.retries_exhausted", 503, 3, 3)
    plain = pickle.loads(pickle.dumps(QaiError("harness.bad_config", "no", status=422, details={"x": 1})))
    assert (plain.code, plain.message, plain.status, plain.details) == ("harness.bad_config", "no", 422, {"x": 1})


def test_cli_run_without_the_platform_writes_parquet_and_histograms(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {"QAI_HOME": str(tmp_path / ".qai"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "sdk.cli", "harness", "run", "--families", "variational",
                           "--backends", "fake_manila", "--qubits", "2", "--methods", "unmitigated,zne-linear-gate",
                           "--shots", "200", "--workers", "1", "--no-store", "--out", str(tmp_path / "out"),
                           "--json"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["rows"] == 2 and {s["method"] for s in result["summary"]} == {"unmitigated", "zne-linear-gate"}  # H
    table = read_parquet((tmp_path / "out" / "results.parquet").read_bytes())
    for path in set(table.column("raw_histogram_path").to_pylist()):
        assert (tmp_path / "out" / path).exists()
    assert not (tmp_path / ".qai").exists()  # nothing of the platform was touched
    bad = subprocess.run([sys.executable, "-m", "sdk.cli", "harness", "run", "--qubits", "1-3", "--no-store",
                          "--json"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"]["code"] == "harness.bad_config"
