"""The built-in filter and score plugins, and discovery of others through the entry-point group
``qai.scheduler.plugins`` (each entry point names a :class:`scheduler.engine.Plugin`).

Every filter says why it rejects, in words an operator can act on. Backend records are the
scheduler's inputs (see ``scheduler.service.gather``): the catalog entry, its latest calibration
snapshot id, its status, its expected queue wait and the EM policy's prediction for the job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from scheduler.engine import CRYPTO_RANK, Plugin
from sdk.errors import QaiError

ENTRY_POINT_GROUP = "qai.scheduler.plugins"
J = Mapping[str, Any]


def crypto_mode(job: J, backend: J, policy: J, config: J) -> str | None:
    """The backend's link must carry the job's crypto mode, or a stronger one, and at least the
    tenant's minimum."""
    need = max(CRYPTO_RANK[job["crypto_mode"]], CRYPTO_RANK.get(policy.get("min_crypto_mode") or "classical", 0))
    modes = backend["capabilities"].get("crypto_modes", [])
    if not any(CRYPTO_RANK[m] >= need for m in modes):
        wanted = next(m for m, r in CRYPTO_RANK.items() if r == need)
        return f"supports crypto modes {modes}; the job needs {wanted}"
    return None


def capability(job: J, backend: J, policy: J, config: J) -> str | None:
    caps = backend["capabilities"]
    if job["num_qubits"] > caps["num_qubits"]:
        return f"has {caps['num_qubits']} qubits; the circuit uses {job['num_qubits']}"
    if job["shots"] > caps["max_shots"]:
        return f"runs at most {caps['max_shots']} shots per circuit; the job asks {job['shots']}"
    return None


def qkd(job: J, backend: J, policy: J, config: J) -> str | None:
    """The tenant's ``qkd`` policy against the backend's QKD link (``capabilities.qkd`` and
    ``capabilities.qkd_link``, see ``harness.catalog``). ``required``: only backends with a QKD
    link. ``excluded`` (the default): no backend whose classical control channel is offered only
    over its QKD link (``qkd_link.only``); one that also offers the classical PQC channel is fine,
    the job goes over that. ``preferred``: every backend passes; ``qkd-preference`` scores the link."""
    caps = backend["capabilities"]
    mode = policy.get("qkd") or "excluded"
    if mode == "required" and not caps.get("qkd", False):
        return "has no QKD link; the tenant's policy requires one"
    if mode == "excluded" and qkd_only(caps):
        return "is reachable only over its QKD link; the tenant's policy excludes QKD"
    return None


def qkd_only(caps: J) -> bool:
    """Whether a backend is reachable only over its QKD link. Read from ``qkd_link.only`` alone,
    even where ``qkd`` says false: registration refuses that contradiction, and a record that has
    it anyway fails closed for a tenant that excludes QKD."""
    link = caps.get("qkd_link")
    return isinstance(link, Mapping) and link.get("only") is True


def _qkd_v1(job: J, backend: J, policy: J, config: J) -> str | None:
    """Version 1 of the ``qkd`` filter (``required`` only), kept so that decisions recorded under
    it replay with it (see ``Plugin.earlier``)."""
    if policy.get("qkd", "excluded") == "required" and not backend["capabilities"].get("qkd", False):
        return "has no QKD link; the tenant's policy requires one"
    return None


def allow_list(job: J, backend: J, policy: J, config: J) -> str | None:
    allowed = policy.get("allowed_backends")
    if allowed and backend["backend_id"] not in allowed:
        return "is not on the tenant's allowed backend list"
    if job.get("backend_id") and job["backend_id"] != backend["backend_id"]:
        return f"the manifest names backend {job['backend_id']}"
    return None


def status(job: J, backend: J, policy: J, config: J) -> str | None:
    if backend["status"] != "online":
        return f"is {backend['status']}"
    if not backend.get("calibration_snapshot_id"):
        return "has no calibration snapshot"
    return None


def prediction(job: J, backend: J, policy: J, config: J) -> str | None:
    """The EM policy must have a prediction for the backend (the circuit compiled for it)."""
    error = backend.get("prediction_error")
    return None if error is None else f"the EM policy could not predict for it ({error['code']}: {error['message']})"


def sla(job: J, backend: J, policy: J, config: J) -> str | None:
    """Expected queue wait plus execution time against the job's remaining time."""
    limit = job.get("deadline_seconds")
    if limit is None:
        return None
    seconds = _completion_seconds(backend)
    if seconds > limit:
        return f"would finish in about {seconds:.0f} s (queue {backend['queue_wait_seconds']:.0f} s); the SLA " \
               f"leaves {limit:.0f} s"
    return None


def _completion_seconds(backend: J) -> float:
    p = backend["prediction"]
    return float(backend["queue_wait_seconds"]) + float(p.get("estimated_seconds") or 0.0)


def v1_score(job: J, backend: J, policy: J, config: J) -> dict[str, float]:
    """SPEC-001's v1: (expected post-EM fidelity / effective cost) x availability penalty x crypto
    compatibility, with effective cost = cost per shot x shots x shot multiplier. The profile's
    ``fidelity_exponent`` (default 1, SPEC-001's ratio) raises the fidelity to a power first."""
    p = backend["prediction"]
    cost = float(backend["cost_per_shot"]) * job["shots"] * float(p["shot_multiplier"])
    fidelity = float(p["expected_fidelity"])
    # .get: decisions recorded before the knob existed replay with their own config, without it
    exponent = float(config.get("fidelity_exponent", 1.0))
    weighted = fidelity if exponent == 1.0 else fidelity ** exponent
    available = backend["availability"] >= config["availability_threshold"]
    availability = 1.0 if available else float(config["availability_penalty"])
    compatible = 1.0 if crypto_mode(job, backend, policy, config) is None else 0.0
    return {"expected_fidelity": fidelity, "effective_cost": cost,
            "fidelity_per_cost": weighted / cost if cost > 0 else weighted * 1e12,
            "availability_factor": availability, "crypto_factor": compatible}


