"""What every command shares: the workspace option, the console, error reporting."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from flexolmo.base.workspace import Workspace

console = Console()
err_console = Console(stderr=True)


class _State:
    workspace: str | None = None


state = _State()


def ws() -> Workspace:
    """The workspace chosen by --workspace, $FLEXOLMO_HOME or the default."""
    return Workspace.resolve(state.workspace)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")
