"""The object store: signed envelopes, published checkpoints, datasets and models.

Two backends behind one small interface: a local directory (the embedded default, under
``$QAI_HOME/objects``) and S3/MinIO through boto3 (``QAI_S3_*``). Objects are **write-once** unless
the caller says ``overwrite=True`` (only "latest" pointers do): writing different bytes to an
existing key is ``object.exists``, writing the same bytes again is a no-op, so a retried ingest is
idempotent and nothing can silently replace a ledgered envelope.

On an S3 bucket created with Object Lock, every write-once object also gets COMPLIANCE retention:
then not even the bucket's owner can delete or overwrite that version before the retention date,
which is what an auditor needs from the store of record (write-once here is only our own code's
promise; Object Lock is the store's).
"""

from __future__ import annotations

import ctypes
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from orchestrator.settings import Settings
from sdk.errors import QaiError

R = TypeVar("R")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")


def check_key(key: str) -> str:
    if len(key) > 512 or not _KEY.match(key) or ".." in key.split("/"):
        raise QaiError("object.bad_key", f"invalid object key {key!r}", details={"key": key[:600]})
    return key


def _exists_error(key: str) -> QaiError:
    return QaiError("object.exists", f"object {key} exists with different content", status=409,
                    details={"key": key})


def _not_found(key: str) -> QaiError:
    return QaiError("object.not_found", f"no object {key}", status=404, details={"key": key})


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None: ...
    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[QaiError | None]: ...
    def get(self, key: str) -> bytes: ...
    def get_many(self, keys: Sequence[str]) -> list[bytes | QaiError]: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def ping(self) -> None: ...
    def retention(self, key: str) -> dict[str, Any]: ...
    @property
    def location(self) -> str: ...


def put_once(store: ObjectStore, key: str, data: bytes) -> None:
    """Store content-addressed bytes: the key names a digest of ``data``, so finding it already
    there (``object.exists``) means the same bytes were stored before, and is not an error."""
    try:
        store.put(key, data)
    except QaiError as err:
        if err.code != "object.exists":
            raise


def _each(call: Callable[[Any], R], items: Sequence[Any], concurrency: int = 1) -> list[R | QaiError]:
    """``call`` on every item, ``concurrency`` at a time; one result per item, in order: its
    return value, or the error that refused it."""
    def one(item: Any) -> R | QaiError:
        try:
            return call(item)
        except QaiError as exc:
            return exc

    if concurrency <= 1 or len(items) <= 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(concurrency, len(items)), thread_name_prefix="object-store") as pool:
        return list(pool.map(one, items))


def _fsync(path: Path | str, *, data_only: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


_SYNCFS = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)  # Linux
_SYNCFS_FROM = 8  # paths per call from which one file-system sync beats one fsync per path


def _make_durable(root: Path, paths: Iterable[Path | str], *, data_only: bool = False) -> None:
    """fsync ``paths`` (or their data only). Many at once, where syncfs(2) exists, are one sync of
    the file system instead: ext4 then commits its journal once, not once per path."""
    paths = list(paths)
    if _SYNCFS is None or len(paths) < _SYNCFS_FROM:
        for path in paths:
            _fsync(path, data_only=data_only)
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise QaiError("object.sync_failed", f"syncfs failed: {os.strerror(err)}", status=503)
    finally:
        os.close(fd)


class LocalObjectStore:
    """A directory. Writes go to a temporary file and are renamed into place (atomic on POSIX)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def location(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        error = self._put_all([(key, data)], overwrite=overwrite)[0]
        if error is not None:
            raise error

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[QaiError | None]:
        return self._put_all(items, overwrite=False)

    def _put_all(self, items: Sequence[tuple[str, bytes]], *, overwrite: bool) -> list[QaiError | None]:
        """Write in three phases, so that a name only ever points at durable bytes: write and
        fdatasync every temporary file; link (or rename) each into place; fsync each directory
        once. Directly after a crash an object is thus absent or whole; a batch costs two syncs
        of the file system instead of two per object."""
        results: list[QaiError | None] = [None] * len(items)
        staged: list[tuple[int, str, Path, bytes]] = []  # (position, temporary file, final path, bytes)
        try:
            for pos, (key, data) in enumerate(items):
                try:
                    path = self._path(key)
                    if not overwrite and path.exists():
                        if path.read_bytes() != data:
                            raise _exists_error(key)
                        continue  # the same bytes again: an idempotent retry
                    path.parent.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
                    staged.append((pos, tmp, path, data))
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                except QaiError as exc:
                    results[pos] = exc
            _make_durable(self.root, [tmp for _, tmp, _, _ in staged], data_only=True)
            directories = set()
            for pos, tmp, path, data in staged:
                if overwrite:
                    os.replace(tmp, path)
                else:
                    try:
                        os.link(tmp, path)  # fails if another writer won the race
                    except FileExistsError:
                        if path.read_bytes() != data:
                            results[pos] = _exists_error(items[pos][0])
                    os.unlink(tmp)
                directories.add(path.parent)
            _make_durable(self.root, directories)
        finally:
            for _, tmp, _, _ in staged:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return results

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise _not_found(key) from None

    def get_many(self, keys: Sequence[str]) -> list[bytes | QaiError]:
        return _each(self.get, keys)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        keys = [p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                if p.is_file() and not p.name.startswith(".tmp-")]
        return sorted(k for k in keys if k.startswith(prefix))

    def retention(self, key: str) -> dict[str, Any]:
        """How ``key`` is protected: by this store's refusal to overwrite, nothing stronger."""
        if not self.exists(key):
            raise _not_found(key)
        return {"mode": "write-once"}

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise QaiError("object.unreachable", "object store directory is not writable", status=503)


