"""The nightly EM pipeline: a simulated week with injected drift, the one-run-at-a-time lease,
lineage verification and tampering, the webhook and the report endpoint."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from em_policy.nightly import NightlyConfig, run_once
from em_policy.nightly.lineage import chain
from em_policy.nightly.models import NightlyRunRow
from em_policy.nightly.pipeline import begin
from harness.calibration import CalibrationSnapshot, degraded
from harness.catalog import catalog_snapshot
from harness.run import RunConfig
from orchestrator.auth import Role, issue_token
from orchestrator.services import Services
from orchestrator.settings import Settings
from sdk.errors import QaiError
from tests.conftest import LiveServer, storage_settings
from tests.ledger_helpers import ledger_services

BACKENDS = ("fake_manila", "fake_nairobi", "fake_guadalupe")
DRIFTED = "fake_nairobi"
DAY0 = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
SMALL = RunConfig(families=("random", "trotter"), qubits=(2, 3),
                  methods=("unmitigated", "readout", "zne-linear-global", "zne-richardson-global"), shots=1000, seed=1)


@pytest.fixture(params=["postgresql+s3", "sqlite+local"])
def svc(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Services]:
    yield from ledger_services(*storage_settings(request, settings, "nightly"))


@pytest.fixture
def local_svc(settings: Settings, sqlite_db: Any) -> Iterator[Services]:
    yield from ledger_services(settings, sqlite_db)


class Receiver:
    """A local webhook: records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                outer.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def source(missing_from: int | None = None) -> Any:
    """Catalog calibrations; from day 4 (index 3) DRIFTED's error rates are doubled (a new
    calibration); from day ``missing_from`` fake_manila's vendor fails."""

    def get(backend_id: str, now: datetime) -> CalibrationSnapshot:
        day = (now - DAY0).days
        if backend_id == "fake_manila" and missing_from is not None and day >= missing_from:
            raise QaiError("adapter.vendor_error", "calibration endpoint returned 503", status=502)
        snap = catalog_snapshot(backend_id)
        if backend_id == DRIFTED and day >= 3:  # gate, readout and relaxation error rates × 2
            return degraded(snap, 2.0, DAY0 + timedelta(days=3))
        return snap

    return get


