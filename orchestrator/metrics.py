"""Prometheus metrics: every ``qai_…`` metric the services export is defined here (apart from the
TLS server's ``qai_tls_handshakes_total`` in :mod:`kms.tls.models` and the nightly gauges in
:mod:`em_policy.nightly.alerts`, which their own processes also serve), plus ``GET /metrics``.

Conventions (docs/telemetry.md): one ``qai_`` prefix, the unit in the name (``_seconds``,
``_bytes``, ``_entries``, ``_ratio``; counters end in ``_total``), and bounded label values only:
route templates, error codes, suites, methods, plugin names and catalog backend ids. Never a job,
decision or key id, a tenant or a free-text reason.

Hot paths only increment counters and observe histograms (a few microseconds, no I/O). State
that lives in the database (checkpoint age, backlog, backend status) is read when Prometheus
scrapes, by :class:`StateCollector`, from the services :func:`bind` registered.
"""

from __future__ import annotations

import logging
import time
import weakref
from bisect import bisect_left
from collections import Counter as CounterOf
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # no FastAPI at import time: the KMS, HSM and ledger modules import this one
    from fastapi import APIRouter
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from orchestrator.services import Services

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- HTTP
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HTTP_REQUEST_SECONDS = Histogram(
    "qai_http_request_duration_seconds",
    "HTTP request latency by method, matched route template (or <unmatched>) and response status",
    ["method", "route", "status"], buckets=LATENCY_BUCKETS)

# ------------------------------------------------------------------------------------------- ingest
JOBS_INGESTED = Counter("qai_jobs_ingested", "Signed job manifests stored (new jobs; resubmissions not counted)")
JOBS_REJECTED = Counter("qai_jobs_rejected", "Job submissions rejected, by error code", ["reason"])

# -------------------------------------------------------------------------------------- signatures
SIGNATURES = Counter("qai_signatures", "Signatures made (sign) and checked (verify) by suite and outcome (ok, error)",
                     ["operation", "suite", "outcome"])
KMS_AUDIT_RECORDS = Counter("qai_kms_audit_records", "KMS audit-log records committed, by operation and result",
                            ["operation", "result"])

# ------------------------------------------------------------------------------------------ ledger
BULK_LANE_WAITING = Gauge("qai_bulk_lane_waiting_requests",
                          "Batch requests waiting for their bulk lane in this process (orchestrator.http.run_bulk)",
                          ["lane"])
LEDGER_SIZE = Gauge("qai_ledger_size_entries", "Entries in the transparency ledger (set on every append)")
LEDGER_APPEND_SECONDS = Histogram("qai_ledger_append_duration_seconds",
                                  "From queueing a ledger write to its commit (group commit included)",
                                  buckets=LATENCY_BUCKETS)
LEDGER_APPENDED = Counter("qai_ledger_appended_entries", "Entries appended to the ledger by this process")
LEDGER_CHECKPOINTS = Counter("qai_ledger_checkpoints", "Signed ledger checkpoints written by this process")

# -------------------------------------------------------------------------------------------- policy
SHOT_MULTIPLIER_BUCKETS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)
POLICY_PREDICTIONS = Counter("qai_policy_predictions", "EM policy predictions by recommended method", ["method"])
POLICY_REFUSED = Counter("qai_policy_prediction_errors", "Prediction requests refused, by error code", ["code"])
POLICY_SHOT_MULTIPLIER = Histogram("qai_policy_shot_multiplier_ratio",
                                   "Shot overhead of the recommended EM method (mitigated / requested shots)",
                                   buckets=SHOT_MULTIPLIER_BUCKETS)
POLICY_EXPECTED_FIDELITY = Histogram("qai_policy_expected_fidelity_ratio",
                                     "Expected post-EM fidelity of the recommendation",
                                     buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0))

# ------------------------------------------------------------------------------------------ scheduler
SCHEDULER_DECISIONS = Counter("qai_scheduler_decisions", "Scheduling decisions recorded, by chosen backend "
                              "(none: nothing fit)", ["backend_id"])
SCHEDULER_FILTER_REJECTIONS = Counter("qai_scheduler_filter_rejections",
                                      "Backends ruled out by a filter plugin in recorded decisions", ["plugin"])
SCHEDULER_CRYPTO_VIOLATIONS = Counter(
    "qai_scheduler_crypto_violations",
    "Chosen backends that fail the job's crypto mode or the tenant's crypto policy when re-checked "
    "independently of the filters (expected to stay 0)", ["stage"])
SCHEDULER_REPLAYS = Counter("qai_scheduler_replays", "Decision replays, by outcome (ok, failed)", ["outcome"])
SCHEDULER_REPLAY_FAILURES = Counter(
    "qai_scheduler_replay_failures",
    "Decision replays that failed: mismatch (the body does not recompute), rederive (an input no longer matches "
    "its source), tampered (signature, ledger or index check)", ["reason"])

