"""A small real harness dataset for the policy tests, generated once per test session and shared by
the xdist workers (the first one to get the lock generates it, the others wait and read it)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from harness.catalog import catalog_snapshot
from harness.run import AdapterConfig, RunConfig, build_tasks, run_tasks, sorted_rows, to_parquet

BACKENDS = ("fake_manila", "fake_nairobi", "fake_guadalupe", "fake_kolkata")
HOLDOUT = ("fake_nairobi",)
CONFIG = RunConfig(qubits=(2, 3, 4), circuits_per_family=2, shots=2000, seed=7,
                   methods=("unmitigated", "readout", "zne-linear-global", "zne-richardson-global", "zne-exp-global"))


def dataset(shared_dir: Path) -> Path:
    """The Parquet file (generated on first use; about a minute on two cores). While developing,
    ``QAI_POLICY_TEST_DATA`` names a directory that keeps it between runs."""
    shared_dir = Path(os.environ.get("QAI_POLICY_TEST_DATA", shared_dir))
    path = shared_dir / "policy-train.parquet"
    with open(shared_dir / "policy-train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            tasks = build_tasks(CONFIG, [catalog_snapshot(b) for b in BACKENDS])
            rows = sorted_rows(run_tasks(tasks, AdapterConfig(), workers=2))
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(to_parquet(rows))
            tmp.replace(path)
    return path