def test_a_simulated_week_alerts_retrains_promotes_and_verifies(local_svc: Services, tmp_path: Path) -> None:
    from harness.backends import import_catalog

    svc = local_svc
    import_catalog(svc.db)
    with Receiver() as hook:
        config = NightlyConfig(backends=BACKENDS, workload=SMALL, webhook_url=hook.url, missing_runs_alert=1,
                               workers=2)
        # day 7 trains a candidate without drift (forced): on the same data it can only tie the
        # champion, so it must not be promoted
        week = [run_once(svc, replace(config, force_retrain=d == 6), at=DAY0 + timedelta(days=d),
                         source=source(missing_from=5)) for d in range(7)]

    assert [r["status"] for r in week] == ["ok"] * 5 + ["partial"] * 2, [r["error"] for r in week]
    # day 1 has no champion: it trains one and promotes it (nothing to beat)
    assert week[0]["retrain"]["trained"] and week[0]["retrain"]["promoted"]
    assert week[0]["retrain"]["reason"] == "no champion yet"
    # the drift alert fires on day 4, for the drifted backend only, and on no other day
    drift_alerts = [(d, a["backend_id"], a["metric"]) for d, r in enumerate(week) for a in r["alerts"]
                    if a["kind"] == "drift"]
    assert drift_alerts and {d for d, _, _ in drift_alerts} == {3}
    assert {b for _, b, _ in drift_alerts} == {DRIFTED}
    assert "feature_shift" in {m for _, _, m in drift_alerts}
    day4 = week[3]
    assert day4["drift"][DRIFTED]["feature_shift"] > day4["thresholds"]["psi"]
    assert all(d["feature_shift"] == 0.0 and not d["over"] for b, d in day4["drift"].items() if b != DRIFTED)
    # retraining happens on day 4 only (after day 1's bootstrap), and the candidate is promoted
    # because it beats the champion on the post-drift holdout (the drifted backend's held-out circuits)
    assert [r["retrain"]["trained"] for r in week] == [True, False, False, True, False, False, True]
    retrain = day4["retrain"]
    assert retrain["holdout_backends"] == [DRIFTED]
    assert retrain["champion"] == week[0]["retrain"]["candidate"]
    assert retrain["candidate_holdout_mae"] < retrain["champion_holdout_mae"]
    assert retrain["promoted"] and day4["model_version"] == retrain["candidate"]
    # after promotion the new champion was trained on the drifted calibration: no drift on days 5-7
    assert all(not r["drift"][DRIFTED]["over"] for r in week[4:])

    # the forced candidate of day 7 ties the champion on the holdout: trained, never promoted silently
    forced = week[6]["retrain"]
    assert forced["reason"] == "forced" and not forced["promoted"]
    assert forced["candidate_holdout_mae"] >= forced["champion_holdout_mae"]
    assert week[6]["model_version"] == retrain["candidate"]
    assert [a["kind"] for a in week[6]["alerts"]] == ["model_not_promoted", "backend_missing"]

    # a failing backend: the run goes on (partial), the backend is missing with the reason, and the
    # missing alert fires once it has been missing for more than one run
    assert "503" in week[5]["missing"]["fake_manila"] and "fake_manila" not in week[5]["drift"]
    missing_alerts = [(d, a["backend_id"]) for d, r in enumerate(week) for a in r["alerts"]
                      if a["kind"] == "backend_missing"]
    assert missing_alerts == [(6, "fake_manila")]

    # the webhook got every alert, with the run id, metric, value, threshold and report link
    drift_posts = [b for b in hook.bodies if b["kind"] == "drift"]
    assert {b["run_id"] for b in drift_posts} == {day4["run_id"]}
    assert all(b["backend_id"] == DRIFTED and b["value"] > b["threshold"] and b["report"] for b in drift_posts)
    assert [b["kind"] for b in hook.bodies] == [a["kind"] for r in week for a in r["alerts"]]

    # the dashboard shows the step change: the drifted backend's fidelity drops on day 4
    data = json.loads(svc.objects.get(f"nightly/reports/{week[6]['run_id']}/data.json"))
    assert [h["run_id"] for h in data["history"]] == [r["run_id"] for r in week]

    def mean_fidelity(h: dict[str, Any], backend: str) -> float:
        values = list(h["fidelity"][backend].values())
        return sum(values) / len(values)

    history = data["history"]
    assert mean_fidelity(history[3], DRIFTED) < mean_fidelity(history[2], DRIFTED) - 0.01
    assert abs(mean_fidelity(history[3], "fake_guadalupe") - mean_fidelity(history[2], "fake_guadalupe")) < 1e-9
    assert history[3]["drift"][DRIFTED]["feature_shift"] > data["thresholds"]["feature_shift"]
    assert Path(week[6]["report"]["local"]).read_bytes() == svc.objects.get(week[6]["report"]["path"])

    # lineage verifies for every run, and for the promoted model down to the datasets it used
    for r in week:
        result = chain(svc, r["run_id"])
        assert result["verified"] and result["runs"][0]["statements"]
        steps = [s["step"] for s in result["runs"][0]["statements"]]
        assert steps[:3] == ["refresh", "workload", "store"] and steps[-1] == "publish"
    model = chain(svc, retrain["candidate"])
    assert model["model"]["version"] == retrain["candidate"] and "champion" in model["model"]["aliases"]
    assert {r["dataset"] for r in model["runs"]} >= {week[0]["dataset"], day4["dataset"]}
    assert any(DRIFTED in r["snapshots"] and "~" not in r["snapshots"][DRIFTED] for r in model["runs"])

    # a dataset changed after it was attested breaks the chain, with the step named
    target = svc.settings.home / "objects" / week[1]["dataset_parquet"]
    assert target.exists()
    target.chmod(0o644)
    target.write_bytes(target.read_bytes() + b"tampered")
    with pytest.raises(QaiError) as err:
        chain(svc, week[1]["run_id"])
    assert err.value.code == "nightly.lineage_subject_changed" and "store" in err.value.message


