"""The ``qai`` command. Its auditor commands need only ``sdk``; server commands join when present."""

from __future__ import annotations

import importlib
import importlib.util

import typer

app = typer.Typer(name="qai", help="qai: quantum workloads with provable provenance.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _register_auditor_commands() -> None:
    from sdk.audit_cli import audit_app
    from sdk.manifest_cli import jobs_app, manifest_app

    app.add_typer(audit_app, name="audit")
    app.add_typer(manifest_app, name="manifest")
    app.add_typer(jobs_app, name="jobs")


def _register_server_commands() -> None:
    # An auditor may install the sdk alone; the server packages are then simply absent.
    if importlib.util.find_spec("orchestrator") is None:
        return
    importlib.import_module("orchestrator.cli").register(app)


_register_auditor_commands()
_register_server_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
