"""`flexolmo eval`: the FlexOlmo paper's comparison on this federation, on held-out text.

    result = run_eval(ws, "demo")                 # every row; models trained where missing
    result = run_eval(ws, "tiny", rows=["public", "flexolmo"])

Models, each trained only when no current one exists (so a second run only measures):
    public          the workspace's public model
    expert:<s>      owner s's own 2-expert model [public | s], from the workspace's packages
    soup, btm       from those packages (flexolmo/evaluation/baselines.py, metrics.py)
    dense           public model trained further on all data, the owners' token budget
    flexolmo        public + every owner's expert merged (top-k of the profile)
    flexolmo_tuned  flexolmo + router tuning as in the paper (proxy data picked by classifiers)
    no_bias         owners retrained with the router bias fixed at 0 (the previous recipe)
    random_init     owners retrained with random router rows instead of domain embeddings
    embedder_init   owners retrained with rows from an off-the-shelf embedder (the paper's choice:
                    all-MiniLM-L6-v2, through a fixed public projection) instead of the
                    public model's own hidden states
Everything the evaluation trains lives in `<workspace>/eval/<profile>/`. Opt-out removes
each owner's expert from the flexolmo model in turn. `device` and `dtype` apply to everything
it trains and measures (`flexolmo eval --profile gpu --device cuda --dtype bfloat16`; what that
costs: flexolmo/evaluation/budget.py). The task measure is next-line exact
match on code (metrics in flexolmo/evaluation/task.py).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from flexolmo.model.artifacts import expert_package, public_model
from flexolmo.model.config import get_profile, override
from flexolmo.model.device import DEVICE, DTYPE, autocast, resolve_device, resolve_dtype
from flexolmo.base.errors import InputError
from flexolmo.model.layout import shared_weights_hash
from flexolmo.model.merge import load_expert_model, load_merged, merge
from flexolmo.model.moe import as_module
from flexolmo.base.sources import list_sources
from flexolmo.base.workspace import Workspace
from flexolmo.evaluation import baselines, metrics

ALL_ROWS = ("public", "experts", "soup", "btm", "dense", "flexolmo", "flexolmo_tuned", "no_bias", "random_init",
            "embedder_init", "optout", "task")
ABLATIONS = {"no_bias": {"router_bias_init": 0.0}, "random_init": {"router_init": "random"},
             "embedder_init": {"router_init": "embedder"}}


def _owners(ws: Workspace, public_source: str) -> list[str]:
    return [s.name for s in list_sources(ws) if s.name != public_source]


def _ensure_experts(ws: Workspace, profile, owners: list[str], public_hash: str, packages_dir: Path | None,
                    progress: bool, log: Callable[[str], None]) -> None:
    """Train every owner's expert that is missing or stale (on the profile's device and dtype)."""
    from flexolmo.model.train import train_expert

    for s in owners:
        why = expert_package.status(ws, profile, s, public_hash, packages_dir=packages_dir)
        if why is None:
            continue
        log(f"  training expert {s} ({why})")
        r = train_expert(ws, s, profile, packages_dir=packages_dir, progress=progress)
        log(f"  {s}: {r.tokens:,} tokens, loss {r.final_loss:.3f}, {r.tokens_per_s:,.0f} tokens/s")


def _merged(ws: Workspace, profile, owners: list[str], out: Path, packages_dir: Path | None):
    merge(ws, owners, out=out, top_k=min(profile.model.top_k, 1 + len(owners)), packages_dir=packages_dir)
    return load_merged(out, respect_catalog=False)


def run_eval(ws: Workspace, profile: str = "demo", *, rows: list[str] | None = None, tokens_per_domain: int = 16_384,
             bytes_per_domain: int | None = None, task_lines: int = 100, tune_steps: int = 200, device: str = DEVICE,
             dtype: str = DTYPE, progress: bool = True, log: Callable[[str], None] = print,
             on_row: Callable[[dict], None] | None = None) -> dict:
    """Train what is missing, measure every row on every domain's validation split; the result
    dict of flexolmo/evaluation/report.py. `on_row(result so far)` runs after every row (the
    CLI rewrites the report, so a long run shows its results as they come). `device` (cpu, cuda,
    auto) and `dtype` (float32, bfloat16: autocast) for every model trained and measured."""
    t0 = time.time()
    run_device, run_dtype = resolve_device(device), resolve_dtype(dtype)  # refused before any work
    p = get_profile(profile).on(device, dtype)
    rows = list(rows or ALL_ROWS)
    bad = sorted(set(rows) - set(ALL_ROWS))
    if bad:
        raise InputError(f"unknown row(s) {', '.join(bad)}: use {', '.join(ALL_ROWS)}")
    public, public_card = public_model.load(ws)
    if public_card.profile != p.name:  # the experts take the public model's shape, whatever the profile
        log(f"note: the workspace's public model was trained with profile {public_card.profile}, not {p.name}: the "
            f"experts will have its shape; train it with `flexolmo train public --profile {p.name}` first to evaluate {p.name}")
    public_source = public.experts[0]
    public_hash = shared_weights_hash(public)
    owners = _owners(ws, public_source)
    if not owners:
        raise InputError("the workspace has no owner sources besides the public one: nothing to evaluate")
    domains = [public_source] + owners
    seq_len = min(256, public.config.max_position_embeddings)
    val = metrics.validation_set(ws, domains, seq_len, tokens_per_domain, bytes_per_domain)
    root = ws.root / "eval" / p.name
    res: dict = {"profile": p.name, "domains": domains, "public_domain": public_source, "rows": {}, "bpb": {},
                 "public_in_topk": {}, "routing_share": {}, "optout": {}}
    lp_cache: dict[str, dict[str, "np.ndarray"]] = {}
    budget = f"--bytes-per-domain {bytes_per_domain}" if bytes_per_domain is not None else f"--tokens-per-domain {tokens_per_domain}"
    command = (f"flexolmo eval --profile {p.name} {budget} --task-lines {task_lines}"
               + (f" --rows {','.join(rows)}" if set(rows) != set(ALL_ROWS) else "")
               + (f" (router tuning: {tune_steps} steps)" if tune_steps != 200 else ""))

    def _meta() -> dict:
        return {**res.get("meta", {}), "command": command,
                "date": dt.date.today().isoformat(), "seconds": round(time.time() - t0, 1),
                "tokens_per_domain": {d: int(val.windows[d][:, 1:].numel()) for d in domains},
                "bytes_per_domain": dict(val.target_bytes),
                "windows": "first bytes" if bytes_per_domain is not None else "spread",
                "top_k": p.model.top_k, "expert_steps": p.expert.steps,
                "expert_tokens": p.expert.steps * p.expert.tokens_per_step(),
                "complete": "loss_curves" in res}

    def logprobs(model) -> dict:  # domain -> (n, T) log-probs, on the CPU
        as_module(model).to(run_device)
        with autocast(run_device, run_dtype):
            return {d: metrics.window_logprobs(model, val.windows[d]) for d in domains}

    def measure(name: str, model, routing: bool = False) -> None:
        t = time.time()
        lps = logprobs(model)
        lp_cache[name] = lps
        scores = {d: metrics.score(lps[d], val.target_bytes[d]) for d in domains}
        res["rows"][name] = {d: round(s.ppl, 3) for d, s in scores.items()}
        res["bpb"][name] = {d: round(s.bpb, 4) for d, s in scores.items()}
        if routing:
            names = model.experts
            share, topk = {}, {}
            for d in domains:
                with autocast(run_device, run_dtype):
                    sh, with_pub = metrics.routing_stats(model, val.windows[d])
                share[d] = {n: round(float(sh[i]), 4) for i, n in enumerate(names)}
                topk[d] = round(with_pub, 4)
            res["routing_share"][name], res["public_in_topk"][name] = share, topk
        gm = math.exp(sum(math.log(v) for v in res["rows"][name].values()) / len(domains))
        log(f"{name:>16}: geometric-mean perplexity {gm:,.1f}  ({time.time() - t:.0f}s)")
        if on_row is not None:
            on_row({**res, "meta": _meta()})

    log(f"evaluating on {', '.join(f'{d} {val.windows[d].numel():,}' for d in domains)} validation tokens")
    measure("public", public)
    need_experts = any(r in rows for r in ("experts", "soup", "btm", "flexolmo", "flexolmo_tuned", "optout", "task"))
    if need_experts:
        _ensure_experts(ws, p, owners, public_hash, None, progress, log)
    if "experts" in rows or "btm" in rows:
        for s in owners:
            measure(f"expert:{s}", load_expert_model(ws, s))
    if "btm" in rows:
        mix = {d: metrics.btm_mixture([lp_cache[f"expert:{s}"][d] for s in owners], top_k=2) for d in domains}
        scores = {d: metrics.score(mix[d], val.target_bytes[d]) for d in domains}
        res["rows"]["btm"] = {d: round(s.ppl, 3) for d, s in scores.items()}
        res["bpb"]["btm"] = {d: round(s.bpb, 4) for d, s in scores.items()}
        log(f"{'btm':>16}: ensemble of {len(owners)} owner models, top-2 by domain posterior")
    if "soup" in rows:
        measure("soup", baselines.soup_model(ws, owners))
    flex = None
    if any(r in rows for r in ("flexolmo", "flexolmo_tuned", "optout")):
        flex = _merged(ws, p, owners, root / "flexolmo", None)
        measure("flexolmo", flex, routing=True)
    if "flexolmo_tuned" in rows:
        from flexolmo.model.router_tuning import tune_router

        tuned_dir = root / "flexolmo_tuned"
        tune_router(ws, root / "flexolmo", out=tuned_dir, steps=tune_steps, device=device, dtype=dtype, progress=progress)
        measure("flexolmo_tuned", load_merged(tuned_dir, respect_catalog=False), routing=True)
    if "optout" in rows and flex is not None:
        for s in owners:
            lps = logprobs(load_merged(root / "flexolmo", exclude=[s], respect_catalog=False))
            res["optout"][s] = {d: round(metrics.score(lps[d], val.target_bytes[d]).ppl, 3) for d in domains}
            log(f"{'opt-out ' + s:>16}: {s} {res['optout'][s][s]:,.1f} vs {res['rows']['flexolmo'][s]:,.1f} with it")
    if "dense" in rows:
        steps = len(owners) * p.expert.steps
        dense, card = baselines.dense_model(ws, p, domains, steps, root / "dense", progress=progress)
        measure("dense", dense)
        res.setdefault("meta", {})["dense"] = {"tokens": card["tokens"], "steps": card["steps"]}
    for name, change in ABLATIONS.items():
        if name not in rows:
            continue
        variant = get_profile(p.name).on(device, dtype)
        variant.expert = override(variant.expert, **change)
        pk = root / name / "experts"
        log(f"ablation {name}: owners retrained with {change}")
        _ensure_experts(ws, variant, owners, public_hash, pk, progress, log)
        measure(name, _merged(ws, variant, owners, root / name / "merged", pk), routing=True)
    if "task" in rows:
        from flexolmo.evaluation.task import next_line_task

        models = {n: m for n, m in _task_models(ws, root, owners, res).items()}
        for m in models.values():
            as_module(m).to(run_device)
        with autocast(run_device, run_dtype):
            res["task"] = next_line_task(ws, models, n_lines=task_lines, log=log)
    cards = _owner_cards(ws, owners)
    res["loss_curves"] = _loss_curves(ws, cards, root)
    res["owner_routing"] = _owner_routing(cards)
    res["meta"] = _meta()
    return res


def _owner_cards(ws: Workspace, owners: list[str]) -> dict[str, expert_package.ExpertPackageCard]:
    """The cards of the owners' expert packages that exist."""
    folders = {s: expert_package.folder(ws, s) for s in owners}
    return {s: expert_package.ExpertPackageCard.read(f) for s, f in folders.items() if (f / "card.json").exists()}


