"""The EM policy's model registry: MLflow for the workflow, the KMS and the ledger for trust.

A trained policy is one deterministic byte string, the *bundle* (plus a metadata dict). Registering
it makes:

* an MLflow run in experiment ``qai-em-policy`` (params, metrics, tag ``dataset_sha256``, artifacts
  ``model/bundle.zip`` and ``model/metadata.json``) and a version of the registered model ``name``;
* the bundle in the object store, content-addressed (``em-policy/models/<sha256>.zip``);
* a signed statement naming the version, the bundle's SHA-256 and the training dataset: a DSSE
  envelope signed through the KMS with the system tenant's key ``qai.em-policy``, stored
  content-addressed (``em-policy/envelopes/<sha256>.dsse.json``) and ledgered as a ``model-version``
  entry of tenant ``qai``.

Order matters. The bundle goes to the object store first (write-once and content-addressed, so an
orphan is harmless), then MLflow, then the envelope, then the ledger entry; the ledger is last, so a
failed MLflow registration ledgers nothing. A version that MLflow created but that never reached the
ledger is deleted again (best effort) and in any case is neither listed nor resolved: only ledgered
versions count. Promotions are ledgered too (statement ``qai.em-policy.promotion.v1``).

MLflow is the index, not the root of trust: its tags say where a version's envelope and ledger
entry are, and :func:`load_bundle` checks the ledger entry, the envelope's signatures (KMS public key,
at the entry's time), the statement against the version, and the bundle's bytes against the signed
SHA-256. Anything off is ``em_policy.model_tampered`` (409, like ``harness.dataset_tampered``: the stored
state conflicts with what was signed).

Error codes: ``em_policy.model_unavailable`` (503; :func:`resolve` found no such alias or version, or
no model at all: the policy engine cannot serve), ``em_policy.unknown_model_version`` (404;
:func:`promote` of a version that does not exist or was never ledgered), ``em_policy.model_tampered``
(409), ``em_policy.bad_model`` (422; a bad name, alias, digest or metric, or a param longer than the
6000 characters MLflow would truncate it to), ``em_policy.registry_rejected`` (422; MLflow refused a
value, e.g. a param name) and ``em_policy.registry_error`` (503; any other MLflow failure).
``mlflow`` is imported lazily: ``qai`` start-up must not pay for it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlparse

from sdk.canonical import canonical_json
from sdk.dsse import envelope_bytes, envelope_from_bundle, pae, parse_envelope, verify_envelope
from sdk.errors import QaiError
from sdk.ledger import SYSTEM_TENANT, LedgerEntry

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from orchestrator.services import Services
    from orchestrator.settings import Settings

MODEL_NAME = "em-policy"
MODEL_PAYLOAD_TYPE = "application/vnd.qai.model-version.v1+json"  # both statements; their "type" tells them apart
MODEL_KEY = "qai.em-policy"
MODEL_ENTRY_TYPE: Literal["model-version"] = "model-version"
EXPERIMENT = "qai-em-policy"
VERSION_STATEMENT = "qai.em-policy.model-version.v1"
PROMOTION_STATEMENT = "qai.em-policy.promotion.v1"
DEFAULT_ALIAS = "champion"

# MLflow model-version tags: where the version's signed statement is. Not trusted by load_bundle.
TAG_SHA256 = "qai.sha256"
TAG_BYTES = "qai.bytes"
TAG_BUNDLE_PATH = "qai.bundle_path"
TAG_DATASET = "qai.dataset_sha256"
TAG_CREATED_AT = "qai.created_at"
TAG_ENVELOPE_PATH = "qai.envelope_path"
TAG_LEDGER_LEAF = "qai.ledger_leaf"  # set before the append: finds the entry if the index tag was never written
TAG_LEDGER_INDEX = "qai.ledger_index"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")  # never all digits: resolve() reads digits as a version
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_PARAM_CHARS = 6000  # MLflow truncates a longer param value (with a warning only)
_REMOTE_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")

_log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    sha256: str
    bundle_path: str  # object-store key, content-addressed: em-policy/models/<sha256>.zip
    envelope_path: str  # object-store key of the signed statement (the ledger entry's object)
    ledger_index: int
    run_id: str  # MLflow run id
    dataset_sha256: str
    created_at: str
    aliases: tuple[str, ...]
    metrics: dict[str, float]


# --- MLflow plumbing ----------------------------------------------------------------------------


def tracking_uri(settings: Settings) -> str:
    """``settings.mlflow_tracking_uri``, else SQLite at ``home/mlflow/mlflow.db``."""
    if settings.mlflow_tracking_uri:
        return settings.mlflow_tracking_uri
    return f"sqlite:///{(settings.home / 'mlflow' / 'mlflow.db').resolve()}"


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def artifact_location(settings: Settings) -> str | None:
    """Where the experiment keeps its artifacts, set when it is created so that nothing lands in
    ``./mlruns`` of the working directory: beside a SQLite database (``<dir>/artifacts``), the
    tracking server's own choice for a remote URI (``None``), else ``home/mlflow/artifacts``."""
    uri = tracking_uri(settings)
    db = _sqlite_file(uri)
    if db is not None:
        return (db.resolve().parent / "artifacts").as_uri()
    if urlparse(uri).scheme in _REMOTE_SCHEMES:
        return None
    return (settings.home / "mlflow" / "artifacts").resolve().as_uri()


