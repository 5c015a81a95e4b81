"""`flexolmo eval`: held-out perplexity of every comparison row, routing, opt-out, a task.

    flexolmo eval --profile demo                 # trains what is missing, writes docs/results.md
    flexolmo eval --rows public,flexolmo --json  # the result object on stdout
    flexolmo eval --profile gpu --device cuda --dtype bfloat16   # one large GPU, about 6 minutes
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flexolmo.model.device import DEVICE, DTYPE

from .common import DeviceOpt, DtypeOpt, console, print_json, ws


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)


def eval_cmd(
    profile: Annotated[str, typer.Option("--profile", "-p", help="Model/training profile of the models to evaluate "
                                         "(tiny, demo, paper, gpu).")] = "demo",
    rows: Annotated[Optional[str], typer.Option("--rows", help="Comma-separated rows (default: all): public, experts, "
                                                "soup, btm, dense, flexolmo, flexolmo_tuned, no_bias, random_init, embedder_init, optout, task.")] = None,
    tokens_per_domain: Annotated[int, typer.Option("--tokens-per-domain", help="Validation tokens per domain (at most).")] = 16_384,
    bytes_per_domain: Annotated[Optional[int], typer.Option(
        "--bytes-per-domain", help="Instead: the tokens of each domain's first N bytes of validation text, the same "
                                   "text whatever the tokenizer (to compare bits per byte across tokenizers).")] = None,
    task_lines: Annotated[int, typer.Option("--task-lines", help="Held-out code lines for the next-line task.")] = 100,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write results.md and results/ (JSON, PNG) into this folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result object as JSON (progress goes to stderr).")] = False,
    device: DeviceOpt = DEVICE,
    dtype: DtypeOpt = DTYPE,
) -> None:
    """Evaluate the FlexOlmo model against its baselines on every source's validation split."""
    import sys

    from flexolmo.evaluation.report import write_report
    from flexolmo.evaluation.run import run_eval

    log = (lambda m: print(m, file=sys.stderr)) if as_json else console.print
    chosen = [r.strip() for r in rows.split(",") if r.strip()] if rows else None
    on_row = (lambda partial: write_report(partial, report)) if report is not None else None
    result = run_eval(ws(), profile, rows=chosen, tokens_per_domain=tokens_per_domain, bytes_per_domain=bytes_per_domain,
                      task_lines=task_lines, device=device, dtype=dtype,
                      progress=not as_json, log=log, on_row=on_row)
    if report is not None:
        paths = write_report(result, report)
        log(f"report: {paths['markdown']}, {paths['json']}")
    if as_json:
        print_json(result)
