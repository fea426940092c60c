"""``/v1/schedule`` and ``/v1/decisions``: thin; the logic is ``scheduler.service`` and ``scheduler.replay``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from orchestrator.http import PrincipalDep, ServicesDep
from orchestrator.services import Services
from scheduler.service import scheduler
from sdk.errors import QaiError

router = APIRouter(prefix="/v1", tags=["scheduler"])


class ScheduleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str | None = Field(default=None, description="A submitted job.")
    envelope: dict[str, Any] | None = Field(
        default=None, description="Or a signed run-manifest (DSSE envelope): submitted, then scheduled.")

    @model_validator(mode="after")
    def _one(self) -> ScheduleRequest:
        if (self.job_id is None) == (self.envelope is None):
            raise ValueError("give exactly one of job_id and envelope")
        return self


def _schedule(svc: Services, req: ScheduleRequest, who: Any) -> Response:
    job_id = req.job_id
    if req.envelope is not None:
        submitted = svc.jobs.submit_many([req.envelope], who)[0]
        if isinstance(submitted, QaiError):
            raise submitted
        job_id = submitted.job_id
    assert job_id is not None
    decision = scheduler(svc).schedule(job_id, who)
    # written on the worker thread: a decision's JSON is tens of kB, not work for the event loop
    return Response(decision.to_json_bytes(), status_code=201 if decision.created else 200,
                    media_type="application/json")


@router.post("/schedule", status_code=201,
             summary="Choose a backend and EM method for a job; the decision is signed, stored and ledgered",
             responses={422: {"description": "no backend fits (code scheduler.no_backend): details.backends lists "
                                             "every backend with the reasons it was filtered"},
                        409: {"description": "the job is not pending (scheduler.bad_status)"}})
async def schedule(body: ScheduleRequest, svc: ServicesDep, who: PrincipalDep) -> Response:
    return await run_in_threadpool(_schedule, svc, body, who)


@router.get("/decisions/{decision_id}", summary="A decision: its signed document (inputs and body), verified")
def get_decision(decision_id: str, svc: ServicesDep, who: PrincipalDep) -> dict[str, Any]:
    return scheduler(svc).get(decision_id, who)


@router.get("/decisions", summary="The decisions about one job, oldest first")
def list_decisions(svc: ServicesDep, who: PrincipalDep, job_id: str = Query(...)) -> dict[str, Any]:
    svc.jobs.get(job_id, who)  # job.not_found unless the caller may read the job
    return {"job_id": job_id, "decisions": scheduler(svc).for_job(job_id)}


@router.post("/decisions/{decision_id}/replay",
             summary="Recompute a decision from its recorded inputs and re-derive the inputs; ok or the differences")
def replay_decision(decision_id: str, svc: ServicesDep, who: PrincipalDep,
                    deep: bool = Query(True, description="Also re-derive the job, snapshots and predictions.")
                    ) -> dict[str, Any]:
    from scheduler.replay import replay

    scheduler(svc).row(decision_id, who)  # not found unless readable
    return replay(svc, decision_id, deep=deep).to_dict()
