"""Bulk lanes (``orchestrator.http.run_bulk``): a process works on a bounded number of batch
requests per endpoint at once; the rest queue without holding a thread, and single requests pass."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI, Request
from prometheus_client import REGISTRY

from orchestrator.http import run_bulk


def _app(concurrency: int, gate: threading.Event, inside: list[int], peak: list[int]) -> FastAPI:
    app = FastAPI()
    app.state.services = SimpleNamespace(settings=SimpleNamespace(bulk_lane_concurrency=concurrency))
    lock = threading.Lock()

    def work(n: int) -> dict[str, Any]:
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        gate.wait(30)
        with lock:
            inside[0] -= 1
        return {"n": n, "thread": threading.current_thread().name}

    @app.post("/batch/{n}")
    async def batch(n: int, request: Request) -> dict[str, Any]:
        return await run_bulk(request, "batch", work, n)

    @app.get("/single")
    async def single() -> dict[str, bool]:
        return {"ok": True}

    return app


async def _until(check: Any) -> None:
    """Wait for a condition another task brings about (bounded, so a bug fails instead of hanging)."""
    for _ in range(3000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_lane_admits_its_concurrency_and_queues_the_rest(concurrency: int) -> None:
    gate, inside, peak = threading.Event(), [0], [0]
    app = _app(concurrency, gate, inside, peak)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            requests = [asyncio.create_task(c.post(f"/batch/{n}")) for n in range(3)]
            await _until(lambda: "batch" in getattr(app.state, "bulk_lanes", {})  # made by the first request
                         and app.state.bulk_lanes["batch"].statistics().tasks_waiting == 3 - concurrency
                         and inside[0] == concurrency)
            lane: anyio.CapacityLimiter = app.state.bulk_lanes["batch"]
            assert lane.borrowed_tokens == concurrency  # the others wait for a token, not in a thread
            assert REGISTRY.get_sample_value("qai_bulk_lane_waiting_requests", {"lane": "batch"}) == 3 - concurrency
            single = await c.get("/single")  # a request outside the lane is not held up by it
            assert single.json() == {"ok": True}
            gate.set()
            answers = [(await r).json()["n"] for r in requests]
            assert answers == [0, 1, 2]
            assert lane.borrowed_tokens == 0
            assert REGISTRY.get_sample_value("qai_bulk_lane_waiting_requests", {"lane": "batch"}) == 0

    asyncio.run(main())
    assert peak[0] == concurrency
