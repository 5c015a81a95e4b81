"""`flexolmo trace`, `flexolmo query`, `flexolmo report ...`, `flexolmo traces export|repair`."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from flexolmo.base.errors import InputError
from tracing.provenance import queries
from tracing.results import Span, Trace
from tracing.options import TraceOptions
from tracing.trace import Tracer

from . import tables as T
from flexolmo.model.generate import GenerationOptions
from flexolmo.model.loading import ModelSpec

from .common import (GENERATION_FLAGS, check_unicode, console, err_console, print_json, with_model, with_options,
                     ws)

report_app = typer.Typer(help="Reports for data owners.", no_args_is_help=True)
traces_app = typer.Typer(help="The provenance store.", no_args_is_help=True)

STYLES = ["on dark_green", "on dark_blue", "on dark_magenta", "on dark_red", "on dark_cyan", "on grey37"]


def register(app: typer.Typer) -> None:
    app.command("trace")(trace)
    app.command("query")(query)
    app.add_typer(report_app, name="report")
    app.add_typer(traces_app, name="traces")


@with_options(TraceOptions, "opts", renamed={"seed": "docs_seed"}, flags={"seed": ("--docs-seed",)})
@with_options(GenerationOptions, "gen", flags=GENERATION_FLAGS)
@with_model("spec")
def trace(
    text: Annotated[Optional[str], typer.Option("--text", help="The response to trace ('-' or omitted: stdin).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="The prompt the response answered (used for relevance).")] = None,
    generate: Annotated[Optional[str], typer.Option("--generate", help="Generate a response to this prompt, then trace it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full trace record as JSON.")] = False,
    *,
    spec: ModelSpec,
    gen: GenerationOptions,
    opts: TraceOptions,
) -> None:
    """Trace a response back to the training documents and the experts that shaped it.

    From --model on: the model, then GenerationOptions' fields (with --generate), then TraceOptions' (as in POST /api/generate and /api/trace); --seed is the generation's, --docs-seed the document sample's."""
    if generate is not None and (text is not None or prompt is not None):
        raise InputError("--generate PROMPT generates its own response: drop --text/--prompt, or drop --generate")
    tracer = Tracer.open(ws(), options=opts, model=spec)
    if (opts.exclude or opts.include is not None) and tracer.model is None:
        raise InputError("--exclude/--include switch experts off, but there is no merged model; run `flexolmo merge` first")
    if generate is not None:
        t = tracer.generate_and_trace(generate, gen)
    else:
        if text is None or text == "-":
            if sys.stdin.isatty():
                raise InputError("give the response with --text TEXT, on stdin, or use --generate PROMPT")
            text = read_text(sys.stdin.buffer.read(), "stdin")
        else:
            check_unicode(text, "--text")
        if prompt is not None:
            check_unicode(prompt, "--prompt")
        if not as_json:  # the spans table as soon as it is found, the experts when linked
            parts = tracer.trace_parts(text, prompt=prompt)
            show_trace(next(parts), experts=False)
            show_experts(next(parts))
            return
        t = tracer.trace(text, prompt=prompt)
    if as_json:
        print_json(t.to_dict())
    else:
        show_trace(t)


def read_text(data: bytes, where: str) -> str:
    """Bytes given as a response to trace, as text; binary input is refused with a clear error."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
                         "pipe a text file, or convert it first (e.g. iconv -t UTF-8)") from None
    if "\x00" in text:
        raise InputError(f"{where} holds NUL bytes: it looks binary, not a response to trace")
    return text


def show_trace(t: Trace, max_docs: int = 3, experts: bool = True) -> None:
    """The response with its spans highlighted, then a table of spans, sources, documents, experts
    (without the experts column and the closing line when `experts` is False: they follow)."""
    if t.prompt:
        console.print(Text.assemble(("prompt: ", "bold"), t.prompt))  # caller text: never markup
    body = Text(t.response)
    for g in t.groups:
        body.stylize(STYLES[g.index % len(STYLES)], g.char_start, g.char_end)
    console.print("[bold]response[/] (highlighted: text found verbatim in training data):")
    console.print(body)
    table = Table(title=f"trace {t.trace_id}: {len(t.spans)} spans of {t.n_tokens} tokens, "
                        f"searched {', '.join(t.sources_searched) or 'nothing'}")
    for col in ("#", "span", "sources (count)", "documents (relevance)", "experts (share, drop)")[: 4 + experts]:
        table.add_column(col, overflow="fold")
    for s in t.spans:
        srcs = ", ".join(f"{k} ({v})" for k, v in s.count_by_source.items() if v)
        shown = [d for d in s.documents if d.repeat_of is None]
        docs = Text("\n").join(Text.assemble(("blocked " if d.blocked else "", "red"), f"{d.source}:{d.doc_id} [{d.bucket}]",
                                              (f" repeated {d.repeats} times" if d.repeats > 1 else "", "yellow"))
                                for d in shown[:max_docs])
        if len(shown) > max_docs:
            docs.append(f"\n+{len(shown) - max_docs} more")
        mark = "" if s.agreement is None else (" ✓" if s.agreement else " ✗")
        table.add_row(f"{s.index}{mark}", Text(repr(s.text.strip())[1:-1][:80]), Text(srcs), docs,
                      *[Text(experts_cell(s))] * experts)
    console.print(table)
    if experts:
        closing(t)
    elif t.spans and (t.settings.get("model") or {}).get("kind") == "flexolmo" and t.settings.get("link_experts", True):
        console.print("[dim]finding the experts…[/]")