def test_one_run_at_a_time_a_dead_run_is_failed_and_a_fire_is_not_doubled(svc: Services) -> None:
    at = DAY0
    first = begin(svc, "nr-a", at, lease_seconds=600)
    assert first.status == "running"
    with pytest.raises(QaiError) as err:
        begin(svc, "nr-b", at, lease_seconds=600)
    assert err.value.code == "nightly.already_running" and err.value.details["run_id"] == "nr-a"

    # the holder died: its heartbeat stops; the next run marks it failed and starts clean
    with svc.db.write() as s:
        row = s.get(NightlyRunRow, "nr-a")
        assert row is not None
        row.heartbeat_at = datetime.now(UTC) - timedelta(seconds=3600)
    begin(svc, "nr-c", at, lease_seconds=600)
    with svc.db.read() as s:
        rows = {r.run_id: r for r in s.scalars(select(NightlyRunRow))}
    assert rows["nr-a"].status == "failed" and "crashed" in (rows["nr-a"].error or "")
    assert rows["nr-c"].status == "running" and "nr-b" not in rows

    # a finished run serves its fire once: the same fire again is refused (unless asked to rerun)
    with svc.db.write() as s:
        row = s.get(NightlyRunRow, "nr-c")
        assert row is not None
        row.status = "ok"
    with pytest.raises(QaiError) as err:
        begin(svc, "nr-d", at, lease_seconds=600)
    assert err.value.code == "nightly.already_done"
    assert begin(svc, "nr-e", at, lease_seconds=600, again=True).status == "running"


def test_too_few_backends_fails_the_run_with_its_reason_and_publishes_nothing_half_done(local_svc: Services) -> None:
    from harness.backends import import_catalog

    import_catalog(local_svc.db)

    def broken(backend_id: str, now: datetime) -> CalibrationSnapshot:
        raise QaiError("adapter.vendor_error", f"{backend_id}: 503", status=502)

    result = run_once(local_svc, NightlyConfig(backends=BACKENDS, workload=SMALL), at=DAY0, source=broken)
    assert result["status"] == "failed" and result["error"].startswith("nightly.too_few_backends")
    assert [(s["name"], s["status"]) for s in result["steps"]] == [("refresh", "failed")]
    assert set(result["missing"]) == set(BACKENDS)
    assert [a["kind"] for a in result["alerts"]] == ["step_failed"]
    with local_svc.db.read() as s:
        row = s.get(NightlyRunRow, result["run_id"])
        assert row is not None and row.status == "failed" and row.finished_at is not None
    # nothing was stored for it but the failure's own dashboard
    assert local_svc.objects.list("harness/runs/") == []
    # and the next run is not blocked by it
    assert begin(local_svc, "nr-next", DAY0 + timedelta(days=1), lease_seconds=600).status == "running"


