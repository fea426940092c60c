"""``qai backends``: the backend registry and its calibration snapshots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from harness.calibration import CalibrationSnapshot
from harness.catalog import BackendInfo
from orchestrator.cli import cli_errors, services
from sdk.errors import QaiError
from sdk.output import JsonFlag, console, print_json, progress, table

backends_app = typer.Typer(help="Backends and their calibration snapshots.", no_args_is_help=True)


def _load_json(path: Path, code: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QaiError("cli.unreadable", f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise QaiError(code, f"{path} is not UTF-8 text", status=422) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise QaiError(code, f"{path} is not JSON: {exc}", status=422) from exc


def _read_import(file: Path, backend_info: Path | None) -> tuple[CalibrationSnapshot, BackendInfo | None]:
    data = _load_json(file, "calibration.malformed")
    if not isinstance(data, dict):
        raise QaiError("calibration.malformed", f"{file} does not hold a JSON object", status=422)
    embedded = data.get("backend")
    if embedded is not None and backend_info is not None:
        raise QaiError("backends.bad_arguments",
                       f"{file} describes its backend already; drop --backend-info or the file's 'backend' object")
    snap = CalibrationSnapshot.from_json(data)
    described = _load_json(backend_info, "backends.bad_info") if backend_info is not None else embedded
    return snap, BackendInfo.from_json(described, snap) if described is not None else None


@backends_app.command("list")
def backends_list(as_json: JsonFlag = False) -> None:
    """Registered backends, by qubit count."""
    from harness.backends import list_backends

    with cli_errors(as_json):
        rows = list_backends(services().db)
    if as_json:
        print_json(rows)
        return
    table("backends", ["backend", "qubits", "2q gate", "vendor", "region", "$/shot", "availability",
                       "crypto modes", "qkd", "last calibration"],
          [(r["backend_id"], r["num_qubits"], r["capabilities"]["two_qubit_gate"], r["vendor"], r["region"],
            f"{r['cost_per_shot']:.5f}", f"{r['availability']:.2f}", ",".join(r["capabilities"]["crypto_modes"]),
            "yes" if r["capabilities"]["qkd"] else "no",
            r["last_calibration_at"].isoformat() if r["last_calibration_at"] else None) for r in rows])


@backends_app.command("show")
def backends_show(backend_id: str, as_json: JsonFlag = False) -> None:
    """One backend: its description and a summary of its latest calibration."""
    from harness.backends import get_backend

    with cli_errors(as_json):
        b = get_backend(services().db, backend_id)
    if as_json:
        print_json(b)
        return
    caps, queue, cal = b["capabilities"], b["queue"], b["latest_calibration"]
    rows: list[tuple[str, Any]] = [
        ("vendor / region", f"{b['vendor']} / {b['region']}"),
        ("status", b["status"]), ("qubits", b["num_qubits"]), ("basis gates", ", ".join(caps["basis_gates"])),
        ("cost per shot (USD)", b["cost_per_shot"]), ("availability", b["availability"]),
        ("queue", ", ".join(f"{k}={v}" for k, v in sorted(queue.items()))),
        ("crypto modes", ", ".join(caps["crypto_modes"])), ("qkd", "yes" if caps["qkd"] else "no"),
        ("max shots", caps["max_shots"]), ("adapter", caps["adapter"]), ("snapshots stored", b["snapshots"]),
    ]
    if cal is not None:
        rows += [
            ("last calibration", cal["id"]), ("calibrated at", cal["created_at"].isoformat()),
            (f"median {cal['two_qubit_gate']} error", f"{cal['median_2q_error']:.3e}"),
            ("median readout error", "-" if cal["median_readout_error"] is None
             else f"{cal['median_readout_error']:.3e}"),
            ("median T1 / T2 (us)", f"{cal['median_t1_seconds'] * 1e6:.0f} / {cal['median_t2_seconds'] * 1e6:.0f}"),
        ]
    table(b["backend_id"], ["field", "value"], rows)


@backends_app.command("status")
def backends_status(backend_id: str,
                    status: Annotated[str, typer.Argument(help="online, offline, maintenance, calibrating or error")],
                    as_json: JsonFlag = False) -> None:
    """Set a backend's operational status; the scheduler sends work only to online backends."""
    from harness.backends import set_status

    with cli_errors(as_json):
        set_status(services().db, backend_id, status)
    if as_json:
        print_json({"backend_id": backend_id, "status": status})
    else:
        console.print(f"{backend_id} is now {status}")


@backends_app.command("import")
def backends_import(
    file: Annotated[Path | None, typer.Argument(help="Calibration JSON (CalibrationSnapshot.to_json shape).")] = None,
    backend_info: Annotated[Path | None, typer.Option(
        "--backend-info", help="JSON describing a backend not yet registered (BackendInfo fields).")] = None,
    load_catalog: Annotated[bool, typer.Option(
        "--catalog", help="Register the whole built-in catalog with its shipped calibrations.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Import a vendor calibration file, or the whole catalog with --catalog. Idempotent."""
    from harness.backends import import_catalog, import_snapshot
    from harness.catalog import catalog

    with cli_errors(as_json):
        if load_catalog == (file is not None):
            raise QaiError("backends.bad_arguments", "give either a calibration FILE or --catalog")
        if load_catalog and backend_info is not None:
            raise QaiError("backends.bad_arguments", "--backend-info goes with a calibration FILE, not --catalog")
        if file is not None:
            snap, info = _read_import(file, backend_info)  # a bad file fails before the services start
            results = [import_snapshot(services().db, snap, info)]
        else:
            db = services().db
            with progress(as_json) as bar:
                task = bar.add_task("importing the catalog", total=len(catalog()))
                results = import_catalog(db, progress=lambda _info: bar.advance(task))
    if as_json:
        print_json(results[0] if file is not None else results)
        return
    for r in results:
        state = "imported" if r.created else "already stored"
        note = "; new backend" if r.backend_created else ""
        latest = "latest" if r.latest else "older than the backend's latest"
        console.print(f"{r.backend_id}: snapshot {r.snapshot_id} {state} ({latest}{note})")
