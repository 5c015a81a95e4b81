"""`flexolmo search`: phrase counts, boolean (CNF) queries, documents and next tokens over the
training data, each source under its owner's policy (index/query.py).

    flexolmo search "the river"
    flexolmo search "natural language OR speech AND model" --source news --docs 5 --json
    flexolmo search "the president" --next
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from flexolmo.base import tokenizer as tok_lib
from index import query as index_query
from index.engine import Federation

from .common import check_unicode, console, print_json, ws


def register(app: typer.Typer) -> None:
    app.command("search")(search)


def search(
    query: Annotated[str, typer.Argument(help="A phrase, or `a OR b AND c` (AND of ORs of phrases; quote a phrase "
                                              "holding AND/OR).")],
    source: Annotated[Optional[str], typer.Option(help="Search this source only.")] = None,
    docs: Annotated[int, typer.Option("--docs", min=0, max=index_query.MAX_DOCS,
                                      help="Documents to show per source (0: counts only).")] = index_query.DOCS_PER_SOURCE,
    seed: Annotated[int, typer.Option(help="Seed of the document sample.")] = 0,
    next_: Annotated[bool, typer.Option("--next", help="Show the next-token distribution after the phrase instead.")] = False,
    top: Annotated[int, typer.Option(help="With --next: the most frequent tokens shown.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Search the training data: counts per source, matching documents, or what follows a phrase."""
    check_unicode(query, "the query")
    w = ws()
    tok = tok_lib.load_tokenizer(w)
    fed = Federation.open(w, strict=False)
    try:
        if next_:
            res = index_query.next_tokens(fed, tok, query, source=source, top=top)
            print_json(res.to_dict()) if as_json else _show_next(res)
        else:
            res = index_query.search(fed, tok, query, source=source, n_docs=docs, seed=seed)
            print_json(res.to_dict()) if as_json else _show_search(res)
    finally:
        fed.close()


def _show_search(res) -> None:
    console.print(Text.assemble(("query: ", "bold"), res.query, f"  ·  {res.total:,} matches"))
    table = Table()
    for col in ("source", "count", "documents"):
        table.add_column(col, overflow="fold")
    for s in res.sources:
        count = "—" if s.count is None else f"{s.count:,}{' (approx)' if s.approx else ''}"
        body = Text()
        for h in s.documents:
            body.append(f"{h.doc_id}", "bold")
            if h.repeats > 1:
                body.append(f" (repeated {h.repeats} times)", "yellow")
            if h.blocked:
                body.append(" blocked: taken down by its owner\n", "red")
                continue
            a, b = h.snippet_span
            body.append(": …")
            body.append(h.snippet[:a].replace("\n", " "))
            body.append(h.snippet[a:b].replace("\n", " "), "reverse")
            body.append(h.snippet[b:].replace("\n", " ") + "…\n")
        if s.note:
            body.append(s.note, "dim")
        table.add_row(s.source, count, body)
    console.print(table)
    if res.skipped:
        console.print("[dim]not searched: " + ", ".join(f"{k} ({v})" for k, v in res.skipped.items()) + "[/]",
                      highlight=False)


def _show_next(res) -> None:
    counts = ", ".join(f"{k} {'—' if v is None else v}" for k, v in res.prompt_count.items())
    console.print(Text.assemble(("after: ", "bold"), repr(res.phrase), f"  ·  occurrences: {counts}"))
    table = Table()
    for col in ("token", "count", "prob", "by source"):
        table.add_column(col, overflow="fold")
    for t in res.tokens:
        table.add_row(Text(repr(t.text)), str(t.count), f"{t.prob:.1%}",
                      Text(", ".join(f"{k} {v}" for k, v in t.by_source.items())))
    console.print(table)
    for k, v in res.notes.items():
        console.print(f"[dim]{k}: {v}[/]", highlight=False)