def _quiet_mlflow() -> None:
    # Before the first import: no usage telemetry from a control plane (an explicit setting wins).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("mlflow", "alembic"):  # MLflow's schema migrations log INFO lines
        logger = logging.getLogger(name)
        if logger.level in (logging.NOTSET, logging.INFO):
            logger.setLevel(logging.WARNING)
    # MLflow's SQL store maps a relationship with a loader SQLAlchemy 2.1 deprecates; not ours to fix
    warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated",
                            category=DeprecationWarning)


_INITIALISED: set[str] = set()  # SQLite tracking URIs this process has opened (and so migrated)


def _client(settings: Settings) -> MlflowClient:
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()  # mlflow's import configured its logger at INFO
    uri = tracking_uri(settings)
    db = _sqlite_file(uri)
    if db is None or uri in _INITIALISED:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    # MLflow creates and migrates a SQLite store when a process first opens it; two processes doing
    # so at once (the workers of `qai serve --workers 2` on a fresh home) race on its alembic_version
    # row and one dies. One opener at a time, across processes.
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / ".open.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # opens (and migrates) the tracking store
            client.search_registered_models(max_results=1)  # …and the registry's, which opens lazily
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _INITIALISED.add(uri)
    return client


def _registry_error(exc: MlflowException, what: str) -> QaiError:
    code = exc.error_code
    if code == "INVALID_PARAMETER_VALUE":
        return QaiError("em_policy.registry_rejected", f"MLflow refused {what}: {exc.message[:500]}", status=422,
                        details={"mlflow_code": code})
    return QaiError("em_policy.registry_error", f"MLflow failed ({what}): {exc.message[:500]}", status=503,
                    details={"mlflow_code": code})


def _call(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, with MLflow's errors as QaiErrors."""
    from mlflow.exceptions import MlflowException

    try:
        return fn()
    except MlflowException as exc:
        raise _registry_error(exc, what) from exc


def _experiment_id(client: MlflowClient, settings: Settings) -> str:
    from mlflow.exceptions import MlflowException

    exp = _call("get experiment", lambda: client.get_experiment_by_name(EXPERIMENT))
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(EXPERIMENT, artifact_location=artifact_location(settings)))
    except MlflowException as exc:  # another process created it first
        exp = _call("get experiment", lambda: client.get_experiment_by_name(EXPERIMENT))
        if exp is None:
            raise _registry_error(exc, "create experiment") from exc
        return str(exp.experiment_id)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise _registry_error(exc, "get registered model") from exc
    try:
        client.create_registered_model(name, tags={"qai.kind": "em-policy"})
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it first
            raise _registry_error(exc, "create registered model") from exc


