"""Orchestrator: platform core (settings, database, auth, HTTP) and the API application.

Public API::

    from orchestrator.app import create_app
    from orchestrator.services import build_services, get_services
    from orchestrator.settings import Settings, get_settings

Kept import-free so that services importing ``orchestrator.db`` do not pull in the app.
"""
