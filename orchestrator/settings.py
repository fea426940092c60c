"""The one settings object of the server side (pydantic-settings, prefix ``QAI_``).

The embedded default needs no configuration at all: everything lives under ``./.qai/`` (a SQLite
database, an object-store directory and a SoftHSM token with its own ``softhsm2.conf``).
Production is a matter of environment variables: ``QAI_DATABASE_URL`` (PostgreSQL via psycopg 3),
``QAI_S3_*`` (S3/MinIO), ``QAI_REDIS_URL`` and ``QAI_PKCS11_*`` (the HSM). Every setting is listed
in ``docs/operations.md``.
"""

from __future__ import annotations

import json
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def _default_module() -> str:
    for candidate in SOFTHSM_MODULE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return SOFTHSM_MODULE_CANDIDATES[0]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QAI_", env_file=None, extra="ignore")

    home: Path = Field(default=Path(".qai"), description="Root of the embedded default's data.")

    # Storage
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite under home.")
    s3_bucket: str | None = Field(default=None, description="Use S3/MinIO when set.")
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_prefix: str = ""
    s3_object_lock_days: int = Field(
        default=3650, ge=1,
        description="COMPLIANCE retention (days) given to write-once objects when the bucket has Object Lock.")
    s3_concurrency: int = Field(
        default=8, ge=1, le=64,
        description="S3 requests one batch call (put_many, get_many: the outbox uploader's batches, a run's files) "
                    "keeps in flight at once (1: one after another).")
    redis_url: str | None = None
    redis_prefix: str = Field(default="qai", min_length=1, max_length=64,
                              description="Prefix of every Redis key of the job queue.")
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow tracking/registry URI; default: SQLite under home/mlflow.")

    # HSM (PKCS#11)
    pkcs11_module: str = Field(default_factory=_default_module)
    pkcs11_token_label: str = "qai"
    pkcs11_user_pin: SecretStr | None = None
    pkcs11_so_pin: SecretStr | None = None
    pkcs11_pool_size: int = Field(default=4, ge=1, le=64)
    softhsm_auto_init: bool = Field(
        default=True,
        description="For SoftHSM only: create ./.qai/softhsm and initialise the token on first use.",
    )
    kek_label: str = "qai-kek-1"

    # KMS
    kms_url: str | None = Field(
        default=None,
        description="Sign through the KMS API at this URL instead of opening the HSM in this process "
                    "(Kubernetes: every component but the KMS). Needs kms_token.")
    kms_token: SecretStr | None = Field(
        default=None, description="Bearer token (role admin) this process presents to the KMS at kms_url.")
    kms_ca_file: str | None = Field(
        default=None, description="CA bundle that verifies an https kms_url (default: the system's).")
    default_suite: str = "ML-DSA-65+ECDSA-P256"
    kms_max_message_bytes: int = Field(default=256 * 1024, ge=1)
    kms_unsealed_key_ttl_seconds: float = Field(
        default=300.0,
        ge=0,
        description="How long an unsealed PQC key stays in proxy memory; 0 unseals for every use.",
    )
    crypto_provider: str | None = Field(default=None, description="Preferred provider name.")

    # Ledger
    ledger_origin: str = Field(default="qai.local/ledger",
                               description="The log's origin line in its checkpoints (a schema-less URL).")
    ledger_checkpoint_every: int = Field(default=1000, ge=1, description="Checkpoint after this many new entries.")
    ledger_checkpoint_interval_seconds: float = Field(
        default=10.0, ge=0, description="Checkpoint this often when the log grew (0: only by count).")
    ledger_key_name: str = "qai.ledger-checkpoint"
    ledger_suite: str = "ML-DSA-65+ECDSA-P256"

    # Outbox uploader (orchestrator/outbox.py: Uploader; orchestrator/uploader_process.py)
    uploader: Literal["process", "thread", "external"] = Field(
        default="process",
        description="Where the outbox uploader runs. process: `qai serve` (all, jobs or scheduler) starts one "
                    "`qai uploader` process beside its workers, so uploads do not share the workers' GIL (an app "
                    "started any other way runs a thread). thread: each process serving jobs or the scheduler "
                    "runs one. external: none here; run `qai uploader` yourself.")
    uploader_nice: int = Field(default=0, ge=0, le=19,
                               description="Niceness the uploader process adds to itself (0: as the server).")

    # Dispatch and workers (scheduler/dispatch.py, scheduler/worker.py)
    worker_lease_seconds: float = Field(
        default=30.0, ge=1.0,
        description="A running job's lease; its worker renews it every third of this. A job whose lease "
                    "expired is retried or failed by the reaper.")
    worker_max_attempts: int = Field(default=3, ge=1, le=100,
                                     description="Attempts a job gets (a lost worker or a fault costs one).")
    worker_job_timeout_seconds: float = Field(default=3600.0, gt=0,
                                              description="A job still running after this fails (worker.timeout).")
    worker_poll_seconds: float = Field(default=1.0, gt=0, le=60,
                                       description="How long an idle worker waits on the queue at a time.")
    worker_redeliver_after_seconds: float = Field(
        default=30.0, ge=0,
        description="A queued job missing from the queue this long after it was enqueued is enqueued again.")
    worker_embedded: bool = Field(
        default=True, description="Without Redis: qai serve runs queued jobs on a worker thread (start_dispatch).")
    worker_vendor_urls: dict[str, str] = Field(
        default_factory=dict,
        description='Adapter kind -> vendor API base URL, e.g. {"ibm-like": "https://..."}. A backend whose '
                    "adapter has none runs on the local Aer simulator of its calibration snapshot.")
    worker_vendor_tokens: dict[str, SecretStr] = Field(default_factory=dict,
                                                       description="Adapter kind -> vendor API token.")

    # HTTP
    gc_freeze: bool = Field(
        default=True,
        description="After start-up, freeze the heap out of the garbage collector's reach (orchestrator.app); "
                    "false only to measure what that saves.")
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    bulk_lane_concurrency: int = Field(
        default=1, ge=1,
        description="Batch requests (sign-batch, jobs/batch) one process works on at once, per endpoint; "
                    "the rest queue, so that single requests do not share the GIL with many batches.")
    auth_cache_seconds: float = Field(
        default=2.0, ge=0,
        description="How long a verified bearer token is remembered; bounds revocation latency.",
    )
    kms_key_cache_seconds: float = Field(
        default=1.0, ge=0,
        description="How stale a key's version list may be in another process after a rotation.",
    )
    bootstrap_admin_token: SecretStr | None = Field(
        default=None, description="If set, a token with this exact value is accepted as admin."
    )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'qai.db').resolve()}"

    @property
    def objects_dir(self) -> Path:
        return self.home / "objects"

    @property
    def is_softhsm(self) -> bool:
        return "softhsm" in Path(self.pkcs11_module).name

    @property
    def softhsm_dir(self) -> Path:
        return self.home / "softhsm"

    def hsm_pins(self) -> tuple[str, str]:
        """The user and SO PIN. Settings win; otherwise a dev-only pair is generated once.

        The generated pair is written with mode 0600 under ``home`` and only ever used with the
        embedded SoftHSM token. A production HSM must be given its PIN through settings.
        """
        if self.pkcs11_user_pin is not None:
            so = self.pkcs11_so_pin.get_secret_value() if self.pkcs11_so_pin else ""
            return self.pkcs11_user_pin.get_secret_value(), so
        pin_file = self.home / "hsm-pin.json"
        if pin_file.exists():
            data = json.loads(pin_file.read_text())
            return str(data["user_pin"]), str(data["so_pin"])
        self.home.mkdir(parents=True, exist_ok=True)
        pins = {"user_pin": secrets.token_hex(16), "so_pin": secrets.token_hex(16)}
        fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(pins, fh)
        return pins["user_pin"], pins["so_pin"]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
