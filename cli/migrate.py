"""`flexolmo migrate`: bring a workspace written by an older flexolmo to this version's formats.

    flexolmo migrate            # upgrade in place, print what changed (nothing: already current)
    flexolmo migrate --check    # print what would change; exit 1 when something would
    flexolmo migrate --json     # the report as JSON

The upgrades themselves live in the library (flexolmo/base/migrate.py lists them): importing
the modules below registers every layer's.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

import flexolmo.base.artifacts.upgrades  # noqa: F401  (each import registers its layer's upgrades)
import flexolmo.base.catalog  # noqa: F401
import flexolmo.model.artifacts.upgrades  # noqa: F401
import index.upgrades  # noqa: F401
import tracing.provenance.store  # noqa: F401
from flexolmo.base import migrate as lib

from .common import console, print_json, ws


def register(app: typer.Typer) -> None:
    app.command("migrate")(migrate)


def migrate(
    check: Annotated[bool, typer.Option("--check", help="Say what would change; change nothing (exit 1 if "
                                                        "anything would).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Upgrade the workspace's older cards, catalog and provenance store in place (each change
    atomic; running it again changes nothing)."""
    report = lib.run(ws(), apply=not check)
    if as_json:
        print_json(report.to_dict())
    else:
        verb = "would change" if check else "changed"
        for step, lines in report.changes.items():
            for line in lines:
                console.print(Text(f"{step}: {line}"), highlight=False, soft_wrap=True)
        for step, problems in report.problems.items():
            for p in problems:
                console.print(Text(f"{step}: cannot upgrade: {p}", style="red"), highlight=False, soft_wrap=True)
        n = report.changed
        console.print(f"{n} {verb}" if n else "the workspace is current: nothing to upgrade", highlight=False)
    if report.problems or (check and report.changed):
        raise typer.Exit(1)
