"""SDK hooks: every quantum job leaves a signed, ledgered run-manifest, with no other change to user code.

* :func:`instrument` wraps a Qiskit ``BackendV2`` or ``SamplerV2``. Each ``run(...)`` builds one
  manifest for the job (the OpenQASM 3 of its circuits, the shots, the seed), signs it through the
  KMS, submits it, and then runs the job as before. The job comes back unchanged but for a
  ``qai_manifest`` attribute: ``{"job_id", "receipt"}``. The seed is passed to simulators
  (``seed_simulator``) so that the run replays from its manifest.
* :func:`run_manifest` does the same for code that is not Qiskit: ``with run_manifest(...) as m:``.

Qiskit is imported only when a circuit is serialised, so the SDK installs without it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sdk.client import Client
from sdk.manifest import CryptoMode, new_manifest


@dataclass(frozen=True)
class Submitted:
    job_id: str
    receipt: dict[str, Any]
    manifest: dict[str, Any]


def _qasm(circuits: Sequence[Any]) -> str:
    from qiskit import qasm3

    return "\n".join(qasm3.dumps(c) for c in circuits)


def _circuits(run_input: Any) -> list[Any]:
    """Circuits of a BackendV2.run input (one or many) or of SamplerV2 pubs (circuit or tuple)."""
    items = run_input if isinstance(run_input, list | tuple) else [run_input]
    return [item[0] if isinstance(item, tuple) else item for item in items]


def _submit(client: Client, key: str, *, tenant: str, qasm: str, shots: int, seed: int | None,
            crypto_mode: CryptoMode, suite: str, **fields: Any) -> Submitted:
    manifest = new_manifest(tenant=tenant, qasm=qasm, shots=shots, seed=seed, crypto_mode=crypto_mode,
                            pqc_suite=suite, **fields)
    out = client.create_job(manifest, key)
    return Submitted(out["job_id"], out["receipt"], manifest.model_dump(mode="json"))


class Instrumented:
    """A backend or sampler whose every ``run`` is manifested first. Everything else passes through."""

    def __init__(self, target: Any, *, client: Client, tenant: str, key: str, crypto_mode: CryptoMode,
                 suite: str, default_shots: int, fields: dict[str, Any]) -> None:
        self._target = target
        self._client, self._tenant, self._key = client, tenant, key
        self._crypto_mode, self._suite, self._default_shots, self._fields = crypto_mode, suite, default_shots, fields

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def run(self, run_input: Any, *args: Any, **kwargs: Any) -> Any:
        shots = int(kwargs.get("shots") or self._default_shots)
        kwargs["shots"] = shots  # the job runs exactly the shots its manifest records
        seed = kwargs.get("seed_simulator")
        backend_name = getattr(self._target, "name", None)
        if seed is None and _accepts_seed(self._target):
            import secrets

            seed = secrets.randbits(31)
            kwargs["seed_simulator"] = seed
        fields = dict(self._fields)
        if isinstance(backend_name, str) and "backend_id" not in fields:
            fields["backend_id"] = backend_name
        submitted = _submit(self._client, self._key, tenant=self._tenant, qasm=_qasm(_circuits(run_input)),
                            shots=shots, seed=seed, crypto_mode=self._crypto_mode, suite=self._suite, **fields)
        job = self._target.run(run_input, *args, **kwargs)
        job.qai_manifest = {"job_id": submitted.job_id, "receipt": submitted.receipt}
        return job


def _accepts_seed(target: Any) -> bool:
    """Aer backends take ``seed_simulator``; hardware and samplers do not."""
    return type(target).__module__.startswith("qiskit_aer") and hasattr(target, "set_options")


def instrument(backend_or_sampler: Any, *, client: Client, tenant: str, key: str,
               crypto_mode: CryptoMode = "hybrid", suite: str = "ML-DSA-65+ECDSA-P256", shots: int = 1024,
               **fields: Any) -> Any:
    """Wrap a Qiskit BackendV2 or SamplerV2 so that each ``run`` submits a signed manifest first.

    ``fields`` go into every manifest (``em_method``, ``priority_class``, ``labels``…).
    """
    return Instrumented(backend_or_sampler, client=client, tenant=tenant, key=key, crypto_mode=crypto_mode,
                        suite=suite, default_shots=shots, fields=fields)


@contextmanager
def run_manifest(*, client: Client, tenant: str, key: str, qasm: str, shots: int, seed: int | None = None,
                 crypto_mode: CryptoMode = "hybrid", suite: str = "ML-DSA-65+ECDSA-P256",
                 **fields: Any) -> Iterator[Submitted]:
    """Submit a signed manifest for a run of ``qasm``, then run the body: ``with run_manifest(...) as m:``.

    The manifest is ledgered before the body runs, so a run that crashes is still on record.
    """
    yield _submit(client, key, tenant=tenant, qasm=qasm, shots=shots, seed=seed, crypto_mode=crypto_mode,
                  suite=suite, **fields)