# --- checks and signing -------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise QaiError("em_policy.bad_model", f"invalid model name {name!r}", status=422, details={"name": name[:200]})


def _check_alias(alias: str) -> None:
    if not _ALIAS.match(alias) or re.fullmatch(r"v\d+", alias) or alias == "latest":  # MLflow reserves these
        raise QaiError("em_policy.bad_model", f"invalid alias {alias!r}: a letter, then letters, digits, _ or -; "
                       "not 'latest' or v<number>", status=422, details={"alias": alias[:200]})


def _metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise QaiError("em_policy.bad_model", f"metric {k!r} must be a finite number, not {v!r}", status=422)
        out[k] = float(v)
    return out


def _params(params: Mapping[str, Any]) -> dict[str, str]:
    """MLflow's string form of each param; one MLflow would truncate is refused instead."""
    out = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for k, v in params.items()}
    long = sorted(k for k, v in out.items() if len(v) > MAX_PARAM_CHARS)
    if long:
        raise QaiError("em_policy.bad_model", f"params longer than {MAX_PARAM_CHARS} characters: {', '.join(long)}",
                       status=422, details={"params": long[:20]})
    return out


def bundle_path(sha256: str) -> str:
    return f"em-policy/models/{sha256}.zip"


def model_key(svc: Services) -> str:
    """The system tenant's key that signs model statements, created on first use."""
    from orchestrator.ledger import system_signing_key

    return system_signing_key(svc.db, svc.kms, MODEL_KEY, suite=svc.settings.ledger_suite, subject="em-policy",
                              error_code="em_policy.bad_key")


def _sign(svc: Services, key: str, statement: dict[str, Any]) -> tuple[str, bytes]:
    """Sign ``statement`` as a DSSE envelope and store it, content-addressed: (path, envelope bytes)."""
    from orchestrator.auth import Principal

    payload = canonical_json(statement)
    signature = svc.kms.sign(key, principal=Principal.system("em-policy"), message=pae(MODEL_PAYLOAD_TYPE, payload))
    envelope = envelope_bytes(envelope_from_bundle(MODEL_PAYLOAD_TYPE, payload, signature))
    path = f"em-policy/envelopes/{hashlib.sha256(envelope).hexdigest()}.dsse.json"
    svc.objects.put(path, envelope)
    return path, envelope


def _entry(path: str, envelope: bytes, at: datetime) -> LedgerEntry:
    return LedgerEntry(type=MODEL_ENTRY_TYPE, sha256=hashlib.sha256(envelope).hexdigest(), path=path,
                       tenant=SYSTEM_TENANT, time=at)


def _ledgered(svc: Services, leaf: str) -> bool:
    try:
        svc.ledger.index_of(leaf)
        return True
    except QaiError as exc:
        if exc.code != "ledger.entry_not_found":
            raise
        return False


# --- the API ------------------------------------------------------------------------------------