def test_report_endpoint_serves_the_latest_dashboard(local_svc: Services) -> None:
    from harness.backends import import_catalog

    import_catalog(local_svc.db)
    result = run_once(local_svc, NightlyConfig(backends=BACKENDS, workload=SMALL, workers=2), at=DAY0,
                      source=source())
    assert result["status"] == "ok"
    token = issue_token(local_svc.db, role=Role.AUDITOR, tenant=None).token
    from orchestrator.app import create_app

    with LiveServer(create_app(local_svc)) as srv, httpx.Client(
            base_url=srv.url, headers={"Authorization": f"Bearer {token}"}) as c:
        latest = c.get("/v1/reports/latest", follow_redirects=True)
        assert latest.status_code == 200 and latest.headers["content-type"].startswith("text/html")
        assert result["run_id"] in latest.text
        png = c.get(f"/v1/reports/{result['run_id']}/fidelity.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        assert c.get(f"/v1/reports/{result['run_id']}/..%2Fsecret").status_code in (404, 422)
        assert c.get("/v1/nightly/runs").json()[0]["run_id"] == result["run_id"]
        assert c.get("/v1/reports/latest", headers={"Authorization": ""}).status_code == 401


def test_a_restarted_scheduler_keeps_its_schedule_and_does_not_start_a_second_run(svc: Services) -> None:
    from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED

    from em_policy.nightly.schedule import JOB_ID, scheduler

    config = NightlyConfig(backends=BACKENDS, workload=SMALL)
    first = scheduler(svc, "0 2 * * *", config, start=False)
    stored = first.get_job(JOB_ID).next_run_time
    first.shutdown(wait=False)

    # the old process is mid-run (its lease is fresh) when the service restarts, and the restart
    # finds tonight's fire missed: it fires once at start-up, and that fire must not start a run
    begin(svc, "nr-old", DAY0, lease_seconds=600)
    again = scheduler(svc, "0 2 * * *", config, start=False)
    assert again.get_job(JOB_ID).next_run_time == stored  # the stored job was kept, not recomputed
    done = threading.Event()
    events: list[Any] = []

    def seen(event: Any) -> None:
        events.append(event)
        done.set()

    again.add_listener(seen, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    again.modify_job(JOB_ID, next_run_time=datetime.now(UTC) - timedelta(minutes=5))
    again.resume()
    try:
        assert done.wait(120), "the missed fire did not run"
    finally:
        again.shutdown(wait=True)
    assert events[0].exception is None  # skipped: nr-old holds the lease
    assert events[0].retval["skipped"] == "nightly.already_running" and events[0].retval["run_id"] == "nr-old"
    with svc.db.read() as s:
        assert [(r.run_id, r.status) for r in s.scalars(select(NightlyRunRow))] == [("nr-old", "running")]


def test_qai_nightly_serve_restarted_mid_run_does_not_start_a_second_run(tmp_path: Path) -> None:
    """The real command: a run is in progress (fresh lease) when ``qai nightly serve`` comes back
    with tonight's fire missed. It fires once at start-up, sees the run, and starts nothing."""
    import os
    import subprocess
    import sys

    from apscheduler.job import Job
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    from em_policy.nightly.schedule import JOB_ID, JOBS_TABLE, MISFIRE_GRACE_SECONDS, fire
    from orchestrator.services import build_services

    home = tmp_path / ".qai"
    services = build_services(Settings(home=home))
    try:
        # what the old process left in the job store: tonight's fire, 5 minutes ago, not yet run
        # (written straight to the store: a scheduler shut down here would process it first)
        config = NightlyConfig(backends=("fake_manila", "fake_nairobi"))
        store = SQLAlchemyJobStore(engine=services.db.engine, tablename=JOBS_TABLE)
        owner = BackgroundScheduler(jobstores={"default": store}, timezone=UTC)  # never started
        store.start(owner, "default")
        store.add_job(Job(owner, id=JOB_ID, func=fire, args=[config], kwargs={}, name="qai nightly run",
                          trigger=CronTrigger.from_crontab("0 2 * * *", timezone=UTC), executor="default",
                          misfire_grace_time=MISFIRE_GRACE_SECONDS, coalesce=True, max_instances=1,
                          next_run_time=datetime.now(UTC) - timedelta(minutes=5)))
        begin(services, "nr-in-progress", DAY0, lease_seconds=600)  # the old process's run, mid-way
    finally:
        services.close()

    env = {**os.environ, "QAI_HOME": str(home)}
    env.pop("SOFTHSM2_CONF", None)
    proc = subprocess.Popen([sys.executable, "-m", "sdk.cli", "nightly", "serve", "--backends",
                             "fake_manila,fake_nairobi"], env={**env, "COLUMNS": "200"}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    skipped = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "skipped: nightly.already_running" in line:
                skipped.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert skipped.wait(180), "".join(seen)
    finally:
        proc.terminate()  # SIGTERM: the command stops its scheduler and exits
        proc.wait(60)
    assert proc.returncode == 0, "".join(seen)
    assert any("nr-in-progress" in line for line in seen)
    services = build_services(Settings(home=home))
    try:
        with services.db.read() as s:
            rows = [(r.run_id, r.status) for r in s.scalars(select(NightlyRunRow))]
        assert rows == [("nr-in-progress", "running")]
    finally:
        services.close()
