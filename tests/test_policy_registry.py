"""The EM policy's model registry on real MLflow (SQLite, one tracking directory per test), the real
KMS (SoftHSM) and the ledger, on PostgreSQL+S3 (moto's server) and SQLite+local store."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from em_policy.registry import (
    MODEL_KEY,
    MODEL_NAME,
    MODEL_PAYLOAD_TYPE,
    ModelVersion,
    artifact_location,
    list_versions,
    load_bundle,
    points_at,
    promote,
    register,
    resolve,
    tracking_uri,
)
from orchestrator.auth import Principal
from orchestrator.objects import LocalObjectStore, S3ObjectStore
from orchestrator.services import Services
from orchestrator.settings import Settings
from sdk.audit import check_entry
from sdk.canonical import canonical_json
from sdk.dsse import parse_envelope, verify_envelope
from sdk.errors import QaiError
from sdk.ledger import SYSTEM_TENANT, IndexedEntry
from tests.test_jobs import svc  # noqa: F401  (the jobs tests' services on PostgreSQL+S3 and SQLite+local)

BUNDLE_1 = b"PK\x03\x04 policy bundle one \x00\xff" * 40
BUNDLE_2 = b"PK\x03\x04 policy bundle two \x00\xfe" * 40
DATASET = "ab" * 32
PARAMS: dict[str, Any] = {"estimator": "gbt", "depth": 3, "features": ["depth", "t1"]}
METRICS = {"mae": 0.125, "coverage": 0.9}
METADATA: dict[str, Any] = {"feature_names": ["depth", "t1", "readout_error"], "seed": 7, "format": "qai-em/1"}


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow database: each test copies it instead of migrating its own."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    uri = f"sqlite:///{db}"
    with warnings.catch_warnings():  # MLflow's own SQLAlchemy mapping (see em_policy.registry._quiet_mlflow)
        warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy", category=DeprecationWarning)
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()
    return db


@pytest.fixture
def settings(settings: Settings, tmp_path: Path, mlflow_template: Path) -> Settings:
    """The shared settings plus this test's own MLflow tracking directory under ``tmp_path``."""
    db = tmp_path / "mlflow-tracking" / "mlflow.db"
    db.parent.mkdir()
    with sqlite3.connect(mlflow_template) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    return settings.model_copy(update={"mlflow_tracking_uri": f"sqlite:///{db}"})


@pytest.fixture
def mlflow_client(svc: Services) -> Iterator[Any]:  # noqa: F811
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(svc.settings)
    yield MlflowClient(tracking_uri=uri, registry_uri=uri)


def _register(svc: Services, bundle: bytes, **overrides: Any) -> ModelVersion:  # noqa: F811
    args: dict[str, Any] = {"params": PARAMS, "metrics": METRICS, "dataset_sha256": DATASET, "metadata": METADATA}
    return register(svc, bundle, **(args | overrides))


def _statement(svc: Services, index: int) -> tuple[IndexedEntry, dict[str, Any]]:  # noqa: F811
    """Ledger entry ``index`` and its statement, after checking it as the auditor does."""
    entry = svc.ledger.entry(index)
    obj = svc.ledger.object_bytes(entry.path)
    key = svc.kms.public_key(MODEL_KEY)
    assert key.tenant == SYSTEM_TENANT
    assert check_entry(entry, obj, {MODEL_KEY: key}) is None
    envelope = parse_envelope(obj)
    assert envelope.payload_type == MODEL_PAYLOAD_TYPE
    verify_envelope(envelope, key, at=entry.time)
    return entry, json.loads(envelope.payload_bytes())


def _overwrite_stored(svc: Services, key: str, data: bytes) -> None:  # noqa: F811
    """Replace an object behind the store's back: in its directory, or straight in its bucket."""
    store = svc.objects
    if isinstance(store, LocalObjectStore):
        (store.root / key).write_bytes(data)
    else:
        assert isinstance(store, S3ObjectStore)
        store.client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=data)


def _raises(code: str, status: int, fn: Any, *args: Any, **kwargs: Any) -> QaiError:
    with pytest.raises(QaiError) as e:
        fn(*args, **kwargs)
    assert (e.value.code, e.value.status) == (code, status), e.value
    return e.value


