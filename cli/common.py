"""What every command shares: the workspace option, the console, error reporting, --device/--dtype."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from flexolmo.base.workspace import Workspace

console = Console()
err_console = Console(stderr=True)


# where a model computes and in which precision (flexolmo/model/device.py checks the values)
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda (cuda:N) or auto (cuda when a GPU is visible).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, or bfloat16 (autocast; weights stay float32).")]


class _State:
    workspace: str | None = None


state = _State()


def ws() -> Workspace:
    """The workspace chosen by --workspace, $FLEXOLMO_HOME or the default."""
    return Workspace.resolve(state.workspace)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")
