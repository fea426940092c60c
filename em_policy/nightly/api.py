"""``GET /v1/reports/latest`` (the newest nightly dashboard) and its files; ``GET /v1/nightly/runs``."""

from __future__ import annotations

import mimetypes
from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from sqlalchemy import select

from em_policy.nightly.models import NightlyRunRow
from orchestrator.http import PrincipalDep, ServicesDep
from orchestrator.services import Services
from sdk.errors import QaiError

router = APIRouter(prefix="/v1", tags=["nightly"])
REPORT_FILE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def latest_report(svc: Services) -> dict[str, Any]:
    """The newest run that published a dashboard."""
    with svc.db.read() as s:
        for row in s.scalars(select(NightlyRunRow).where(NightlyRunRow.status != "running")
                             .order_by(NightlyRunRow.started_at.desc()).limit(50)):
            report = row.summary.get("report")
            if report:
                return {"run_id": row.run_id, "status": row.status, **report}
    raise QaiError("nightly.no_report", "no nightly run has published a dashboard yet", status=404)


@router.get("/reports/latest", summary="The newest nightly dashboard (redirects to its index.html)")
async def report_latest(svc: ServicesDep, _: PrincipalDep) -> RedirectResponse:
    found = await run_in_threadpool(latest_report, svc)
    return RedirectResponse(f"/v1/reports/{found['run_id']}/index.html", status_code=307)


@router.get("/reports/{run_id}/{name}", summary="A file of a nightly dashboard (HTML, PNG, data.json)")
async def report_file(run_id: str, name: str, svc: ServicesDep, _: PrincipalDep) -> Response:
    if not run_id.startswith("nr-") or set(name) - REPORT_FILE_CHARS or set(run_id) - REPORT_FILE_CHARS \
            or name.startswith("."):
        raise QaiError("nightly.bad_report_path", "not a report file name", status=422)
    try:
        data = await run_in_threadpool(svc.objects.get, f"nightly/reports/{run_id}/{name}")
    except QaiError as exc:
        if exc.code == "object.not_found":
            raise QaiError("nightly.no_report", f"no report file {run_id}/{name}", status=404) from exc
        raise
    return Response(data, media_type=mimetypes.guess_type(name)[0] or "application/octet-stream")


@router.get("/nightly/runs", summary="The latest nightly runs, newest first")
async def runs(svc: ServicesDep, _: PrincipalDep, limit: int = 20) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        with svc.db.read() as s:
            rows = s.scalars(select(NightlyRunRow).order_by(NightlyRunRow.started_at.desc())
                             .limit(max(1, min(limit, 200)))).all()
        return [{"run_id": r.run_id, "status": r.status, "scheduled_for": r.scheduled_for.isoformat(),
                 "steps": r.steps, "error": r.error, "missing": r.summary.get("missing", {}),
                 "alerts": r.summary.get("alerts", []), "retrain": r.summary.get("retrain")} for r in rows]

    return await run_in_threadpool(read)
