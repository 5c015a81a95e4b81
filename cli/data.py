"""`flexolmo data ...`: build the sample federation."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from flexolmo.base import samples
from flexolmo.base import sources as src_lib

from .common import console, err_console, ws
from .sources import show_sources

app = typer.Typer(help="Sample data: the eight-source demo federation.", no_args_is_help=True)


@app.command("samples")
def samples_(
    only: Annotated[Optional[str], typer.Option(help="Comma-separated subset, e.g. 'code,math'.")] = None,
) -> None:
    """Build the eight sample sources from installed packages (see `make data-deps`)."""
    results = build_and_report(only.split(",") if only else None)
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def build_and_report(only: list[str] | None = None) -> list[samples.SampleResult]:
    """Build the samples with a line per source, then print the source table."""

    def show(r: samples.SampleResult) -> None:
        if r.ok:
            console.print(f"  [green]ok[/]   {r.name:12s} {r.n_docs:7,} docs {r.n_chars / 1e6:7.2f}M chars  {r.seconds:5.1f}s")
        else:
            err_console.print(f"  [red]miss[/] {r.name:12s} {r.message}", soft_wrap=True)

    console.print("building sample sources")
    results = samples.build_samples(ws(), only=only, on_result=show)
    show_sources(src_lib.list_sources(ws()))
    return results