def register(svc: Services, bundle: bytes, *, params: dict[str, Any], metrics: dict[str, float],
             dataset_sha256: str, metadata: dict[str, Any], name: str = MODEL_NAME) -> ModelVersion:
    """Register ``bundle`` as the next version of ``name``: the bundle object, the MLflow run and
    version, the signed statement, the ledger entry (in that order; see the module docstring)."""
    from mlflow.entities import Metric, Param

    _check_name(name)
    if not _HEX64.match(dataset_sha256):
        raise QaiError("em_policy.bad_model", "dataset_sha256 must be 64 lower-case hex digits", status=422)
    metrics = _metrics(metrics)
    str_params = _params(params)
    metadata_json = canonical_json(metadata)  # refuses what cannot be signed, before anything is written
    sha = hashlib.sha256(bundle).hexdigest()
    path = bundle_path(sha)
    key = model_key(svc)  # before `now`: the statement is verified as of its ledger time

    # 1. the bundle, content-addressed: the same bytes again are a no-op; other bytes under its
    #    digest's name mean the stored copy was altered, and a version pointing at it could never load
    try:
        svc.objects.put(path, bundle)
    except QaiError as exc:
        if exc.code != "object.exists":
            raise
        raise QaiError("em_policy.model_tampered", f"the object store holds other bytes under {path}", status=409,
                       details={"path": path, "reason": "bundle_object_differs"}) from exc

    # 2. MLflow: a run with the bundle as its artifact, then a version of the registered model
    client = _client(svc.settings)
    experiment = _experiment_id(client, svc.settings)
    run = _call("create run", lambda: client.create_run(
        experiment, run_name=f"{name}-{sha[:12]}", tags={"dataset_sha256": dataset_sha256, TAG_SHA256: sha}))
    run_id = run.info.run_id
    try:
        stamp = int(time.time() * 1000)
        _call("log params and metrics", lambda: client.log_batch(
            run_id, metrics=[Metric(k, v, stamp, 0) for k, v in sorted(metrics.items())],
            params=[Param(k, v) for k, v in sorted(str_params.items())]))
        with tempfile.TemporaryDirectory(prefix="qai-em-policy-") as tmp:
            Path(tmp, "bundle.zip").write_bytes(bundle)
            Path(tmp, "metadata.json").write_bytes(metadata_json)
            _call("log artifacts", lambda: client.log_artifacts(run_id, tmp, "model"))
        _call("finish run", lambda: client.set_terminated(run_id, "FINISHED"))
    except BaseException:
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception:  # the original error matters more
            _log.warning("could not mark MLflow run %s as failed", run_id, exc_info=True)
        raise
    _ensure_registered_model(client, name)
    created = _call("create model version", lambda: client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run_id,
        tags={TAG_SHA256: sha, TAG_BYTES: str(len(bundle)), TAG_BUNDLE_PATH: path, TAG_DATASET: dataset_sha256}))
    version = int(created.version)

    # 3. the signed statement, stored, then ledgered last
    leaf: str | None = None
    try:
        now = datetime.now(UTC)
        statement = {
            "type": VERSION_STATEMENT, "name": name, "version": version, "sha256": sha, "bytes": len(bundle),
            "dataset_sha256": dataset_sha256, "mlflow_run_id": run_id, "metrics": metrics, "metadata": metadata,
            "created_at": now.isoformat(),
        }
        envelope_path, envelope = _sign(svc, key, statement)
        entry = _entry(envelope_path, envelope, now)
        leaf = entry.leaf_hash().hex()
        for tag, value in ((TAG_CREATED_AT, now.isoformat()), (TAG_ENVELOPE_PATH, envelope_path),
                           (TAG_LEDGER_LEAF, leaf)):
            _call("tag model version", partial(client.set_model_version_tag, name, str(version), tag, value))
        from orchestrator.ledger import LedgerWrite

        indexed = svc.ledger.append([LedgerWrite([entry])])[0]
    except BaseException:
        try:  # never leave an unledgered version behind (but never delete a ledgered one)
            if leaf is None or not _ledgered(svc, leaf):
                client.delete_model_version(name, str(version))
        except Exception:
            _log.warning("could not delete unledgered model version %s/%s", name, version, exc_info=True)
        raise
    try:  # the version is registered now; a missing index tag is recovered from the leaf tag
        client.set_model_version_tag(name, str(version), TAG_LEDGER_INDEX, str(indexed.index))
    except Exception:
        _log.warning("could not tag %s/%s with its ledger index %d", name, version, indexed.index, exc_info=True)
    return ModelVersion(name=name, version=version, sha256=sha, bundle_path=path, envelope_path=envelope_path,
                        ledger_index=indexed.index, run_id=run_id, dataset_sha256=dataset_sha256,
                        created_at=now.isoformat(), aliases=(), metrics=metrics)


