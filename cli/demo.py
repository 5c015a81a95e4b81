"""`flexolmo demo`: the sample federation built, trained and traced, then a short story of what
tracing shows (tracing/story.py), each step about a screen.

Each build step keeps what an earlier run built when its inputs did not change (the tokenizer,
indexes, the public model, expert packages, the merged model), so a second `make demo` only
traces. Whether a model artifact is current is its card's answer (flexolmo/base/artifacts/).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flexolmo.base import tokenizer as tok_lib
from flexolmo.base.workspace import Workspace
from flexolmo.model.generate import GenerationOptions

from flexolmo.model.config import DEMO_EXPERT_DTYPE

from .common import DtypeOpt, console, ws
from .data import build_and_report

PASTED_FROM = ("creative", "news", "educational")  # Shakespeare, State of the Union, the Python docs
OPT_OUT = "news"
TOY_PROMPT = "To be, or not to be,"
# the real model's prompt: the opening of a Wikipedia lead in the public source (text such a model saw)
REAL_PROMPT_FROM = ("public", "wiki/United States")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    profile: Annotated[str, typer.Option(help="Model profile: tiny | demo | paper.")] = "demo",
    retrain: Annotated[bool, typer.Option(help="Retrain the models even if they are current.")] = False,
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size.")] = tok_lib.DEFAULT_VOCAB,
    dtype: DtypeOpt = DEMO_EXPERT_DTYPE,
) -> None:
    """Build the sample federation, train and merge the model, index every source, and trace."""
    w: Workspace = ws()
    t0 = time.time()
    steps: dict[str, float] = {}
    build(w, profile, retrain, vocab_size, steps, dtype)
    s = time.time()
    real = import_real_model(w)
    steps["real model"] = time.time() - s
    s = time.time()
    tell_story(w, real)
    steps["story"] = time.time() - s
    s = time.time()
    console.rule("11. a batch: held-out passages of every source, traced at once (flexolmo trace-batch)")
    from tracing.batch.demo import demo_batch

    from .batch import show_report

    show_report(demo_batch(w)[1])
    steps["batch"] = time.time() - s
    console.rule(f"done in {time.time() - t0:.0f} s; workspace {w.root}")
    console.print("  ".join(f"{k} {v:.0f} s" for k, v in steps.items()), highlight=False)
    what_next(w)


# -- building (steps 1-6) --------------------------------------------------------------------


def build(w: Workspace, profile: str, retrain: bool, vocab_size: int, steps: dict[str, float],
          dtype: str = DEMO_EXPERT_DTYPE) -> None:
    from flexolmo.base.sources import list_sources
    from flexolmo.model.artifacts import expert_package, merged_model, public_model
    from flexolmo.model.config import get_profile
    from flexolmo.model.merge import merge
    from flexolmo.model.train import train_expert, train_public
    from index.build import build_all, catalog_table

    def step(title: str):
        console.rule(title)
        return time.time()

    s = step("1. the sample federation: eight sources, eight owners")
    if any(not r.ok for r in build_and_report()):
        console.print("[yellow]some sample sources are missing; run `make data-deps` and retry[/]")
    steps["sources"] = time.time() - s

    s = step("2. a shared tokenizer (public source only)")
    info = tok_lib.train_tokenizer(w, vocab_size=vocab_size)
    console.print(f"{info.vocab_size:,} ids ({info.n_bow:,} begin a word)")
    steps["tokenizer"] = time.time() - s

    s = step("3. one suffix-array index per source (train split)")
    build_all(w)
    console.print(_catalog(catalog_table(w)))
    steps["indexes"] = time.time() - s

    s = step(f"4. the public model ({profile} profile)")
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
        r = train_public(w, profile)
        console.print(f"public: {r.tokens:,} tokens, {r.steps} steps, loss {r.final_loss:.3f}, "
                      f"{r.tokens_per_s:,.0f} tokens/s")
    steps["public model"] = time.time() - s

    s = step("5. one expert per data owner, trained on its own data against the frozen public model")
    if dtype != "float32":
        console.print(f"[dim]under {dtype} autocast with float32 master weights (faster on CPUs with bfloat16 "
                      "instructions); `flexolmo demo --dtype float32` trains as the evaluation does[/]")
    owners = [src.name for src in list_sources(w) if src.name != "public"]
    public_hash = public_model.read(w).weights
    for name in owners:
        if not retrain and expert_package.status(w, p, name, public_hash) is None:
            console.print(f"{name}: expert package is current, kept")
            continue
        r = train_expert(w, name, profile, dtype=dtype)
        console.print(f"{name}: {r.tokens:,} tokens, loss {r.final_loss:.3f}, {r.tokens_per_s:,.0f} tokens/s ({dtype})")
    steps["experts"] = time.time() - s

    s = step("6. the experts merged into one model (no joint training)")
    if merged_model.status(w, public_hash, owners, top_k=min(p.model.top_k, 1 + len(owners))) is None:
        console.print("merged model is current, kept")
    else:
        m = merge(w, owners)
        console.print(f"merged {len(m.experts)} experts (top-{m.top_k}): " + ", ".join(m.experts))
    steps["merge"] = time.time() - s


@dataclass(frozen=True)
class RealModel:
    """A real pretrained model folder for step 8 and the document whose opening prompts it."""

    path: Path
    about: str
    source: str
    doc_id: str


def import_real_model(w: Workspace) -> RealModel | None:
    """The packaged real model converted into the workspace once (None, said why, when its
    package is not installed)."""
    from flexolmo.base.errors import NotFoundError
    from flexolmo.model import pretrained

    console.rule("a real pretrained model, from its package (nothing is fetched from a hub)")
    try:
        m = pretrained.import_packaged(w)
    except NotFoundError as e:
        console.print(f"[yellow]{e}[/]")
        return None
    console.print(f"{m.name}: {m.parameters:,} parameters, {m.vocab_size:,}-id tokenizer, {m.licence}; "
                  f"{'current, kept' if m.kept else 'converted'} in {m.path}", highlight=False)
    return RealModel(m.path, m.about or m.name, *REAL_PROMPT_FROM)


def _catalog(rows: list[dict]) -> Table:
    t = Table(box=None, pad_edge=False)
    for c in ("source", "owner", "docs", "tokens", "MB", "state"):
        t.add_column(c, justify="right" if c in ("docs", "tokens", "MB") else "left")
    for r in rows:
        state = "not built" if not r["indexed"] else ("stale" if r["stale"] else "ok")
        t.add_row(r["source"], r["owner"], f"{r['n_docs'] or 0:,}", f"{r['n_tokens'] or 0:,}",
                  f"{(r['bytes'] or 0) / 1e6:.1f}", state)
    return t


# -- the story (steps 7-10) ------------------------------------------------------------------


def tell_story(w: Workspace, real: RealModel | None = None) -> None:
    from flexolmo.base import sources as src_lib
    from flexolmo.model.moe import num_parameters
    from tracing import story
    from tracing.provenance import governance
    from tracing.trace import Tracer

    tracer = Tracer.open(w)
    have = {s.name for s in src_lib.available_sources(w)}
    pasted_from = [s for s in PASTED_FROM if s in have]

    console.rule("7. a pasted response, traced")
    pasted = story.pasted_response(tracer, pasted_from)
    console.print("[dim]This response was pasted together by the demo from passages of three sources' "
                  "training documents, joined by plain prose; it was not generated.[/]")
    console.print(pasted.text, highlight=False, markup=False)
    before = tracer.trace(pasted.text, prompt=pasted.prompt)
    _attributions(story.attributed(before, pasted))

    console.rule("8. a model's own words, traced: the demo's toy, then a real pretrained model")
    t = tracer.generate_and_trace(TOY_PROMPT, GenerationOptions(max_new_tokens=40))
    n = num_parameters(tracer.model)
    console.print(f"[dim]The demo's model ({n / 1e6:.1f}M parameters, trained for minutes on 2 cores) writes "
                  "nonsense:[/]")
    console.print(f"{TOY_PROMPT}[bold]{t.response}[/]", highlight=False)
    longest = max(t.spans, key=lambda s: s.end - s.start, default=None)
    console.print(f"{len(t.spans)} spans found verbatim in the training data" + (
        f"; the longest, {longest.end - longest.start} tokens: {longest.text.strip()!r} in "
        + ", ".join(f"{k} ({v})" for k, v in longest.count_by_source.items() if v) if longest else ""),
        highlight=False)
    _real_model(w, real)

    console.rule("9. memorisation: the opening of a training document, continued greedily")
    owners = [s.name for s in src_lib.available_sources(w) if s.name != "public"]
    m = story.memorised(tracer, owners)
    console.print(f"tried the openings of {m.tried} training documents; the longest verbatim continuation: "
                  f"{m.verbatim_tokens} tokens of {m.source}:{m.doc_id}", highlight=False)
    if m.trace is not None:
        console.print(f"{m.prompt}[bold]{m.trace.response}[/]", highlight=False)
        found = [s for s in m.trace.spans if any(d.doc_id == m.doc_id for d in s.documents)]
        console.print(f"traced: {len(found)} span(s) lead back to {m.doc_id}" + (
            f", the longest {max(s.end - s.start for s in found)} tokens" if found else ""), highlight=False)
    if m.verbatim_tokens < story.LONG:
        console.print("[dim]A model this small memorises almost nothing; a large one repeats text it saw often, "
                      "and its trace then reads like step 7's.[/]")

    console.rule(f"10. the {OPT_OUT} owner switches its source off")
    governance.set_policy(w, OPT_OUT, active=False, by="demo")
    try:
        after = Tracer.open(w).trace(pasted.text, prompt=pasted.prompt, store=False)
    finally:
        governance.set_policy(w, OPT_OUT, active=True, by="demo")
    _opt_out(story.opt_out(before, after, OPT_OUT))


def _real_model(w: Workspace, real: RealModel | None) -> None:
    """The real model answers the opening of a document it plausibly saw; its answer is traced
    over the same indexes."""
    from flexolmo.model.loading import ModelSpec
    from tracing import story
    from tracing.trace import Tracer

    if real is None:
        console.print("[dim]no real pretrained model installed (`make data-deps` installs one)[/]")
        return
    console.print(f"[dim]{real.about}[/]", highlight=False)
    tracer = Tracer.open(w, model=ModelSpec.parse(real.path))
    answer = story.real_answer(tracer, real.source, real.doc_id)
    console.print(f"prompt: the opening of {real.source}:{real.doc_id}; greedy answer in bold", highlight=False)
    console.print(f"{answer.prompt}[bold]{answer.trace.response}[/]", highlight=False)
    t = Table(box=None, pad_edge=False)
    for c in ("tokens", "span", "found in", "documents (first 3)"):
        t.add_column(c, overflow="fold")
    for s in answer.notable():
        t.add_row(str(s.end - s.start), s.text.strip(), ", ".join(f"{k} ({v})" for k, v in s.count_by_source.items() if v),
                  ", ".join(d.doc_id for d in s.documents[:3]))
    console.print(t)
    own = (f"its own tokenizer ({len(tracer.model_tokenizer):,} ids) aligned to the index's by characters"
           if tracer.model_tokenizer is not None else "the index's tokenizer")
    console.print(f"{len(answer.trace.spans)} spans, {own}. A dense model has no experts: routing, counterfactuals "
                  f"and opt-out are the toy's. Yours: flexolmo trace --model {real.path} --text \"...\"",
                  highlight=False, markup=False)


def _attributions(rows) -> None:
    t = Table(box=None, pad_edge=False)
    for c in ("tokens", "span", "found in", "its document", "top expert"):
        t.add_column(c, overflow="fold")
    for a in rows:
        s = a.span
        where = ", ".join(f"{k} ({v})" for k, v in s.count_by_source.items() if v)
        drop = next((e.counterfactual for e in s.experts if e.expert == s.top_expert), None)
        expert = "" if a.top_expert is None else f"{a.top_expert}" + (f" ({drop:+.1f} nats off)" if drop else "")
        text = s.text.strip()
        t.add_row(str(s.end - s.start), (text[:48] + "…") if len(text) > 49 else text, where,
                  "yes" if a.origin_document else "no", expert)
    console.print(t)
    ok = sum(a.found_in_origin for a in rows)
    console.print(f"{ok} of {len(rows)} spans of 8+ tokens found in the source they were taken from; the top expert "
                  "is the one whose removal lowers the span's log-probability most (the counterfactual).",
                  highlight=False)


def _opt_out(o) -> None:
    console.print(f"spans: {o.spans_before} -> {o.spans_after}; {o.source} documents shown: "
                  f"{o.documents_before} -> {o.documents_after}; the {o.source} expert is switched off with it",
                  highlight=False)
    tops = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))  # noqa: E731
    console.print(f"top experts before: {tops(o.tops_before)}; after: {tops(o.tops_after)}", highlight=False)
    for text in o.lost:
        console.print(f"  no longer traced: {text[:70]!r}", highlight=False)
    console.print(f"(switched back on; both changes are in the policy log: flexolmo sources show {o.source})",
                  highlight=False)


def what_next(w: Workspace) -> None:
    from .keys import announce_admin_key

    console.rule("what next")
    announce_admin_key(w)  # the owner routes' admin key: created and printed on the first demo only
    console.print("flexolmo serve                      # then open http://127.0.0.1:8000: the page traces, "
                  "owners switch sources off", highlight=False, markup=False)
    console.print('flexolmo trace --text "Four score and seven years ago"', highlight=False, markup=False)
    console.print('flexolmo search "the river AND king"', highlight=False, markup=False)
    console.print('flexolmo query "SELECT source, count(*) FROM span_sources WHERE count > 0 GROUP BY 1"',
                  highlight=False, markup=False)
