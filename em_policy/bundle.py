"""A trained policy as one deterministic byte string (the *bundle*): what MLflow logs, the registry
signs and ledgers, and the service loads.

A zip with fixed timestamps and sorted entries: ``policy.json`` (structure, ranges, history,
metadata), one ``.npy`` per array (no pickle anywhere: a bundle from the object store is data, not
code) and, for an XGBoost ranker, the booster's own JSON. Equal models give equal bytes, so equal
training gives an equal digest.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np

from em_policy.features import History
from em_policy.policy import Confidence, PolicyModel, Ranker, Regressor
from sdk.errors import QaiError

FORMAT = "qai.em-policy.bundle.v1"
_EPOCH = (1980, 1, 1, 0, 0, 0)
MAX_BUNDLE_BYTES = 256 * 1024 * 1024


def _npy(array: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    write = np.lib.format.write_array
    # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
    write(buf, np.asarray(array, order="C"), allow_pickle=False)  # type: ignore[no-untyped-call]
    return buf.getvalue()


def _read_npy(data: bytes) -> np.ndarray[Any, Any]:
    return np.asarray(np.lib.format.read_array(io.BytesIO(data), allow_pickle=False))  # type: ignore[no-untyped-call]


def dumps(model: PolicyModel) -> bytes:
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    files: dict[str, bytes] = {}
    if model.ranker.kind == "rf":
        arrays.update(model.ranker.model.to_arrays("ranker"))
    else:
        assert model.ranker.source is not None
        files["ranker.xgb.json"] = model.ranker.source
    arrays.update(model.mlqem.to_arrays("mlqem"))
    reg = model.regressor
    arrays.update({"reg.x_mean": reg.x_mean, "reg.x_std": reg.x_std, "reg.y_mean": reg.y_mean, "reg.y_std": reg.y_std})
    for k, member in enumerate(reg.members):
        arrays.update(member.to_arrays(f"reg.m{k}"))
    doc = {
        "format": FORMAT, "methods": list(model.methods), "ranker": {"kind": model.ranker.kind,
                                                                     "classes": list(model.ranker.classes)},
        "regressor": {"methods": list(reg.methods), "members": len(reg.members)},
        "confidence": {"coef": list(model.confidence.coef), "intercept": model.confidence.intercept,
                       "mean": list(model.confidence.mean), "std": list(model.confidence.std)},
        "mlqem_features": list(model.mlqem_features), "history": model.history.to_json(),
        "ranges": {k: list(v) for k, v in sorted(model.ranges.items())}, "metadata": model.metadata,
    }
    files["policy.json"] = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    for name, array in arrays.items():
        files[f"arrays/{name}.npy"] = _npy(array)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, files[name])
    return buf.getvalue()


def loads(data: bytes) -> PolicyModel:
    from em_policy.fastpath import CompiledForest, CompiledMLP

    if len(data) > MAX_BUNDLE_BYTES:
        raise QaiError("em_policy.bad_bundle", "the bundle is too large", status=422)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            doc = json.loads(zf.read("policy.json"))
            if doc.get("format") != FORMAT:
                raise QaiError("em_policy.bad_bundle", f"not a {FORMAT} bundle", status=422)
            arrays = {n[len("arrays/"):-len(".npy")]: _read_npy(zf.read(n))
                      for n in zf.namelist() if n.startswith("arrays/")}
            xgb_json = zf.read("ranker.xgb.json") if "ranker.xgb.json" in zf.namelist() else None
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise QaiError("em_policy.bad_bundle", f"unreadable bundle: {exc}", status=422) from None
    if doc["ranker"]["kind"] == "rf":
        ranker_model: Any = CompiledForest.from_arrays(arrays, "ranker")
    else:  # the booster's JSON is data; it is compiled to the same flat trees, never unpickled
        import xgboost as xgb

        from em_policy.fastpath import CompiledBooster

        booster = xgb.Booster()
        booster.load_model(bytearray(xgb_json or b""))
        ranker_model = CompiledBooster.from_booster(booster)
    reg = doc["regressor"]
    regressor = Regressor(tuple(reg["methods"]), arrays["reg.x_mean"], arrays["reg.x_std"], arrays["reg.y_mean"],
                          arrays["reg.y_std"],
                          [CompiledMLP.from_arrays(arrays, f"reg.m{k}") for k in range(int(reg["members"]))])
    conf = doc["confidence"]
    return PolicyModel(
        methods=tuple(doc["methods"]),
        ranker=Ranker(doc["ranker"]["kind"], tuple(doc["ranker"]["classes"]), ranker_model, xgb_json),
        regressor=regressor, confidence=Confidence(tuple(map(float, conf["coef"])), float(conf["intercept"]),
                                                   tuple(map(float, conf["mean"])), tuple(map(float, conf["std"]))),
        mlqem=CompiledForest.from_arrays(arrays, "mlqem"), mlqem_features=tuple(doc["mlqem_features"]),
        history=History.from_json(doc["history"]),
        ranges={k: (float(v[0]), float(v[1])) for k, v in doc["ranges"].items()}, metadata=doc["metadata"])