# ------------------------------------------------------------------------------------------- workers
BACKEND_RUNS = Counter(
    "qai_backend_runs",
    "Job attempts a worker ran through a backend's adapter, by catalog backend id and outcome (ok; error: an "
    "execution the adapter gave up on, or the attempt timed out on the backend)", ["backend_id", "outcome"])

# ----------------------------------------------------------------------------------------------- HSM
HSM_SESSION_ERRORS = Counter("qai_hsm_session_errors", "HSM operations that failed on a pooled session",
                             ["operation"])
HSM_SESSIONS_ACQUIRED = Counter("qai_hsm_session_acquisitions", "HSM sessions borrowed from the pool")

for _crypto_stage in ("schedule", "dispatch"):  # exported at 0 from the start, so alerts see a series
    SCHEDULER_CRYPTO_VIOLATIONS.labels(_crypto_stage)
for _outcome in ("ok", "failed"):
    SCHEDULER_REPLAYS.labels(_outcome)


# ---------------------------------------------------------------------------------- scrape-time state
_bound: weakref.ref[Services] | None = None


def bind(svc: Services) -> None:
    """Make ``svc`` the services whose state (ledger, HSM pool, backlog) ``/metrics`` reports."""
    global _bound
    _bound = weakref.ref(svc)
    try:
        LEDGER_SIZE.set(svc.ledger.size())
    except Exception:  # a database that is down must not stop the app from starting
        log.warning("reading the ledger size for the metrics failed", exc_info=True)


def bound() -> Services | None:
    return _bound() if _bound is not None else None


class StateCollector(Collector):
    """Gauges read at scrape time: a few indexed queries per scrape, none on request paths."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        svc = bound()
        pool_size = GaugeMetricFamily("qai_hsm_session_pool_size_sessions", "Sessions in the HSM session pool")
        in_use = GaugeMetricFamily("qai_hsm_session_pool_in_use_sessions", "HSM sessions borrowed right now")
        age = GaugeMetricFamily("qai_ledger_checkpoint_age_seconds",
                                "Seconds since the latest signed ledger checkpoint (NaN before the first)")
        backlog = GaugeMetricFamily("qai_scheduler_backlog_seconds", "Expected run seconds of queued and running "
                                    "jobs, per backend and priority class", labels=["backend_id", "priority_class"])
        up = GaugeMetricFamily("qai_backend_up", "1 while the registered backend's status is online, else 0",
                               labels=["backend_id"])
        depth = GaugeMetricFamily("qai_dispatch_queue_depth", "Jobs queued for a worker (decided, not yet running), "
                                  "per priority class", labels=["priority_class"])
        outbox = GaugeMetricFamily("qai_outbox_pending_envelopes",
                                   "Signed envelopes in the database outbox, not yet in the object store")
        if svc is not None:
            if svc.hsm is not None:  # a process that signs through the KMS API has no pool
                pool_size.add_metric([], float(svc.hsm.config.pool_size))
                in_use.add_metric([], float(svc.hsm.in_use))
            age.add_metric([], _checkpoint_age(svc))
            for (backend_id, priority_class), seconds in _backlog(svc):
                backlog.add_metric([backend_id, priority_class], seconds)
            for backend_id, online in _backends(svc):
                up.add_metric([backend_id], 1.0 if online else 0.0)
            for priority_class, jobs in _queue_depth(svc):
                depth.add_metric([priority_class], jobs)
            outbox.add_metric([], _outbox_pending(svc))
        yield from (pool_size, in_use, age, backlog, up, depth, outbox)


def _outbox_pending(svc: Services) -> float:
    """What the uploader (a process of its own under qai serve) has yet to move: job envelopes not
    marked uploaded and the rows of ``object_outbox`` (scheduler decisions), refused copies included."""
    try:
        return float(svc.uploader.pending())
    except Exception:
        log.warning("reading the outbox for the metrics failed", exc_info=True)
        return float("nan")


def _checkpoint_age(svc: Services) -> float:
    try:
        row = svc.ledger.latest_checkpoint_row()
    except Exception:
        log.warning("reading the latest checkpoint for the metrics failed", exc_info=True)
        return float("nan")
    if row is None:
        return float("nan")
    at = row.at if row.at.tzinfo else row.at.replace(tzinfo=UTC)
    return max(0.0, time.time() - at.timestamp())


def _backlog(svc: Services) -> Iterable[tuple[tuple[str, str], float]]:
    try:
        from scheduler.service import scheduler

        return sorted(scheduler(svc).backlog().items())
    except Exception:
        log.warning("reading the backlog for the metrics failed", exc_info=True)
        return []


def _queue_depth(svc: Services) -> Iterable[tuple[str, float]]:
    """Every priority class, 0 included (an alert on a class needs its series)."""
    try:
        from sqlalchemy import func, select

        from orchestrator.jobs import ManifestRow
        from scheduler.engine import PRIORITY_CLASSES

        with svc.db.read() as s:
            rows = s.execute(select(ManifestRow.priority_class, func.count()).where(ManifestRow.status == "queued")
                             .group_by(ManifestRow.priority_class)).all()
        counts = {str(c): float(n) for c, n in rows}
        return [(c, counts.get(c, 0.0)) for c in PRIORITY_CLASSES]
    except Exception:
        log.warning("reading the queue depth for the metrics failed", exc_info=True)
        return []


def _backends(svc: Services) -> Iterable[tuple[str, bool]]:
    try:
        from harness.backends import list_backends

        return [(str(b["backend_id"]), b["status"] == "online") for b in list_backends(svc.db)]
    except Exception:
        log.warning("reading the backends for the metrics failed", exc_info=True)
        return []


_collector = StateCollector()
REGISTRY.register(_collector)


# ------------------------------------------------------------------------------------------- helpers
def observe_decision(body: dict[str, Any]) -> None:
    """Count one recorded decision: its chosen backend and every filter that rejected a backend."""
    chosen = body.get("chosen")
    SCHEDULER_DECISIONS.labels(chosen["backend_id"] if chosen else "none").inc()
    rejected: CounterOf[str] = CounterOf(str(f.get("plugin")) for row in body.get("backends", ())
                                         for f in row.get("filters", ()) if f.get("verdict") == "reject")
    for plugin, count in rejected.items():  # one increment per plugin, not per rejection
        SCHEDULER_FILTER_REJECTIONS.labels(plugin).inc(count)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value, with one increment per bucket touched rather than a
    call per value. The EM policy observes two values per prediction: 70 calls per scheduling
    decision, 0.15 ms of it. prometheus_client has no batch observe, so this does what its
    ``observe`` does, on the same fields (a test compares the two): the sum, then the first bucket
    whose upper bound is at least the value (none for NaN)."""
    if not values:
        return
    histogram._raise_if_not_observable()  # type: ignore[no-untyped-call]
    bounds: list[float] = histogram._upper_bounds
    counts = [0] * len(bounds)
    for v in values:
        if v == v:  # NaN falls in no bucket, as in observe
            counts[bisect_left(bounds, v)] += 1
    histogram._sum.inc(sum(values))
    for i, n in enumerate(counts):
        if n:
            histogram._buckets[i].inc(n)


