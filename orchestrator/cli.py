"""Server-side CLI commands: serve, db, tenants, tokens, demo; plus each service's own commands."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.auth import Principal, Role
from sdk.errors import QaiError
from sdk.output import JsonFlag, console, fail, print_json, table

if TYPE_CHECKING:
    from orchestrator.services import Services


@contextmanager
def cli_errors(as_json: bool) -> Iterator[None]:
    try:
        yield
    except QaiError as err:
        fail(err, as_json)


def cli_principal() -> Principal:
    return Principal.system(f"cli:{getpass.getuser()}")


def services() -> Services:
    from orchestrator.services import get_services

    return get_services()


db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants.", no_args_is_help=True)
tokens_app = typer.Typer(help="API bearer tokens.", no_args_is_help=True)
ledger_app = typer.Typer(help="The run ledger (server side; auditors use `qai audit`).", no_args_is_help=True)


def serve(
    component: Annotated[str, typer.Argument(help="all, or one of: kms, ledger, jobs, em-policy, scheduler")] = "all",
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes, each accepting on a socket of its own "
                                         "(SO_REUSEPORT), so connections spread over them.")] = 1,
) -> None:
    """Serve every component in one process (default) or a single one (``qai serve kms``)."""
    import uvicorn

    from orchestrator.app import COMPONENTS

    if component != "all" and component not in COMPONENTS:
        fail(QaiError("serve.unknown_component", f"unknown component {component!r}",
                      details={"components": ["all", *COMPONENTS]}), False)
    from orchestrator.app import served_components
    from orchestrator.settings import get_settings
    from orchestrator.uploader_process import uploader_process

    settings = get_settings()
    with cli_errors(False):
        served_components(COMPONENTS if component == "all" else (component,), settings.kms_url)
        services()  # migrate and open the HSM (or reach the KMS) before accepting traffic
    factory = "orchestrator.main:app" if component == "all" else f"orchestrator.main:{component.replace('-', '_')}_app"
    with uploader_process(settings, component):  # started after the migration, stopped after the workers
        if workers == 1:
            uvicorn.run(factory, host=host, port=port, log_level="warning")
            return
        from orchestrator.server_processes import serve_processes

        with cli_errors(False):
            code = serve_processes(factory, host, port, workers)
    if code:
        raise typer.Exit(code=code)


def uploader(
    drain: Annotated[bool, typer.Option("--drain", help="Upload what the outbox holds now, then exit.")] = False,
    timeout: Annotated[float, typer.Option(help="With --drain: give up (exit 1, outbox.stuck) after this "
                                           "many seconds.")] = 600.0,
    parent: Annotated[int | None, typer.Option(hidden=True, help="Exit when this process is gone "
                                               "(qai serve passes its pid).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Move signed envelopes from the database outbox to the object store, verified by hash, until
    stopped (SIGTERM or Ctrl-C). `qai serve` runs one itself (QAI_UPLOADER=process); run this one
    where QAI_UPLOADER=external, e.g. as its own Deployment."""
    import logging
    import signal
    import threading
    from types import FrameType

    from orchestrator.settings import get_settings
    from orchestrator.uploader_process import drain_outbox, run_uploader

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if drain:
        with cli_errors(as_json):
            pending = drain_outbox(settings, timeout)
        if as_json:
            print_json({"uploaded": pending})
        else:
            console.print(f"outbox drained: {pending} envelope(s) were pending")
        return
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with cli_errors(as_json):
        run_uploader(settings, stop, parent=parent)


@db_app.command("upgrade")
def db_upgrade(as_json: JsonFlag = False) -> None:
    """Apply all migrations (the services also do this on start-up)."""
    from orchestrator import migrate

    with cli_errors(as_json):
        svc = services()
        rev = migrate.current(svc.db)
    if as_json:
        print_json({"revision": rev, "database": svc.db.dialect})
    else:
        console.print(f"database ({svc.db.dialect}) at revision {rev}")


@tenants_app.command("create")
def tenants_create(name: str, as_json: JsonFlag = False) -> None:
    from orchestrator.auth import create_tenant

    with cli_errors(as_json):
        t = create_tenant(services().db, name)
    print_json({"name": t.name}) if as_json else console.print(f"tenant {t.name} created")


