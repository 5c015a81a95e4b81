"""`flexolmo index ...`: build, verify and list the per-source indexes; take documents down."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from flexolmo.base.errors import InputError
from index import build as lib
from index import takedown as td
from index import verify as checks

from . import tables as T
from .common import console, ws

app = typer.Typer(help="Per-source suffix-array indexes (infini-gram format) and takedowns.", no_args_is_help=True)


class _RichProgress:
    """One line per finished step, with its rate."""

    def __init__(self) -> None:
        self._t0: dict[tuple[str, str], float] = {}

    def __call__(self, source: str, step: str, done: float, total: float | None, unit: str) -> None:
        key = (source, step)
        now = time.perf_counter()
        if key not in self._t0:
            self._t0[key] = now
        if total is not None and done >= total:
            secs = now - self._t0.pop(key)
            rate = f", {done / secs:,.0f} {unit}/s" if secs > 0 and done else ""
            console.print(f"  [bold]{source}[/] {step}: {int(done):,} {unit} in {secs:.2f}s{rate}", highlight=False)


def register(app_: typer.Typer) -> None:
    app_.add_typer(app, name="index")


@app.command("build")
def build(
    source: Annotated[Optional[str], typer.Option("--source", help="Build this source's index.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Build every registered source's index.")] = False,
    shards: Annotated[Optional[int], typer.Option(help="Shards per index (1..256); default: as many as "
                                                       "--mem-gib and --max-shard-tokens need (1 for small sources).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the source and tokenizer are unchanged.")] = False,
    mem_gib: Annotated[float, typer.Option("--mem-gib", help="Memory budget of the suffix-array build (GiB); a "
                                                             "shard's tokens must fit in 3/4 of it.")] = lib.IndexConfig.mem_gib,
    cpus: Annotated[int, typer.Option(help="Suffix-sort threads at a time (with --ray: the local Ray's CPUs).")] = lib.IndexConfig.cpus,
    max_shard_tokens: Annotated[Optional[int], typer.Option("--max-shard-tokens", help="At most this many tokens "
                                                                                       "per shard.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Build the shards' suffix arrays as Ray tasks (the `ray` extra): "
                                                    "a local Ray of --cpus CPUs, or the cluster at --ray-address.")] = False,
    ray_address: Annotated[Optional[str], typer.Option(help="With --ray: a running cluster's address (the build "
                                                            "folder must be on storage its nodes share).")] = None,
) -> None:
    """Build the index of a source's train split (atomically; verified before it is served).
    Streams: memory stays within --mem-gib whatever the source's size."""
    if bool(source) == all_:
        raise InputError("give either --source NAME or --all")
    progress = _RichProgress()
    config = lib.IndexConfig(shards=shards, mem_gib=mem_gib, cpus=cpus, max_shard_tokens=max_shard_tokens, ray=ray,
                             ray_address=ray_address)
    results = lib.build_all(ws(), force=force, progress=progress, names=[source] if source else None, config=config)
    for r in results:
        if r.remote:
            console.print(f"{r.source}: not built here ({r.reason})", highlight=False)
        elif r.skipped:
            console.print(f"{r.source}: unchanged, kept ({r.reason})")
        else:
            console.print(f"{r.source}: {r.n_docs:,} documents, {r.n_tokens:,} tokens, {r.bytes / 1e6:.1f} MB "
                          f"in {r.seconds:.1f}s ({r.tokens_per_second:,.0f} tokens/s)")


@app.command("verify")
def verify(source: Annotated[Optional[str], typer.Option("--source", help="Verify only this source.")] = None) -> None:
    """Recheck checksums, structure, the engine and sampled counts of built indexes."""
    results = checks.verify_all(ws(), [source] if source else None)
    bad = 0
    for r in results:
        if r.skipped:
            console.print(f"{r.source}: not verified here ({r.skipped})", highlight=False)
        elif r.ok:
            console.print(f"{r.source}: ok ({r.checked_files} files, {r.checked_ngrams} n-gram counts, {r.seconds:.1f}s)")
        else:
            bad += 1
            console.print(f"[bold red]{r.source}: FAILED[/]")
            for p in r.problems:
                console.print(f"  - {p}", highlight=False)
    if not results:
        console.print("no indexes built yet; run `flexolmo index build --all`")
    if bad:
        raise typer.Exit(1)