# ------------------------------------------------------------------------------------- HTTP plumbing
class RequestMetrics:
    """Pure ASGI middleware: one histogram observation per HTTP request, labelled with the matched
    route's path template (``/v1/jobs/{job_id}``, never the raw URL) and the response status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            HTTP_REQUEST_SECONDS.labels(scope.get("method", ""), template, str(status)).observe(
                time.perf_counter() - start)


NIGHTLY_REFRESH_SECONDS = 30.0
_nightly_state: dict[str, Any] = {"checked": 0.0, "run_id": None}


def refresh_nightly(svc: Services, *, force: bool = False) -> None:
    """Set the nightly gauges from the latest finished nightly run in the database (at most every
    30 s): the nightly runs as a CronJob whose process is gone by the time Prometheus scrapes, so the
    long-running services export what it last published. A run of this process sets them directly."""
    now = time.monotonic()
    if not force and now - _nightly_state["checked"] < NIGHTLY_REFRESH_SECONDS:
        return
    _nightly_state["checked"] = now
    try:
        from sqlalchemy import select

        from em_policy.nightly import alerts as nightly_alerts
        from em_policy.nightly.models import NightlyRunRow

        with svc.db.read() as s:
            row = s.scalars(select(NightlyRunRow).where(NightlyRunRow.finished_at.is_not(None))
                            .order_by(NightlyRunRow.finished_at.desc()).limit(1)).first()
        if row is None or row.finished_at is None or row.run_id == _nightly_state["run_id"]:
            return
        summary = row.summary or {}
        finished = row.finished_at if row.finished_at.tzinfo else row.finished_at.replace(tzinfo=UTC)
        nightly_alerts.export(row.run_id, row.status, row.steps or [], summary.get("drift", {}),
                              summary.get("missing_streaks", {}), summary.get("alerts", []),
                              predicted_vs_observed=summary.get("predicted_vs_observed", []),
                              published_at=finished.timestamp())
        _nightly_state["run_id"] = row.run_id
    except Exception:
        log.warning("reading the latest nightly run for the metrics failed", exc_info=True)


def _exposition() -> bytes:
    # Imported here, not at the top (the hot-path modules import this one): their metrics register
    # on import, so the families are exported even before the nightly or a TLS handshake sets them.
    import em_policy.nightly.alerts  # noqa: F401
    import kms.tls.models  # noqa: F401

    svc = bound()
    if svc is not None:
        refresh_nightly(svc)
    return generate_latest(REGISTRY)


def metrics_router() -> APIRouter:
    """``GET /metrics``: the Prometheus text exposition, unauthenticated like ``/healthz`` (scrape it
    on the internal network only; see docs/telemetry.md). Not in the OpenAPI schema."""
    from fastapi import APIRouter
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import Response

    router = APIRouter(tags=["health"])

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body = await run_in_threadpool(_exposition)  # the state collector reads the database: off the loop
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router

