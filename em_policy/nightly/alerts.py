"""Nightly alerts: a JSON POST per alert to the configured webhook, and the Prometheus gauges the
alert rules in ``infra/prometheus/`` read.

A webhook that is down does not fail the run (the gauges still say what is wrong, and the run's
summary records the delivery error); it is retried a few times with a short backoff.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import Gauge

WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_SECONDS = 5.0

DRIFT_ALERT = Gauge("qai_nightly_drift_alert", "1 while the last nightly run found drift over a threshold on the "
                    "backend (any metric), else 0", ["backend_id"])
DRIFT_VALUE = Gauge("qai_nightly_drift_value", "The last nightly run's drift metric per backend (mae, bias in "
                    "fidelity units; feature_shift as PSI)", ["backend_id", "metric"])
STEP_OK = Gauge("qai_nightly_step_ok", "1 if the step of the last nightly run succeeded or was skipped, 0 if it "
                "failed", ["step"])
STEP_SECONDS = Gauge("qai_nightly_step_duration_seconds", "Wall time of the step in the last nightly run", ["step"])
MISSING_RUNS = Gauge("qai_nightly_backend_missing_runs", "Consecutive nightly runs the backend has been missing "
                     "from (0 when present)", ["backend_id"])
LAST_RUN_OK = Gauge("qai_nightly_last_run_ok", "1 if the last nightly run ended ok or partial, 0 if it failed")
LAST_RUN_TIME = Gauge("qai_nightly_last_run_timestamp_seconds", "Unix time the last nightly run published")
PREDICTED = Gauge("qai_nightly_predicted_fidelity_ratio", "Mean expected post-EM fidelity the champion predicted in "
                  "the last nightly run, per backend and chosen method", ["backend_id", "method"])
OBSERVED = Gauge("qai_nightly_observed_fidelity_ratio", "Mean fidelity the harness observed in the last nightly run "
                 "for the champion's chosen method, per backend and method", ["backend_id", "method"])


def payload(alert: Mapping[str, Any], *, run_id: str, link: str) -> dict[str, Any]:
    return {"source": "qai.nightly", "run_id": run_id, "kind": alert["kind"], "backend_id": alert.get("backend_id"),
            "metric": alert.get("metric"), "value": alert.get("value"), "threshold": alert.get("threshold"),
            "message": alert["message"], "report": link}


def deliver(alerts: Sequence[Mapping[str, Any]], *, run_id: str, url: str | None, link: str) -> dict[str, Any]:
    """POST each alert to ``url``; returns what was sent and any delivery errors."""
    import httpx

    if not url or not alerts:
        return {"url": url, "sent": 0, "errors": []}
    sent, errors = 0, []
    with httpx.Client(timeout=WEBHOOK_TIMEOUT_SECONDS) as client:
        for alert in alerts:
            body = payload(alert, run_id=run_id, link=link)
            for attempt in range(WEBHOOK_ATTEMPTS):
                try:
                    client.post(url, json=body).raise_for_status()
                    sent += 1
                    break
                except httpx.HTTPError as exc:
                    if attempt == WEBHOOK_ATTEMPTS - 1:
                        errors.append(f"{alert['kind']}: {exc!r}")
                    else:
                        time.sleep(0.5 * 2**attempt)
    return {"url": url, "sent": sent, "errors": errors}


def export(run_id: str, status: str, steps: Sequence[Mapping[str, Any]], drift: Mapping[str, Mapping[str, Any]],
           missing_streaks: Mapping[str, int], alerts: Sequence[Mapping[str, Any]], *,
           predicted_vs_observed: Sequence[Mapping[str, Any]] = (), published_at: float | None = None) -> None:
    """Set the gauges from the last run (a backend absent from ``drift`` keeps no stale alert, and
    the predicted/observed pairs are those of this run only)."""
    for labels in list(DRIFT_ALERT._metrics):  # every backend seen before: cleared, then set again below
        DRIFT_ALERT.labels(*labels).set(0)
    for labels in list(MISSING_RUNS._metrics):
        MISSING_RUNS.labels(*labels).set(0)
    drifting = {a["backend_id"] for a in alerts if a["kind"] == "drift"}
    for backend, d in drift.items():
        DRIFT_ALERT.labels(backend).set(1 if backend in drifting else 0)
        for metric in ("mae", "bias", "feature_shift"):
            if d.get(metric) is not None:
                DRIFT_VALUE.labels(backend, metric).set(float(d[metric]))
    for step in steps:
        STEP_OK.labels(step["name"]).set(0 if step["status"] == "failed" else 1)
        STEP_SECONDS.labels(step["name"]).set(float(step["seconds"]))
    for backend, n in missing_streaks.items():
        MISSING_RUNS.labels(backend).set(n)
    PREDICTED.clear()
    OBSERVED.clear()
    for pair in predicted_vs_observed:
        PREDICTED.labels(pair["backend_id"], pair["method"]).set(float(pair["predicted"]))
        OBSERVED.labels(pair["backend_id"], pair["method"]).set(float(pair["observed"]))
    LAST_RUN_OK.set(0 if status == "failed" else 1)
    LAST_RUN_TIME.set(time.time() if published_at is None else published_at)
