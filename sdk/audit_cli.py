"""``qai audit verify | export | watch``: the auditor's commands. Needs only the ``sdk`` package."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from sdk import merkle
from sdk.audit import (
    DEFAULT_CHECKPOINT_KEY,
    AuditReport,
    BundleSource,
    LedgerSource,
    ServerSource,
    audit,
    export_bundle,
    load_state,
    save_state,
)
from sdk.checkpoint import verify_checkpoint
from sdk.client import Client
from sdk.errors import QaiError
from sdk.output import JsonFlag, console, err_console, fail, print_json, progress
from sdk.signing import KeyDocument

audit_app = typer.Typer(help="Verify ledgers offline: signatures, tree, checkpoints, forks.", no_args_is_help=True)

ServerOpt = Annotated[str | None, typer.Option("--server", envvar="QAI_URL", help="URL of a qai server.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="QAI_TOKEN", help="Bearer token (auditor role).")]
KeysOpt = Annotated[Path | None, typer.Option("--keys", help="JSON file of trusted key documents (pins them).")]
StateOpt = Annotated[Path | None, typer.Option("--state", help="Remember the last verified checkpoint here.")]


def _source(server: str | None, token: str | None, bundle: Path | None) -> LedgerSource:
    if (server is None) == (bundle is None):
        raise QaiError("audit.bad_arguments", "give exactly one of --server or --bundle")
    if bundle is not None:
        return BundleSource(bundle)
    return ServerSource(Client(server or "", token))


def _trusted(path: Path | None) -> dict[str, KeyDocument] | None:
    if path is None:
        return None
    try:
        docs = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise QaiError("audit.bad_keys", f"cannot read trusted keys from {path}: {exc}") from exc
    docs = docs if isinstance(docs, list) else [docs]
    try:
        return {d["name"]: KeyDocument.model_validate(d) for d in docs}
    except (KeyError, TypeError, ValueError) as exc:
        raise QaiError("audit.bad_keys", f"{path} does not hold key documents: {type(exc).__name__}") from exc


def _print_report(report: AuditReport) -> None:
    status = "[bold green]PASS[/]" if report.ok else "[bold red]FAIL[/]"
    console.print(f"{status} ledger {report.origin or ''}: {report.entries} entries, "
                  f"{report.signatures_verified} envelope signatures, {report.checkpoints} checkpoints "
                  f"(latest size {report.latest_checkpoint_size}), root {report.root}")
    for w in report.warnings:
        console.print(f"[yellow]warning[/] {w}")
    first = report.first_failure
    if first is not None:
        where = f"entry {first.index}" if first.index is not None else f"checkpoint {first.checkpoint_size}"
        console.print(f"[bold red]first failure[/] at {where}: {first.code}: {first.message}")
        if len(report.failures) > 1:
            console.print(f"and {len(report.failures) - 1} more failure(s); --json lists them all")


@audit_app.command("verify")
def verify_cmd(
    server: ServerOpt = None,
    token: TokenOpt = None,
    bundle: Annotated[Path | None, typer.Option("--bundle", help="A bundle from `qai audit export`.")] = None,
    keys: KeysOpt = None,
    checkpoint_key: Annotated[str, typer.Option(help="Name of the key that signs checkpoints.")] =
        DEFAULT_CHECKPOINT_KEY,
    origin: Annotated[str | None, typer.Option(help="Expected log origin.")] = None,
    state: StateOpt = None,
    workers: Annotated[int | None, typer.Option(help="Processes for signature checks (default: cores).")] = None,
    allow_uncovered: Annotated[bool, typer.Option(help="Warn, not fail, on entries no checkpoint covers.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Verify every envelope, the tree, every checkpoint and (with --state) no fork since last time."""
    try:
        source = _source(server, token, bundle)
        trusted = _trusted(keys)
        remembered = load_state(state)
        with progress(as_json) as bar:
            task = bar.add_task("verifying", total=None)
            report = audit(source, trusted_keys=trusted, checkpoint_key=checkpoint_key, origin=origin,
                           state=remembered, workers=workers, allow_uncovered=allow_uncovered,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))
    except QaiError as exc:
        fail(exc, as_json)
        return
    # Remember only what this audit matched against the entries, and never step backwards.
    if report.ok and state is not None and report.checkpoint_note is not None and (
            remembered is None or _note_size(report.checkpoint_note) >= _note_size(remembered)):
        save_state(state, report.checkpoint_note)
    print_json(report.to_dict()) if as_json else _print_report(report)
    raise typer.Exit(0 if report.ok else 1)


