"""``qai manifest create|sign|verify|show`` and ``qai jobs submit|get|list`` (client side; needs only sdk)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from sdk.client import BATCH_ITEMS, Client
from sdk.dsse import parse_envelope
from sdk.errors import QaiError
from sdk.manifest import dump_yaml, load_document, new_manifest, parse_manifest, verify_manifest
from sdk.output import JsonFlag, console, fail, print_json, progress, table
from sdk.signing import KeyDocument

manifest_app = typer.Typer(help="Run-manifests: create, sign, verify offline, show.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs: submit signed manifests, read them back.", no_args_is_help=True)

ServerOpt = Annotated[str, typer.Option("--server", envvar="QAI_URL", help="URL of a qai server.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="QAI_TOKEN", help="Bearer token.")]
Format = Annotated[Literal["json", "yaml"], typer.Option("--format", help="Output format.")]


def _write(text: str, out: Path | None) -> None:
    if out is None:
        typer.echo(text, nl=not text.endswith("\n"))
    else:
        out.write_text(text)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise QaiError("cli.unreadable", f"cannot read {path}: {exc.strerror}") from exc


@manifest_app.command("create")
def create(
    qasm: Annotated[Path, typer.Argument(help="OpenQASM 3 file.")],
    tenant: Annotated[str, typer.Option(help="Tenant.")],
    shots: Annotated[int, typer.Option(help="Shots.")] = 1024,
    crypto_mode: Annotated[str, typer.Option(help="classical, hybrid or pqc-required.")] = "hybrid",
    suite: Annotated[str, typer.Option(help="Suite that will sign it.")] = "ML-DSA-65+ECDSA-P256",
    em_method: str = "none",
    em_version: str = "-",
    seed: Annotated[int | None, typer.Option(help="Default: random, recorded.")] = None,
    priority_class: str = "standard",
    backend_id: str | None = None,
    fmt: Format = "json",
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of stdout.")] = None,
) -> None:
    """Build an unsigned manifest for a QASM file (fresh job id, current time, circuit hash)."""
    try:
        extra: dict[str, object] = {"priority_class": priority_class}
        if backend_id:
            extra["backend_id"] = backend_id
        m = new_manifest(tenant=tenant, qasm=_read(qasm).decode(), shots=shots, pqc_suite=suite,
                         crypto_mode=crypto_mode, em_method=em_method, em_version=em_version,  # type: ignore[arg-type]
                         seed=seed, **extra)  # type: ignore[arg-type]
    except QaiError as exc:
        fail(exc, False)
        return
    _write(dump_yaml(m) if fmt == "yaml" else m.to_bytes().decode() + "\n", out)


@manifest_app.command("sign")
def sign(
    manifest: Annotated[Path, typer.Argument(help="Manifest file (JSON or YAML).")],
    key: Annotated[str, typer.Option(help="KMS key to sign with.")],
    server: ServerOpt,
    token: TokenOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the envelope here.")] = None,
) -> None:
    """Sign a manifest through the KMS API; prints the DSSE envelope."""
    try:
        m = parse_manifest(_read(manifest))
        with Client(server, token) as client:
            envelope = client.sign_manifest(m, key)
    except QaiError as exc:
        fail(exc, False)
        return
    _write(envelope.to_bytes().decode() + "\n", out)


@manifest_app.command("verify")
def verify(
    envelope: Annotated[Path, typer.Argument(help="Signed manifest (DSSE envelope).")],
    key: Annotated[Path, typer.Option("--key", help="Public key document(s), JSON (qai keys export-public).")],
    as_json: JsonFlag = False,
) -> None:
    """Verify a signed manifest offline, with public keys only."""
    try:
        docs = json.loads(_read(key))
        docs = docs if isinstance(docs, list) else [docs]
        keys = {d["name"]: KeyDocument.model_validate(d) for d in docs}
        v = verify_manifest(parse_envelope(_read(envelope)), keys)
    except QaiError as exc:
        fail(exc, as_json)
        return
    except (KeyError, TypeError, ValueError):
        fail(QaiError("cli.bad_key_file", f"{key} does not hold key documents"), as_json)
        return
    result = {"valid": True, "job_id": str(v.manifest.job_id), "tenant": v.manifest.tenant,
              "key": f"{v.key.name}@{v.version.version}", "suite": v.key.suite, "crypto_mode": v.manifest.crypto_mode}
    if as_json:
        print_json(result)
    else:
        console.print(f"[green]valid[/]: job {result['job_id']} of {result['tenant']}, signed by {result['key']} "
                      f"({result['suite']}, {result['crypto_mode']})")


@manifest_app.command("show")
def show(
    path: Annotated[Path, typer.Argument(help="A manifest or a signed manifest.")],
    fmt: Format = "yaml",
) -> None:
    """Print a manifest (the payload, for an envelope) as YAML or JSON. Verifies nothing."""
    try:
        data = _read(path)
        doc = load_document(data)
        if isinstance(doc, dict) and "payloadType" in doc:
            data = parse_envelope(json.dumps(doc).encode()).payload_bytes()
        m = parse_manifest(data)
    except QaiError as exc:
        fail(exc, False)
        return
    _write(dump_yaml(m) if fmt == "yaml" else json.dumps(m.model_dump(mode="json", exclude_none=True), indent=2), None)


@jobs_app.command("submit")
def submit(
    envelopes: Annotated[list[Path], typer.Argument(help="Signed manifests (JSON or YAML); several go in batches.")],
    server: ServerOpt,
    token: TokenOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Submit signed manifests; prints each job id and its ledger entry. Several files go through
    POST /v1/jobs/batch, where each stands alone: the command exits 1 if any was rejected."""
    try:
        with Client(server, token) as client:
            if len(envelopes) == 1:
                out = client.submit_job(_read(envelopes[0]))
                results = [out | {"status": 201 if out["created"] else 200}]
            else:
                docs = [parse_envelope(json.dumps(load_document(_read(p))).encode()) for p in envelopes]
                with progress(as_json) as bar:
                    task = bar.add_task("submitting", total=len(docs))
                    results = []
                    for i in range(0, len(docs), BATCH_ITEMS):
                        results += client.submit_jobs(docs[i:i + BATCH_ITEMS])
                        bar.advance(task, len(docs[i:i + BATCH_ITEMS]))
    except QaiError as exc:
        fail(exc, as_json)
        return
    failed = [r for r in results if "error" in r]
    if as_json:
        print_json(results[0] if len(envelopes) == 1 else {"results": results})
    else:
        for path, r in zip(envelopes, results, strict=True):
            if "error" in r:
                console.print(f"{path}: rejected: {r['error']['code']}: {r['error']['message']}")
            else:
                state = "stored" if r["created"] else "already stored"
                console.print(f"job {r['job_id']} {state}; ledger entry {r['receipt']['index']}")
    if failed:
        raise typer.Exit(1)


