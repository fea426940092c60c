"""``qai nightly serve``: APScheduler 3 with a cron trigger and its job store in the database.

The job store is persistent, so a restart neither loses the schedule nor doubles a fire: a fire
missed while the process was down runs once on start-up (``coalesce``, within the grace time).
Whether a run may start is decided by ``pipeline.begin`` in the database, not here: a second
process, or a restarted one while the old run still holds its lease, gets
``nightly.already_running`` and the fire is recorded as skipped in the log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from em_policy.nightly.pipeline import NightlyConfig, run_once
from sdk.errors import QaiError

if TYPE_CHECKING:
    from orchestrator.services import Services

_log = logging.getLogger("qai.nightly")
JOB_ID = "qai-nightly"
JOBS_TABLE = "nightly_apscheduler_jobs"
MISFIRE_GRACE_SECONDS = 6 * 3600  # a fire missed by less than this still runs (once) after a restart


# The services the scheduler of this process runs with: a stored job holds only picklable
# arguments (the config), so it finds them here (or builds the process's own).
_services: Services | None = None


def fire(config: NightlyConfig) -> dict[str, Any]:
    """The scheduled job (module-level, so the job store can reference it by name): the run's
    summary, or ``{"skipped": code, "message": …}`` when the database says no run may start."""
    from orchestrator.services import get_services

    svc = _services or get_services()
    at = datetime.now(UTC)
    try:
        return run_once(svc, config, at=at, scheduled_for=at.replace(second=0, microsecond=0))
    except QaiError as exc:
        if exc.code in ("nightly.already_running", "nightly.already_done"):
            _log.warning("nightly fire skipped: %s", exc.message)
            return {"skipped": exc.code, "message": exc.message, **exc.details}
        raise


def scheduler(svc: Services, cron: str, config: NightlyConfig, *, start: bool = True) -> Any:
    """A background APScheduler whose one job runs ``fire`` on ``cron`` (5 fields, UTC)."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    global _services
    _services = svc

    try:
        trigger = CronTrigger.from_crontab(cron, timezone=UTC)
    except ValueError as exc:
        raise QaiError("nightly.bad_cron", f"{cron!r} is not a 5-field cron expression: {exc}", status=422) from exc
    store = SQLAlchemyJobStore(engine=svc.db.engine, tablename=JOBS_TABLE)
    sched = BackgroundScheduler(jobstores={"default": store}, timezone=UTC,
                                job_defaults={"coalesce": True, "max_instances": 1,
                                              "misfire_grace_time": MISFIRE_GRACE_SECONDS})
    sched.start(paused=True)  # the job store is open now; nothing fires yet
    job = sched.get_job(JOB_ID)
    # Keep a stored job whose schedule is unchanged: replacing it would recompute its next fire
    # from now and lose a fire missed while the process was down.
    if job is None or str(job.trigger) != str(trigger) or tuple(job.args) != (config,):
        sched.add_job(fire, trigger, args=[config], id=JOB_ID, replace_existing=True, name="qai nightly run")
    if start:
        sched.resume()
    return sched


def serve(svc: Services, cron: str, config: NightlyConfig, stop: threading.Event,
          on_start: Callable[[Any], None] | None = None) -> None:
    sched = scheduler(svc, cron, config, start=False)
    try:
        if on_start is not None:  # before anything fires: a fire missed while down runs at resume()
            on_start(sched)
        sched.resume()
        stop.wait()
    finally:
        sched.shutdown(wait=True)