def test_register_list_promote_resolve_and_load(svc: Services, mlflow_client: Any, tmp_path: Path) -> None:  # noqa: F811
    start = svc.ledger.size()
    v1 = _register(svc, BUNDLE_1)
    v2 = _register(svc, BUNDLE_2, metrics={"mae": 0.0625, "coverage": 0.95})
    assert (v1.name, v1.version, v2.version) == (MODEL_NAME, 1, 2)
    assert v1.bundle_path == f"em-policy/models/{v1.sha256}.zip" and v1.sha256 != v2.sha256
    assert (v1.ledger_index, v2.ledger_index) == (start, start + 1) and svc.ledger.size() == start + 2
    assert v1.aliases == () and v1.metrics == METRICS and v1.dataset_sha256 == DATASET
    assert svc.objects.get(v1.bundle_path) == BUNDLE_1 and svc.objects.get(v2.bundle_path) == BUNDLE_2
    assert list_versions(svc) == [v1, v2]

    # the ledger holds each version's signed statement, verifiable with the KMS public key alone
    entry, statement = _statement(svc, v1.ledger_index)
    assert (entry.type, entry.tenant, entry.path) == ("model-version", SYSTEM_TENANT, v1.envelope_path)
    assert statement == {
        "type": "qai.em-policy.model-version.v1", "name": MODEL_NAME, "version": 1, "sha256": v1.sha256,
        "bytes": len(BUNDLE_1), "dataset_sha256": DATASET, "mlflow_run_id": v1.run_id, "metrics": METRICS,
        "metadata": METADATA, "created_at": v1.created_at}
    assert _statement(svc, v2.ledger_index)[1]["metrics"] == {"mae": 0.0625, "coverage": 0.95}

    # MLflow: the run's params, metrics, dataset tag and artifacts, kept in this test's directory
    run = mlflow_client.get_run(v1.run_id)
    assert run.data.params == {"estimator": "gbt", "depth": "3", "features": '["depth", "t1"]'}
    assert run.data.metrics == METRICS and run.data.tags["dataset_sha256"] == DATASET
    assert run.info.status == "FINISHED"
    artifacts = tmp_path / "mlflow-tracking" / "artifacts"
    assert artifact_location(svc.settings) == artifacts.as_uri()
    assert run.info.artifact_uri.startswith(artifacts.as_uri())
    model_dir = Path(mlflow_client.download_artifacts(v1.run_id, "model", str(tmp_path / "dl")))
    assert (model_dir / "bundle.zip").read_bytes() == BUNDLE_1
    assert (model_dir / "metadata.json").read_bytes() == canonical_json(METADATA)
    registered = mlflow_client.get_model_version(MODEL_NAME, "1")
    assert registered.run_id == v1.run_id and registered.source == f"{run.info.artifact_uri}/model"

    # no champion yet
    _raises("em_policy.model_unavailable", 503, resolve, svc)

    p1 = promote(svc, 1)
    assert p1 == dataclasses.replace(v1, aliases=("champion",))
    assert resolve(svc) == p1 == resolve(svc, "champion") == resolve(svc, "1")
    assert resolve(svc, "2") == v2
    entry, statement = _statement(svc, start + 2)
    assert entry.type == "model-version" and entry.path != v1.envelope_path
    assert statement["type"] == "qai.em-policy.promotion.v1"
    assert {k: statement[k] for k in ("name", "alias", "version", "sha256", "model_ledger_index",
                                      "previous_version")} == {
        "name": MODEL_NAME, "alias": "champion", "version": 1, "sha256": v1.sha256,
        "model_ledger_index": v1.ledger_index, "previous_version": None}

    assert points_at(svc, 1) and not points_at(svc, 2) and points_at(svc, 2, "2") and not points_at(svc, 1, "nobody")
    p2 = promote(svc, 2)
    assert p2.version == 2 and p2.aliases == ("champion",) and resolve(svc) == p2
    assert points_at(svc, 2) and not points_at(svc, 1)
    assert _statement(svc, start + 3)[1]["previous_version"] == 1
    assert list_versions(svc) == [v1, p2]
    size = svc.ledger.size()
    assert promote(svc, 2) == p2 and svc.ledger.size() == size  # already the champion: nothing to record

    assert load_bundle(svc, resolve(svc)) == BUNDLE_2
    assert load_bundle(svc, resolve(svc, "1")) == BUNDLE_1

    # the same bundle again is a new version sharing the content-addressed object
    v3 = _register(svc, BUNDLE_1)
    assert v3.version == 3 and v3.bundle_path == v1.bundle_path and v3.envelope_path != v1.envelope_path
    challenger = promote(svc, 3, alias="challenger")
    assert resolve(svc, "challenger") == challenger and challenger.aliases == ("challenger",)
    assert [(m.version, m.aliases) for m in list_versions(svc)] == [(1, ()), (2, ("champion",)), (3, ("challenger",))]
    assert load_bundle(svc, challenger) == BUNDLE_1