def show_experts(t: Trace) -> None:
    """The experts of each span (after `show_trace(t, experts=False)` printed the spans)."""
    if t.spans and any(s.experts for s in t.spans):
        table = Table(title=f"trace {t.trace_id}: experts")
        for col in ("#", "span", "experts (share, drop)"):
            table.add_column(col, overflow="fold")
        for s in t.spans:
            mark = "" if s.agreement is None else (" ✓" if s.agreement else " ✗")
            table.add_row(f"{s.index}{mark}", Text(repr(s.text.strip())[1:-1][:80]), Text(experts_cell(s)))
        console.print(table)
    closing(t)


def experts_cell(s: Span) -> str:
    return "\n".join([top_line(s)] * bool(s.experts) + [
        f"{e.source} {e.routing_share:.0%}" + (f", {e.counterfactual:+.2f}" if e.counterfactual is not None else "")
        for e in sorted(s.experts, key=lambda e: -e.routing_share)[:3] if e.routing_share > 0])


def closing(t: Trace) -> None:
    """The line under a trace: expert linkage notes, time, experts off, sources not searched."""
    linkage = (t.settings.get("model") or {}).get("expert_linkage")
    if not t.settings.get("link_experts", True):
        linkage = "not asked (--no-link-experts: spans and documents only)"
    if linkage:
        console.print(f"[dim]expert linkage: {linkage}[/]")
    off = f"; experts off: {', '.join(t.experts_off)}" if t.experts_off else ""
    skipped = "; not searched: " + ", ".join(f"{k} ({v})" for k, v in t.sources_skipped.items()) if t.sources_skipped else ""
    console.print(f"[dim]{t.timings_ms.get('total', 0):.0f} ms{off}{skipped}. ✓/✗: the top expert is / is not "
                  "the one trained on a source containing the span.[/]")


def top_line(s: Span) -> str:
    """'top: news (by counterfactual)': the span's top expert and the signal that chose it."""
    if s.top_expert is None or not s.experts:
        return "top: —"
    return f"top: {s.experts[s.top_expert].source} (by {s.top_expert_by or 'routing'})"


