"""`flexolmo audit ...`: privacy audits of an owner's source (tracing/audit.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import console, print_json, ws

audit_app = typer.Typer(help="Privacy audits of a source: can its documents be extracted from the models?",
                        no_args_is_help=True)


@audit_app.command("extraction")
def extraction_cmd(
    source: Annotated[str, typer.Option("--source", "-s", help="The source whose training documents are attacked.")],
    dp_package: Annotated[Optional[Path], typer.Option("--dp-package", help="A package of SOURCE trained with DP, "
                                                                             "for the 'merged with DP expert' row.")] = None,
    docs: Annotated[int, typer.Option("--docs", help="Prefixes (sampled training documents).")] = 100,
    samples: Annotated[int, typer.Option("--samples", help="Continuations sampled per prefix.")] = 10,
    prefix_len: Annotated[int, typer.Option("--prefix-len", help="Prefix tokens (the paper: 32).")] = 32,
    continuation_len: Annotated[int, typer.Option("--continuation-len", help="Continuation tokens compared.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the document sample, offsets and sampling.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """The FlexOlmo paper's extraction attack on SOURCE: 32-token prefixes of its training
    documents, sampled continuations, success at edit similarity >= 0.9 (continuation only and
    with the prefix), longest verbatim runs in its index. Written to <workspace>/audits/SOURCE.json."""
    from tracing.audit import AuditConfig, extraction_audit

    r = extraction_audit(ws(), source, dp_package=dp_package, cfg=AuditConfig(
        docs=docs, samples=samples, prefix_len=prefix_len, continuation_len=continuation_len, seed=seed))
    if as_json:
        print_json(r)
        return
    t = Table("model", "extracted (continuation)", "extracted (with prefix, published)", "best sim (cont.)",
              "longest run max/mean", title=f"extraction audit of {source}: {r['n_prompts']} prefixes")
    for name, row in r["rows"].items():
        if "skipped" in row:
            t.add_row(name, "skipped: " + row["skipped"], "", "", "")
            continue
        run = row.get("longest_verbatim_run")
        t.add_row(name, f"{row['rate_continuation']:.1%}", f"{row['rate_with_prefix']:.1%}",
                  f"{row['mean_best_similarity_continuation']:.3f}", f"{run['max']}/{run['mean']}" if run else "no index")
    console.print(t)
    console.print(f"written to {r['written_to']}")


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
