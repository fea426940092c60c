"""``qai policy``: train, evaluate, predict with and promote the EM policy model."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sdk.errors import QaiError
from sdk.output import JsonFlag, console, print_json, progress, table

policy_app = typer.Typer(help="EM policy engine: which mitigation method, at what cost, with what fidelity.",
                         no_args_is_help=True)

DataOpt = Annotated[list[Path], typer.Option("--data", help="Harness Parquet file or directory (repeatable).")]


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip()) if text else ()


@policy_app.command("train")
def train(
    data: DataOpt,
    holdout_backends: Annotated[str, typer.Option(help="Backends held out entirely, comma-separated.")] =
    "fake_nairobi,fake_kyiv",
    holdout_fraction: Annotated[float, typer.Option(help="Fraction of circuits held out.")] = 0.3,
    seed: Annotated[int, typer.Option(help="Every split, model and bootstrap derives from it.")] = 0,
    rankers: Annotated[str, typer.Option(help="Ranker kinds to validate: rf, xgb or both.")] = "rf,xgb",
    promote: Annotated[bool, typer.Option(help="Put the new version behind the champion alias.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the bundle here.")] = None,
    no_register: Annotated[bool, typer.Option("--no-register", help="Bundle only: no MLflow, object store or ledger."
                                              )] = False,
    as_json: JsonFlag = False,
) -> None:
    """Train ML-QEM, the ranker, the regressor and the confidence on harness data; register the version
    in MLflow, sign it through the KMS and ledger it."""
    from em_policy.training import train_and_register
    from orchestrator.cli import cli_errors

    with cli_errors(as_json):
        from em_policy.policy import TrainConfig

        config = TrainConfig(seed=seed, holdout_backends=_split(holdout_backends),
                             holdout_circuit_fraction=holdout_fraction, rankers=_split(rankers))
        result = train_and_register([str(p) for p in data], config, register=not no_register, promote=promote,
                                    out=out, quiet=as_json)
        if as_json:
            print_json(result)
            return
        console.print(f"trained on {result['training_groups']} groups ({result['dataset_sha256'][:12]}…); "
                      f"ranker {result['ranker']}; bundle sha256 {result['sha256'][:16]}…")
        console.print("validation (leave-one-backend-out): " + ", ".join(
            f"{k} {v:.4f}" for k, v in result["validation"].items() if isinstance(v, float)))
        if result.get("version"):
            console.print(f"registered {result['version']} (ledger index {result['ledger_index']})"
                          + (", promoted to champion" if result.get("promoted") else ""))


@policy_app.command("evaluate")
def evaluate_cmd(
    data: DataOpt,
    model: Annotated[str, typer.Option(help="Registry alias or version number.")] = "champion",
    bundle: Annotated[Path | None, typer.Option(help="Evaluate this bundle file instead of a registered version.")] =
    None,
    report: Annotated[Path, typer.Option(help="Markdown report to write.")] = Path("docs/em-policy-report.md"),
    calibrator: Annotated[bool, typer.Option(help="Also run mitiq's Calibrator on each held-out backend.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Measure ML-QEM and the policy on held-out circuits and backends; write the report and its plots."""
    from em_policy.bundle import loads
    from em_policy.dataset import load
    from em_policy.evaluate import evaluate, plots
    from em_policy.evaluate import report as render
    from orchestrator.cli import cli_errors

    with cli_errors(as_json):
        if bundle is not None:
            blob, version = bundle.read_bytes(), f"file:{bundle.name}"
        else:
            from em_policy import registry
            from orchestrator.cli import services

            svc = services()
            mv = registry.resolve(svc, model)
            blob, version = registry.load_bundle(svc, mv), f"{mv.name}/{mv.version}"
        policy = loads(blob)
        frame, sha, _ = load([str(p) for p in data])
        with progress(as_json) as bar:
            task = bar.add_task("evaluating", total=None)
            ev = evaluate(frame, policy, model_version=version, dataset_sha256=sha,
                          calibrator=_calibrator(policy.metadata) if calibrator else None,
                          progress=lambda m: bar.update(task, description=m))
        figures = report.parent / "em-policy"
        plots(ev, figures)
        command = "qai policy evaluate " + " ".join(shlex.quote(a) for a in sys.argv[3:])
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(render(ev, command=command, figures_dir=figures.name))
        result: dict[str, Any] = {"report": str(report), "targets": ev.targets,
                                  "policy": ev.policy_table.to_dict("records"),
                                  "mlqem": ev.mlqem_table.to_dict("records")}
        if as_json:
            print_json(result)
            return
        table("targets", ["target", "value", "met"],
              [[k, f"{v['value']:.4f}", "—" if v["met"] is None else ("yes" if v["met"] else "no")]
               for k, v in ev.targets.items()])
        console.print(f"report: {report}")