def query(
    sql: Annotated[str, typer.Argument(help="Read-only SQL over traces, spans, span_sources, span_documents, span_experts.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print rows as JSON objects.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 1000,
    as_csv: T.CsvOpt = False,
) -> None:
    """Run read-only SQL over the provenance store."""
    check_unicode(sql, "the query")
    res = queries.query(ws(), sql, limit=limit)
    if as_json or as_csv:  # every column the query asked for, as it asked
        T.emit(console, [dict(zip(res.columns, r)) for r in res.rows], [], as_json=as_json, as_csv=as_csv)
        return
    table = Table()
    for c in res.columns:
        table.add_column(c, overflow="fold")
    for r in res.rows:
        table.add_row(*[Text("" if v is None else _clip(str(v))) for v in r])  # stored data: never markup
    console.print(table)


def _clip(v: str, n: int = 2000) -> str:
    return v if len(v) <= n else v[:n] + f"... (+{len(v) - n:,} characters; --json shows all)"


@report_app.command("contribution")
def contribution(
    source: Annotated[str, typer.Option(help="The source (data owner) to report on.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw it as a PNG here: matches over time, routing "
                                                      "share and counterfactual drop per domain.")] = None,
) -> None:
    """What a source contributed over all stored traces: matches, routing share, counterfactuals."""
    from flexolmo.base.sources import get_source

    get_source(ws(), source)
    c = queries.contribution(ws(), source)
    if plot is not None:
        from tracing.provenance.plots import contribution_png

        if plot.suffix.lower() != ".png":
            raise InputError(f"--plot writes a PNG: give a path ending in .png, not {plot.name!r}")
        err_console.print(f"wrote {contribution_png(c, plot)}", highlight=False)
    if as_json:
        from dataclasses import asdict

        print_json(asdict(c))
        return
    console.print(f"[bold]{source}[/] over {c.n_traces} stored traces: matched in {c.traces_matched} traces by "
                  f"{c.spans_matched} spans, {c.documents_matched} distinct documents retrieved"
                  f"{f', {c.blocked_hits} blocked' if c.blocked_hits else ''}.")
    if c.mean_routing_share is not None:
        console.print(f"its expert: mean routing share {c.mean_routing_share:.1%} over traced spans, mean log-prob drop "
                      f"when switched off {c.mean_counterfactual if c.mean_counterfactual is not None else 'n/a'}; "
                      f"top expert on {c.agreement_rate:.0%} of the spans found in it" if c.agreement_rate is not None
                      else f"its expert: mean routing share {c.mean_routing_share:.1%}")
    if c.audit:
        rows = "; ".join(f"{name} {r['rate_continuation']:.1%} ({r['rate_with_prefix']:.1%} with prefix)"
                         for name, r in c.audit["rows"].items())
        console.print(Text(f"extraction audit {c.audit['created_at']} ({c.audit['n_prompts']} prefixes): {rows}"))
    table = Table(title="top matched spans")
    for col in ("tokens", "count", "traced", "top expert", "span"):
        table.add_column(col, overflow="fold")
    for s in c.top_spans:
        table.add_row(str(s["n_tokens"]), str(s["count"]), str(s["times_traced"]), Text(str(s["top_expert_source"] or "")),
                      Text(repr(s["text"].strip())[1:-1][:100]))
    console.print(table)


@traces_app.command("export")
def export(
    out: Annotated[Path, typer.Option(help="Folder for one Parquet file per table.")] = Path("provenance-export"),
    force: Annotated[bool, typer.Option("--force", help="Replace a file at --out, or an earlier export in it.")] = False,
) -> None:
    """Export every provenance table to Parquet (a consistent snapshot; the store is not locked)."""
    for p in queries.export_parquet(ws(), out, force=force):
        console.print(f"wrote {p}", highlight=False)


@traces_app.command("repair")
def repair(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Finish owner changes a crash left half-applied (takedowns, `counts` sources) in stored
    traces, import a store of the DuckDB-file era, and remove what crashed writers left."""
    from tracing.provenance.governance import repair as run

    r = run(ws())
    if as_json:
        print_json(r)
        return
    console.print(f"store: {r['traces']:,} traces in {r['parts']} parts, {r['redactions']} redactions in force; "
                  f"{r['rows_redacted']} rows redacted now, {len(r['removed'])} leftovers removed"
                  f"{'; the old provenance.duckdb was imported' if r['imported_old_store'] else ''}", highlight=False)


@traces_app.command("list")
def list_traces(
    source: Annotated[Optional[str], typer.Option(help="Found in this source.")] = None,
    owner: Annotated[Optional[str], typer.Option(help="Found in a source of this owner.")] = None,
    licence: Annotated[Optional[str], typer.Option(help="Found in a source under this licence.")] = None,
    bucket: Annotated[Optional[str], typer.Option(help="With a document of this relevance: high, medium or low.")] = None,
    since: Annotated[Optional[datetime], typer.Option(formats=["%Y-%m-%d"], help="Traced on or after this day.")] = None,
    until: Annotated[Optional[datetime], typer.Option(formats=["%Y-%m-%d"], help="Traced on or before this day.")] = None,
    level: Annotated[str, typer.Option(help="List traces, spans or documents.")] = "traces",
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print rows as JSON objects.")] = False,
    as_csv: T.CsvOpt = False,
) -> None:
    """Stored traces, spans or documents filtered by source, owner, licence, relevance and date."""
    from tracing.provenance.listing import TraceFilter, list_provenance

    f = TraceFilter(source=source, owner=owner, licence=licence, bucket=bucket, since=since and since.date(),
                    until=until and until.date(), level=level, limit=limit)
    res = list_provenance(ws(), f)
    rows = [dict(zip(res.columns, r)) for r in res.rows]
    T.emit(console, rows, T.columns_of(res.columns, rows), title=f"{len(res.rows)} {level}", as_json=as_json,
           as_csv=as_csv)


@traces_app.command("report")
def report(
    trace_id: Annotated[str, typer.Argument(help="The trace_id of a stored trace.")],
    fmt: Annotated[str, typer.Option("--format", help="json or csv.")] = "json",
    out: Annotated[Optional[Path], typer.Option(help="Write to this file (default: stdout).")] = None,
) -> None:
    """One response's provenance: its spans, their sources, top expert and documents (repeats grouped)."""
    from tracing.provenance.listing import report as build, report_csv

    if fmt not in ("json", "csv"):
        raise InputError(f"--format is json or csv, not {fmt!r}")
    rep = build(ws(), trace_id)
    if fmt == "csv":
        body = report_csv(rep)
    else:
        import json

        body = json.dumps(rep, indent=2, default=str, ensure_ascii=False) + "\n"
    if out is None:
        sys.stdout.write(body)
    else:
        out.write_text(body, encoding="utf-8")
        err_console.print(f"wrote {out}", highlight=False)
