"""Noisy simulation on a large device: the compact model against ``AerSimulator.from_backend``.

    make bench-harness   # or: .venv/bin/python bench/harness_bench.py [--backend FakeTorino] [--repeat 3]

One 5-qubit circuit of about 20 layers, transpiled to the device once, run with 10,000 shots:

* **naive**: ``AerSimulator.from_backend(device)`` (a noise model of every qubit and coupler), then
  ``run`` on the device-wide circuit;
* **compact**: the noise model of the circuit's physical qubits only (harness.noise), built from
  scratch (cache cleared), then ``run`` on the compacted circuit;
* **compact, cached**: the same with the model already cached, as in a harness run.

Both are measured in this run, best of ``--repeat``; the figure is the ratio. Target (issue 5): >= 50x.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qiskit import QuantumCircuit, transpile
from qiskit.circuit.random import random_circuit
from qiskit_aer import AerSimulator
from qiskit_ibm_runtime import fake_provider

from harness import noise
from harness.calibration import snapshot_from_backend

SHOTS = 10_000


def best(repeat: int, fn: object) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="FakeTorino", help="a qiskit-ibm-runtime fake backend of 127+ qubits")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()

    backend = getattr(fake_provider, args.backend)()
    snap = snapshot_from_backend(backend)
    logical = random_circuit(5, 20, max_operands=2, measure=False, seed=args.seed)
    logical.measure_all()
    device: QuantumCircuit = transpile(logical, backend, seed_transpiler=args.seed, optimization_level=1)
    physical = noise.active_qubits(device)
    compact = noise.compact_circuit(device, physical)
    print(f"{args.backend}: {backend.num_qubits} qubits; circuit: {logical.num_qubits} qubits, depth "
          f"{logical.depth()} logical, {device.depth()} on the device, {len(physical)} physical qubits, "
          f"{SHOTS} shots")

    def naive() -> None:
        sim = AerSimulator.from_backend(backend)
        sim.run(device, shots=SHOTS, seed_simulator=args.seed).result()

    def fresh() -> None:
        noise._compact_noise_model.cache_clear()
        noise.simulator(snap, physical, seed=args.seed).run(compact, shots=SHOTS).result()

    def cached() -> None:
        noise.simulator(snap, physical, seed=args.seed).run(compact, shots=SHOTS).result()

    t_naive = best(args.repeat, naive)
    t_fresh = best(args.repeat, fresh)
    cached()
    t_cached = best(args.repeat, cached)
    results = {"backend": args.backend, "device_qubits": backend.num_qubits, "shots": SHOTS,
               "naive_seconds": t_naive, "compact_seconds": t_fresh, "compact_cached_seconds": t_cached,
               "speedup": t_naive / t_fresh, "speedup_cached": t_naive / t_cached}
    print(f"naive from_backend + run : {t_naive * 1000:9.1f} ms")
    print(f"compact model + run      : {t_fresh * 1000:9.1f} ms   {t_naive / t_fresh:6.1f}x faster (target >= 50x)")
    print(f"compact, model cached    : {t_cached * 1000:9.1f} ms   {t_naive / t_cached:6.1f}x faster")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
