"""`flexolmo trace-batch INPUT` and `flexolmo report batch ID`: provenance across a corpus of outputs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from flexolmo.base.errors import InputError
from tracing.batch.spec import MAX_CHARS, BatchSpec
from tracing.options import TraceOptions

from flexolmo.model.generate import GenerationOptions
from flexolmo.model.loading import ModelSpec

from .common import GENERATION_FLAGS, console, err_console, print_json, with_model, with_options, ws


def register(app: typer.Typer) -> None:
    from .trace_cmds import report_app

    app.command("trace-batch")(trace_batch)
    report_app.command("batch")(report_batch)


@with_options(TraceOptions, "opts", renamed={"seed": "docs_seed"}, flags={"seed": ("--docs-seed",)})
@with_options(GenerationOptions, "gen", flags=GENERATION_FLAGS)
@with_model("ms")
def trace_batch(
    input: Annotated[Path, typer.Argument(help="JSONL or Parquet: a `text` column (the responses), optional `prompt` "
                                               "and `id`; with --generate a `prompt` column.")],
    generate: Annotated[bool, typer.Option("--generate", help="Generate a response to each row's `prompt` with the "
                                                              "model, then trace it.")] = False,
    contamination: Annotated[bool, typer.Option("--contamination", help="Benchmark items: the longest verbatim match "
                                                                        "of each item per source (no model).")] = False,
    question_field: Annotated[str, typer.Option(help="With --contamination: the items' question column.")] = "question",
    answer_field: Annotated[str, typer.Option(help="With --contamination: the items' answer column ('' for none).")] = "answer",
    min_match: Annotated[int, typer.Option(help="With --contamination: flag items with a match of at least this "
                                                "many tokens.")] = 8,
    flagged: Annotated[Optional[Path], typer.Option(help="With --contamination: also write the flagged items here "
                                                         "(.jsonl or .csv).")] = None,
    no_model: Annotated[bool, typer.Option("--no-model", help="Spans and documents only: no routing or "
                                                              "counterfactuals (no model is loaded).")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Worker processes (or Ray actors); default: "
                                                                     "the cores.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run on Ray Data (the `ray` extra): a local Ray with --workers "
                                                    "CPUs, or the cluster at --ray-address.")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="With --ray: a running cluster's address "
                                                            "(e.g. ray://head:10001, or auto).")] = None,
    chunk_rows: Annotated[Optional[int], typer.Option(help="Rows per committed chunk (a kill loses at most the "
                                                           "chunks in flight); default 32, or 256 without a model.")] = None,
    max_chars: Annotated[int, typer.Option(help="Rows longer than this are reported as bad rows.")] = MAX_CHARS,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run and the report as JSON.")] = False,
    *,
    ms: ModelSpec,
    gen: GenerationOptions,
    opts: TraceOptions,
) -> None:
    """Trace every response of a file (resumable: rerun the same command to finish a stopped batch).

    The model, generation and trace flags are `flexolmo trace`'s (the same option models)."""
    from tracing.batch import batch_report, export_flagged, run_batch

    if generate and contamination:
        raise InputError("--generate and --contamination are two different batches; pick one")
    if flagged is not None and not contamination:
        raise InputError("--flagged writes a contamination batch's flagged items; add --contamination")
    mode = "contamination" if contamination else "generate" if generate else "trace"
    spec = BatchSpec.parse(
        mode=mode, options=opts, use_model=not no_model, max_chars=max_chars, question_field=question_field,
        answer_field=answer_field or None, min_match=min_match, generation=gen,
        model_path=str(ms.path) if ms.path else None, experts=ms.experts, device=ms.device, dtype=ms.dtype)
    if ray_address is not None and not ray:
        raise InputError("--ray-address names the Ray cluster of --ray; add --ray")
    res = run_batch(ws(), input, spec, workers=workers, engine="ray" if ray else "local", ray_address=ray_address,
                    chunk_rows=chunk_rows)
    rep = batch_report(ws(), res.batch_id)
    if flagged is not None:
        path, n = export_flagged(ws(), res.batch_id, flagged)
        err_console.print(f"wrote {n} flagged items to {path}", highlight=False)
    if as_json:
        print_json({"run": res.to_dict(), "report": rep.to_dict()})
        return
    done = "complete" if res.complete else f"{res.done:,}/{res.total:,} rows done"
    console.print(f"batch [bold]{res.batch_id}[/]: {done}; {res.run_rows:,} rows this run "
                  f"({res.resumed_from:,} done before), {res.errors:,} bad rows, {res.seconds:.1f} s "
                  f"on {res.engine} x{res.workers}; results in {res.folder}", highlight=False)
    show_report(rep)


