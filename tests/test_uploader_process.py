"""The outbox uploader as a process of its own: ``qai uploader`` and ``qai serve``'s child of it.

``qai serve`` starts one uploader process beside its workers (``QAI_UPLOADER=process``, the
default), so uploads do not hold a serving worker's GIL. The child must do the uploads, must not
outlive a ``kill -9`` of its server, and the workers must not also run the thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from orchestrator.auth import Principal, Role, create_tenant, issue_token
from orchestrator.jobs import ManifestRow
from orchestrator.services import Services, build_services
from orchestrator.settings import Settings
from orchestrator.uploader_process import UPLOADER_PROCESS_ENV, runs_uploader_thread, serve_starts_uploader
from sdk.manifest import sign_manifest
from tests.conftest import free_port, storage_settings
from tests.ledger_helpers import ledger_services
from tests.proc_helpers import child_pids, gone
from tests.test_dispatch import worker_env
from tests.test_manifest import manifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["postgresql+s3", "sqlite+local"])
def svc(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Services]:
    yield from ledger_services(*storage_settings(request, settings, "uploader"))


def _submit(svc: Services, n: int) -> list[str]:
    signer = Principal(subject="t", role=Role.SIGNER, tenant="org-a")
    submitter = Principal(subject="t", role=Role.SUBMITTER, tenant="org-a")
    ids = [str(uuid.uuid4()) for _ in range(n)]
    for job_id in ids:
        env = sign_manifest(manifest(job_id=job_id),
                            lambda msg: svc.kms.sign("org-a.manifests", principal=signer, message=msg))
        svc.jobs.submit(env.to_bytes(), submitter)
    return ids


def _pending(svc: Services) -> int:
    with svc.db.read() as s:
        return int(s.scalar(select(func.count()).select_from(ManifestRow)
                            .where(ManifestRow.uploaded_at.is_(None))) or 0)


def test_where_the_uploader_runs(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.delenv(UPLOADER_PROCESS_ENV, raising=False)
    process = settings.model_copy(update={"uploader": "process"})
    # an app that no qai serve started (tests, embedding) keeps the thread: nobody else uploads for it
    assert runs_uploader_thread(process)
    # where envelopes enter the outbox: job ingest and scheduler decisions
    assert all(serve_starts_uploader(process, c) for c in ("all", "jobs", "scheduler"))
    assert not any(serve_starts_uploader(process, c) for c in ("kms", "ledger", "em-policy"))
    monkeypatch.setenv(UPLOADER_PROCESS_ENV, "12345")  # qai serve's workers
    assert not runs_uploader_thread(process)
    assert runs_uploader_thread(settings.model_copy(update={"uploader": "thread"}))
    external = settings.model_copy(update={"uploader": "external"})
    monkeypatch.delenv(UPLOADER_PROCESS_ENV)
    assert not runs_uploader_thread(external) and not serve_starts_uploader(external, "all")


def test_qai_uploader_drains_the_outbox(svc: Services) -> None:
    svc.uploader.close()
    ids = _submit(svc, 5)
    assert _pending(svc) == 5 and svc.objects.list("manifests/") == []
    done = subprocess.run([sys.executable, "-m", "sdk.cli", "uploader", "--drain", "--json"],
                          env=worker_env(svc), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"uploaded": 5}
    assert _pending(svc) == 0 and len(svc.objects.list("manifests/")) == 5
    for job_id in ids:  # verified by hash, and the DB copy dropped
        job = svc.jobs.get(job_id, Principal.system("test"))
        assert job["uploaded"] is True


def test_the_outbox_backlog_is_a_gauge(svc: Services) -> None:
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from orchestrator.metrics import bind

    def scraped() -> float:
        families = {f.name: f for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())}
        return float(families["qai_outbox_pending_envelopes"].samples[0].value)

    svc.uploader.close()
    bind(svc)
    base = scraped()
    _submit(svc, 3)
    assert scraped() == base + 3 == _pending(svc)
    svc.uploader.drain()
    assert scraped() == 0


def test_serve_runs_one_uploader_process_that_dies_with_it(tmp_path: Path) -> None:
    home = tmp_path / ".qai"
    svc = build_services(Settings(home=home))  # the embedded default: SQLite and a local directory
    try:
        create_tenant(svc.db, "org-a")
        svc.kms.create_key("org-a.manifests", tenant="org-a", principal=Principal.system("test"))
        token = issue_token(svc.db, role=Role.SUBMITTER, tenant="org-a").token
        signer = Principal(subject="t", role=Role.SIGNER, tenant="org-a")
        envs = [sign_manifest(manifest(job_id=str(uuid.uuid4())),
                              lambda msg: svc.kms.sign("org-a.manifests", principal=signer, message=msg)).to_bytes()
                for _ in range(4)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("QAI_")} | {"QAI_HOME": str(home)}
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "sdk.cli", "serve", "--port", str(port)], env=env,
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and server.poll() is None, "qai serve did not start"
                time.sleep(0.1)
            children = child_pids(server.pid, b"uploader")
            assert len(children) == 1, children  # one uploader process, whatever the worker count
            with httpx.Client(base_url=f"http://127.0.0.1:{port}",
                              headers={"Authorization": f"Bearer {token}"}) as c:
                for e in envs:
                    assert c.post("/v1/jobs", content=e).status_code == 201
            while _pending(svc) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _pending(svc) == 0 and len(svc.objects.list("manifests/")) == 4
            os.kill(server.pid, signal.SIGKILL)  # no finally runs in qai serve: the child must notice
            server.wait()
            while not gone(children[0]) and time.monotonic() < deadline + 60:
                time.sleep(0.2)
            assert gone(children[0]), "the uploader outlived its server"
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    finally:
        svc.close()


def test_the_uploader_loops_at_once_only_after_a_full_batch(svc: Services) -> None:
    """Rows that came in since the last batch wait for the interval and go together, in one write:
    on SQLite a write per commit held the lock the next request's commit waited for."""
    from orchestrator.outbox import Uploader

    svc.uploader.close()
    _submit(svc, 5)
    uploader = Uploader(svc.db, svc.objects, batch=2)
    assert [uploader._step(), uploader._step()] == [True, True]  # full batches: more may be waiting
    assert _pending(svc) == 1
    assert uploader._step() is False  # one left, moved: the loop now waits its interval
    assert _pending(svc) == 0 and len(svc.objects.list("manifests/")) == 5
    assert uploader._step() is False  # nothing to do
