"""A harness run: the cross product of circuits, backends and methods, executed on a process
pool (default) or a Dask cluster, written as one Parquet dataset.

The rows of a run depend only on its configuration and the calibration snapshots, never on the
engine or on the order tasks complete in: rows are sorted before they are written.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from harness.calibration import CalibrationSnapshot
from harness.circuits import FAMILIES, generate
from harness.methods import Method, bind_model, parse_method
from harness.tasks import Task, TaskOutput, run_task
from sdk.errors import QaiError

DEFAULT_METHODS = ("unmitigated", "readout", "zne-linear-global", "zne-poly2-global", "zne-richardson-global",
                   "zne-exp-global", "zne-richardson-gate")
WALL_CLOCK_COLUMNS = ("runtime_seconds",)  # the only columns that differ between replays of a run
STRING_COLUMNS = frozenset({"error_code", "simulation_method", "raw_histogram_path", "variant"})
SORT_KEY = ("family", "circuit_id", "backend_id", "calibration_snapshot_id", "observable", "method")


@dataclass(frozen=True)
class AdapterConfig:
    kind: str = "local-aer"  # local-aer | ibm-like | braket-like
    url: str | None = None
    token: str | None = None
    retry: dict[str, float] = field(default_factory=dict)  # RetryPolicy fields


@dataclass(frozen=True)
class RunConfig:
    families: tuple[str, ...] = FAMILIES
    qubits: tuple[int, ...] = (2, 3, 4, 5, 6)
    circuits_per_family: int = 1
    methods: tuple[str, ...] = DEFAULT_METHODS
    shots: int = 4000
    seed: int = 0
    depth: int | None = None
    mlqem_bundle: str | None = None  # the EM policy bundle ml-qem applies
    mlqem_version: str | None = None

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise QaiError("harness.bad_config", f"unknown families {unknown}", status=422,
                           details={"families": list(FAMILIES)})
        if not self.qubits or any(not 2 <= q <= 8 for q in self.qubits):
            raise QaiError("harness.bad_config", f"qubits must be within 2..8, got {list(self.qubits)}", status=422)
        if not 1 <= self.shots <= 1_000_000:
            raise QaiError("harness.bad_config", f"shots must be within 1..1000000, got {self.shots}", status=422)
        if self.circuits_per_family < 1:
            raise QaiError("harness.bad_config", "circuits_per_family must be at least 1", status=422)
        self.parsed_methods()

    def parsed_methods(self) -> tuple[Method, ...]:
        if not self.methods:
            raise QaiError("harness.bad_config", "no methods", status=422)
        methods = tuple(bind_model(parse_method(m), self.mlqem_bundle, self.mlqem_version) for m in self.methods)
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise QaiError("harness.bad_config", f"a method is listed twice: {names}", status=422)
        return methods

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def parse_qubits(text: str) -> tuple[int, ...]:
    """``2-6`` or ``2,4,6``."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            return tuple(range(lo, hi + 1))
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise QaiError("harness.bad_config", f"qubits: expected 2-6 or 2,4,6, got {text!r}", status=422) from None


def build_tasks(config: RunConfig, snapshots: Sequence[CalibrationSnapshot]) -> list[Task]:
    methods = config.parsed_methods()
    tasks = []
    for family in config.families:
        for n in config.qubits:
            for spec in generate(family, n, config.circuits_per_family, config.seed, depth=config.depth):
                for snap in snapshots:
                    if snap.num_qubits < n:
                        continue
                    tasks.append(Task(spec, snap, methods, config.shots, config.seed))
    if not tasks:
        raise QaiError("harness.empty_run", "the configuration selects no (circuit, backend) pair", status=422)
    return tasks


def execute(task: Task, adapter: AdapterConfig) -> TaskOutput:
    """One task in a worker process (pool or Dask): the adapter is built where it runs."""
    from harness.tasks import failed_task, local_runner

    started = time.perf_counter()
    try:
        if adapter.kind == "local-aer":
            return run_task(task, local_runner({task.snapshot.id: task.snapshot}))
        from harness.adapters import remote_runner

        return run_task(task, remote_runner(adapter))
    except Exception as exc:  # one task that cannot run is recorded as failed rows; the run goes on
        return failed_task(task, exc, time.perf_counter() - started)


def run_tasks(tasks: Sequence[Task], adapter: AdapterConfig, *, workers: int | None = None,
              dask_scheduler: str | None = None, on_done: Callable[[TaskOutput], None] | None = None
              ) -> list[TaskOutput]:
    """Outputs in task order. ``workers=1`` runs in this process (no pool)."""
    done = on_done or (lambda _o: None)
    if dask_scheduler:
        return _run_dask(tasks, adapter, dask_scheduler, done)
    workers = workers or max(1, os.cpu_count() or 1)
    if workers == 1:
        outputs = []
        for t in tasks:
            outputs.append(execute(t, adapter))
            done(outputs[-1])
        return outputs
    # spawn, not fork: the parent may hold HSM sessions, DB pools and threads a fork would copy
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures: dict[Future[TaskOutput], int] = {pool.submit(execute, t, adapter): i for i, t in enumerate(tasks)}
        results: dict[int, TaskOutput] = {}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                results[futures[f]] = f.result()
                done(results[futures[f]])
    return [results[i] for i in range(len(tasks))]


def _run_dask(tasks: Sequence[Task], adapter: AdapterConfig, address: str, done: Callable[[TaskOutput], None]
              ) -> list[TaskOutput]:
    from dask.distributed import Client, as_completed

    try:
        client = Client(address, timeout="10s")  # type: ignore[no-untyped-call]
    except OSError as exc:
        raise QaiError("harness.dask_unreachable", f"no Dask scheduler at {address}: {exc}", status=503) from exc
    with client:
        futures = client.map(execute, list(tasks), [adapter] * len(tasks), pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        results: dict[int, TaskOutput] = {}
        for f in as_completed(futures):  # type: ignore[no-untyped-call]
            results[index[f.key]] = f.result()
            done(results[index[f.key]])
    return [results[i] for i in range(len(tasks))]


def sorted_rows(outputs: Sequence[TaskOutput]) -> list[dict[str, Any]]:
    rows = [r for o in outputs for r in o.rows]
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in SORT_KEY))


def to_parquet(rows: Sequence[dict[str, Any]], metadata: dict[str, str] | None = None) -> bytes:
    """The rows as Parquet bytes: column order fixed, no pandas index, no creation time in the footer
    beyond what pyarrow writes deterministically, so equal rows give equal files."""
    if not rows:
        raise QaiError("harness.empty_run", "no rows to write", status=422)
    columns = list(dict.fromkeys(c for r in rows for c in r))  # every column, in first-seen order
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    # A column that is null in every row (error_code in a clean run) would otherwise be typed
    # "null", and datasets of different runs would not concatenate.
    for i, f in enumerate(table.schema):
        if pa.types.is_null(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(pa.string() if f.name in STRING_COLUMNS
                                                                     else pa.float64()))
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_parquet(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))
