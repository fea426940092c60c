"""``qai harness``: run the EM regression harness, verify a stored run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sdk.errors import QaiError
from sdk.output import JsonFlag, console, print_json, table

harness_app = typer.Typer(help="EM regression harness: circuits × backends × mitigation methods → Parquet.",
                          no_args_is_help=True)


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip()) if text else ()


@harness_app.command("run")
def run(
    families: Annotated[str, typer.Option(help="Comma-separated: random, trotter, variational.")] =
    "random,trotter,variational",
    backends: Annotated[str | None, typer.Option(help="Comma-separated backend ids (default: the catalog).")] = None,
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated: unmitigated, readout, zne-<linear|poly2|richardson|exp>-<global|gate>[@1,2,3] "
             "(default: unmitigated, readout and ZNE with every factory).")] = None,
    qubits: Annotated[str, typer.Option(help="Sizes: 2-6 or 2,4,6 (2..8).")] = "2-6",
    circuits_per_family: Annotated[int, typer.Option(help="Circuits per (family, size).")] = 1,
    shots: Annotated[int, typer.Option(help="Shots per executed circuit.")] = 4000,
    seed: Annotated[int, typer.Option(help="Run seed: every circuit, layout, fold and shot derives from it.")] = 0,
    depth: Annotated[int | None, typer.Option(help="Override the families' default depth.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Also write the Parquet file here (file or directory); with --no-store the histograms too.")] = None,
    workers: Annotated[int | None, typer.Option(help="Process-pool size (default: CPU count; 1 = in process).")] =
    None,
    dask_scheduler: Annotated[str | None, typer.Option(help="Run on a Dask cluster: tcp://host:port.")] = None,
    adapter: Annotated[str, typer.Option(help="local-aer, ibm-like or braket-like.")] = "local-aer",
    adapter_url: Annotated[str | None, typer.Option(help="Base URL of the ibm-like/braket-like vendor.")] = None,
    no_store: Annotated[bool, typer.Option("--no-store", help="Write Parquet only: no object store, DB or ledger."
                                           )] = False,
    mlqem_bundle: Annotated[Path | None, typer.Option(
        help="EM policy bundle that the ml-qem method applies (default: the registry's champion).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run a harness workload, store it (Parquet, histograms, em_results, signed dataset manifest) and
    print a summary: mean abs error per method and backend, and shot cost."""
    from harness.run import DEFAULT_METHODS, AdapterConfig, RunConfig, parse_qubits
    from harness.service import resolve_snapshots, run_harness, summarize
    from orchestrator.cli import cli_errors, services

    with cli_errors(as_json):
        svc = None if no_store else services()
        method_names = _split(methods) or DEFAULT_METHODS
        bundle: str | None = str(mlqem_bundle) if mlqem_bundle else None
        version: str | None = None
        if "ml-qem" in method_names and bundle is None and svc is not None:
            from em_policy.registry import champion_file

            bundle, version = champion_file(svc)
        config = RunConfig(families=_split(families), qubits=parse_qubits(qubits),
                           circuits_per_family=circuits_per_family, methods=method_names,
                           shots=shots, seed=seed, depth=depth, mlqem_bundle=bundle, mlqem_version=version)
        if adapter not in ("local-aer", "ibm-like", "braket-like"):
            raise QaiError("harness.bad_config", f"unknown adapter {adapter!r}", status=422)
        if adapter != "local-aer" and not adapter_url:
            raise QaiError("harness.bad_config", f"--adapter {adapter} needs --adapter-url", status=422)
        snapshots = resolve_snapshots(svc, _split(backends))
        local = None
        if out is not None:
            local_file = out / "results.parquet" if out.is_dir() or not out.suffix else out
            local_file.parent.mkdir(parents=True, exist_ok=True)
            local = str(local_file)
        done = run_harness(svc, config, snapshots, adapter=AdapterConfig(kind=adapter, url=adapter_url),
                           workers=workers, dask_scheduler=dask_scheduler, quiet=as_json, local_path=local)
        rows, record = done.rows, done.record
        result: dict[str, Any] = {"tasks": done.tasks, "rows": len(rows), "seconds": round(done.seconds, 1),
                                  "failed_rows": sum(r["status"] != "ok" for r in rows), "local_parquet": local}
        if record is not None:
            result.update(run_id=record.run_id, parquet=record.parquet_path, parquet_sha256=record.parquet_sha256,
                          dataset_manifest=record.dataset_manifest_path, ledger_index=record.ledger_index)
        summary = summarize(rows)
    if as_json:
        print_json({**result, "summary": summary})
        return
    print_summary(summary)
    console.print(" ".join(f"{k}={v}" for k, v in result.items() if v is not None))


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def print_summary(summary: list[dict[str, Any]]) -> None:
    backends = sorted({s["backend_id"] for s in summary})
    methods = sorted({s["method"] for s in summary})
    cell = {(s["method"], s["backend_id"]): s for s in summary}
    table("mean abs error (method × backend)", ["method", *backends],
          [[m, *(_fmt(cell[(m, b)]["mean_abs_error"]) if (m, b) in cell else "" for b in backends)] for m in methods])
    rows = []
    for m in methods:
        ss = [s for s in summary if s["method"] == m]
        mults = [s["mean_shot_multiplier"] for s in ss if s["mean_shot_multiplier"] is not None]
        errs = [s["mean_abs_error"] for s in ss if s["mean_abs_error"] is not None]
        rows.append([m, _fmt(sum(errs) / len(errs) if errs else None),
                     _fmt(sum(mults) / len(mults) if mults else None, 2),
                     sum(s["shots"] for s in ss), sum(s["failed"] for s in ss)])
    table("cost per method", ["method", "mean abs error", "shot multiplier", "shots", "failed"], rows)