@tenants_app.command("list")
def tenants_list(as_json: JsonFlag = False) -> None:
    from orchestrator.auth import list_tenants

    with cli_errors(as_json):
        rows = list_tenants(services().db)
    if as_json:
        print_json([{"name": t.name, "created_at": t.created_at, "crypto_policy": t.crypto_policy}
                    for t in rows])
    else:
        table("tenants", ["name", "created"], [(t.name, t.created_at.isoformat()) for t in rows])


@tokens_app.command("issue")
def tokens_issue(
    role: Annotated[Role, typer.Option(help="Role of the token.")],
    tenant: Annotated[str | None, typer.Option(help="Tenant (not for admin/auditor).")] = None,
    label: str = "",
    ttl_hours: Annotated[float | None, typer.Option(help="Lifetime; default no expiry.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Issue a bearer token. It is printed once and stored only hashed."""
    from orchestrator.auth import issue_token

    with cli_errors(as_json):
        issued = issue_token(services().db, role=role, tenant=tenant, label=label,
                             ttl=timedelta(hours=ttl_hours) if ttl_hours else None)
    if as_json:
        print_json(issued)
    else:
        console.print(f"token {issued.token_id} ({issued.role.value}, tenant {issued.tenant}):")
        console.print(issued.token, soft_wrap=True)


@tokens_app.command("revoke")
def tokens_revoke(token_id: str, as_json: JsonFlag = False) -> None:
    from orchestrator.auth import revoke_token

    with cli_errors(as_json):
        revoke_token(services().db, token_id)
    print_json({"revoked": token_id}) if as_json else console.print(f"token {token_id} revoked")


@ledger_app.command("status")
def ledger_status(as_json: JsonFlag = False) -> None:
    """Tree size and the latest signed checkpoint."""
    with cli_errors(as_json):
        ledger = services().ledger
        size, row = ledger.size(), ledger.latest_checkpoint_row()
    out = {"tree_size": size, "checkpoint_size": row.size if row else None, "root": row.root if row else None,
           "checkpoint_time": row.at if row else None, "uncovered": size - (row.size if row else 0)}
    if as_json:
        print_json(out)
    else:
        table("ledger", ["tree size", "checkpoint size", "root", "checkpoint time", "uncovered"],
              [[out["tree_size"], out["checkpoint_size"], out["root"], out["checkpoint_time"], out["uncovered"]]])


@ledger_app.command("checkpoint")
def ledger_checkpoint(as_json: JsonFlag = False) -> None:
    """Sign a checkpoint now if the log grew since the last one, and publish it."""
    with cli_errors(as_json):
        cp = services().ledger.checkpoint()
    out = {"created": cp is not None, "tree_size": cp.checkpoint.size if cp else None,
           "note": cp.note if cp else None}
    if as_json:
        print_json(out)
    elif cp is None:
        console.print("no new entries since the last checkpoint")
    else:
        console.print(cp.note, markup=False)


def demo(as_json: JsonFlag = False) -> None:
    """Run the end-to-end demo on the embedded default (make demo)."""
    from orchestrator.demo import run_demo

    with cli_errors(as_json):
        run_demo(services(), as_json=as_json)


def register(app: typer.Typer) -> None:
    from em_policy.cli import policy_app
    from em_policy.nightly.cli import lineage_cmd, nightly_app, report_app
    from harness.backends_cli import backends_app
    from harness.cli import harness_app
    from kms.cli import keys_app, kms_app
    from kms.tls.cli import tls_app
    from orchestrator.supplychain_cli import supplychain_app
    from scheduler.cli import scheduler_app
    from scheduler.worker_cli import worker

    app.command("serve")(serve)
    app.command("uploader")(uploader)
    app.add_typer(db_app, name="db")
    app.add_typer(tenants_app, name="tenants")
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(keys_app, name="keys")
    app.add_typer(kms_app, name="kms")
    app.add_typer(tls_app, name="tls")
    app.add_typer(ledger_app, name="ledger")
    app.add_typer(backends_app, name="backends")
    app.add_typer(harness_app, name="harness")
    app.add_typer(policy_app, name="policy")
    app.add_typer(scheduler_app, name="scheduler")
    app.add_typer(nightly_app, name="nightly")
    from sdk.audit_cli import audit_app

    audit_app.command("lineage")(lineage_cmd)  # needs the server's stores: it joins the auditor's group here
    app.add_typer(report_app, name="report")
    app.add_typer(supplychain_app, name="supplychain")
    app.command("worker")(worker)
    app.command("demo")(demo)
