"""``qai worker``: run dispatched jobs (``scheduler.worker``) until stopped."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Annotated

import typer

from orchestrator.cli import cli_errors, services
from sdk.output import JsonFlag, console, print_json


def worker(
    burst: Annotated[bool, typer.Option("--burst", help="Exit once the queue is empty.")] = False,
    max_jobs: Annotated[int | None, typer.Option("--max-jobs", min=1, help="Exit after this many jobs.")] = None,
    worker_id: Annotated[str | None, typer.Option("--worker-id", help="Name in leases and attempts "
                                                  "(default: host:pid:cli:random).")] = None,
    http_port: Annotated[int | None, typer.Option(
        "--http-port", min=1, max=65535,
        help="Serve /healthz, /readyz and /metrics on this port (default: no HTTP server).")] = None,
    http_host: Annotated[str, typer.Option(
        "--http-host", help="Address of the --http-port server (0.0.0.0 for Kubernetes probes).")] = "127.0.0.1",
    as_json: JsonFlag = False,
) -> None:
    """Run queued jobs on their chosen backends, one at a time. SIGTERM or Ctrl-C stops the worker
    after its current job; a worker killed mid-job loses its lease, and the job is retried or failed."""
    from scheduler.dispatch import close_dispatch
    from scheduler.worker import Worker
    from scheduler.worker_http import WorkerHttp

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("scheduler").setLevel(logging.INFO)  # the jobs; not every transpiler pass
    with cli_errors(as_json):
        svc = services()
        if not svc.settings.redis_url:
            console.print("[yellow]no QAI_REDIS_URL: queued jobs come from the database (redelivery sweep)[/]")
        w = Worker(svc, worker_id=worker_id, name="cli")

        def stop(_signum: int, _frame: FrameType | None) -> None:
            w.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        # Started before the loop, so a port already in use fails the command before any job is
        # taken; closed once the loop has returned (after SIGTERM, the current job included).
        http: WorkerHttp | None = None
        try:
            if http_port is not None:
                http = WorkerHttp(w, http_port, http_host).start()
            done = w.run(burst=burst, max_jobs=max_jobs)
        finally:
            if http is not None:
                http.close()
            close_dispatch(svc)
    if as_json:
        print_json({"worker_id": w.worker_id, "jobs": done})
    else:
        console.print(f"worker {w.worker_id}: {done} job(s)")
