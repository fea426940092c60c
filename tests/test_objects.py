"""The object store on both backends: a local directory and S3 over real HTTP (moto's server)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from pydantic import SecretStr

from orchestrator.db import Database
from orchestrator.objects import LocalObjectStore, ObjectStore, S3ObjectStore, make_object_store
from orchestrator.services import Services
from orchestrator.settings import Settings
from sdk.checkpoint import verify_checkpoint
from sdk.errors import QaiError
from tests.ledger_helpers import ledger_services, signed_envelopes


def _s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")


def _s3_settings(base: Settings, endpoint: str, bucket: str, *, object_lock: bool = False) -> Settings:
    _s3_client(endpoint).create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=object_lock)
    return base.model_copy(update={"s3_bucket": bucket, "s3_endpoint_url": endpoint, "s3_prefix": "qai",
                                   "s3_access_key_id": SecretStr("test"),
                                   "s3_secret_access_key": SecretStr("test")})


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, settings: Settings) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    endpoint = request.getfixturevalue("s3_endpoint")
    s = make_object_store(_s3_settings(settings, endpoint, f"qai-{tmp_path.name[-20:].lower().replace('_', '-')}"))
    assert isinstance(s, S3ObjectStore)
    return s


def test_put_get_list_exists(store: ObjectStore) -> None:
    store.ping()
    store.put("ledger/run-manifest/aa", b"one")
    store.put("ledger/run-manifest/bb", b"two")
    store.put("other/x", b"three")
    assert store.get("ledger/run-manifest/aa") == b"one"
    assert store.exists("ledger/run-manifest/bb") and not store.exists("ledger/nope")
    assert store.list("ledger/") == ["ledger/run-manifest/aa", "ledger/run-manifest/bb"]


def test_objects_are_write_once(store: ObjectStore) -> None:
    store.put("k/v", b"original")
    store.put("k/v", b"original")  # the same bytes again: an idempotent retry
    with pytest.raises(QaiError) as err:
        store.put("k/v", b"replaced")
    assert err.value.code == "object.exists" and err.value.status == 409
    assert store.get("k/v") == b"original"
    store.put("k/latest", b"1", overwrite=True)
    store.put("k/latest", b"2", overwrite=True)
    assert store.get("k/latest") == b"2"


def test_put_many_refuses_only_the_overwrites(store: ObjectStore) -> None:
    store.put("m/taken", b"first")
    results = store.put_many([("m/a", b"a"), ("m/taken", b"other"), ("m/taken", b"first"), ("m/../x", b"x"),
                              ("m/b", b"b")])
    assert [r.code if r else None for r in results] == [None, "object.exists", None, "object.bad_key", None]
    assert [store.get(k) for k in ("m/a", "m/taken", "m/b")] == [b"a", b"first", b"b"]
    assert store.list("m/") == ["m/a", "m/b", "m/taken"]  # no temporary files left behind


def test_many_at_once_answers_each_item_in_order(store: ObjectStore) -> None:
    # on S3 the batch is in flight QAI_S3_CONCURRENCY requests at a time (8 by default)
    items = [(f"n/{i:03d}", bytes([i % 256]) * (i + 1)) for i in range(40)]
    assert store.put_many(items) == [None] * 40
    again = store.put_many([("n/005", b"other"), ("n/006", items[6][1]), ("n/new", b"new")])
    assert [getattr(r, "code", None) for r in again] == ["object.exists", None, None]
    got = store.get_many([k for k, _ in items[::-1]] + ["n/missing", "n/../x"])
    assert got[:40] == [data for _, data in items[::-1]]
    assert [g.code for g in got[40:] if isinstance(g, QaiError)] == ["object.not_found", "object.bad_key"]


def test_concurrent_writers_of_one_key_leave_one_version(store: ObjectStore) -> None:
    errors: list[str] = []

    def put(data: bytes) -> None:
        try:
            store.put("race/key", data)
        except QaiError as exc:
            errors.append(exc.code)

    threads = [threading.Thread(target=put, args=(bytes([65 + i]) * 100,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 7 and set(errors) == {"object.exists"}
    assert len(set(store.get("race/key"))) == 1


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/../b", "sp ace", "", "x" * 600])
def test_bad_keys(store: ObjectStore, key: str) -> None:
    with pytest.raises(QaiError) as err:
        store.put(key, b"x")
    assert err.value.code == "object.bad_key"


def test_missing_objects(store: ObjectStore) -> None:
    with pytest.raises(QaiError) as err:
        store.get("no/such")
    assert err.value.code == "object.not_found" and err.value.status == 404


def test_object_lock_bucket_gets_compliance_retention(settings: Settings, s3_endpoint: str,
                                                      tmp_path: Path) -> None:
    """On a bucket with Object Lock, write-once objects carry COMPLIANCE retention, so S3 itself
    refuses to delete the version, even for the account that wrote it; pointers stay unlocked."""
    name = f"lock-{tmp_path.name[-20:].lower().replace('_', '-')}"
    store = make_object_store(_s3_settings(settings, s3_endpoint, name, object_lock=True).model_copy(
        update={"s3_object_lock_days": 30}))
    assert isinstance(store, S3ObjectStore) and store.object_lock
    store.put("manifests/ab/cd", b"envelope")
    store.put("ledger/checkpoint", b"1", overwrite=True)
    store.put("ledger/checkpoint", b"2", overwrite=True)
    held = store.retention("manifests/ab/cd")
    assert held["object_lock"] == "COMPLIANCE"
    until = datetime.fromisoformat(held["retain_until"])
    assert timedelta(days=29) < until - datetime.now(UTC) <= timedelta(days=30)
    assert store.retention("ledger/checkpoint") == {"mode": "write-once"}
    client = _s3_client(s3_endpoint)
    version = client.head_object(Bucket=name, Key="qai/manifests/ab/cd")["VersionId"]
    with pytest.raises(ClientError) as err:
        client.delete_object(Bucket=name, Key="qai/manifests/ab/cd", VersionId=version)
    assert err.value.response["Error"]["Code"] == "AccessDenied"
    assert store.get("manifests/ab/cd") == b"envelope" and store.get("ledger/checkpoint") == b"2"
    # a plain bucket: write-once by our conditional PUT only, and nothing claims more
    plain = make_object_store(_s3_settings(settings, s3_endpoint, name.replace("lock-", "plain-")))
    assert isinstance(plain, S3ObjectStore) and not plain.object_lock
    plain.put("manifests/ab/cd", b"envelope")
    assert plain.retention("manifests/ab/cd") == {"mode": "write-once"}
    with pytest.raises(QaiError) as bad:
        S3ObjectStore(client, name, retention_days=0)
    assert bad.value.code == "object.bad_retention"


def test_unreachable_s3_is_a_503(settings: Settings) -> None:
    s = make_object_store(settings.model_copy(update={"s3_bucket": "b", "s3_endpoint_url": "http://127.0.0.1:9",
                                                      "s3_access_key_id": SecretStr("t"),
                                                      "s3_secret_access_key": SecretStr("t")}))
    with pytest.raises(QaiError) as err:
        s.ping()
    assert err.value.code == "object.unreachable" and err.value.status == 503


@pytest.fixture
def s3_services(settings: Settings, db: Database, s3_endpoint: str, tmp_path: Path) -> Iterator[Services]:
    bucket = f"ledger-{tmp_path.name[-20:].lower().replace('_', '-')}"
    yield from ledger_services(_s3_settings(settings, s3_endpoint, bucket), db)


def test_ledger_on_s3_stores_envelopes_and_publishes_checkpoints(s3_services: Services) -> None:
    svc = s3_services
    assert isinstance(svc.objects, S3ObjectStore)
    for env in signed_envelopes(svc.kms, "org-a.manifests", "org-a", 12):
        e = svc.ledger.append_object("run-manifest", "org-a", env)
        assert svc.objects.get(e.path) == env
    key = svc.ledger.checkpoint_key()
    history = svc.objects.list("ledger/checkpoints/")
    assert [verify_checkpoint(svc.objects.get(k).decode(), key).checkpoint.size for k in history] == [10]
    assert svc.objects.get("ledger/checkpoint").decode() == svc.ledger.latest_checkpoint()