def _to_model_version(svc: Services, client: MlflowClient, mv: MlflowModelVersion,
                      aliases: tuple[str, ...] | None = None) -> ModelVersion | None:
    """Our view of an MLflow version; ``None`` if it never reached the ledger."""
    tags: dict[str, str] = dict(mv.tags or {})
    if not all(t in tags for t in (TAG_SHA256, TAG_BUNDLE_PATH, TAG_DATASET, TAG_ENVELOPE_PATH, TAG_LEDGER_LEAF)):
        return None
    if TAG_LEDGER_INDEX in tags:
        index = int(tags[TAG_LEDGER_INDEX])
    else:
        try:
            index = svc.ledger.index_of(tags[TAG_LEDGER_LEAF])
        except QaiError as exc:
            if exc.code != "ledger.entry_not_found":
                raise
            return None  # being registered right now, or its registration failed
    run_id = str(mv.run_id)
    run = _call("get run", lambda: client.get_run(run_id))
    return ModelVersion(
        name=str(mv.name), version=int(mv.version), sha256=tags[TAG_SHA256], bundle_path=tags[TAG_BUNDLE_PATH],
        envelope_path=tags[TAG_ENVELOPE_PATH], ledger_index=index, run_id=run_id,
        dataset_sha256=tags[TAG_DATASET], created_at=tags.get(TAG_CREATED_AT, ""),
        aliases=tuple(sorted(mv.aliases or ())) if aliases is None else aliases,
        metrics={k: float(v) for k, v in run.data.metrics.items()})


