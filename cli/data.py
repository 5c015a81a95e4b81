"""`flexolmo data ...`: build the sample federation."""

from __future__ import annotations

import typer

app = typer.Typer(help="Sample data: the eight-source demo federation.", no_args_is_help=True)