@harness_app.command("verify")
def verify(run_id: str, as_json: JsonFlag = False) -> None:
    """Check a stored run's signed dataset manifest and every file it lists."""
    from harness.service import verify_run
    from orchestrator.cli import cli_errors, services

    with cli_errors(as_json):
        result = verify_run(services(), run_id)
    if as_json:
        print_json(result)
    else:
        console.print(f"run {run_id}: signature and {result['files']} file(s) verified, {result['rows']} rows")


@harness_app.command("vendor")
def vendor(
    kind: Annotated[str, typer.Option(help="ibm-like or braket-like.")] = "ibm-like",
    backends: Annotated[str | None, typer.Option(help="Comma-separated catalog backends it hosts (default: all).")]
    = None,
    host: str = "127.0.0.1",
    port: int = 8100,
    seed: Annotated[int, typer.Option(help="Seed of the injected faults and queue delays.")] = 0,
    rate_limit: Annotated[float, typer.Option(help="Probability of an injected HTTP 429 per request.")] = 0.0,
    transient_error: Annotated[float, typer.Option(help="Probability of an injected 5xx per request.")] = 0.0,
    job_failure: Annotated[float, typer.Option(help="Probability that an accepted job fails.")] = 0.0,
    stall: Annotated[float, typer.Option(help="Probability that a job never finishes.")] = 0.0,
    queue_delay: Annotated[str, typer.Option(help="Queue delay range in seconds: min,max.")] = "0,0",
    token: Annotated[str | None, typer.Option(help="Bearer token / API key the mock requires.")] = None,
) -> None:
    """Serve a mock QPU vendor (queue delays, 429s, transient failures, stalled jobs) that executes on
    the catalog's calibrated simulators: the remote end of ``--adapter ibm-like|braket-like``."""
    from harness.catalog import catalog, catalog_snapshot
    from harness.vendors import FaultProfile, serve_vendor
    from sdk.output import fail

    try:
        if kind not in ("ibm-like", "braket-like"):
            raise QaiError("vendor.unknown_kind", f"unknown vendor kind {kind!r}", status=422)
        low, high = (float(x) for x in queue_delay.split(","))
        faults = FaultProfile(rate_limit=rate_limit, transient_error=transient_error, job_failure=job_failure,
                              stall=stall, queue_delay_seconds=(low, high))
        ids = _split(backends) or tuple(b.backend_id for b in catalog())
        snapshots = {b: catalog_snapshot(b) for b in ids}
    except QaiError as err:
        fail(err, False)
    except ValueError:
        fail(QaiError("vendor.bad_faults", f"queue delay: expected min,max, got {queue_delay!r}", status=422), False)
    serve_vendor(kind, snapshots, faults, host, port, seed, token=token)  # type: ignore[arg-type]