def _version_entity(client: MlflowClient, name: str, ref: str) -> MlflowModelVersion | None:
    """The MLflow version ``ref`` (a number or an alias) of ``name``; ``None`` if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.isdigit():
            return client.get_model_version(name, str(int(ref)))
        return client.get_model_version_by_alias(name, ref)
    except MlflowException as exc:
        # an unknown model or version is RESOURCE_DOES_NOT_EXIST; an unknown alias INVALID_PARAMETER_VALUE
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise _registry_error(exc, f"get model version {ref}") from exc


def resolve(svc: Services, ref: str = DEFAULT_ALIAS, name: str = MODEL_NAME) -> ModelVersion:
    """The version behind alias ``ref``, or version number ``ref``; ``em_policy.model_unavailable``
    (503) when there is none."""
    _check_name(name)
    client = _client(svc.settings)
    entity = _version_entity(client, name, ref)
    mv = _to_model_version(svc, client, entity) if entity is not None else None
    if mv is None:
        raise QaiError("em_policy.model_unavailable", f"model {name} has no ledgered version {ref!r}", status=503,
                       details={"name": name, "ref": ref})
    return mv


def points_at(svc: Services, version: int, ref: str = DEFAULT_ALIAS, name: str = MODEL_NAME) -> bool:
    """Whether alias ``ref`` still names ``version``: one registry read, where :func:`resolve`
    also reads the run and checks the ledger (about a third of its time). A server that holds
    ``version``, verified when it loaded it, asks this every few seconds."""
    _check_name(name)
    uri = tracking_uri(svc.settings)
    db = _sqlite_file(uri)
    if db is not None and uri in _INITIALISED and not ref.isdigit():
        named = _alias_in_sqlite(db, name, ref)
        if named is not False:
            return named == version
    entity = _version_entity(_client(svc.settings), name, ref)
    return entity is not None and int(entity.version) == version


def _alias_in_sqlite(db: Path, name: str, alias: str) -> int | Literal[False] | None:
    """The version ``alias`` of ``name`` names in MLflow's SQLite store, read from the table MLflow
    itself reads (``registered_model_aliases``); None if it names none; False if the store cannot be
    read this way (another schema, several workspaces naming the alias), for the client to answer.

    Why not the client: its alias lookup is nine ORM queries, 3 ms of CPU, most of it holding the
    GIL, on a server's background thread every ALIAS_TTL_SECONDS; a scheduling decision that
    overlapped one took 3-5 ms longer (docs/benchmarks.md). This is one indexed read, 1 ms on a
    connection opened for it (reading MLflow's schema), nearly all of it inside SQLite, where the
    GIL is released. A connection kept open would cost 0.07 ms but could outlive its file."""
    if alias.lower() == "latest":  # MLflow's own rule: the newest version, not a row of the table
        return False
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # a missing file: an error, not a new store
        try:
            rows = conn.execute("SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
                                (name, alias)).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    if len(rows) > 1:  # several workspaces name it: MLflow knows which one is meant
        return False
    return int(rows[0][0]) if rows else None


def list_versions(svc: Services, name: str = MODEL_NAME) -> list[ModelVersion]:
    """Every ledgered version of ``name``, oldest first (none: an empty list)."""
    from mlflow.exceptions import MlflowException

    _check_name(name)
    client = _client(svc.settings)
    try:
        aliases_of: dict[int, list[str]] = {}
        for alias, v in client.get_registered_model(name).aliases.items():
            aliases_of.setdefault(int(v), []).append(alias)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise _registry_error(exc, "get registered model") from exc
    entities: list[MlflowModelVersion] = []
    token: str | None = None
    while True:
        page = _call("search model versions", partial(client.search_model_versions, f"name='{name}'",
                                                      max_results=1000, page_token=token))
        entities.extend(page)
        token = page.token
        if not token:
            break
    out = [_to_model_version(svc, client, e, tuple(sorted(aliases_of.get(int(e.version), ())))) for e in entities]
    return sorted((mv for mv in out if mv is not None), key=lambda mv: mv.version)


def _tampered(mv: ModelVersion, reason: str, message: str) -> QaiError:
    return QaiError("em_policy.model_tampered", f"model {mv.name} version {mv.version}: {message}", status=409,
                    details={"name": mv.name, "version": mv.version, "reason": reason})


def verified_statement(svc: Services, mv: ModelVersion) -> dict[str, Any]:
    """The signed statement of ``mv``, checked: its ledger entry, the envelope's SHA-256 and
    signatures (the KMS public key of ``qai.em-policy``, at the entry's time) and every field
    against ``mv``. ``em_policy.model_tampered`` (409) on any mismatch."""
    try:
        entry = svc.ledger.entry(mv.ledger_index)
    except QaiError as exc:
        if exc.code != "ledger.entry_not_found":
            raise
        raise _tampered(mv, "no_ledger_entry", f"no ledger entry {mv.ledger_index}") from exc
    if (entry.type, entry.tenant, entry.path) != (MODEL_ENTRY_TYPE, SYSTEM_TENANT, mv.envelope_path):
        raise _tampered(mv, "wrong_ledger_entry", f"ledger entry {mv.ledger_index} is not this version's")
    try:
        data = svc.ledger.object_bytes(entry.path)
    except QaiError as exc:
        if exc.code != "object.not_found":
            raise
        raise _tampered(mv, "envelope_missing", f"its signed statement {entry.path} is gone") from exc
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise _tampered(mv, "envelope_mismatch", "its signed statement does not match its ledger entry")
    try:
        envelope = parse_envelope(data)
        if envelope.payload_type != MODEL_PAYLOAD_TYPE:
            raise QaiError("dsse.payload_type", f"payload type {envelope.payload_type}")
        key = svc.kms.public_key(MODEL_KEY)
        if key.tenant != SYSTEM_TENANT:
            raise QaiError("signature.wrong_tenant", f"{MODEL_KEY} belongs to tenant {key.tenant}")
        verify_envelope(envelope, key, at=entry.time)
        statement: dict[str, Any] = json.loads(envelope.payload_bytes())
    except (QaiError, ValueError) as exc:
        reason = exc.code if isinstance(exc, QaiError) else "payload.malformed"
        raise _tampered(mv, reason, f"its signed statement does not verify ({exc})") from exc
    expected = {"type": VERSION_STATEMENT, "name": mv.name, "version": mv.version, "sha256": mv.sha256,
                "dataset_sha256": mv.dataset_sha256, "mlflow_run_id": mv.run_id}
    wrong = sorted(k for k, v in expected.items() if statement.get(k) != v)
    if wrong or mv.bundle_path != bundle_path(mv.sha256):
        raise _tampered(mv, "statement_mismatch",
                        f"the registry disagrees with the signed statement on {', '.join(wrong) or 'bundle_path'}")
    return statement


def load_bundle(svc: Services, mv: ModelVersion) -> bytes:
    """The bundle of ``mv`` from the object store, checked against its signed statement."""
    statement = verified_statement(svc, mv)
    try:
        data = svc.objects.get(mv.bundle_path)
    except QaiError as exc:
        if exc.code != "object.not_found":
            raise
        raise _tampered(mv, "bundle_missing", f"its bundle {mv.bundle_path} is gone") from exc
    if hashlib.sha256(data).hexdigest() != statement["sha256"] or len(data) != statement["bytes"]:
        raise _tampered(mv, "bundle_mismatch", f"{mv.bundle_path} does not match the signed SHA-256")
    return data


def promote(svc: Services, version: int, *, alias: str = DEFAULT_ALIAS, name: str = MODEL_NAME) -> ModelVersion:
    """Point ``alias`` at ``version`` and ledger a signed promotion statement. The version must be
    ledgered (else ``em_policy.unknown_model_version``, 404) and its bundle must verify (else
    ``em_policy.model_tampered``, 409). Promoting the version the alias already names is a no-op."""
    from mlflow.exceptions import MlflowException

    _check_name(name)
    _check_alias(alias)
    client = _client(svc.settings)
    entity = _version_entity(client, name, str(version)) if version >= 1 else None
    mv = _to_model_version(svc, client, entity) if entity is not None else None
    if mv is None:
        raise QaiError("em_policy.unknown_model_version", f"model {name} has no ledgered version {version}",
                       status=404, details={"name": name, "version": version})
    load_bundle(svc, mv)  # never promote what would not load
    current = _version_entity(client, name, alias)
    previous = int(current.version) if current is not None else None
    if previous == mv.version:
        return mv

    key = model_key(svc)
    now = datetime.now(UTC)
    statement = {
        "type": PROMOTION_STATEMENT, "name": name, "alias": alias, "version": mv.version, "sha256": mv.sha256,
        "model_ledger_index": mv.ledger_index, "previous_version": previous, "promoted_at": now.isoformat(),
    }
    envelope_path, envelope = _sign(svc, key, statement)
    entry = _entry(envelope_path, envelope, now)
    _call("set alias", lambda: client.set_registered_model_alias(name, alias, str(mv.version)))
    try:
        from orchestrator.ledger import LedgerWrite

        svc.ledger.append([LedgerWrite([entry])])
    except BaseException:
        try:  # an unledgered promotion must not stand
            if previous is None:
                client.delete_registered_model_alias(name, alias)
            else:
                client.set_registered_model_alias(name, alias, str(previous))
        except MlflowException:
            _log.warning("could not restore alias %s of %s after a failed promotion", alias, name, exc_info=True)
        raise
    return resolve(svc, str(mv.version), name)


def champion_file(svc: Services, alias: str = DEFAULT_ALIAS, name: str = MODEL_NAME) -> tuple[str, str]:
    """The verified bundle behind ``alias`` as a local file, for processes that load it themselves (the
    harness's workers apply ``ml-qem`` from it): content-addressed under ``home/em-policy/bundles``."""
    mv = resolve(svc, alias, name)
    data = load_bundle(svc, mv)
    directory = Path(svc.settings.home) / "em-policy" / "bundles"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{mv.sha256}.zip"
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != mv.sha256:
        from harness.service import write_atomically

        write_atomically(str(path), data)
    return str(path), f"{mv.name}/{mv.version}"
