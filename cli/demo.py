"""`flexolmo demo`: the whole pipeline on the sample federation, step by step.

Each step keeps what an earlier run built when its inputs did not change (the tokenizer,
indexes, the public model, expert packages, the merged model), so a second `make demo` only
traces. Whether a model artifact is current is its card's answer (flexolmo/artifacts/).
Measured on a fresh workspace: `make demo` 13 min 3 s, of which 743 s training the experts (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from flexolmo.base import tokenizer as tok_lib
from flexolmo.base.workspace import Workspace

from .common import console, ws
from .data import build_and_report

DEMO_PROMPTS = (
    "Fellow-Citizens of the Senate and House of Representatives:",
    "To be, or not to be,",
    "def __init__(self",
    "The theorem states that",
)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    profile: Annotated[str, typer.Option(help="Model profile: tiny | demo | paper.")] = "demo",
    retrain: Annotated[bool, typer.Option(help="Retrain the models even if they are current.")] = False,
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size.")] = tok_lib.DEFAULT_VOCAB,
) -> None:
    """Build the sample federation, train and merge the model, index every source, trace outputs."""
    from flexolmo.model.artifacts import expert_package, merged_model, public_model
    from flexolmo.model.config import get_profile
    from flexolmo.model.merge import merge
    from flexolmo.base.sources import list_sources
    from flexolmo.model.train import train_expert, train_public
    from index.build import build_all, catalog_table

    from .index_cmds import _RichProgress, catalog_rich_table
    from .trace_cmds import show_trace

    w: Workspace = ws()
    t0 = time.time()
    steps: dict[str, float] = {}

    def mark(name: str, since: float) -> None:
        steps[name] = time.time() - since

    console.rule("1. sample sources")
    s = time.time()
    results = build_and_report()
    missing = [r for r in results if not r.ok]
    if missing:
        console.print(f"[yellow]{len(missing)} sample source(s) missing; run `make data-deps` and retry[/]")
    mark("sources", s)

    console.rule("2. shared tokenizer (public source only)")
    s = time.time()
    info = tok_lib.train_tokenizer(w, vocab_size=vocab_size)
    console.print(f"{info.vocab_size:,} ids ({info.n_bow:,} begin a word)")
    mark("tokenizer", s)

    console.rule("3. per-source indexes (train split)")
    s = time.time()
    build_all(w, progress=_RichProgress())
    console.print(catalog_rich_table(catalog_table(w)))
    mark("indexes", s)

    console.rule(f"4. public model ({profile} profile)")
    s = time.time()
    p = get_profile(profile)
    why = public_model.status(w, p)
    if not retrain and why is None:
        console.print("public model is current, kept")
    elif not retrain and (not_shipped := public_model.install_shipped(w, p)) is None:
        card = public_model.read(w)
        console.print(f"installed the shipped public model ({card.n_params:,} parameters, {card.tokens:,} tokens, "
                      f"loss {card.final_loss:.3f}; assets/public-model/README.md says how it was trained)")
    else:
        if not retrain:
            console.print(f"[yellow]{not_shipped}[/]")
        console.print(f"training: {'--retrain' if retrain else why}")
        r = train_public(w, profile)
        console.print(f"public: {r.tokens:,} tokens, {r.steps} steps, loss {r.final_loss:.3f}, {r.tokens_per_s:,.0f} tokens/s")
    mark("public model", s)

    console.rule("5. one expert per data owner, trained against the frozen public model")
    s = time.time()
    owners = [src.name for src in list_sources(w) if src.name != "public"]
    public_hash = public_model.read(w).weights
    for name in owners:
        why = expert_package.status(w, p, name, public_hash)
        if not retrain and why is None:
            console.print(f"{name}: expert package is current, kept")
            continue
        r = train_expert(w, name, profile)
        console.print(f"{name}: {r.tokens:,} tokens, loss {r.final_loss:.3f}, {r.tokens_per_s:,.0f} tokens/s")
    mark("experts", s)

    console.rule("6. merge")
    s = time.time()
    if merged_model.status(w, public_hash, owners, top_k=min(p.model.top_k, 1 + len(owners))) is None:
        console.print("merged model is current, kept")
    else:
        m = merge(w, owners)
        console.print(f"merged {len(m.experts)} experts (top-{m.top_k}): " + ", ".join(f"{i}={n}" for i, n in enumerate(m.experts)))
    mark("merge", s)

    console.rule("7. generate and trace")
    s = time.time()
    from tracing.trace import Tracer

    tracer = Tracer.open(w)
    new_tokens = min(48, tracer.model.config.max_position_embeddings - 24)  # the tiny profile has 64 positions
    # sampled (seeded): greedy decoding of a model this small falls into repetition
    traces = [tracer.generate_and_trace(p, max_new_tokens=new_tokens, do_sample=True, seed=i)
              for i, p in enumerate(DEMO_PROMPTS)]
    show_trace(max(traces, key=lambda t: len(t.spans)))
    n_spans = sum(len(t.spans) for t in traces)
    agree = sum(bool(sp.agreement) for t in traces for sp in t.spans)
    console.print(f"{len(traces)} responses traced and stored: {n_spans} spans, top expert matches a source "
                  f"containing the span on {agree}/{n_spans}. Query them: flexolmo query \"SELECT * FROM spans\"")
    mark("trace", s)

    console.rule(f"done in {time.time() - t0:.0f}s; workspace {w.root}")
    console.print("  ".join(f"{k} {v:.0f}s" for k, v in steps.items()))

    from .keys import announce_admin_key

    announce_admin_key(w)  # the owner routes' admin key: created and printed on the first demo only
