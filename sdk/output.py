"""Output for the CLI: rich tables for people, ``--json`` for machines."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sdk.errors import QaiError

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]

console = Console()
err_console = Console(stderr=True)


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "__dataclass_fields__"):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    return str(value)


def dump_json(data: Any) -> str:
    return json.dumps(data, default=_default, indent=2, sort_keys=True)


def print_json(data: Any) -> None:
    sys.stdout.write(dump_json(data) + "\n")


def progress(quiet: bool = False) -> Progress:
    """A progress bar on stderr for long work; ``quiet`` (``--json``) hides it."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err_console, disable=quiet, transient=True)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    console.print(t)


def fail(err: QaiError, as_json: bool) -> None:
    """Print an error in the shared shape and exit non-zero."""
    if as_json:
        print_json(err.to_body())
    else:
        err_console.print(f"[bold red]error[/] {err.code}: {err.message}")
        if err.details:
            err_console.print(dump_json(err.details))
    raise typer.Exit(code=2 if err.status < 500 else 3)
