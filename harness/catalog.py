"""The backend catalog: the devices qai can schedule on, with real calibrations and assumed commerce.

Each entry is a fake backend of ``qiskit-ibm-runtime``; its calibration (gate errors and
durations, readout errors, T1/T2) is real IBM data shipped with that package. Everything else an
entry says — vendor, region, price, availability, queue model and capabilities such as crypto modes
or QKD — is an **assumption assigned by qai** so that the scheduler has a varied field to choose
from. Two entries are presented as AWS Braket devices: they are mocks that rehost an IBM calibration
behind a Braket-like adapter, not Braket hardware. ``docs/backends.md`` lists the whole catalog.

The backend id is the fake backend's ``.name`` (``fake_sherbrooke``).
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from harness.calibration import CalibrationSnapshot, snapshot_from_backend
from sdk.errors import QaiError

CRYPTO_MODES = ("classical", "hybrid", "pqc-required")
ADAPTERS = ("ibm-like", "braket-like", "local-aer")
QUEUE_MODELS = ("exponential",)
# What every catalog device offers besides its native 2-qubit gate (rz is virtual on IBM hardware).
_COMMON_BASIS = ("delay", "id", "measure", "reset", "rz", "sx", "x")
_INFO_FIELDS = ("backend_id", "vendor", "region", "cost_per_shot", "availability", "queue", "capabilities")
_CAPABILITY_FIELDS = ("crypto_modes", "qkd", "max_shots", "basis_gates", "num_qubits", "two_qubit_gate", "adapter")
# Present exactly when qkd is true: the link's key-delivery interface (ETSI GS QKD 014).
_OPTIONAL_CAPABILITY_FIELDS = ("qkd_link",)
QKD_LINK_FIELDS = ("kme_url", "sae_id", "only")
# An SAE id goes into the KME's URL path (/api/v1/keys/{SAE_ID}/...): a path-safe charset means it
# is never re-encoded and cannot reach another path.
SAE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True)
class BackendInfo:
    """What the scheduler knows about a backend besides its calibration.

    ``queue`` is a queue model: ``{"model": "exponential", "mean_wait_seconds": s}`` (the wait before
    a job starts is exponentially distributed with that mean). ``capabilities`` holds
    ``crypto_modes`` (which manifest crypto modes the backend's link supports), ``qkd`` (a QKD link
    is available), ``max_shots``, ``basis_gates``, ``num_qubits``, ``two_qubit_gate`` and
    ``adapter`` (``ibm-like``, ``braket-like`` or ``local-aer``: how jobs are submitted). When
    ``qkd`` is true, and only then, ``qkd_link`` describes the link's key delivery in the manner of
    ETSI GS QKD 014: ``{"kme_url", "sae_id", "only"}``, where ``kme_url`` is the key management
    entity qai (the master SAE) asks for keys, ``sae_id`` the backend's SAE id (the slave SAE of
    those requests), and ``only`` true when the backend's classical control channel is offered only
    over the QKD-protected link (a QKD-only backend; see ``docs/qkd-hardening.md``).
    """

    backend_id: str
    vendor: str
    region: str
    cost_per_shot: float  # USD
    availability: float  # fraction of time the backend accepts jobs, 0..1
    queue: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, Any] = field(default_factory=dict)

    @property
    def num_qubits(self) -> int:
        return int(self.capabilities["num_qubits"])

    @property
    def two_qubit_gate(self) -> str:
        return str(self.capabilities["two_qubit_gate"])

    @property
    def crypto_modes(self) -> list[str]:
        return list(self.capabilities["crypto_modes"])

    def to_json(self) -> dict[str, Any]:
        return {"backend_id": self.backend_id, "vendor": self.vendor, "region": self.region,
                "cost_per_shot": self.cost_per_shot, "availability": self.availability,
                "queue": dict(self.queue), "capabilities": dict(self.capabilities)}

    @classmethod
    def from_json(cls, data: Any, snap: CalibrationSnapshot | None = None) -> BackendInfo:
        """Validate a backend description (``qai backends import --backend-info`` or the ``backend``
        object of a calibration file). With ``snap``, a missing ``backend_id``, ``num_qubits``,
        ``basis_gates`` or ``two_qubit_gate`` is taken from the calibration, and one that is given
        must agree with it."""
        if not isinstance(data, dict):
            raise _bad("a backend description must be a JSON object")
        unknown = sorted(set(data) - set(_INFO_FIELDS))
        if unknown:
            raise _bad(f"unknown fields {unknown}", unknown=unknown)
        caps = data.get("capabilities")
        if not isinstance(caps, dict):
            raise _bad("capabilities must be an object")
        unknown = sorted(set(caps) - set(_CAPABILITY_FIELDS) - set(_OPTIONAL_CAPABILITY_FIELDS))
        if unknown:
            raise _bad(f"unknown capabilities {unknown}", unknown=unknown)
        caps = dict(caps)
        backend_id = data.get("backend_id")
        if snap is not None:
            derived = {"num_qubits": snap.num_qubits, "basis_gates": list(snap.basis_gates),
                       "two_qubit_gate": snap.two_qubit_gate}
            if backend_id is None:
                backend_id = snap.backend_id
            for key, value in derived.items():
                caps.setdefault(key, value)
        info = cls(backend_id=_str(backend_id, "backend_id"), vendor=_str(data.get("vendor"), "vendor"),
                   region=_str(data.get("region"), "region"),
                   cost_per_shot=_number(data.get("cost_per_shot"), "cost_per_shot"),
                   availability=_number(data.get("availability"), "availability"),
                   queue=_queue(data.get("queue")), capabilities=_capabilities(caps))
        if not 0.0 <= info.availability <= 1.0:
            raise _bad("availability must lie in [0, 1]")
        if info.cost_per_shot < 0:
            raise _bad("cost_per_shot must not be negative")
        if snap is not None:
            check_matches(info, snap)
        return info


def check_matches(info: BackendInfo, snap: CalibrationSnapshot) -> None:
    """A calibration belongs to a backend only if it names it and has its qubit count."""
    if info.backend_id != snap.backend_id:
        raise QaiError("calibration.backend_mismatch",
                       f"the calibration is for {snap.backend_id}, the backend description for {info.backend_id}",
                       status=409, details={"calibration": snap.backend_id, "backend": info.backend_id})
    if info.num_qubits != snap.num_qubits:
        raise QaiError("calibration.backend_mismatch",
                       f"{snap.backend_id} has {info.num_qubits} qubits; the calibration has {snap.num_qubits}",
                       status=409, details={"backend_qubits": info.num_qubits, "calibration_qubits": snap.num_qubits})
    if info.two_qubit_gate != snap.two_qubit_gate:
        raise QaiError("calibration.backend_mismatch",
                       f"{snap.backend_id}'s 2-qubit gate is {info.two_qubit_gate}; the calibration's is "
                       f"{snap.two_qubit_gate}", status=409)


def _bad(message: str, **details: Any) -> QaiError:
    return QaiError("backends.bad_info", message, status=422, details=details)


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 128:
        raise _bad(f"{name} must be a non-empty string of at most 128 characters")
    return value


def _number(value: Any, name: str) -> float:
    # bool is an int to Python; a JSON true is no price
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"{name} must be a finite number")
    return float(value)


def _queue(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("model") not in QUEUE_MODELS:
        raise _bad(f"queue must be an object whose model is one of {list(QUEUE_MODELS)}")
    if _number(value.get("mean_wait_seconds"), "queue.mean_wait_seconds") < 0:
        raise _bad("queue.mean_wait_seconds must not be negative")
    return dict(value)


def _capabilities(caps: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in _CAPABILITY_FIELDS if k not in caps]
    if missing:
        raise _bad(f"capabilities lack {missing}", missing=missing)
    modes = caps["crypto_modes"]
    if not isinstance(modes, list) or not modes or not set(modes) <= set(CRYPTO_MODES) or len(set(modes)) != len(modes):
        raise _bad(f"capabilities.crypto_modes must be a non-empty subset of {list(CRYPTO_MODES)}")
    if not isinstance(caps["qkd"], bool):
        raise _bad("capabilities.qkd must be true or false")
    caps = _qkd_link(caps)
    for key in ("max_shots", "num_qubits"):
        if isinstance(caps[key], bool) or not isinstance(caps[key], int) or caps[key] <= 0:
            raise _bad(f"capabilities.{key} must be a positive integer")
    gates = caps["basis_gates"]
    if not isinstance(gates, list) or not all(isinstance(g, str) for g in gates):
        raise _bad("capabilities.basis_gates must be a list of gate names")
    if not isinstance(caps["two_qubit_gate"], str) or caps["two_qubit_gate"] not in gates:
        raise _bad("capabilities.two_qubit_gate must be one of the basis gates")
    if caps["adapter"] not in ADAPTERS:
        raise _bad(f"capabilities.adapter must be one of {list(ADAPTERS)}")
    # Crypto modes in their canonical order, so that equal capabilities compare and serialise equally.
    return {**caps, "crypto_modes": [m for m in CRYPTO_MODES if m in modes], "basis_gates": sorted(gates)}


def _qkd_link(caps: dict[str, Any]) -> dict[str, Any]:
    """``qkd_link`` is there exactly when ``qkd`` is true, with its three fields (``field`` in the
    error's details names the one at fault)."""
    link = caps.get("qkd_link")
    if not caps["qkd"]:
        if "qkd_link" in caps:  # a link the flag denies: which one is true is anyone's guess
            raise _bad("capabilities.qkd_link is only for a backend whose capabilities.qkd is true",
                       field="capabilities.qkd_link")
        return caps
    if not isinstance(link, dict):
        raise _bad("capabilities.qkd is true: capabilities.qkd_link must describe the link "
                   '({"kme_url", "sae_id", "only"})', field="capabilities.qkd_link")
    wrong = sorted(set(link) ^ set(QKD_LINK_FIELDS))
    if wrong:
        raise _bad(f"capabilities.qkd_link must have exactly {list(QKD_LINK_FIELDS)}; it differs on {wrong}",
                   field="capabilities.qkd_link")
    _kme_url(link["kme_url"])
    if not isinstance(link["sae_id"], str) or not SAE_ID.fullmatch(link["sae_id"]):
        raise _bad("capabilities.qkd_link.sae_id must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':' "
                   "and '-', starting with a letter or digit", field="capabilities.qkd_link.sae_id")
    if not isinstance(link["only"], bool):
        raise _bad("capabilities.qkd_link.only must be true or false", field="capabilities.qkd_link.only")
    return {**caps, "qkd_link": {k: link[k] for k in QKD_LINK_FIELDS}}


def _kme_url(url: Any) -> None:
    """An https URL (ETSI GS QKD 014 delivers keys over TLS). Plain http only to a loopback host, for
    a local mock KME: key material must not cross a network in clear. No query, fragment or
    credentials: the client appends the API path, and a secret in a URL ends up in every log."""
    where = "capabilities.qkd_link.kme_url"
    if not isinstance(url, str) or not url or len(url) > 512:
        raise _bad("capabilities.qkd_link.kme_url must be a URL of at most 512 characters", field=where)
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises on a port that is not a number
    except ValueError as exc:
        raise _bad(f"capabilities.qkd_link.kme_url is not a URL: {exc}", field=where) from exc
    if parts.scheme not in ("https", "http") or not host or parts.query or parts.fragment or parts.username:
        raise _bad("capabilities.qkd_link.kme_url must be an https URL with a host and no query, fragment "
                   "or credentials", field=where)
    if parts.scheme == "http" and not _loopback(host):
        raise _bad("capabilities.qkd_link.kme_url may use plain http only for a loopback host (a local mock "
                   "KME); a KME elsewhere is reached over https", field=where)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class _Entry:
    fake: str  # class name in qiskit_ibm_runtime.fake_provider
    backend_id: str
    num_qubits: int
    two_qubit_gate: str
    vendor: str
    region: str
    cost_per_shot: float
    availability: float
    mean_wait_seconds: float
    crypto_modes: tuple[str, ...]
    qkd: bool
    max_shots: int
    adapter: str


_ALL = CRYPTO_MODES
_NO_PQC = ("classical", "hybrid")

# The physical columns (qubits, 2-qubit gate) restate the fake backend and are
# checked against its calibration on import; the rest are qai's assumptions (see the module docstring).
# Prices are in the range of public per-shot list prices; bigger, newer devices cost more, a busy
# device has a long queue and lower availability, and only some links offer pqc-required or QKD.
_ENTRIES: tuple[_Entry, ...] = (
    _Entry("FakeManilaV2", "fake_manila", 5, "cx", "qai", "local", 0.0, 1.0, 1.0,
           _ALL, False, 100_000, "local-aer"),
    _Entry("FakeNairobiV2", "fake_nairobi", 7, "cx", "ibm", "us-east", 0.00012, 0.97, 60.0,
           _NO_PQC, False, 100_000, "ibm-like"),
    _Entry("FakeGuadalupeV2", "fake_guadalupe", 16, "cx", "ibm", "eu-de", 0.00015, 0.93, 240.0,
           _ALL, False, 100_000, "ibm-like"),
    _Entry("FakeKolkataV2", "fake_kolkata", 27, "cx", "aws-braket", "us-west-2", 0.00035, 0.90, 600.0,
           _NO_PQC, False, 50_000, "braket-like"),
    _Entry("FakeSherbrooke", "fake_sherbrooke", 127, "ecr", "ibm", "us-east", 0.00025, 0.95, 900.0,
           _ALL, False, 100_000, "ibm-like"),
    _Entry("FakeBrisbane", "fake_brisbane", 127, "ecr", "ibm", "eu-de", 0.00022, 0.85, 1800.0,
           _NO_PQC, False, 100_000, "ibm-like"),
    _Entry("FakeKyiv", "fake_kyiv", 127, "ecr", "aws-braket", "eu-west-2", 0.00045, 0.92, 300.0,
           _ALL, True, 50_000, "braket-like"),
    _Entry("FakeTorino", "fake_torino", 133, "cz", "ibm", "eu-de", 0.00030, 0.96, 1200.0,
           _ALL, True, 100_000, "ibm-like"),
    _Entry("FakeFez", "fake_fez", 156, "cz", "ibm", "us-east", 0.00032, 0.80, 3600.0,
           _NO_PQC, False, 100_000, "ibm-like"),
)
_BY_ID = {e.backend_id: e for e in _ENTRIES}


def _info(e: _Entry) -> BackendInfo:
    caps: dict[str, Any] = {"crypto_modes": list(e.crypto_modes), "qkd": e.qkd, "max_shots": e.max_shots,
                            "basis_gates": sorted((*_COMMON_BASIS, e.two_qubit_gate)), "num_qubits": e.num_qubits,
                            "two_qubit_gate": e.two_qubit_gate, "adapter": e.adapter}
    if e.qkd:
        # Assumed like the rest of the commerce: the .invalid host (RFC 2606) names no real KME, so a
        # link check reports it unreachable. Both links also carry the classical PQC channel (only:
        # false), so a tenant that excludes QKD, the default, can still use these backends.
        caps["qkd_link"] = {"kme_url": f"https://kme.{e.region}.qai.invalid", "sae_id": f"qai-{e.backend_id}",
                            "only": False}
    return BackendInfo(
        backend_id=e.backend_id, vendor=e.vendor, region=e.region, cost_per_shot=e.cost_per_shot,
        availability=e.availability, queue={"model": "exponential", "mean_wait_seconds": e.mean_wait_seconds},
        capabilities=caps,
    )


def catalog() -> list[BackendInfo]:
    """Every catalog backend, by qubit count then id. Cheap: no fake backend is loaded."""
    return [_info(e) for e in sorted(_ENTRIES, key=lambda e: (e.num_qubits, e.backend_id))]


def backend_info(backend_id: str) -> BackendInfo:
    return _info(_entry(backend_id))


def _entry(backend_id: str) -> _Entry:
    entry = _BY_ID.get(backend_id)
    if entry is None:
        raise QaiError("backends.not_found", f"{backend_id!r} is not in the catalog", status=404,
                       details={"known": sorted(_BY_ID)})
    return entry


@cache
def catalog_snapshot(backend_id: str) -> CalibrationSnapshot:
    """The real calibration a catalog backend ships with. Cached: loading a fake backend parses its
    JSON files (a tenth to half a second for the 127+ qubit devices)."""
    entry = _entry(backend_id)
    from qiskit_ibm_runtime import fake_provider

    snap = snapshot_from_backend(getattr(fake_provider, entry.fake)())
    check_matches(_info(entry), snap)
    return snap
