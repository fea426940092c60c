"""Concurrent sequencing: 8 processes append 20,000 entries in total to PostgreSQL (and 4,000 to
SQLite, whose single writer lock makes the same shape slower but must be just as gapless).

Each process has its own engine, its own group-commit sequencer and 4 appending threads, as API
workers would. Afterwards the indices must be exactly 0..19,999 and a full audit through the REST
API (tree recomputed, every object hashed, checkpoint verified) must pass.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator.app import create_app
from orchestrator.auth import Role, issue_token
from orchestrator.db import Database, utcnow
from orchestrator.ledger import Ledger, LedgerConfig, LedgerEntryRow
from orchestrator.objects import LocalObjectStore
from orchestrator.services import Services
from orchestrator.settings import Settings
from sdk.audit import ServerSource, audit
from sdk.client import Client
from sdk.ledger import LedgerEntry, sha256_hex
from tests.conftest import LiveServer
from tests.ledger_helpers import ledger_services, trusted_keys

PROCESSES, THREADS, CHUNK = 8, 4, 25
TOTALS = {"postgresql": 20_000, "sqlite": 4_000}


def _append_worker(url: str, schema: str | None, objects: str, worker: int, total: int) -> int:
    db = Database(url, schema=schema)
    store = LocalObjectStore(Path(objects))
    # Appending needs no KMS: this process never checkpoints.
    ledger = Ledger(db, None, store, LedgerConfig(checkpoint_every=10**9, checkpoint_interval=0))  # type: ignore[arg-type]
    per_thread = total // PROCESSES // THREADS
    appended: list[int] = []

    def run(thread: int) -> None:
        for lo in range(0, per_thread, CHUNK):
            entries = []
            for i in range(lo, lo + CHUNK):
                data = f"dataset {worker}/{thread}/{i}".encode()
                key = f"datasets/{worker}/{thread}/{i}"
                store.put(key, data)
                entries.append(LedgerEntry(type="dataset", sha256=sha256_hex(data), path=key, tenant="org-a",
                                           time=utcnow()))
            appended.extend(e.index for e in ledger.append(entries))

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger.close()
    db.dispose()
    return len(appended)


@pytest.fixture
def svc(settings: Settings, db: Database) -> Iterator[Services]:
    yield from ledger_services(settings, db, ledger_checkpoint_every=10**9)


def test_eight_processes_append_gapless_entries(svc: Services) -> None:
    total = TOTALS[svc.db.dialect]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(PROCESSES) as pool:
        counts = pool.starmap(_append_worker, [(svc.db.url, svc.db.schema, str(svc.settings.objects_dir), w, total)
                                               for w in range(PROCESSES)])
    assert sum(counts) == total
    with svc.db.read() as s:
        n, lo, hi = s.execute(select(func.count(), func.min(LedgerEntryRow.idx), func.max(LedgerEntryRow.idx))).one()
    assert (n, lo, hi) == (total, 0, total - 1)  # unique (primary key) and gapless
    cp = svc.ledger.checkpoint()
    assert cp is not None and cp.checkpoint.size == total
    keys = trusted_keys(svc)
    token = issue_token(svc.db, role=Role.AUDITOR, tenant=None).token
    with LiveServer(create_app(svc)) as srv, Client(srv.url, token) as c:
        report = audit(ServerSource(c), trusted_keys=keys)
    assert report.ok, report.failures[:5]
    assert report.entries == total and report.latest_checkpoint_size == total and report.uncovered == 0
