"""`flexolmo federation up`: the demo with every owner's index behind its own node process.

    flexolmo -w fed-tracer federation up --owners flexolmo-work            # Ctrl-C stops the nodes
    flexolmo -w fed-tracer federation up --owners flexolmo-work --trace "To be, or not to be,"

The owners' workspace is only read. The tracer workspace gets the shared tokenizer and each
source as a remote source (no documents); traces, the store and the web page then work
there as usual (`flexolmo -w fed-tracer trace ...`, `flexolmo -w fed-tracer serve`).
"""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer
from rich.table import Table

from flexolmo.base.workspace import Workspace

from .common import console, ws

app = typer.Typer(help="Run a federation of owner nodes on this machine (the federated demo).", no_args_is_help=True)


def register(app_: typer.Typer) -> None:
    app_.add_typer(app, name="federation")


@app.command("up")
def up(
    owners: Annotated[str, typer.Option(help="The workspace holding the owners' sources and indexes (read only).")],
    sources: Annotated[Optional[str], typer.Option(help="Comma-separated sources (default: every indexed one).")] = None,
    base_port: Annotated[int, typer.Option(help="Node ports: base, base+1, ... in source-name order.")] = 8701,
    trace: Annotated[Optional[str], typer.Option(help="Trace this text once through the nodes, then stop them.")] = None,
) -> None:
    """Start one owner node per source (127.0.0.1) and set this workspace up to trace through them."""
    from index.cluster import federate_workspace, stop_nodes

    tracer_ws = ws()
    names = [s.strip() for s in sources.split(",") if s.strip()] if sources else None
    nodes = federate_workspace(Workspace.resolve(owners), tracer_ws, names, base_port)
    try:
        t = Table(title=f"owner nodes (tracer workspace {tracer_ws.root})")
        for c in ("source", "url", "pid", "log"):
            t.add_column(c)
        for n in nodes.values():
            t.add_row(n.source, n.url, str(n.proc.pid), str(n.log))
        console.print(t)
        if trace is not None:
            _trace_once(tracer_ws, trace)
            return
        console.print(f"tracing through the nodes: `flexolmo -w {tracer_ws.root} trace --text ...` or "
                      f"`flexolmo -w {tracer_ws.root} serve`; Ctrl-C stops the nodes")
        while all(n.alive for n in nodes.values()):
            time.sleep(1)
        console.print("a node stopped: " + ", ".join(n.source for n in nodes.values() if not n.alive))
    except KeyboardInterrupt:
        pass
    finally:
        stop_nodes(nodes)


def _trace_once(w: Workspace, text: str) -> None:
    from tracing.trace import Tracer

    tracer = Tracer.open(w)
    tr = tracer.trace(text, store=False)
    console.print(f"{len(tr.spans)} spans over {', '.join(tr.sources_searched)}; "
                  f"unavailable/skipped: {tr.sources_skipped or 'none'}; {tr.timings_ms}", highlight=False)
    for s in tr.spans:
        docs = ", ".join(f"{d.source}/{d.doc_id}" + (" (blocked)" if d.blocked else "") for d in s.documents[:3])
        console.print(f"  [{s.start}:{s.end}] {s.text!r} x{s.count} {s.count_by_source} -> {docs}", highlight=False,
                      markup=False)