def report_batch(
    batch_id: Annotated[str, typer.Argument(help="The batch id `trace-batch` printed (e.g. b0123456789ab).")],
    top: Annotated[int, typer.Option(help="The most reproduced documents to list.")] = 10,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw the longest-match distribution as a PNG here.")] = None,
    flagged: Annotated[Optional[Path], typer.Option(help="A contamination batch: write its flagged items here "
                                                         "(.jsonl or .csv).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """A batch's report: per-source reproduction, the most reproduced documents, each expert's
    effect on its own source's spans vs elsewhere, the longest-match distribution."""
    from tracing.batch.report import batch_report, export_flagged, longest_png

    rep = batch_report(ws(), batch_id, top_documents=top)
    if plot is not None:
        err_console.print(f"wrote {longest_png(rep, plot)}", highlight=False)
    if flagged is not None:
        path, n = export_flagged(ws(), batch_id, flagged)
        err_console.print(f"wrote {n} flagged items to {path}", highlight=False)
    if as_json:
        print_json(rep.to_dict())
        return
    show_report(rep)


def show_report(rep) -> None:
    """The report's tables on the console."""
    console.print(f"batch {rep.batch_id} ({rep.mode}, submitted by {rep.submitted_by}): {rep.n_done:,}/{rep.n_rows:,} "
                  f"rows done, {rep.n_ok:,} ok, {rep.n_errors:,} bad", highlight=False)
    for e in rep.errors[:5]:
        console.print(Text(f"  bad: {e['reason']} ({e['rows']} rows, e.g. row {e['example_rows'][0]})"))
    lo = rep.longest
    if rep.mode == "contamination":
        c = rep.contamination
        console.print(f"{c['flagged']:,} of {c['items']:,} items ({c['flagged_share']:.1%}) have a verbatim match of "
                      f">= {c['min_match']} tokens; by source: "
                      + (", ".join(f"{k} {v}" for k, v in c["flagged_by_source"].items()) or "none"), highlight=False)
        t = Table(title="flagged items (longest match first)")
        for col in ("row", "id", "tokens", "source", "match"):
            t.add_column(col, overflow="fold")
        for it in c["flagged_items"][:20]:
            t.add_row(str(it["row"]), Text(it["id"]), str(it["longest"]), Text(it["longest_source"] or ""),
                      Text(repr((it["longest_text"] or "").strip())[1:-1][:90]))
        console.print(t)
        return
    n1, n2 = rep.thresholds[0], rep.thresholds[-1]
    t = Table(title=f"reproduction per source ({rep.n_ok:,} responses)")
    for col in ("source", "owner", f"responses >= {n1}", f"responses >= {n2}", f"tokens in >= {n1}",
                f"tokens in >= {n2}"):
        t.add_column(col, overflow="fold")
    for s in rep.sources + [rep.overall]:
        t.add_row(Text(s["source"]), Text(s.get("owner") or ""), f"{s[f'share_ge_{n1}']:.1%}",
                  f"{s[f'share_ge_{n2}']:.1%}", f"{s[f'token_share_ge_{n1}']:.1%}", f"{s[f'token_share_ge_{n2}']:.1%}")
    console.print(t)
    if rep.documents:
        t = Table(title=f"most reproduced documents (spans >= {n1} tokens)")
        for col in ("source", "doc_id", "responses", "spans", "longest"):
            t.add_column(col, overflow="fold")
        for d in rep.documents:
            t.add_row(Text(d["source"]), Text(str(d["doc_id"])), str(d["responses"]), str(d["spans"]),
                      str(d["longest_span"]))
        console.print(t)
    if rep.owners:
        t = Table(title="each expert on spans found in its own source vs elsewhere (sums over spans)")
        for col in ("expert", "owner", "spans own/else", "routing own", "routing else", "drop own", "drop else"):
            t.add_column(col, overflow="fold")
        for o in rep.owners:
            t.add_row(Text(o["source"]), Text(o["owner"] or ""), f"{o['spans_own']}/{o['spans_elsewhere']}",
                      f"{o['routing_share_own']:.2f}", f"{o['routing_share_elsewhere']:.2f}",
                      _num(o["counterfactual_own"]), _num(o["counterfactual_elsewhere"]))
        console.print(t)
    if lo.get("n"):
        console.print(f"longest match per response: mean {lo['mean']:.1f}, median {lo['p50']}, p90 {lo['p90']}, "
                      f"max {lo['max']} tokens", highlight=False)
    sys.stdout.flush()


def _num(v) -> str:
    return "n/a" if v is None else f"{v:+.2f}"