def _calibrator(metadata: dict[str, Any]) -> Any:
    def run(backend_id: str) -> dict[str, Any]:
        from dataclasses import asdict

        from em_policy.calibrator import run_calibrator
        from harness.catalog import catalog_snapshot

        snap = catalog_snapshot(backend_id)
        return asdict(run_calibrator(snap, shots=4000, seed=int(metadata["config"]["seed"]), settings="corrected"))

    return run


@policy_app.command("predict")
def predict_cmd(
    qasm: Annotated[Path, typer.Option(help="OpenQASM 2 or 3 file.")],
    shot_budget: Annotated[int, typer.Option(help="Total shots the job may spend.")],
    backend: Annotated[str | None, typer.Option(help="Backend id (its latest calibration).")] = None,
    snapshot: Annotated[str | None, typer.Option(help="Or a calibration snapshot id.")] = None,
    shots: Annotated[int, typer.Option(help="Shots per circuit.")] = 4000,
    observable: Annotated[str | None, typer.Option(help='JSON object of Pauli label to coefficient, e.g. {"ZZ": 1}.'
                                                   )] = None,
    latency_budget: Annotated[float | None, typer.Option(help="Seconds.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Recommend a method for a circuit on a backend, in process (the same code as POST /v1/predict)."""
    from em_policy.service import PolicyService, PredictRequest
    from orchestrator.cli import cli_errors, services

    with cli_errors(as_json):
        try:
            obs = json.loads(observable) if observable else None
        except ValueError:
            raise QaiError("em_policy.invalid_observable", "--observable is not a JSON object", status=422) from None
        request = PredictRequest(qasm=qasm.read_text(), backend_id=backend, calibration_snapshot_id=snapshot,
                                 shots=shots, shot_budget=shot_budget, latency_budget_seconds=latency_budget,
                                 observable=obs)
        pred = PolicyService(services()).predict(request)
        if as_json:
            print_json(pred.model_dump())
            return
        console.print(f"[bold]{pred.method}[/] {json.dumps(pred.params)}")
        console.print(f"expected fidelity {pred.expected_fidelity:.4f}, shot multiplier {pred.shot_multiplier:.2f} "
                      f"({pred.estimated_shots} shots), confidence {pred.confidence:.2f}, model {pred.model_version}")
        for w in pred.warnings:
            console.print(f"[yellow]warning:[/] {w}")
        table("alternatives", ["method", "p", "fidelity", "multiplier", "in budget"],
              [[a.method, f"{a.probability:.2f}", f"{a.expected_fidelity:.4f}", f"{a.shot_multiplier:.1f}",
                "yes" if a.within_budget else "no"] for a in pred.alternatives])


@policy_app.command("promote")
def promote_cmd(
    version: Annotated[int, typer.Argument(help="Registered version number.")],
    alias: Annotated[str, typer.Option(help="Registry alias the service loads.")] = "champion",
    as_json: JsonFlag = False,
) -> None:
    """Put a registered version behind an alias (signed and ledgered)."""
    from em_policy import registry
    from orchestrator.cli import cli_errors, services

    with cli_errors(as_json):
        mv = registry.promote(services(), version, alias=alias)
        if as_json:
            print_json({"name": mv.name, "version": mv.version, "alias": alias, "sha256": mv.sha256})
            return
        console.print(f"{mv.name} version {mv.version} is now {alias}")


@policy_app.command("list")
def list_cmd(as_json: JsonFlag = False) -> None:
    """Registered model versions, with their aliases, digests and ledger indexes."""
    from em_policy import registry
    from orchestrator.cli import cli_errors, services

    with cli_errors(as_json):
        versions = registry.list_versions(services())
        if as_json:
            print_json([{"version": v.version, "sha256": v.sha256, "aliases": list(v.aliases),
                         "created_at": v.created_at, "ledger_index": v.ledger_index} for v in versions])
            return
        table("em-policy versions", ["version", "aliases", "sha256", "created", "ledger"],
              [[str(v.version), ",".join(v.aliases), v.sha256[:16], v.created_at, str(v.ledger_index)]
               for v in versions])
