"""``qai scheduler``: schedule, show and replay decisions; evaluate the scheduler (``simulate``)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from sdk.output import JsonFlag, console, print_json, progress, table

scheduler_app = typer.Typer(help="Noise- and EM-aware scheduler: decisions, replay, evaluation.", no_args_is_help=True)

DEFAULT_REPORT = Path("docs/scheduler-report.md")


@scheduler_app.command("simulate")
def simulate_cmd(
    jobs: Annotated[int, typer.Option(help="Jobs in the trace.")] = 1000,
    seed: Annotated[int, typer.Option(help="Every random stream of the trace derives from it.")] = 7,
    arrival_rate: Annotated[float, typer.Option(help="Jobs per second at normal load (Poisson).")] = 0.03,
    peak: Annotated[bool, typer.Option(help="A peak of 5x the rate for 10 minutes, a third of the way in.")] = True,
    max_qubits: Annotated[int, typer.Option(help="Largest circuit in the trace.")] = 32,
    foreign_load: Annotated[bool, typer.Option(help="Other tenants' jobs share each backend's queue.")] = True,
    queue_view: Annotated[str, typer.Option(help="Queue wait the policies see: provider (whole backlog) or "
                                                 "catalog (catalog mean + qai's backlog, as scheduler.service)."
                                            )] = "provider",
    profile: Annotated[str, typer.Option(help="v1's tenant profile: default (SPEC-001's ratio, the policy's EM "
                                              "method) or value (USD utility, co-selects the EM method).")
                       ] = "default",
    sensitivity: Annotated[bool, typer.Option(help="Also rerun with one setting changed at a time.")] = True,
    report: Annotated[Path | None, typer.Option(help="Markdown report to write.")] = DEFAULT_REPORT,
    no_report: Annotated[bool, typer.Option("--no-report", help="Write no report.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Simulate a job trace on the real-snapshot catalog: v1 against the baselines, seeded.

    A discrete-event simulation: v1 (the real engine) against random, round-robin, least-busy,
    max-fidelity (FCFS) and cheapest on the same trace; writes the report. The same options give
    the same figures."""
    from orchestrator.cli import cli_errors
    from scheduler.simulate import SimConfig, planned_ticks, report_markdown, simulate

    with cli_errors(as_json):
        config = SimConfig(jobs=jobs, seed=seed, arrival_rate=arrival_rate, peak=peak, max_qubits=max_qubits,
                           foreign_load=foreign_load, queue_view=queue_view, v1_profile=profile)
        with progress(as_json) as bar:
            task = bar.add_task("loading the catalog and compiling circuits", total=planned_ticks(config, sensitivity))

            def tick(policy: str) -> None:
                bar.update(task, advance=1, description=f"simulating {policy}")

            result = simulate(config, sensitivity=sensitivity, progress=tick)
        target = None if no_report else report
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(report_markdown(result, command_line(config, sensitivity, target)))
            result["report"] = str(target)
        if as_json:
            print_json(result)
            return
        _print(result)
        if target is not None:
            console.print(f"report: {target}")


def command_line(config: Any, sensitivity: bool, report: Path) -> str:
    """The command that reproduces ``config``, every option spelt out."""
    args = ["qai", "scheduler", "simulate", "--jobs", str(config.jobs), "--seed", str(config.seed),
            "--arrival-rate", repr(config.arrival_rate), "--peak" if config.peak else "--no-peak",
            "--max-qubits", str(config.max_qubits), "--foreign-load" if config.foreign_load else "--no-foreign-load",
            "--queue-view", config.queue_view, "--profile", config.v1_profile,
            "--sensitivity" if sensitivity else "--no-sensitivity",
            "--report", str(report)]
    return shlex.join(args)


def _print(result: dict[str, Any]) -> None:
    from scheduler.simulate import fmt

    table("policies (JCT in seconds)", ["policy", "fidelity", "F/USD", "JCT", "p95 JCT", "SLA miss", "crypto",
                                         "dropped"],
          [[p, fmt(m["mean_fidelity"]), fmt(m["fidelity_per_usd"]), fmt(m["mean_jct_seconds"], 0),
            fmt(m["p95_jct_seconds"], 0), m["sla_violations"], m["crypto_violations"], m["dropped"]]
           for p, m in result["policies"].items()])
    table("targets", ["target", "value", "met"],
          [[k, str(t["value"]) + (f" (best: {t['best']})" if "best" in t else ""), "yes" if t["met"] else "no"]
           for k, t in result["targets"].items()])
    if result.get("sensitivity"):
        table("sensitivity (v1 against max-fidelity)", ["scenario", "JCT change %", "fidelity loss %", "best F/USD"],
              [[r["scenario"], f"{r.get('mean_jct_change_pct', 0):.1f}", f"{r.get('fidelity_loss_pct', 0):.2f}",
                r["best_fidelity_per_usd"]] for r in result["sensitivity"]])


def _register_decision_commands() -> None:
    from scheduler.decisions_cli import register

    register(scheduler_app)


_register_decision_commands()
