"""ASGI entry points for uvicorn: ``orchestrator.main:app`` (everything) and one per component
(``kms_app``, ``ledger_app``, ``jobs_app``, ``em_policy_app``, ``scheduler_app``).

Each app is built when uvicorn first asks for it, so a process builds only the one it serves: a
KMS client process (``QAI_KMS_URL``) can import this module for ``jobs_app`` although it may not
build ``kms_app``.
"""

from __future__ import annotations

from functools import cache

from fastapi import FastAPI

from orchestrator.app import COMPONENTS, create_app

_APPS = {f"{c.replace('-', '_')}_app": (c,) for c in COMPONENTS} | {"app": COMPONENTS}


@cache
def _app(name: str) -> FastAPI:
    return create_app(components=_APPS[name])


def __getattr__(name: str) -> FastAPI:
    if name in _APPS:
        return _app(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
