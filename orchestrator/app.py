"""The FastAPI application. ``qai serve`` mounts every component; ``qai serve kms`` mounts one.

Every component's router is thin; logic lives in each package's service module. Probes:
``/healthz`` (the process is alive) and ``/readyz`` (database, object store, HSM and, when configured,
the Redis job queue reachable). Every component also serves ``/metrics`` (Prometheus; like the probes,
unauthenticated: see docs/telemetry.md).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from kms.remote import RemoteKMS
from orchestrator.http import BodySizeLimit, ServicesDep, install_error_handlers
from orchestrator.metrics import RequestMetrics, metrics_router
from orchestrator.services import Services, get_services
from orchestrator.uploader_process import runs_uploader_thread
from sdk.errors import QaiError

COMPONENTS = ("kms", "ledger", "jobs", "em-policy", "scheduler")

health = APIRouter(tags=["health"])


@health.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get("/readyz")
def readyz(svc: ServicesDep) -> JSONResponse:
    checks: dict[str, str] = {}
    probes = [("database", svc.db.ping), ("object_store", svc.objects.ping)]
    if svc.hsm is not None:
        probes.append(("hsm", svc.hsm.ping))
    elif isinstance(svc.kms, RemoteKMS):  # the KMS this process signs through checks its own HSM
        probes.append(("kms", svc.kms.ping))
    if svc.settings.redis_url:
        from scheduler.dispatch import job_queue

        probes.append(("queue", lambda: job_queue(svc).ping()))
    for name, probe in probes:
        try:
            probe()
            checks[name] = "ok"
        except QaiError as exc:
            checks[name] = exc.code
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)


def _routers(component: str) -> list[APIRouter]:
    if component == "kms":
        from kms.api import router as kms_router

        return [kms_router]
    if component == "jobs":
        from orchestrator.jobs_api import router as jobs_router

        return [jobs_router]
    if component == "ledger":
        from orchestrator.ledger_api import router as ledger_router

        return [ledger_router]
    if component == "em-policy":
        from em_policy.api import router as policy_router
        from em_policy.nightly.api import router as nightly_router

        return [policy_router, nightly_router]
    if component == "scheduler":
        from scheduler.api import router as scheduler_router

        return [scheduler_router]
    raise QaiError("serve.unknown_component", f"unknown component {component!r}",
                   details={"components": list(COMPONENTS)})


# After the freeze, a full collection every this many gen-1 collections (CPython's default is 10).
FULL_COLLECTION_EVERY = 1000


def freeze_startup_heap() -> None:
    """Move everything allocated so far (imports, services, warmed models) out of the collector's
    reach, and make full collections rare.

    A served process holds about 300,000 long-lived objects (qiskit, MLflow, pandas, scikit-learn).
    A full collection walks them all: 125 ms in isolation, 300-350 ms stalls under the scheduling
    benchmark (docs/benchmarks.md), whenever CPython's heuristic decides one is due. Frozen, they are
    never scanned. Freezing alone made things worse, though: CPython skips a full collection while
    its candidates are under a quarter of the long-lived objects, and frozen objects no longer count,
    so full collections came about every 70,000 allocations, each walking the caches filled since
    start-up (schedule p99 82-87 ms against 41-51 ms unfrozen). Hence the higher third threshold.

    The cost: an object frozen here that later becomes cyclic garbage is never reclaimed. What is
    frozen is what the process keeps (modules, services, pools), except the policy model warmed at
    start-up, which a promotion replaces: at most that one model's memory, once per process.
    Cyclic garbage made after start-up is still collected, less often."""
    gc.collect()
    gc.freeze()
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, FULL_COLLECTION_EVERY)


def served_components(components: Sequence[str], kms_url: str | None) -> tuple[str, ...]:
    """The components this process mounts. A process that signs through a remote KMS
    (``QAI_KMS_URL``) never serves the KMS API itself: its KMS client signs with an admin service
    token, so proxying callers' requests through it would sign with that token's rights instead
    of theirs."""
    if not kms_url or "kms" not in components:
        return tuple(components)
    rest = tuple(c for c in components if c != "kms")
    if not rest:
        raise QaiError("kms.remote_configured",
                       f"QAI_KMS_URL is set ({kms_url}): this process is a KMS client and cannot serve the KMS; "
                       "run qai serve kms without QAI_KMS_URL", status=500)
    return rest


def create_app(services: Services | None = None, components: Sequence[str] = COMPONENTS) -> FastAPI:
    from orchestrator.settings import get_settings

    components = served_components(components, (services.settings if services else get_settings()).kms_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if getattr(app.state, "services", None) is None:
            app.state.services = get_services()
        from orchestrator.metrics import bind

        bind(app.state.services)
        app.state.services.db.checkpoint_in_background()  # SQLite: no log checkpoint inside a request's commit
        if "ledger" in components:
            app.state.services.ledger.start()
        if {"jobs", "scheduler"} & set(components) and runs_uploader_thread(app.state.services.settings):
            app.state.services.uploader.start()
        if "em-policy" in components or "scheduler" in components:
            from em_policy.api import warm_up

            warm_up(app.state.services)
        if "scheduler" in components:  # the embedded worker, or the reaper and redelivery sweep
            from scheduler.dispatch import start_dispatch

            start_dispatch(app.state.services)
        if app.state.services.settings.gc_freeze:
            freeze_startup_heap()
        try:
            yield
        finally:
            if "scheduler" in components:
                from scheduler.dispatch import close_dispatch

                close_dispatch(app.state.services)

    app = FastAPI(
        title="qai",
        version="0.1.0",
        summary="Control plane for quantum workloads with provable provenance",
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(app)
    app.include_router(health)
    app.include_router(metrics_router())
    for component in components:
        for router in _routers(component):
            app.include_router(router)
    limit = services.settings.max_request_bytes if services else get_services_limit()
    app.add_middleware(BodySizeLimit, limit=limit)
    app.add_middleware(RequestMetrics)  # outermost: times the whole request, the 413s included
    return app


def get_services_limit() -> int:
    from orchestrator.settings import get_settings

    return get_settings().max_request_bytes
