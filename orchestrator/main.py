"""ASGI entry points for uvicorn: ``orchestrator.main:app`` (everything) and one per component."""

from __future__ import annotations

from orchestrator.app import create_app

app = create_app()
kms_app = create_app(components=("kms",))
ledger_app = create_app(components=("ledger",))
jobs_app = create_app(components=("jobs",))
em_policy_app = create_app(components=("em-policy",))
scheduler_app = create_app(components=("scheduler",))
