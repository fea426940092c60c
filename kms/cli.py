"""``qai keys …`` and ``qai kms …``: key lifecycle, audit verification, self-test."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.progress import Progress

from orchestrator.cli import cli_errors, cli_principal, services
from sdk.crypto import public_key_pem
from sdk.errors import QaiError, VerificationError
from sdk.output import JsonFlag, console, fail, print_json, table
from sdk.signing import KeyDocument, b64decode, parse_suite

keys_app = typer.Typer(help="KMS keys: create, list, show, rotate, revoke, export-public.",
                       no_args_is_help=True)
kms_app = typer.Typer(help="KMS operations: audit verification, self-test, token inspection.",
                      no_args_is_help=True)
audit_app = typer.Typer(help="The KMS audit log.", no_args_is_help=True)
kms_app.add_typer(audit_app, name="audit")

# Suites the self-test exercises: the defaults plus every algorithm at least once.
SELFTEST_SUITES = (
    "ML-DSA-65+ECDSA-P256",
    "ML-DSA-44+Ed25519",
    "ML-DSA-87+SLH-DSA-SHA2-128s",
    "SLH-DSA-SHA2-128f+ECDSA-P256",
)
SELFTEST_KEMS = ("ML-KEM-768", "ML-KEM-1024")
SELFTEST_TENANT = "qai-selftest"


def _show(doc: KeyDocument) -> None:
    table(f"key {doc.name} (tenant {doc.tenant}, {doc.purpose}, suite {doc.suite})",
          ["version", "state", "created", "revoked", "reason", "algorithms"],
          [(v.version, v.state, v.created_at.isoformat(),
            v.revoked_at.isoformat() if v.revoked_at else "", v.revocation_reason or "",
            ", ".join(v.public_keys)) for v in doc.versions])


@keys_app.command("create")
def keys_create(
    name: str,
    tenant: Annotated[str, typer.Option(help="Owning tenant.")],
    suite: Annotated[str | None, typer.Option(help="e.g. ML-DSA-65+ECDSA-P256 (default).")] = None,
    purpose: Annotated[str, typer.Option(help="signing or kem.")] = "signing",
    as_json: JsonFlag = False,
) -> None:
    """Create a key (version 1)."""
    with cli_errors(as_json):
        doc = services().kms.create_key(name, tenant=tenant, suite=suite, purpose=purpose,
                                        principal=cli_principal())
    print_json(doc) if as_json else _show(doc)


@keys_app.command("list")
def keys_list(tenant: str | None = None, as_json: JsonFlag = False) -> None:
    with cli_errors(as_json):
        docs = services().kms.list_keys(principal=cli_principal(), tenant=tenant)
    if as_json:
        print_json(docs)
        return
    table("keys", ["name", "tenant", "purpose", "suite", "versions", "latest enabled"],
          [(d.name, d.tenant, d.purpose, d.suite, len(d.versions),
            max((v.version for v in d.versions if v.state == "enabled"), default="-"))
           for d in docs])


@keys_app.command("show")
def keys_show(name: str, as_json: JsonFlag = False) -> None:
    with cli_errors(as_json):
        doc = services().kms.public_key(name)
    print_json(doc) if as_json else _show(doc)


@keys_app.command("rotate")
def keys_rotate(name: str, as_json: JsonFlag = False) -> None:
    """Add a version; new signatures use it, old versions still verify."""
    with cli_errors(as_json):
        doc = services().kms.rotate(name, principal=cli_principal())
    print_json(doc) if as_json else _show(doc)


@keys_app.command("revoke")
def keys_revoke(
    name: str,
    version: Annotated[int, typer.Option(help="Version to revoke.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the audit log).")],
    as_json: JsonFlag = False,
) -> None:
    """Revoke a version: signatures dated after now stop verifying."""
    with cli_errors(as_json):
        doc = services().kms.revoke(name, version, principal=cli_principal(), reason=reason)
    print_json(doc) if as_json else _show(doc)


@keys_app.command("disable")
def keys_disable(name: str, version: Annotated[int, typer.Option()], as_json: JsonFlag = False) -> None:
    """Stop signing with a version; its signatures still verify."""
    with cli_errors(as_json):
        doc = services().kms.disable(name, version, principal=cli_principal())
    print_json(doc) if as_json else _show(doc)


@keys_app.command("export-public")
def keys_export_public(
    name: str,
    fmt: Annotated[Literal["json", "pem", "raw"], typer.Option("--format")] = "json",
    version: Annotated[int | None, typer.Option(help="Default: latest (pem/raw).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """Export public material: the JSON key document (all versions), PEM or raw hex."""
    with cli_errors(False):
        doc = services().kms.public_key(name)
        if fmt == "json":
            text = doc.model_dump_json(indent=2) + "\n"
        else:
            chosen = [v for v in doc.versions if version is None or v.version == version]
            if not chosen:
                raise QaiError("kms.version_not_found", f"{name} has no version {version}", status=404)
            v = chosen[-1]
            if fmt == "pem":
                text = "".join(public_key_pem(a, b64decode(k, what="key")) for a, k in v.public_keys.items())
            else:
                text = "".join(f"{a} {b64decode(k, what='key').hex()}\n" for a, k in v.public_keys.items())
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        console.print(f"wrote {out}")


@audit_app.command("verify")
def kms_audit_verify(as_json: JsonFlag = False) -> None:
    """Check the audit log's hash chain; name the first record that breaks it."""
    from kms.audit import verify_chain

    with cli_errors(as_json), Progress(console=console, transient=True, disable=as_json) as progress:
        task = progress.add_task("verifying audit chain", total=None)
        report = verify_chain(services().db, progress=lambda n: progress.update(task, completed=n))
    if as_json:
        print_json(report)
    elif report.ok:
        console.print(f"[green]audit chain OK[/]: {report.records} records, head {report.head}")
    else:
        console.print(f"[red]audit chain BROKEN[/] at record {report.first_break}")
    if not report.ok:
        raise typer.Exit(code=1)


