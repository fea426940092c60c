"""REST router of job ingest (``/v1/jobs``). Thin: the logic is in :mod:`orchestrator.jobs`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from orchestrator.http import PrincipalDep, ServicesDep, run_bulk
from orchestrator.jobs import MAX_BATCH
from sdk.errors import QaiError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=201, summary="Submit a signed run-manifest (DSSE envelope, JSON or YAML)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"type": "object"}},
                 "application/yaml": {"schema": {"type": "string"}}}}})
async def submit(request: Request, svc: ServicesDep, who: PrincipalDep) -> JSONResponse:
    body = await request.body()
    done = await run_in_threadpool(svc.jobs.submit, body, who)
    content = {"job_id": done.job_id, "created": done.created, "receipt": done.receipt.model_dump(mode="json")}
    return JSONResponse(content, status_code=201 if done.created else 200)


@router.post("/batch", summary="Submit many signed run-manifests; one result per envelope, in order",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                 "type": "object", "required": ["envelopes"],
                 "properties": {"envelopes": {"type": "array", "items": {"type": "object"},
                                              "maxItems": MAX_BATCH}}}}}}})
async def submit_batch(request: Request, svc: ServicesDep, who: PrincipalDep) -> JSONResponse:
    """Each envelope is checked and stored as by ``POST /v1/jobs`` and stands alone: a rejected
    one carries its error (``status`` and ``error``) and leaves nothing behind; the others are
    stored (``status`` 201, or 200 for a resubmission). The response is 200 whatever the items say."""
    body = await request.body()
    # The checks (parsing, signatures) are the CPU-bound half and take the bulk lane; the write,
    # mostly waiting for the ledger, does not hold it, so the next batch's checks overlap it.
    checked = await run_bulk(request, "jobs-batch", svc.jobs.check_batch, body, who)

    def store() -> JSONResponse:  # the response is built on the worker thread too, not on the event loop
        results = svc.jobs.store(checked)
        return JSONResponse({"results": [
            r.to_body() | {"status": r.status} if isinstance(r, QaiError) else
            {"status": 201 if r.created else 200, "job_id": r.job_id, "created": r.created,
             "receipt": r.receipt.model_dump(mode="json")}
            for r in results]})

    return await run_in_threadpool(store)


@router.get("/{job_id}", summary="A job: envelope, status, storage, ledger index, its decisions and execution")
def get_job(job_id: str, svc: ServicesDep, who: PrincipalDep) -> dict[str, Any]:
    from scheduler.service import scheduler
    from scheduler.worker import job_execution

    job = svc.jobs.get(job_id, who)
    return {**job, "decisions": scheduler(svc).for_job(job_id), "execution": job_execution(svc, job_id)}


@router.post("/{job_id}/cancel", summary="Cancel a pending or queued job (a running or finished one: 409)")
def cancel_job(job_id: str, svc: ServicesDep, who: PrincipalDep) -> dict[str, Any]:
    from orchestrator.auth import Role
    from scheduler.dispatch import cancel

    tenant = svc.jobs.get(job_id, who)["tenant"]  # job.not_found unless the caller may read it
    who.require(tenant, Role.SUBMITTER, Role.SIGNER, Role.OPERATOR, action="cancelling a job")
    return {"job_id": job_id, "cancelled": cancel(svc, job_id), "status": "cancelled"}


@router.get("", summary="Jobs, oldest first, with cursor pagination")
def list_jobs(svc: ServicesDep, who: PrincipalDep, tenant: str | None = None,
              status: Literal["pending", "queued", "running", "completed", "failed", "cancelled"] | None = None,
              since: datetime | None = None, limit: int = Query(100, ge=1, le=1000),
              cursor: str | None = None) -> dict[str, Any]:
    return svc.jobs.list(who, tenant=tenant, status=status, since=since, limit=limit, cursor=cursor)
