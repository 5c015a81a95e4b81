"""`flexolmo sources ...`: register a data owner's documents, list them, set their policy."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from flexolmo.base import source_schema
from flexolmo.base import sources as lib

from . import tables as T
from .common import console, print_json, ws

app = typer.Typer(help="Register and inspect sources (one per data owner).", no_args_is_help=True)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Source name: lowercase letters, digits, '_'.")],
    owner: Annotated[str, typer.Option(help="The data owner.")],
    domain: Annotated[str, typer.Option(help="The domain, e.g. news, code, math.")],
    licence: Annotated[str, typer.Option(help="Licence of the documents.")],
    path: Annotated[Optional[str], typer.Option("--path", help="A JSONL or Parquet file, or a folder of them, with a 'text' column.")] = None,
    visibility: Annotated[str, typer.Option(help=source_schema.POLICY_HELP["visibility"])] = "full",
    expires: Annotated[Optional[str], typer.Option(help="Licence expiry, YYYY-MM-DD.")] = None,
    remote: Annotated[Optional[str], typer.Option("--remote", help="Instead of --path: the owner node's URL "
                                                                   "(`flexolmo index serve`); no documents come here.")] = None,
    key_file: Annotated[Optional[str], typer.Option("--key-file", help="With --remote: the key the owner issued.")] = None,
) -> None:
    """Register a folder or file of documents as a new source, or an owner's node (--remote)."""
    if remote is not None:
        from index.remote import add_remote

        if path is not None or expires is not None or key_file is None:
            raise lib.InputError("--remote takes --key-file and no --path or --expires (set an expiry afterwards "
                                 "with `flexolmo sources set NAME --expires`)")
        src = add_remote(ws(), name, remote, key_file, owner=owner, domain=domain, licence=licence, visibility=visibility)
        console.print(f"added remote source [bold]{src.name}[/] at {remote}: {src.n_docs_train:,} documents stay "
                      "with their owner")
        return
    if path is None:
        raise lib.InputError("give --path (documents) or --remote (an owner node)")
    src = lib.add_source(ws(), name, path, owner=owner, domain=domain, licence=licence, visibility=visibility, expires=expires)
    console.print(f"added source [bold]{src.name}[/]: {src.n_docs_train:,} train + {src.n_docs_valid:,} validation documents")


@app.command("list")
def list_(as_json: T.JsonOpt = False, as_csv: T.CsvOpt = False) -> None:
    """List the registered sources with their policy and document and character counts per split."""
    show_sources(lib.list_sources(ws()), as_json, as_csv)


@app.command("show")
def show(name: str, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show one source, its policy and its policy history."""
    src = lib.get_source(ws(), name)
    log = lib.policy_log(ws(), name)
    if as_json:
        print_json({**src.to_dict(), "policy_log": log})
        return
    t = Table(show_header=False, title=Text(f"source {src.name}"))
    for k, v in src.to_dict().items():
        t.add_row(k, Text(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else _one_line(v)))
    console.print(t)
    for e in log:  # stored as data: shown literally, one line each, never as markup
        who = _one_line(e["changed_by"]) + (f" (key {e['key_id']})" if e.get("key_id") else "") + ":"
        note = f"  # {_one_line(e['comment'])}" if e.get("comment") else ""
        console.print(Text("  " + "  ".join((str(e["changed_at"]), who, e["field"], _one_line(e["old_value"]), "->",
                                             _one_line(e["new_value"]))) + note),
                      highlight=False, soft_wrap=True)


P = source_schema.POLICY_HELP  # the policy's fields and their help: defined once


@app.command("set")
def set_(
    name: str,
    active: Annotated[Optional[bool], typer.Option("--active/--inactive", help=P["active"])] = None,
    visibility: Annotated[Optional[str], typer.Option("--visibility", help=P["visibility"])] = None,
    expires: Annotated[Optional[str], typer.Option("--expires", help=P["expires"])] = None,
    max_verbatim: Annotated[Optional[str], typer.Option("--max-verbatim", metavar="N|none", help=P["max_verbatim"])] = None,
    by: Annotated[Optional[str], typer.Option(help="Who makes the change (default: the OS user).")] = None,
) -> None:
    """Change a source's policy; the change is logged with who and when."""
    from tracing.provenance.governance import set_policy

    given = {"active": active, "visibility": visibility, "expires": expires, "max_verbatim": max_verbatim}
    change = {k: source_schema.parse_cli_value(k, v) if k in ("expires", "max_verbatim") else v
              for k, v in given.items() if v is not None}
    src = set_policy(ws(), name, by=by, **change)
    console.print(f"{src.name}: active={src.active} visibility={src.visibility} "
                  f"expires={src.expires or source_schema.NO_EXPIRY_WORD} "
                  f"max_verbatim={src.max_verbatim or source_schema.NO_LIMIT_WORD}", highlight=False)


def _on(r: dict) -> str:
    if "available" not in r:  # the total row
        return ""
    return "yes" if r["available"] else ("expired" if r["active"] else "no")


def _mchars(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.2f}M"


# the columns of `sources list`, the least useful (highest priority number) left out first when narrow
LIST_COLUMNS = [
    T.Col("name"),
    T.Col("owner", priority=4, wrap=True),
    T.Col("domain", priority=3, wrap=True),
    T.Col("visibility", priority=1),
    T.Col("on", value=_on),
    T.Col("n_docs_train", "docs train", priority=1, show=T.num(), right=True),
    T.Col("n_docs_valid", "docs valid", priority=5, show=T.num(), right=True),
    T.Col("n_chars_train", "chars train", priority=2, show=_mchars, right=True),
    T.Col("n_chars_valid", "chars valid", priority=6, show=_mchars, right=True),
    T.Col("max_verbatim", "verbatim max", priority=7, show=T.num()),
    T.Col("expires", priority=8),
]


def show_sources(rows: list[lib.Source], as_json: bool = False, as_csv: bool = False) -> None:
    """The sources as a table fitted to the terminal (with a total row), or JSON / CSV."""
    records = [s.to_dict() for s in rows]
    sums = {k: sum(r[k] for r in records) for k in ("n_docs_train", "n_docs_valid", "n_chars_train", "n_chars_valid")}
    totals = {"name": "total", **sums} if records else None
    T.emit(console, records, LIST_COLUMNS, title="sources", as_json=as_json, as_csv=as_csv, totals=totals)


def _one_line(v: object, limit: int = 200) -> str:
    """A stored value for display, one line (rows written before `by` was validated may be long)."""
    return T.one_line(v, limit)