def run_selftest() -> list[dict[str, object]]:
    """Sign and verify with every suite (and a KEM round trip); returns one row per suite."""
    from orchestrator.auth import ensure_tenant

    svc = services()
    principal = cli_principal()
    ensure_tenant(svc.db, SELFTEST_TENANT)
    rows: list[dict[str, object]] = []
    message = b"qai kms self-test"
    for suite in SELFTEST_SUITES:
        name = "selftest." + suite.lower().replace("+", ".")
        try:
            svc.kms.public_key(name)
        except QaiError:
            svc.kms.create_key(name, tenant=SELFTEST_TENANT, suite=suite, principal=principal)
        t0 = time.perf_counter()
        bundle = svc.kms.sign(name, principal=principal, message=message)
        sign_ms = (time.perf_counter() - t0) * 1000
        version = svc.kms.verify(bundle, message, principal=principal)
        tampered_rejected = False
        try:
            svc.kms.verify(bundle, message + b"!", principal=principal)
        except VerificationError:  # a refusal for another reason (the KMS unreachable) is not a pass
            tampered_rejected = True
        rows.append({"suite": suite, "algorithms": list(parse_suite(suite)), "version": version.version,
                     "sign_ms": round(sign_ms, 2), "verified": True,
                     "tamper_rejected": tampered_rejected})
    for kem in SELFTEST_KEMS:
        name = "selftest." + kem.lower()
        try:
            svc.kms.public_key(name)
        except QaiError:
            svc.kms.create_key(name, tenant=SELFTEST_TENANT, suite=kem, purpose="kem", principal=principal)
        t0 = time.perf_counter()
        kem_version, ct, shared = svc.kms.encapsulate(name)
        ok = svc.kms.decapsulate(name, kem_version, ct, principal=principal) == shared
        rows.append({"suite": kem, "algorithms": [kem], "version": kem_version,
                     "sign_ms": round((time.perf_counter() - t0) * 1000, 2), "verified": ok,
                     "tamper_rejected": svc.kms.decapsulate(name, kem_version, bytes([ct[0] ^ 1]) + ct[1:],
                                                            principal=principal) != shared})
    return rows


@kms_app.command("selftest")
def kms_selftest(as_json: JsonFlag = False) -> None:
    """Sign and verify with every suite through the HSM and print a table."""
    with cli_errors(as_json):
        rows = run_selftest()
    if as_json:
        print_json(rows)
    else:
        table("KMS self-test", ["suite", "version", "sign/encap ms", "verified", "tamper rejected"],
              [(r["suite"], r["version"], r["sign_ms"], r["verified"], r["tamper_rejected"]) for r in rows])
    if not all(r["verified"] and r["tamper_rejected"] for r in rows):
        fail(QaiError("kms.selftest_failed", "self-test failed", status=500), as_json)


@kms_app.command("token-objects")
def kms_token_objects(as_json: JsonFlag = False) -> None:
    """List the token's private and secret key objects with their protection attributes."""
    with cli_errors(as_json):
        from orchestrator.services import require_hsm

        objs = require_hsm(services(), "qai kms token-objects").key_objects()
    if as_json:
        print_json(objs)
    else:
        table("HSM key objects", ["label", "class", "type", "sensitive", "extractable", "never extractable"],
              [(o.label, o.object_class, o.key_type, o.sensitive, o.extractable, o.never_extractable)
               for o in objs])


__all__ = ["keys_app", "kms_app", "run_selftest"]
