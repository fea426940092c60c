"""``qai nightly run-once|serve|status|show``, ``qai report open`` and ``qai audit lineage``."""

from __future__ import annotations

import signal
import threading
from typing import Annotated, Any

import typer

from sdk.output import JsonFlag, console, print_json, table

nightly_app = typer.Typer(help="The nightly EM pipeline: benchmark, drift, retrain, dashboard, alerts.",
                          no_args_is_help=True)
report_app = typer.Typer(help="The nightly dashboard.", no_args_is_help=True)

BackendsOpt = Annotated[str, typer.Option(help="Backends, comma-separated (default: every online catalog backend).")]
WebhookOpt = Annotated[str | None, typer.Option(help="POST alerts here (JSON).", envvar="QAI_NIGHTLY_WEBHOOK_URL")]


def _config(backends: str, webhook: str | None, force_retrain: bool = False) -> Any:
    from em_policy.nightly.pipeline import NightlyConfig

    return NightlyConfig(backends=tuple(b.strip() for b in backends.split(",") if b.strip()), webhook_url=webhook,
                         force_retrain=force_retrain)


@nightly_app.command("run-once")
def run_once_cmd(
    backends: BackendsOpt = "",
    webhook: WebhookOpt = None,
    force_retrain: Annotated[bool, typer.Option(help="Train a candidate even without drift.")] = False,
    again: Annotated[bool, typer.Option(help="Run even if a run already served this minute.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """One nightly run now (for an external cron or a Kubernetes CronJob)."""
    from em_policy.nightly.pipeline import run_once
    from orchestrator.cli import cli_errors
    from orchestrator.services import get_services

    with cli_errors(as_json):
        result = run_once(get_services(), _config(backends, webhook, force_retrain), again=again, quiet=as_json)
        if as_json:
            print_json(result)
        else:
            _print_run(result)
        if result["status"] == "failed":
            raise typer.Exit(1)


def _print_run(r: dict[str, Any]) -> None:
    console.print(f"nightly run {r['run_id']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else ""))
    table("steps", ["step", "status", "seconds", "error"],
          [[s["name"], s["status"], f"{s['seconds']:.1f}", s.get("error") or ""] for s in r["steps"]])
    for backend, reason in r.get("missing", {}).items():
        console.print(f"missing: {backend}: {reason}")
    for a in r.get("alerts", []):
        console.print(f"ALERT {a['kind']}: {a['message']}")
    retrain = r.get("retrain") or {}
    if retrain.get("trained"):
        console.print(f"trained {retrain['candidate']} ({retrain['reason']}): holdout MAE "
                      f"{retrain['candidate_holdout_mae']} vs champion {retrain['champion_holdout_mae']}; "
                      f"{'promoted' if retrain['promoted'] else 'NOT promoted'}")
    if r.get("report"):
        console.print(f"report: {r['report']['local']}")


@nightly_app.command("serve")
def serve_cmd(
    cron: Annotated[str, typer.Option(help="When to run (5-field cron, UTC).", envvar="QAI_NIGHTLY_CRON")] =
    "0 2 * * *",
    backends: BackendsOpt = "",
    webhook: WebhookOpt = None,
    metrics_port: Annotated[int, typer.Option(help="Serve /metrics (the nightly gauges) on this port; 0: none.")] = 0,
) -> None:
    """Run the pipeline on a cron schedule (APScheduler, job store in the database) until stopped."""
    from em_policy.nightly.schedule import serve
    from orchestrator.cli import cli_errors
    from orchestrator.services import get_services

    with cli_errors(False):
        if metrics_port:
            from prometheus_client import start_http_server

            start_http_server(metrics_port)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

        def started(sched: Any) -> None:
            from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED

            def outcome(event: Any) -> None:  # one line per fire, whatever became of it
                if event.exception is not None:
                    console.print(f"nightly fire at {event.scheduled_run_time.isoformat()} failed: "
                                  f"{event.exception!r}", markup=False)
                elif "skipped" in event.retval:
                    console.print(f"nightly fire at {event.scheduled_run_time.isoformat()} skipped: "
                                  f"{event.retval['skipped']}: {event.retval['message']}", markup=False)
                else:
                    console.print(f"nightly run {event.retval['run_id']}: {event.retval['status']}", markup=False)

            sched.add_listener(outcome, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
            job = sched.get_job("qai-nightly")
            console.print(f"nightly scheduled ({cron} UTC); next run {job.next_run_time.isoformat()}")

        serve(get_services(), cron, _config(backends, webhook), stop, on_start=started)


@nightly_app.command("status")
def status_cmd(limit: Annotated[int, typer.Option(help="Runs to list, newest first.")] = 20,
               as_json: JsonFlag = False) -> None:
    """The latest nightly runs."""
    from sqlalchemy import select

    from em_policy.nightly.models import NightlyRunRow
    from orchestrator.cli import cli_errors
    from orchestrator.services import get_services

    with cli_errors(as_json):
        svc = get_services()
        with svc.db.read() as s:
            rows = s.scalars(select(NightlyRunRow).order_by(NightlyRunRow.started_at.desc()).limit(limit)).all()
        runs: list[dict[str, Any]] = [
                {"run_id": r.run_id, "status": r.status, "scheduled_for": r.scheduled_for.isoformat(),
                 "started_at": r.started_at.isoformat(),
                 "finished_at": r.finished_at.isoformat() if r.finished_at else None,
                 "alerts": len(r.summary.get("alerts", [])), "missing": sorted(r.summary.get("missing", {})),
                 "model_version": r.summary.get("model_version") or r.summary.get("champion"), "error": r.error}
                for r in rows]
        if as_json:
            print_json(runs)
            return
        table("nightly runs", ["run", "status", "for", "alerts", "missing", "model", "error"],
              [[r["run_id"], r["status"], r["scheduled_for"], str(r["alerts"]), ", ".join(r["missing"]),
                r["model_version"] or "", r["error"] or ""] for r in runs])


@report_app.command("open")
def report_open(as_json: JsonFlag = False) -> None:
    """The latest nightly dashboard: its local path and object-store key."""
    from em_policy.nightly.api import latest_report
    from orchestrator.cli import cli_errors
    from orchestrator.services import get_services

    with cli_errors(as_json):
        found = latest_report(get_services())
        if as_json:
            print_json(found)
        else:
            console.print(found["local"] if found.get("local") else found["path"])


def lineage_cmd(ref: Annotated[str, typer.Argument(help="A nightly run id (nr-…) or a model version (em-policy/3).")],
                as_json: JsonFlag = False) -> None:
    """Verify and print a lineage chain: calibration snapshot → dataset → model version → decisions."""
    from em_policy.nightly.lineage import chain
    from orchestrator.cli import cli_errors
    from orchestrator.services import get_services

    with cli_errors(as_json):
        result = chain(get_services(), ref)
        if as_json:
            print_json(result)
            return
        for r in result["runs"]:
            console.print(f"run {r['run_id']} ({r['status']}, {r['at']}): "
                          f"{len(r['statements'])} statements verified")
            for snap in sorted(r["snapshots"].values()):
                console.print(f"  calibration {snap}")
            if r["dataset"]:
                console.print(f"  → dataset {r['dataset']}")
            if r["model"]:
                console.print(f"  → model {r['model']}")
        if result["model"]:
            m = result["model"]
            console.print(f"model {m['version']} sha256 {m['sha256'][:16]}… ledger {m['ledger_index']} "
                          f"aliases {m['aliases']}: verified")
            console.print(f"  → {len(result['decisions'])} scheduler decision(s) used it")
        console.print("lineage verified")