class S3ObjectStore:
    """S3 or MinIO. Write-once uses ``If-None-Match: *`` (conditional PUT), so it holds across
    processes; a store that ignores the header still gets the read-then-compare check. When the
    bucket has Object Lock enabled, write-once objects are put with COMPLIANCE retention for
    ``retention_days``; "latest" pointers (``overwrite=True``) are not, since each overwrite
    would leave another locked version behind."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", *, retention_days: int = 3650,
                 concurrency: int = 1) -> None:
        if retention_days < 1:
            raise QaiError("object.bad_retention", "S3 Object Lock retention must be at least one day",
                           details={"retention_days": retention_days})
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.retention_days = retention_days
        self.concurrency = concurrency  # boto3 clients are thread-safe; its pool holds 10 connections
        self._locked: bool | None = None  # learnt from the bucket on first use
        self._lock = threading.Lock()

    @property
    def object_lock(self) -> bool:
        """Whether the bucket has Object Lock enabled. Asked once; a bucket cannot turn it off."""
        if self._locked is None:
            from botocore.exceptions import BotoCoreError, ClientError

            with self._lock:
                if self._locked is None:
                    try:
                        config = self.client.get_object_lock_configuration(Bucket=self.bucket)
                        enabled = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
                    except ClientError as exc:
                        if exc.response.get("Error", {}).get("Code") != "ObjectLockConfigurationNotFoundError":
                            raise self._error(exc, "") from exc
                        enabled = False
                    except BotoCoreError as exc:
                        raise self._error(exc, "") from exc
                    self._locked = enabled
        return self._locked

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _error(self, exc: Exception, key: str) -> QaiError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return _not_found(key)
        return QaiError("object.unreachable", f"object store error: {code or type(exc).__name__}",
                        status=503, details={"key": key})

    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        if not overwrite:
            if self.exists(key):
                if self.get(key) == data:
                    return
                raise _exists_error(key)
            args["IfNoneMatch"] = "*"
            if self.object_lock:
                args["ObjectLockMode"] = "COMPLIANCE"
                args["ObjectLockRetainUntilDate"] = datetime.now(UTC) + timedelta(days=self.retention_days)
        try:
            self.client.put_object(**args)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                if self.get(key) != data:
                    raise _exists_error(key) from None
                return
            raise self._error(exc, key) from exc
        except BotoCoreError as exc:
            raise self._error(exc, key) from exc

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[QaiError | None]:
        """Write-once puts, ``concurrency`` in flight at once: each is two or three round trips
        (HEAD, conditional PUT), and one after another they bound the outbox uploader. One key given
        twice with different bytes in one batch keeps either (the other gets ``object.exists``)."""
        return _each(lambda item: self.put(*item), items, self.concurrency)

    def get_many(self, keys: Sequence[str]) -> list[bytes | QaiError]:
        return _each(self.get, keys, self.concurrency)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            return body
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(exc, key) from exc
        except BotoCoreError as exc:
            raise self._error(exc, key) from exc

    def retention(self, key: str) -> dict[str, Any]:
        """The store's own protection of ``key``, as S3 reports it (HEAD), not as we asked for it."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key) from exc
        if head.get("ObjectLockMode"):
            return {"mode": "write-once", "object_lock": head["ObjectLockMode"],
                    "retain_until": head["ObjectLockRetainUntilDate"].astimezone(UTC).isoformat()}
        return {"mode": "write-once"}

    def list(self, prefix: str = "") -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self.prefix + prefix):
                keys.extend(o["Key"][len(self.prefix):] for o in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, prefix) from exc
        return sorted(keys)

    def ping(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise QaiError("object.unreachable", "object store is not reachable", status=503,
                           details={"bucket": self.bucket}) from exc


def make_object_store(settings: Settings) -> ObjectStore:
    if not settings.s3_bucket:
        return LocalObjectStore(settings.objects_dir)
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id.get_secret_value() if settings.s3_access_key_id else None,
        aws_secret_access_key=(settings.s3_secret_access_key.get_secret_value()
                               if settings.s3_secret_access_key else None),
        # a batch's requests plus the requests served meanwhile (reads, checkpoint publication)
        config=Config(max_pool_connections=max(10, 2 * settings.s3_concurrency)),
    )
    return S3ObjectStore(client, settings.s3_bucket, settings.s3_prefix,
                         retention_days=settings.s3_object_lock_days, concurrency=settings.s3_concurrency)
