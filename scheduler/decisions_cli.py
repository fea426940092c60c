"""``qai scheduler schedule|show|replay``: decisions on this platform's database, in process."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from sdk.output import JsonFlag, console, print_json, table


def schedule_cmd(job_id: str, as_json: JsonFlag = False) -> None:
    """Choose a backend and EM method for a pending job (the same code as POST /v1/schedule)."""
    from orchestrator.cli import cli_errors, cli_principal, services
    from scheduler.service import scheduler

    with cli_errors(as_json):
        decision = scheduler(services()).schedule(job_id, cli_principal())
    if as_json:
        print_json(decision.to_json())
        return
    _print_body(decision.decision_id, decision.body)


def show_cmd(decision_id: str, as_json: JsonFlag = False) -> None:
    """A decision: every backend's filter verdicts and score terms, the choice and its rationale."""
    from orchestrator.cli import cli_errors, cli_principal, services
    from scheduler.service import scheduler

    with cli_errors(as_json):
        got = scheduler(services()).get(decision_id, cli_principal())
    if as_json:
        print_json(got)
        return
    _print_body(decision_id, got["document"]["decision"])


def replay_cmd(decision_id: str,
               shallow: Annotated[bool, typer.Option(help="Only recompute the body from the recorded inputs; "
                                                          "do not re-derive the inputs.")] = False,
               as_json: JsonFlag = False) -> None:
    """Recompute a decision from its recorded inputs (byte-identical, or exit 1 with the diff), and
    re-derive the inputs: the manifest, each snapshot by id, each prediction by its model version."""
    from orchestrator.cli import cli_errors, services
    from scheduler.replay import replay

    with cli_errors(as_json):
        report = replay(services(), decision_id, deep=not shallow)
    if as_json:
        print_json(report.to_dict())
    else:
        console.print(f"decision {decision_id}: body "
                      + ("[green]replays byte-identically[/green]" if report.identical else "[red]DIFFERS[/red]"))
        for d in report.differences:
            console.print(f"  {d['path']}: recorded {json.dumps(d['recorded'])[:100]} "
                          f"-> recomputed {json.dumps(d['recomputed'])[:100]}")
        if report.checks:
            table("re-derived inputs", ["input", "ok", "detail"],
                  [(c.name, "yes" if c.ok else "NO", c.detail) for c in report.checks])
    raise typer.Exit(0 if report.ok else 1)


def _print_body(decision_id: str, body: dict[str, Any]) -> None:
    rows = []
    for b in body["backends"]:
        rejects = [f"{f['plugin']}: {f['reason']}" for f in b["filters"] if f["verdict"] == "reject"]
        rows.append((b["backend_id"], "yes" if b["eligible"] else "no",
                     f"{b['normalized_score']:.3f}" if "normalized_score" in b else "-", "; ".join(rejects)))
    table(f"decision {decision_id}", ["backend", "eligible", "score", "rejected by"], rows)
    chosen = body["chosen"]
    if chosen is not None:
        console.print(f"chosen: [bold]{chosen['backend_id']}[/bold] with {chosen['em_method']} "
                      f"(x{chosen['shot_multiplier']:.2f} shots, expected fidelity {chosen['expected_fidelity']:.3f}), "
                      f"confidence {body['confidence']:.2f}")
    console.print(body["rationale"])


def register(app: typer.Typer) -> None:
    app.command("schedule")(schedule_cmd)
    app.command("show")(show_cmd)
    app.command("replay")(replay_cmd)