@audit_app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the bundle to.")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Export entries, envelopes, checkpoints and public keys into a bundle for offline audit."""
    try:
        source = _source(server, token, None)
        with progress(as_json) as bar:
            task = bar.add_task("exporting", total=None)
            n = export_bundle(source, out, progress=lambda done, total: bar.update(task, completed=done, total=total))
    except QaiError as exc:
        fail(exc, as_json)
        return
    result = {"bundle": str(out), "entries": n}
    print_json(result) if as_json else console.print(f"exported {n} entries to {out}")


def _note_size(note: str) -> int:
    try:
        return int(note.split("\n")[1])
    except (IndexError, ValueError):
        return -1


def check_new_checkpoint(client: Client, key: KeyDocument, last: str | None, origin: str | None = None
                         ) -> tuple[str | None, str | None]:
    """(newest verified note, alert or None) for one poll of a monitor."""
    latest = client.ledger_checkpoint()
    if latest is None:
        return last, None
    new = verify_checkpoint(str(latest.get("note", "")), key, origin=origin)
    if last is None:
        return new.note, None
    old = verify_checkpoint(last, key, origin=origin)
    a, b = old.checkpoint, new.checkpoint
    if b.size < a.size:
        return last, f"rollback: the log shrank from {a.size} to {b.size} entries"
    if b.size == a.size:
        return (last, None) if a.root == b.root else (last, f"fork: two signed roots for size {a.size}")
    try:
        merkle.verify_consistency(a.size, b.size, a.root, b.root, client.ledger_consistency(a.size, b.size))
    except QaiError as exc:
        return last, f"fork: size {b.size} does not extend the size {a.size} seen before ({exc.message})"
    return new.note, None


@audit_app.command("watch")
def watch_cmd(
    state: Annotated[Path, typer.Option("--state", help="Where the last seen checkpoint is kept.")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    keys: KeysOpt = None,
    checkpoint_key: Annotated[str, typer.Option(help="Name of the key that signs checkpoints.")] =
        DEFAULT_CHECKPOINT_KEY,
    origin: Annotated[str | None, typer.Option(help="Expected log origin.")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 10.0,
    once: Annotated[bool, typer.Option(help="Poll once and exit.")] = False,
    webhook: Annotated[str | None, typer.Option(help="POST alerts as JSON to this URL.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Monitor checkpoints; exit 1 (and call --webhook) on a fork or a rollback."""
    if server is None:
        fail(QaiError("audit.bad_arguments", "watch needs --server"), as_json)
    client = Client(server or "", token)
    try:
        trusted = _trusted(keys)
        if trusted is not None and checkpoint_key not in trusted:
            raise QaiError("audit.bad_keys", f"--keys holds no key named {checkpoint_key}")
        key = trusted[checkpoint_key] if trusted is not None else client.ledger_key()
        if trusted is None:
            err_console.print("[yellow]warning[/] trusting the checkpoint key served by the log; pass --keys")
        while True:
            last = load_state(state)
            note, alert = check_new_checkpoint(client, key, last, origin)
            if alert is not None:
                body = {"alert": alert, "server": server, "last_verified": last}
                if webhook:
                    try:
                        httpx.post(webhook, json=body, timeout=10)
                    except httpx.HTTPError as exc:
                        err_console.print(f"webhook failed: {type(exc).__name__}")
                print_json(body) if as_json else console.print(f"[bold red]ALERT[/] {alert}")
                raise typer.Exit(1)
            if note is not None and note != last:
                save_state(state, note)
                size = note.split("\n")[1]
                print_json({"ok": True, "tree_size": int(size)}) if as_json else console.print(
                    f"ok: checkpoint {size} is consistent with what was seen before")
            if once:
                return
            time.sleep(interval)
    except QaiError as exc:
        fail(exc, as_json)
