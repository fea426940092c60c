"""``qai supplychain attest|verify|check-lock``: in-toto links, SBOM and SLSA provenance of a release."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sdk.output import JsonFlag, console, print_json, table

supplychain_app = typer.Typer(help="Supply chain: attest a release (in-toto, SBOM, SLSA provenance) and verify it.",
                              no_args_is_help=True)

OutArg = Annotated[Path, typer.Argument(help="The attestation directory (layout, links, release/, provenance).")]


@supplychain_app.command("attest")
def attest_cmd(
    out: OutArg,
    source: Annotated[Path, typer.Option(help="The git work tree to build.")] = Path("."),
    tests: Annotated[str, typer.Option(help="Test paths for the test step, comma-separated.")]
    = "tests/test_merkle.py",
    skip_tests: Annotated[bool, typer.Option("--skip-tests", help="Leave the test step out of the layout.")] = False,
    relock: Annotated[bool, typer.Option(help="Regenerate the lock files (uv, needs the index) in the lock step.")]
    = False,
    as_json: JsonFlag = False,
) -> None:
    """Run lock → build → test → package under in-toto, sign through the KMS, write the SBOM and the
    SLSA provenance, and append them to the ledger."""
    from orchestrator.cli import cli_errors
    from orchestrator.services import get_services
    from orchestrator.supplychain import AttestOptions, attest

    with cli_errors(as_json):
        opts = AttestOptions(source=source, out=out, run_tests=not skip_tests, relock=relock,
                             tests=tuple(t.strip() for t in tests.split(",") if t.strip()))
        result = attest(get_services(), opts)
        if as_json:
            print_json(result)
        else:
            _print(result, f"attested {result['wheel']} in {out}")


@supplychain_app.command("verify")
def verify_cmd(out: OutArg, as_json: JsonFlag = False) -> None:
    """in-toto verification of release/ against the layout and links, plus the ledgered provenance."""
    from orchestrator.cli import cli_errors
    from orchestrator.services import get_services
    from orchestrator.supplychain import verify

    with cli_errors(as_json):
        result = verify(get_services(), out)
        if as_json:
            print_json(result)
        else:
            _print(result, f"verified {result['wheel']}: steps {', '.join(result['steps'])}")


@supplychain_app.command("check-lock")
def check_lock_cmd(paths: Annotated[list[Path] | None, typer.Argument()] = None, as_json: JsonFlag = False) -> None:
    """Every requirement of the lock files is pinned with ``==`` and sha256 hashes."""
    from orchestrator.cli import cli_errors
    from orchestrator.supplychain import LOCK_FILES, check_locks

    with cli_errors(as_json):
        files = paths or [Path(p) for p in LOCK_FILES]
        check_locks(files)
        if as_json:
            print_json({"ok": True, "files": [str(p) for p in files]})
        else:
            console.print(f"{len(files)} lock file(s) pinned with hashes")


def _print(result: dict[str, Any], title: str) -> None:
    console.print(title)
    table("subjects", ["artifact", "sha256"], [[n, s] for n, s in sorted(result.get("subjects", {}).items())])
    files = result.get("files") or {n: {"ledger_index": i} for n, i in result.get("ledger", {}).items()}
    table("ledgered", ["file", "ledger index"], [[n, str(r["ledger_index"])] for n, r in sorted(files.items())])
