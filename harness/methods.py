"""Error-mitigation methods the harness measures, named once: ``unmitigated``, ``readout``,
``zne-<factory>-<folding>`` and ``ml-qem``.

ZNE's extrapolation is Mitiq's (``mitiq.zne.inference``): the harness runs every scale factor
once and hands the measured values to each factory's static ``extrapolate``, so several
factories share one set of noise-scaled executions, exactly as their costs would on a device.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk.errors import QaiError

FACTORIES = ("linear", "poly2", "richardson", "exp")
# Richardson and poly2 both interpolate a quadratic through three points, so poly2 gets five: it is
# then a least-squares fit, a method of its own rather than a second name for Richardson.
DEFAULT_SCALE_FACTORS: dict[str, tuple[float, ...]] = {
    "linear": (1.0, 2.0, 3.0), "poly2": (1.0, 1.5, 2.0, 2.5, 3.0), "richardson": (1.0, 2.0, 3.0),
    "exp": (1.0, 2.0, 3.0)}


@dataclass(frozen=True)
class Method:
    kind: str  # unmitigated | readout | zne | ml-qem
    factory: str | None = None
    folding: str | None = None
    scale_factors: tuple[float, ...] = ()
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str | None = field(default=None, compare=False, hash=False)  # ml-qem: the policy bundle file

    @property
    def name(self) -> str:
        if self.kind == "zne":
            return f"zne-{self.factory}-{self.folding}"
        return self.kind

    def parameters(self) -> dict[str, Any]:
        if self.kind == "zne":
            return {"factory": self.factory, "folding": self.folding, "scale_factors": list(self.scale_factors),
                    **self.options}
        return dict(self.options)


def parse_method(text: str) -> Method:
    """``unmitigated``, ``readout``, ``zne-<linear|poly2|richardson|exp>-<global|gate>[@1,2,3]``."""
    name, _, scales = text.strip().partition("@")
    if name in ("unmitigated", "readout") and not scales:
        return Method(name)
    if name == "ml-qem" and not scales:
        return Method("ml-qem")  # unbound: ``bind_model`` gives it the trained model it needs
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "zne" and parts[1] in FACTORIES and parts[2] in ("global", "gate"):
        try:
            factors = tuple(float(s) for s in scales.split(",")) if scales else DEFAULT_SCALE_FACTORS[parts[1]]
        except ValueError:
            raise QaiError("harness.bad_method", f"bad scale factors in {text!r}", status=422) from None
        _check_factors(parts[1], factors)
        return Method("zne", parts[1], parts[2], factors)
    raise QaiError("harness.bad_method", f"unknown method {text!r}", status=422,
                   details={"methods": ["unmitigated", "readout",
                                        *(f"zne-{f}-{g}" for f in FACTORIES for g in ("global", "gate"))]})


def bind_model(method: Method, bundle: str | None, version: str | None) -> Method:
    """``ml-qem`` with the EM policy bundle it applies (a file; its sha256 and version go into the
    rows' parameters, so a row says which model mitigated it)."""
    if method.kind != "ml-qem":
        return method
    if not bundle:
        raise QaiError("harness.method_unavailable", "ml-qem needs a trained model: train one (qai policy train) "
                       "or pass a bundle (--mlqem-bundle)", status=422, details={"method": method.name})
    try:
        digest = hashlib.sha256(Path(bundle).read_bytes()).hexdigest()
    except OSError as exc:
        raise QaiError("harness.method_unavailable", f"cannot read the ml-qem bundle {bundle}: {exc}",
                       status=422) from None
    return Method("ml-qem", options={"model_version": version or f"file:{Path(bundle).name}", "bundle_sha256": digest},
                  source=str(bundle))


def _check_factors(factory: str, factors: Sequence[float]) -> None:
    needed = {"linear": 2, "poly2": 3, "richardson": 2, "exp": 2}[factory]
    if any(round(f, 3) != f for f in factors):
        raise QaiError("harness.bad_method", f"scale factors take at most 3 decimals, got {list(factors)}",
                       status=422)
    if (len(factors) < needed or len(set(factors)) != len(factors) or factors[0] != 1.0
            or any(not b > a for a, b in itertools.pairwise(factors))):
        raise QaiError("harness.bad_method",
                       f"zne-{factory} needs ≥ {needed} distinct increasing scale factors starting at 1, got "
                       f"{list(factors)}", status=422)


def extrapolate(method: Method, values: Sequence[float], *, asymptote: float = 0.0) -> float:
    """The zero-noise value from the values measured at ``method.scale_factors`` (via Mitiq).

    The exponential factory's infinite-noise limit is the observable's maximally mixed value
    Tr(O)/2ⁿ (``asymptote``): that is where depolarizing noise drives every expectation value,
    and fixing it turns the fit into a stable linear one on log|y − asymptote|."""
    from mitiq.zne.inference import ExpFactory, LinearFactory, PolyFactory, RichardsonFactory

    factors = list(method.scale_factors)
    ys = [float(v) for v in values]
    try:
        if method.factory == "linear":
            return float(LinearFactory.extrapolate(factors, ys))
        if method.factory == "poly2":
            return float(PolyFactory.extrapolate(factors, ys, order=2))
        if method.factory == "richardson":
            return float(RichardsonFactory.extrapolate(factors, ys))
        if method.factory == "exp":
            return float(ExpFactory.extrapolate(factors, ys, asymptote=float(asymptote)))
    except Exception as exc:  # mitiq raises ExtrapolationError/ValueError on a failed fit
        raise QaiError("zne.extrapolation_failed", f"{method.name}: {exc}", status=422) from exc
    raise QaiError("harness.bad_method", f"unknown factory {method.factory!r}", status=422)


def mitiq_factory(method: Method, *, asymptote: float = 0.0) -> Any:
    """The Mitiq factory object equal to ``extrapolate(method, ...)`` (for ``execute_with_zne``)."""
    from mitiq.zne.inference import ExpFactory, LinearFactory, PolyFactory, RichardsonFactory

    factors = list(method.scale_factors)
    return {"linear": lambda: LinearFactory(factors), "poly2": lambda: PolyFactory(factors, order=2),
            "richardson": lambda: RichardsonFactory(factors),
            "exp": lambda: ExpFactory(factors, asymptote=float(asymptote))}[str(method.factory)]()


def sensitivities(method: Method, values: Sequence[float], *, asymptote: float = 0.0) -> list[float]:
    """∂(zero-noise value)/∂(value at each scale factor). Exact for the linear estimators
    (linear, poly2, Richardson: the extrapolation is a fixed linear combination); the delta-method
    gradient, by central differences, for the exponential fit."""
    step = 1e-6 * max(1.0, max(abs(v) for v in values))
    out = []
    for i in range(len(values)):
        up = [v + (step if j == i else 0.0) for j, v in enumerate(values)]
        down = [v - (step if j == i else 0.0) for j, v in enumerate(values)]
        out.append((extrapolate(method, up, asymptote=asymptote) - extrapolate(method, down, asymptote=asymptote))
                   / (2 * step))
    return out
