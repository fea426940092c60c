"""Crash safety of ingest: ``kill -9`` the server mid-run, restart it, resubmit everything.

``qai serve`` runs as its own process on PostgreSQL (a fresh database) with the embedded SoftHSM
and object directory. 8 client threads submit 2,000 signed manifests; the server is killed with
SIGKILL once a few hundred are in, then restarted, and every manifest is submitted again. Each job
must then be stored exactly once, the uploader must finish, and the DB index, the object store
and the ledger must agree entry for entry (and the audit must pass).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select, text

from orchestrator.auth import Principal, Role, create_tenant, issue_token
from orchestrator.jobs import ManifestRow
from orchestrator.ledger import LedgerEntryRow
from orchestrator.services import Services, build_services
from orchestrator.settings import Settings
from sdk.audit import ServerSource, audit
from sdk.client import Client
from sdk.dsse import envelope_from_bundle, pae
from sdk.ledger import sha256_hex
from sdk.manifest import PAYLOAD_TYPE
from tests.conftest import free_port
from tests.test_manifest import manifest

JOBS, CLIENTS = 2000, 8
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pg_database(pg_server: str) -> Iterator[str]:
    name = f"qai_crash_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    yield pg_server.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


class Server:
    def __init__(self, env: dict[str, str]) -> None:
        self.env, self.port = env, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "sdk.cli", "serve", "--port", str(self.port)],
                                     env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("qai serve did not become ready")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _envelopes(svc: Services) -> list[bytes]:
    signer = Principal(subject="crash-test", role=Role.SIGNER, tenant="org-a")
    payloads = [manifest(job_id=str(uuid.UUID(int=10_000 + i)), seed=i).to_bytes() for i in range(JOBS)]
    out: list[bytes] = []
    for lo in range(0, JOBS, 200):
        chunk = payloads[lo:lo + 200]
        bundles = svc.kms.sign_many("org-a.manifests", principal=signer, items=[pae(PAYLOAD_TYPE, p) for p in chunk])
        out += [envelope_from_bundle(PAYLOAD_TYPE, p, b).to_bytes() for p, b in zip(chunk, bundles, strict=True)]
    return out


def _submit_all(url: str, token: str, envelopes: list[bytes], stop_after: int | None = None) -> int:
    """Submit from CLIENTS threads; with ``stop_after``, return once that many have been accepted."""
    done, lock = [0], threading.Lock()
    reached = threading.Event()

    def worker(part: list[bytes]) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            for env in part:
                try:
                    r = c.post("/v1/jobs", content=env)
                except httpx.TransportError:
                    return  # the server died under us
                assert r.status_code in (200, 201), r.text
                with lock:
                    done[0] += 1
                    if stop_after is not None and done[0] >= stop_after:
                        reached.set()

    threads = [threading.Thread(target=worker, args=(envelopes[i::CLIENTS],), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    if stop_after is not None:
        reached.wait(timeout=300)
        return done[0]
    for t in threads:
        t.join()
    return done[0]


def test_kill_9_mid_ingest_then_resubmit(pg_database: str, tmp_path: Path) -> None:
    home = tmp_path / ".qai"
    env = {**os.environ, "QAI_HOME": str(home), "QAI_DATABASE_URL": pg_database,
           "QAI_LEDGER_CHECKPOINT_EVERY": "500", "QAI_LEDGER_CHECKPOINT_INTERVAL_SECONDS": "1"}
    env.pop("SOFTHSM2_CONF", None)
    settings = Settings(home=home, database_url=pg_database)
    svc = build_services(settings)
    try:
        create_tenant(svc.db, "org-a")
        svc.kms.create_key("org-a.manifests", tenant="org-a", principal=Principal.system("test"))
        token = issue_token(svc.db, role=Role.SUBMITTER, tenant="org-a").token
        auditor = issue_token(svc.db, role=Role.AUDITOR, tenant=None).token
        envelopes = _envelopes(svc)
        server = Server(env)
        server.start()
        try:
            accepted = _submit_all(server.url, token, envelopes, stop_after=300)
            server.kill()  # SIGKILL mid-run: requests in flight, outbox half uploaded
            assert 300 <= accepted < JOBS
            server.start()
            assert _submit_all(server.url, token, envelopes) == JOBS
            deadline = time.monotonic() + 120  # the restarted server's uploader finishes the outbox
            while True:
                with svc.db.read() as s:
                    left = s.scalar(select(func.count()).where(ManifestRow.uploaded_at.is_(None)))
                if left == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert left == 0
            with svc.db.read() as s:
                rows = s.execute(select(ManifestRow.job_id, ManifestRow.envelope_sha256, ManifestRow.s3_path,
                                        ManifestRow.ledger_index)).all()
                entries = {e.idx: e for e in s.scalars(select(LedgerEntryRow))}
            assert len(rows) == JOBS and len({r.job_id for r in rows}) == JOBS  # exactly once
            assert len(entries) == JOBS and sorted(entries) == list(range(JOBS))  # no orphan, no gap
            for job_id, digest, path, index in rows:  # DB, object store and ledger agree
                e = entries[index]
                assert (e.sha256, e.path, e.entry_type) == (digest, path, "run-manifest"), job_id
                assert sha256_hex(svc.objects.get(path)) == digest
            svc.ledger.checkpoint()
            with Client(server.url, auditor) as c:
                report = audit(ServerSource(c), trusted_keys={k.name: k for k in c.list_keys()})
            assert report.ok and report.entries == JOBS, report.failures[:3]
        finally:
            server.stop()
    finally:
        svc.close()