def test_tampering_is_detected(svc: Services) -> None:  # noqa: F811
    v1 = _register(svc, BUNDLE_1)
    v2 = _register(svc, BUNDLE_2)
    assert load_bundle(svc, v1) == BUNDLE_1

    # the registry (MLflow tags) cannot point a version at another bundle or another ledger entry
    err = _raises("em_policy.model_tampered", 409, load_bundle, svc,
                  dataclasses.replace(v1, sha256=v2.sha256, bundle_path=v2.bundle_path))
    assert err.details["reason"] == "statement_mismatch"
    err = _raises("em_policy.model_tampered", 409, load_bundle, svc,
                  dataclasses.replace(v1, ledger_index=v2.ledger_index))
    assert err.details["reason"] == "wrong_ledger_entry"
    err = _raises("em_policy.model_tampered", 409, load_bundle, svc,
                  dataclasses.replace(v1, envelope_path=v2.envelope_path, ledger_index=v2.ledger_index))
    assert err.details["reason"] == "statement_mismatch"

    # the stored bundle's bytes, swapped in the backing directory or bucket
    size = svc.ledger.size()
    _overwrite_stored(svc, v1.bundle_path, BUNDLE_1[:-1] + b"\x00")
    err = _raises("em_policy.model_tampered", 409, load_bundle, svc, v1)
    assert err.details == {"name": MODEL_NAME, "version": 1, "reason": "bundle_mismatch"}
    _raises("em_policy.model_tampered", 409, promote, svc, 1)  # never promoted, nothing ledgered
    _raises("em_policy.model_unavailable", 503, resolve, svc, "champion")
    # registering those bytes again finds other bytes under their content address: refused up front
    _raises("em_policy.model_tampered", 409, _register, svc, BUNDLE_1)
    assert [m.version for m in list_versions(svc)] == [1, 2] and svc.ledger.size() == size
    assert load_bundle(svc, v2) == BUNDLE_2

    # the signed statement itself, edited in place: it no longer matches its ledger entry
    envelope = json.loads(svc.objects.get(v2.envelope_path))
    forged = json.loads(parse_envelope(svc.objects.get(v2.envelope_path)).payload_bytes()) | {"sha256": v1.sha256}
    envelope["payload"] = base64.b64encode(canonical_json(forged)).decode()
    _overwrite_stored(svc, v2.envelope_path, canonical_json(envelope))
    err = _raises("em_policy.model_tampered", 409, load_bundle, svc, v2)
    assert err.details["reason"] == "envelope_mismatch"


def test_empty_registry_and_unknown_versions(svc: Services) -> None:  # noqa: F811
    start = svc.ledger.size()
    assert list_versions(svc) == []
    for ref in ("champion", "1"):
        err = _raises("em_policy.model_unavailable", 503, resolve, svc, ref)
        assert err.details == {"name": MODEL_NAME, "ref": ref}
    _raises("em_policy.unknown_model_version", 404, promote, svc, 1)

    v1 = _register(svc, BUNDLE_1)
    for version in (0, 2, 99):
        err = _raises("em_policy.unknown_model_version", 404, promote, svc, version)
        assert err.details == {"name": MODEL_NAME, "version": version}
    for ref in ("champion", "2", "staging"):
        _raises("em_policy.model_unavailable", 503, resolve, svc, ref)
    for alias in ("v1", "latest", "7", "bad alias"):
        _raises("em_policy.bad_model", 422, promote, svc, 1, alias=alias)
    _raises("em_policy.bad_model", 422, resolve, svc, "champion", "no spaces allowed")
    assert svc.ledger.size() == start + 1 and list_versions(svc) == [v1]


def test_failed_registration_ledgers_nothing(svc: Services, mlflow_client: Any) -> None:  # noqa: F811
    start = svc.ledger.size()
    # refused before anything is written
    _raises("em_policy.bad_model", 422, _register, svc, BUNDLE_1, metrics={"mae": math.nan})
    _raises("em_policy.bad_model", 422, _register, svc, BUNDLE_1, dataset_sha256="not-a-digest")
    _raises("json.not_canonicalizable", 400, _register, svc, BUNDLE_1, metadata={"x": math.inf})

    # a param MLflow would silently truncate
    _raises("em_policy.bad_model", 422, _register, svc, BUNDLE_1, params={"blob": "x" * 6001})
    # MLflow refuses the run (a param name it does not allow): no version, no ledger entry
    err = _raises("em_policy.registry_rejected", 422, _register, svc, BUNDLE_1, params={"bad name!": 1})
    assert err.details["mlflow_code"] == "INVALID_PARAMETER_VALUE"
    assert svc.ledger.size() == start and list_versions(svc) == []
    runs = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("qai-em-policy").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]

    # signing fails after MLflow registered the version: the version is withdrawn again
    v1 = _register(svc, BUNDLE_1)
    svc.kms.revoke(MODEL_KEY, 1, reason="test", principal=Principal.system("test"))
    with pytest.raises(QaiError) as e:
        _register(svc, BUNDLE_2)
    assert e.value.code.startswith("kms.")
    assert [m.version for m in mlflow_client.search_model_versions(f"name='{MODEL_NAME}'")] == [1]
    assert list_versions(svc) == [v1] and svc.ledger.size() == start + 1


def _open_registry(home: str) -> int:
    """In a fresh process: open the default (SQLite) MLflow store and count its registered models."""
    from em_policy.registry import _client

    return len(_client(Settings(home=Path(home))).search_registered_models())


def test_processes_opening_a_fresh_registry_at_once_all_succeed(tmp_path: Path) -> None:
    """`qai serve --workers 2` on a fresh home: every worker opens (and so creates and migrates)
    the MLflow SQLite store at start-up; none may lose the race on its schema version."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        counts = list(pool.map(_open_registry, [str(tmp_path / ".qai")] * 3))
    assert counts == [0, 0, 0]
    with sqlite3.connect(tmp_path / ".qai" / "mlflow" / "mlflow.db") as conn:
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
