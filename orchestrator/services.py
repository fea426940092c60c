"""Wiring: build the process's database, HSM and services from settings, once.

Routers and CLI commands get their services from here (or from ``app.state`` in tests), so
settings are read in one place and nothing opens a second HSM session pool by accident.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kms.hsm import Hsm, HsmConfig
from kms.remote import KeyService, RemoteKMS
from kms.service import KMS, KmsConfig
from orchestrator import migrate
from orchestrator.db import Database
from orchestrator.jobs import Jobs
from orchestrator.ledger import Ledger, LedgerConfig
from orchestrator.objects import ObjectStore, make_object_store
from orchestrator.outbox import Uploader
from orchestrator.settings import Settings, get_settings
from sdk.errors import QaiError


def hsm_config(settings: Settings) -> HsmConfig:
    user_pin, so_pin = settings.hsm_pins()
    auto = settings.is_softhsm and settings.softhsm_auto_init
    return HsmConfig(
        module=settings.pkcs11_module,
        token_label=settings.pkcs11_token_label,
        user_pin=user_pin,
        so_pin=so_pin,
        pool_size=settings.pkcs11_pool_size,
        softhsm_dir=settings.softhsm_dir if auto else None,
    )


def kms_config(settings: Settings) -> KmsConfig:
    return KmsConfig(
        kek_label=settings.kek_label,
        default_suite=settings.default_suite,
        max_message_bytes=settings.kms_max_message_bytes,
        unsealed_ttl=settings.kms_unsealed_key_ttl_seconds,
        preferred_provider=settings.crypto_provider,
        key_cache_seconds=settings.kms_key_cache_seconds,
    )


def ledger_config(settings: Settings) -> LedgerConfig:
    return LedgerConfig(
        origin=settings.ledger_origin,
        checkpoint_every=settings.ledger_checkpoint_every,
        checkpoint_interval=settings.ledger_checkpoint_interval_seconds,
        key_name=settings.ledger_key_name,
        suite=settings.ledger_suite,
    )


def remote_kms(settings: Settings, db: Database) -> RemoteKMS:
    if settings.kms_token is None:
        raise QaiError("settings.kms_token_required",
                       "QAI_KMS_URL is set but QAI_KMS_TOKEN is not: the KMS API needs this process's token",
                       status=500)
    return RemoteKMS(db, settings.kms_url or "", settings.kms_token.get_secret_value(),
                     ca_file=settings.kms_ca_file)


def require_hsm(svc: Services, what: str) -> Hsm:
    """This process's HSM, for commands that only the KMS's own process can run."""
    if svc.hsm is None:
        raise QaiError("kms.remote_configured",
                       f"{what} needs the HSM, and this process signs through the KMS at {svc.settings.kms_url}: "
                       "run it where the KMS runs (without QAI_KMS_URL)", status=409)
    return svc.hsm


@dataclass
class Services:
    settings: Settings
    db: Database
    hsm: Hsm | None  # None when this process signs through a remote KMS (QAI_KMS_URL)
    kms: KeyService
    objects: ObjectStore
    ledger: Ledger
    jobs: Jobs
    uploader: Uploader
    extras: dict[str, object] = field(default_factory=dict)

    def close(self) -> None:
        from scheduler.dispatch import close_dispatch

        close_dispatch(self)  # the embedded worker writes through everything below
        self.uploader.close()
        self.ledger.close()
        self.kms.close()
        if self.hsm is not None:
            self.hsm.close()
        self.db.dispose()


def build_services(settings: Settings, *, db: Database | None = None, migrate_db: bool = True) -> Services:
    if settings.database_url is None:
        settings.home.mkdir(parents=True, exist_ok=True)
    database = db or Database(settings.resolved_database_url)
    if migrate_db:
        migrate.upgrade(database)
    hsm: Hsm | None = None
    kms: KeyService
    if settings.kms_url:
        kms = remote_kms(settings, database)
    else:
        hsm = Hsm(hsm_config(settings))
        kms = KMS(database, hsm, kms_config(settings))
    objects = make_object_store(settings)
    ledger = Ledger(database, kms, objects, ledger_config(settings))
    jobs = Jobs(database, ledger, objects, kms.public_key)
    return Services(settings=settings, db=database, hsm=hsm, kms=kms, objects=objects, ledger=ledger, jobs=jobs,
                    uploader=Uploader(database, objects))


_services: Services | None = None
_lock = threading.Lock()


def get_services() -> Services:
    global _services
    with _lock:
        if _services is None:
            _services = build_services(get_settings())
        return _services