@app.command("takedown")
def takedown(
    source: Annotated[str, typer.Option("--source", help="The source holding the document.")],
    doc_id: Annotated[str, typer.Option("--doc-id", help="The document's doc_id.")],
    reason: Annotated[str, typer.Option("--reason", help="Why it is taken down (recorded).")],
    by: Annotated[Optional[str], typer.Option(help="Who asks (default: the OS user).")] = None,
) -> None:
    """Take a document down: traces will show its windows as blocked."""
    from tracing.provenance.governance import takedown as take_down

    t = take_down(ws(), source, doc_id, reason, by=by)
    console.print(f"took down {t.source}/{t.doc_id} ({t.reason}) at {t.created_at} by {t.requested_by}")


TAKEDOWN_COLUMNS = [
    T.Col("source"),
    T.Col("doc_id", wrap=True),
    T.Col("reason", priority=2, wrap=True),
    T.Col("requested_by", "by", priority=1, wrap=True),
    T.Col("created_at", "when", priority=3),
]


@app.command("takedowns")
def takedowns(
    source: Annotated[Optional[str], typer.Option("--source", help="Only this source.")] = None,
    as_json: T.JsonOpt = False,
    as_csv: T.CsvOpt = False,
) -> None:
    """List the takedowns."""
    rows = [t.to_dict() for t in td.list_takedowns(ws(), source)]
    T.emit(console, rows, TAKEDOWN_COLUMNS, title="takedowns", as_json=as_json, as_csv=as_csv)


@app.command("list")
def list_(as_json: T.JsonOpt = False, as_csv: T.CsvOpt = False) -> None:
    """The catalog: every source with its policy and index stats."""
    T.emit(console, lib.catalog_table(ws()), CATALOG_COLUMNS, title="source catalog", as_json=as_json, as_csv=as_csv)


def _state(r: dict) -> str:
    return "remote" if r.get("remote") else "not built" if not r["indexed"] else "stale: rebuild" if r["stale"] else "ok"


# `index list`'s columns, the least useful (highest priority number) left out first when narrow
CATALOG_COLUMNS = [
    T.Col("source"),
    T.Col("owner", priority=5, wrap=True),
    T.Col("domain", priority=4, wrap=True),
    T.Col("visibility", priority=2),
    T.Col("available", "on", show=lambda v: "yes" if v else "no"),
    T.Col("n_docs", "docs", priority=1, show=T.num(), right=True),
    T.Col("n_tokens", "tokens", priority=1, show=T.num(), right=True),
    T.Col("bytes", "MB", priority=3, show=lambda v: "" if v is None else f"{v / 1e6:.1f}", right=True),
    T.Col("bytes_per_token", "B/token", priority=8, show=T.num("{:.1f}"), right=True),
    T.Col("build_seconds", "build s", priority=7, show=T.num("{:.1f}"), right=True),
    T.Col("tokens_per_second", "tokens/s", priority=6, show=T.num("{:,.0f}"), right=True),
    T.Col("takedowns", priority=3, show=T.num(), right=True),
    T.Col("state", value=_state),
]


def catalog_rich_table(rows: list[dict], width: int | None = None):
    """The catalog as a rich table fitted to `width` (None: every column)."""
    return T.table(rows, CATALOG_COLUMNS, "source catalog", width)


@app.command("serve")
def serve(
    source: Annotated[str, typer.Option("--source", help="The source of this workspace to serve.")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: a free one, printed at start).")] = 8701,
    keys: Annotated[Optional[str], typer.Option("--keys", help="The keys file (default: $FLEXOLMO_KEYS or "
                                                                "<workspace>/keys.json).")] = None,
) -> None:
    """Serve one source's index as an owner node (protocol /v1, keyed): its text stays here.

    Tracers register it with `flexolmo sources add NAME --remote http://HOST:PORT --key-file F ...`,
    using a key from `flexolmo keys create --owner OWNER`. The owner's policy (on/off,
    visibility, takedowns) is applied on this side and followed by the next answer.
    """
    from index.node import serve as run

    run(ws(), source, host=host, port=port, keys=keys)
