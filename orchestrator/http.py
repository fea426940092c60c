"""HTTP plumbing shared by every router: the error body, request limits and authentication."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator import metrics
from orchestrator.auth import Principal, authenticate, remembered
from orchestrator.services import Services
from sdk.errors import QaiError

T = TypeVar("T")


def error_response(err: QaiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.to_body(), status_code=err.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> QaiError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return QaiError("request.malformed_json", "request body is not valid JSON", status=400)
    return QaiError(
        "request.invalid",
        "request does not match the schema",
        status=422,
        details={"errors": [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
                            for e in errors]},
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(QaiError)
    async def _qai(_: Request, exc: QaiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's only own 400 is a body it could not decode (JSON syntax errors arrive as
            # validation errors): in practice, bytes that are not UTF-8.
            return error_response(QaiError("request.bad_encoding",
                                           "request body could not be decoded as UTF-8 JSON", status=400))
        code = {404: "http.not_found", 405: "http.method_not_allowed"}.get(exc.status_code, "http.error")
        return error_response(QaiError(code, str(exc.detail), status=exc.status_code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Never echo the exception text: it could carry internal data.
        return error_response(QaiError("internal.error", "internal error", status=500,
                                       details={"type": type(exc).__name__}))


class BodySizeLimit:
    """Refuse bodies over ``limit`` bytes with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = QaiError("request.too_large", f"request body exceeds {self.limit} bytes",
                             status=413, details={"limit": self.limit})
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await error_response(too_large)(scope, receive, send)
                return
        # No (or a small) Content-Length: read the body here, up to the limit, and replay it.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await error_response(too_large)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# Both dependencies are coroutines on purpose: FastAPI runs a plain-function dependency on a worker
# thread, a hop there and back per dependency per request, each one waiting for the GIL while
# other threads compute.
async def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


ServicesDep = Annotated[Services, Depends(services)]


async def principal(request: Request) -> Principal:
    svc: Services = request.app.state.services
    authorization = request.headers.get("authorization")
    cache_seconds = svc.settings.auth_cache_seconds
    if cache_seconds > 0:
        hit = remembered(svc.db, authorization)  # no database read: fine on the event loop
        if hit is not None:
            return hit
    bootstrap = svc.settings.bootstrap_admin_token
    return await anyio.to_thread.run_sync(functools.partial(
        authenticate, svc.db, authorization, bootstrap=bootstrap.get_secret_value() if bootstrap else None,
        cache_seconds=cache_seconds))


PrincipalDep = Annotated[Principal, Depends(principal)]


async def json_body(request: Request) -> Any:
    """Parse a JSON body ourselves, so that malformed JSON and bad UTF-8 get our codes."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QaiError("request.bad_encoding", "request body is not UTF-8", status=400) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise QaiError("request.malformed_json", f"request body is not valid JSON: {exc.msg}",
                       status=400, details={"line": exc.lineno, "column": exc.colno}) from exc


async def run_bulk(request: Request, lane: str, fn: Callable[..., T], *args: Any) -> T:
    """Run a batch endpoint's work on a worker thread, at most ``bulk_lane_concurrency`` batches of
    ``lane`` at a time in this process; the others wait their turn without holding a thread.

    Why: a batch of 100 jobs is about 100 ms of Python in one request. Several at once in one
    process shared the GIL with every single-job request there, which then waited for all of them:
    single-job p99 340-377 ms with the lanes open against 149-216 ms with one batch at a time, in
    alternating runs (docs/benchmarks.md). Batches are CPU-bound, so queueing them costs little
    throughput. Lanes are made on first use, inside the event loop they belong to."""
    lanes: dict[str, anyio.CapacityLimiter] | None = getattr(request.app.state, "bulk_lanes", None)
    if lanes is None:
        lanes = request.app.state.bulk_lanes = {}
    limiter = lanes.get(lane)
    if limiter is None:
        svc: Services = request.app.state.services
        limiter = lanes[lane] = anyio.CapacityLimiter(svc.settings.bulk_lane_concurrency)
    waiting = metrics.BULK_LANE_WAITING.labels(lane)
    waiting.inc()
    try:
        await limiter.acquire()
    finally:
        waiting.dec()
    try:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args))
    finally:
        limiter.release()
