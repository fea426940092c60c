"""``/v1/predict`` and ``/v1/predict:batch``: thin; the logic is ``em_policy.service``."""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from em_policy.service import PolicyService, Prediction, PredictRequest
from orchestrator.http import PrincipalDep, ServicesDep
from orchestrator.services import Services
from sdk.errors import QaiError

MAX_BATCH = 1000

router = APIRouter(prefix="/v1", tags=["em-policy"])


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[PredictRequest] = Field(max_length=MAX_BATCH)


def warm_up(svc: Services) -> None:
    """At start-up: load the champion (and MLflow's modules with it) before the first request, so
    no request pays for imports. No model yet is fine: requests get the 503 until one is promoted."""
    with contextlib.suppress(QaiError):
        policy_service(svc).model()


def policy_service(svc: Services) -> PolicyService:
    service = svc.extras.get("em_policy")
    if not isinstance(service, PolicyService):
        service = PolicyService(svc)
        svc.extras["em_policy"] = service
    return service


@router.post("/predict", response_model=Prediction,
             summary="Recommend an error-mitigation method: parameters, shot overhead, expected fidelity, confidence",
             responses={503: {"description": "no model is promoted yet (code em_policy.model_unavailable)"}})
async def predict(body: PredictRequest, svc: ServicesDep, who: PrincipalDep) -> Response:
    # A prediction is about a millisecond of CPU once the model, snapshot and circuit are cached:
    # it runs on the event loop (no thread hop) and its JSON is written once (no re-validation).
    service = policy_service(svc)
    if service.ready(body):
        prediction = service.predict(body)
    else:  # first use of a model, snapshot or circuit: database, object store or compilation
        prediction = await run_in_threadpool(service.predict, body)
    return Response(prediction.model_dump_json(), media_type="application/json")


@router.post("/predict:batch", summary="Many predictions; one result (prediction or error) per request, in order")
def predict_batch(body: BatchRequest, svc: ServicesDep, who: PrincipalDep) -> dict[str, Any]:
    service = policy_service(svc)
    service.model()  # no model: the whole batch is a 503, not a list of them
    results: list[dict[str, Any]] = []
    for req in body.requests:
        try:
            results.append({"prediction": service.predict(req).model_dump()})
        except QaiError as err:
            results.append(err.to_body())  # {"error": {code, message, details}}
        except Exception:  # one bad item must not fail the others; details never carry internals
            results.append(QaiError("internal.error", "this prediction failed unexpectedly", status=500).to_body())
    return {"results": results}
