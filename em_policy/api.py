"""``/v1/predict`` and ``/v1/predict:batch``: thin; the logic is ``em_policy.service``."""

from __future__ import annotations

import contextlib
import json
import logging

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, ConfigDict, Field

from em_policy.service import PolicyService, Prediction, PredictRequest
from orchestrator.http import PrincipalDep, ServicesDep
from orchestrator.services import Services
from sdk.errors import QaiError

MAX_BATCH = 1000
log = logging.getLogger(__name__)

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
def predict_batch(body: BatchRequest, svc: ServicesDep, who: PrincipalDep) -> Response:
    service = policy_service(svc)
    service.model()  # no model: the whole batch is a 503, not a list of them
    try:
        # The model runs once over the batch, as it does for the scheduler's requests (a quarter of
        # the time of one run per request for 50). Its numbers can differ from /v1/predict's for the
        # same request in the last bits (matrix against single-row arithmetic).
        answers = service.predict_each(body.requests, server_errors_each=True)
    except QaiError:
        raise  # not any one request's (the model unavailable): the whole batch's answer
    except Exception:  # a bug: find the request that meets it, one request at a time
        log.exception("a batch of %d predictions failed; answering it one request at a time", len(body.requests))
        answers = [_one(service, req) for req in body.requests]
    # Each prediction's JSON written once by pydantic: FastAPI's encoder walks a returned dict
    # node by node, as long again as the predictions themselves. Errors as error_response writes them.
    parts = [b'{"prediction":' + a.model_dump_json().encode() + b"}" if isinstance(a, Prediction)
             else json.dumps(jsonable_encoder(a.to_body()), ensure_ascii=False, allow_nan=False).encode()
             for a in answers]
    return Response(b'{"results":[' + b",".join(parts) + b"]}", media_type="application/json")


def _one(service: PolicyService, req: PredictRequest) -> Prediction | QaiError:
    try:
        return service.predict(req)
    except QaiError as err:
        return err
    except Exception:  # one bad item must not fail the others; details never carry internals
        log.exception("a prediction failed")
        return QaiError("internal.error", "this prediction failed unexpectedly", status=500)
