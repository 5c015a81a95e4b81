"""Entry point of the `flexolmo` command.

    flexolmo [--workspace DIR] COMMAND ...
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from flexolmo.base.errors import FlexolmoError

from . import data, sources, tokenizer
from .common import err_console, state

class _Root(TyperGroup):
    """Turns a library error into one line on stderr and exit code 1, for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FlexolmoError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Root,
    help="flexolmo-trace: train a model together without moving data, and trace what it says "
    "back to the data and to the owner's expert.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    workspace: Annotated[
        Optional[str],
        typer.Option("--workspace", "-w", help="Workspace folder (default: $FLEXOLMO_HOME or ./flexolmo-work)."),
    ] = None,
) -> None:
    state.workspace = workspace


app.add_typer(sources.app, name="sources")
app.add_typer(data.app, name="data")
app.add_typer(tokenizer.app, name="tokenizer")

# Command groups of the later packages register themselves here when present.
for _module in ("model", "index_cmds", "trace_cmds", "serve", "demo", "keys", "federation", "eval_cmd", "search", "audit",
                "migrate", "batch"):
    try:
        _mod = __import__(f"cli.{_module}", fromlist=["register"])
    except ModuleNotFoundError as e:
        if e.name != f"cli.{_module}":
            raise
        continue
    _mod.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