def value_score(job: J, backend: J, policy: J, config: J) -> dict[str, float]:
    """A utility in USD instead of v1's ratio: ``fidelity_value_usd`` x expected post-EM fidelity,
    minus the effective cost, minus ``wait_cost_usd_per_second`` x the class's ``wait_weight`` x
    (queue wait + run time). The engine multiplies factors, so the utility enters as
    value / (2 x value - utility): in (0, 1] since utility <= value (fidelity <= 1), increasing
    with the utility, and unlike an exponential it never rounds two utilities far apart to the
    same 0. Availability and crypto compatibility are the same factors as v1's. Replaces
    ``v1-score`` and ``wait`` in a profile (it prices waiting itself); with ``em_coselect`` it
    also picks the EM method."""
    p = backend["prediction"]
    cost = float(backend["cost_per_shot"]) * job["shots"] * float(p["shot_multiplier"])
    value = float(config["fidelity_value_usd"])
    waiting = float(config["wait_cost_usd_per_second"]) * float(config["wait_weight"][job["priority_class"]]) \
        * _completion_seconds(backend)
    utility = value * min(1.0, float(p["expected_fidelity"])) - cost - waiting
    available = backend["availability"] >= config["availability_threshold"]
    compatible = 1.0 if crypto_mode(job, backend, policy, config) is None else 0.0
    # value > 0: tenant profiles are checked (scheduler.service.check_config)
    return {"utility_usd": utility, "value_factor": value / (2.0 * value - utility),
            "availability_factor": 1.0 if available else float(config["availability_penalty"]),
            "crypto_factor": compatible}


def wait(job: J, backend: J, policy: J, config: J) -> dict[str, float]:
    """Priority classes: time spent waiting costs critical work most and background work least."""
    seconds = _completion_seconds(backend)
    weight = float(config["wait_weight"][job["priority_class"]])
    factor = 1.0 / (1.0 + weight * seconds / float(config["wait_reference_seconds"]))
    return {"completion_seconds": seconds, "wait_factor": factor}


def qkd_preference(job: J, backend: J, policy: J, config: J) -> dict[str, float]:
    preferred = policy.get("qkd", "excluded") == "preferred" and backend["capabilities"].get("qkd", False)
    return {"qkd_factor": float(config["qkd_preferred_bonus"]) if preferred else 1.0}


BUILTIN: tuple[Plugin, ...] = (
    Plugin("crypto-mode", "1", "filter", crypto_mode),
    Plugin("tenant-allow-list", "1", "filter", allow_list),
    # 2: `excluded` (the default) rejects backends reachable only over their QKD link
    Plugin("qkd", "2", "filter", qkd, earlier=(("1", _qkd_v1),)),
    Plugin("status", "1", "filter", status),
    Plugin("capability", "1", "filter", capability),
    Plugin("prediction", "1", "filter", prediction),
    Plugin("sla", "1", "filter", sla, needs_prediction=True),
    Plugin("v1-score", "1", "score", v1_score, needs_prediction=True),
    Plugin("wait", "1", "score", wait, needs_prediction=True),
    Plugin("qkd-preference", "1", "score", qkd_preference, needs_prediction=True),
)


# Score plugins a profile may name instead of the defaults; not part of the default profile.
OPTIONAL: tuple[Plugin, ...] = (
    Plugin("value-score", "1", "score", value_score, needs_prediction=True),
)


def crypto_violations(job: J, backend: J, policy: J) -> list[str]:
    """The crypto requirements (job crypto mode and the tenant's minimum, allowed backends, QKD)
    that ``backend`` fails, checked apart from any profile: a tenant profile may leave filters out,
    and the ``qai_scheduler_crypto_violations_total`` counter (expected 0) counts what slips through."""
    found = []
    for check in (crypto_mode, allow_list, qkd):
        reason = check(job, backend, policy, {})
        if reason is not None:
            found.append(f"{check.__name__}: {reason}")
    return found


def available() -> dict[str, Plugin]:
    """Built-ins, the optional ones, and every plugin installed under the entry-point group, by name."""
    found = {p.name: p for p in (*BUILTIN, *OPTIONAL)}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        plugin = ep.load()
        if not isinstance(plugin, Plugin):
            raise QaiError("scheduler.bad_plugin", f"entry point {ep.name} is not a scheduler Plugin", status=500)
        if plugin.name in found:  # replay resolves by name: a shadowed built-in would replay as another function
            raise QaiError("scheduler.bad_plugin", f"entry point {ep.name} reuses the plugin name {plugin.name!r}",
                           status=500)
        found[plugin.name] = plugin
    return found


def resolve(names: Sequence[str] | None) -> list[Plugin]:
    """The plugins a profile names, in its order (all built-ins when it names none)."""
    if not names:
        return list(BUILTIN)
    known = available()
    missing = [n for n in names if n not in known]
    if missing:
        raise QaiError("scheduler.unknown_plugin", f"unknown scheduler plugins {missing}", status=422,
                       details={"known": sorted(known)})
    return [known[n] for n in names]