@jobs_app.command("get")
def get(job_id: str, server: ServerOpt, token: TokenOpt = None, as_json: JsonFlag = False) -> None:
    """A job: status, storage locations, ledger index (and the envelope with --json)."""
    try:
        with Client(server, token) as client:
            job = client.get_job(job_id)
    except QaiError as exc:
        fail(exc, as_json)
        return
    if as_json:
        print_json(job)
    else:
        table(f"job {job_id}", ["field", "value"], [(k, v) for k, v in job.items() if k != "envelope"])


@jobs_app.command("list")
def list_jobs(
    server: ServerOpt,
    token: TokenOpt = None,
    tenant: str | None = None,
    status: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
    as_json: JsonFlag = False,
) -> None:
    """Jobs, oldest first; pass --cursor to page on."""
    try:
        with Client(server, token) as client:
            page = client.list_jobs(tenant=tenant, status=status, limit=limit, cursor=cursor)
    except QaiError as exc:
        fail(exc, as_json)
        return
    if as_json:
        print_json(page)
        return
    table("jobs", ["job id", "tenant", "status", "priority", "ledger", "uploaded"],
          [(j["job_id"], j["tenant"], j["status"], j["priority_class"], j["ledger_index"], j["uploaded"])
           for j in page["jobs"]])
    if page["next_cursor"]:
        console.print(f"next page: --cursor {page['next_cursor']}")