def _loss_curves(ws: Workspace, cards: dict, root: Path) -> dict[str, list]:
    """Training loss curves from the cards: the public model, every owner's expert, dense."""
    import json

    out = {"public": public_model.read(ws).losses}
    out.update({f"expert:{s}": card.losses for s, card in cards.items()})
    if (root / "dense" / "card.json").exists():
        out["dense"] = json.loads((root / "dense" / "card.json").read_text())["losses"]
    return {k: [list(x) for x in v] for k, v in out.items()}


def _owner_routing(cards: dict) -> dict[str, dict]:
    """Each owner's routing check at the end of its training, from its card (issue item 1's
    calibration: public text mostly to the public expert, own text mostly to its own): shares
    of tokens over its calibration windows, every layer pooled, and the final bias per layer."""
    out = {}
    for s, card in cards.items():
        rb = card.router_bias
        end = rb.get("at_end") or {}
        if "own_text_to_own_expert" in end:
            out[s] = {"public_text_to_public_expert": end["public_text_to_public_expert"],
                      "own_text_to_own_expert": end["own_text_to_own_expert"],
                      "bias_per_layer": rb.get("bias_at_end", rb.get("bias_per_layer"))}
    return out


def _task_models(ws: Workspace, root: Path, owners: list[str], res: dict) -> dict:
    """The models the task measure runs on (those that were evaluated, loaded anew)."""
    out = {"public": public_model.load(ws)[0]}
    if "code" in owners:
        out["expert:code"] = load_expert_model(ws, "code")
    for name, folder in (("flexolmo", root / "flexolmo"), ("flexolmo_tuned", root / "flexolmo_tuned"),
                         *((name, root / name / "merged") for name in ABLATIONS)):
        if name in res["rows"]:
            out[name] = load_merged(folder, respect_catalog=False)
    if "dense" in res["rows"]:
        from flexolmo.model.moe import load_model

        out["dense"] = load_model(root / "dense")
    return out
