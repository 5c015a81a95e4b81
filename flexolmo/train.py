"""Training: the public model, and one data owner's expert against the frozen public model.

    flexolmo train public --profile demo
    flexolmo train expert --source news --profile demo
    torchrun --nproc_per_node 2 -m cli.main train public --profile tiny     # DDP, same output

Public model: a 1-expert FlexOlmo (a dense FFN) trained on the public source's train split.
At the end its router row is set to the public domain embedding (below), so that expert 0
arrives in every merged model with a meaningful router row. Output: `models/public/`.

Expert (FlexOlmo recipe): a 2-expert model [public | copy of the public FFN]. Embeddings,
attention, norms, lm_head, expert 0's FFN slice and router row 0 are frozen; expert 1's
FFN slice, router row 1 and its router bias (clamped to <= 0) train. Transformers stores
the experts fused (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, router `[E, H]`), so
the public half is frozen by masking gradients of slice 0 (and, as a belt to those braces,
restoring slice 0 after each optimizer step, so it is bit-for-bit the public model's).
Router row 1 starts from the source's *domain embedding*: the mean of the public model's
final hidden state (after the last norm) over up to `embed_docs` sampled training
documents, scaled to unit length. Output: the expert package `experts/<source>/`.

A run keeps its resume state in `runs/<name>/` (an HF model folder plus `state.pt`, a plain
dict: optimizer, step, config, RNG, losses) and restarts from it after an interruption.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import distributed
from .config import Profile, TrainConfig, get_profile, override
from .errors import InputError, NotFoundError
from .model import (
    build_model,
    is_expert_tensor,
    load_model,
    num_parameters,
    routers,
    save_model,
    shared_weights_hash,
)
from .sources import get_source, iter_texts
from .tokenizer import load_raw_tokenizer, tokenizer_hash, tokenizer_info
from .tokens import source_tokens
from .workspace import Workspace, atomic_dir, current_user, file_sha256

PACKAGE_FILE = "expert.safetensors"
PACKAGE_FORMAT = 1


@dataclass
class TrainResult:
    kind: str  # "public" | "expert"
    source: str
    out_dir: Path
    profile: str
    steps: int
    tokens: int
    final_loss: float
    losses: list[tuple[int, float]]
    seconds: float
    tokens_per_s: float
    n_params: int
    resumed_from: int | None
    card: dict
    model: object = field(default=None, repr=False)  # the trained model (rank 0), in memory


# ---------------------------------------------------------------------------------------
# data: one long token stream per source, random windows


def token_stream(ws: Workspace, source: str, split: str = "train") -> torch.Tensor:
    """All documents of a split as one 1-D id stream, each document followed by eos.

    The ids come from the source's token cache (`flexolmo.tokens`), shared with indexing.
    """
    toks = source_tokens(ws, source, split)
    if toks.n_docs == 0:
        raise InputError(f"source {source!r} has no {split} documents to train on")
    eos = tokenizer_info(ws).eos_id
    stream = np.insert(np.asarray(toks.ids, dtype=np.int64), toks.offsets[1:], eos)  # eos after each document
    return torch.from_numpy(stream)


def get_batch(stream: torch.Tensor, cfg: TrainConfig, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for (step, rank): deterministic, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 7919 + step)
    starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
    w = torch.stack([stream[s : s + cfg.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
    return w[:, :-1], w[:, 1:]


def get_lr(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio (nanoGPT)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    ratio = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))
    return cfg.lr * (cfg.min_lr_ratio + coeff * (1 - cfg.min_lr_ratio))


@torch.no_grad()
def domain_embedding(model, ws: Workspace, source: str, max_docs: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Unit-length mean of the model's final hidden state over up to `max_docs` sampled
    training documents (each truncated to `seq_len` tokens). Returns (vector (H,), n_docs)."""
    texts = list(iter_texts(ws, source, split="train"))
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(texts), generator=g)[:max_docs].tolist()
    tok = load_raw_tokenizer(ws)
    was_training = model.training
    model.eval()
    total = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    n = 0
    for enc in tok.encode_batch([texts[i] for i in pick], add_special_tokens=False):
        ids = enc.ids[:seq_len]
        if not ids:
            continue
        h = model.model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]  # (T, H)
        total += h.mean(0).double()
        n += 1
    model.train(was_training)
    if n == 0:
        raise InputError(f"source {source!r} has no non-empty training documents")
    v = (total / n).float()
    return v / v.norm().clamp_min(1e-8), n


# ---------------------------------------------------------------------------------------
# the loop


@dataclass
class _Run:
    """What the loop needs to know about a run beyond the model and the optimizer."""

    name: str  # runs/<name>
    cfg: TrainConfig
    config_dict: dict  # compared on resume: a changed config starts afresh
    stream: torch.Tensor
    post_step: Callable[[], None] = lambda: None
    clip_and_noise: Callable | None = None  # DP: replaces the plain backward (privacy.py)


def _fit(ws: Workspace, d: distributed.Dist, model, params: list, run: _Run, progress: bool, stop_after: int | None):
    """Train `params` of `model`; checkpoint and resume through runs/<name>/."""
    cfg = run.cfg
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    run_dir = ws.root / "runs" / run.name
    start, losses, tokens, seconds0, resumed = 0, [], 0, 0.0, None
    if (run_dir / "state.pt").exists():
        state = torch.load(run_dir / "state.pt", weights_only=False)
        if state["config"] == run.config_dict and state["world_size"] == d.world_size:
            resumed_model = load_model(run_dir / "model")
            model.load_state_dict(resumed_model.state_dict())
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            start, losses, tokens, seconds0 = state["step"], state["losses"], state["tokens"], state["seconds"]
            resumed = start
    model.train()
    net = distributed.wrap(d, model)
    per_step = cfg.tokens_per_step(d.world_size)
    bar = tqdm(total=cfg.steps, initial=start, desc=run.name, disable=not (progress and d.is_main), dynamic_ncols=True)
    t0 = time.time()
    loss_val = float("nan")
    for step in range(start, cfg.steps):
        # forward, backward, update
        lr = get_lr(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch(run.stream, cfg, step, d.rank)
        x, y = x.to(d.device), y.to(d.device)
        if run.clip_and_noise is not None:
            loss = run.clip_and_noise(model, x, y, step)
        else:
            logits = net(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.post_step()
        tokens += per_step

        # timing and logging
        loss_val = loss.item()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            losses.append((step, round(distributed.mean(d, loss_val), 4)))
        elapsed = seconds0 + time.time() - t0
        bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{(tokens - (resumed or 0) * per_step) / max(1e-9, time.time() - t0):,.0f}")
        bar.update(1)

        # checkpoint (resume state) and termination
        done = step + 1
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps) or done == stop_after:
            _checkpoint(d, model, opt, run, run_dir, done, losses, tokens, elapsed)
        if done == stop_after:
            bar.close()
            raise KeyboardInterrupt(f"stopped after step {done} (stop_after)")
    bar.close()
    seconds = seconds0 + time.time() - t0
    new_tokens = tokens - (resumed or 0) * per_step
    stats = {
        "steps": cfg.steps,
        "tokens": tokens,
        "final_loss": losses[-1][1] if losses else loss_val,
        "losses": losses,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(new_tokens / max(1e-9, time.time() - t0), 1),
        "resumed_from": resumed,
        "world_size": d.world_size,
    }
    return stats, run_dir


def _checkpoint(d, model, opt, run: _Run, run_dir: Path, step: int, losses, tokens: int, seconds: float) -> None:
    if d.is_main:
        with atomic_dir(run_dir) as tmp:
            save_model(model, tmp / "model")
            state = {
                "optimizer": opt.state_dict(),
                "step": step,
                "config": run.config_dict,
                "rng": {"torch": torch.get_rng_state()},
                "losses": losses,
                "tokens": tokens,
                "seconds": seconds,
                "world_size": d.world_size,
            }
            torch.save(state, tmp / "state.pt")
    distributed.barrier(d)


def _profile(profile: str | Profile, steps: int | None, part: str) -> Profile:
    p = get_profile(profile)
    if steps is not None:
        if steps < 1:
            raise InputError(f"--steps must be at least 1, got {steps}")
        setattr(p, part, override(getattr(p, part), steps=steps))
    return p


def _vocab(ws: Workspace) -> tuple[int, int, int]:
    info = tokenizer_info(ws)
    return info.vocab_size, info.eos_id, info.pad_id


# ---------------------------------------------------------------------------------------
# public model


def train_public(
    ws: Workspace,
    profile: str | Profile = "tiny",
    *,
    source: str = "public",
    steps: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the public model (1 expert) on `source`'s train split; save `models/public/`.

    :param profile: `tiny`, `demo`, `paper` or a `Profile`
    :param steps: override the profile's step count
    :param stop_after: simulate an interruption after this step (tests); raises KeyboardInterrupt
    """
    d = distributed.setup()
    p = _profile(profile, steps, "public")
    cfg = p.public
    get_source(ws, source)
    vocab, eos, pad = _vocab(ws)
    hf = p.model.hf_config(vocab_size=vocab, eos_id=eos, pad_id=pad, num_experts=1, top_k=1)
    model = build_model(hf, seed=cfg.seed).to(d.device)
    stream = token_stream(ws, source)
    _check_stream(stream, cfg, source)
    # the single router row gets no useful gradient (softmax over one expert is 1): frozen here,
    # set to the public domain embedding at the end
    params = [p_ for n, p_ in model.named_parameters() if "mlp.gate." not in n]
    for n, p_ in model.named_parameters():
        p_.requires_grad_("mlp.gate." not in n)
    run = _Run(name="public", cfg=cfg, config_dict={"kind": "public", "source": source, "profile": p.to_dict()}, stream=stream)
    stats, run_dir = _fit(ws, d, model, params, run, progress, stop_after)

    model.eval()
    emb, n_docs = domain_embedding(model, ws, source, cfg.embed_docs, cfg.seq_len, seed=cfg.seed)
    with torch.no_grad():
        for r in routers(model):
            r.weight[0].copy_(emb)
    out = ws.models_dir / "public"
    card = {
        "kind": "public",
        "source": source,
        "profile": p.name,
        "config": p.to_dict(),
        "n_params": num_parameters(model),
        **stats,
        "throughput": f"{stats['tokens_per_s']:,.0f} tokens/s",
        "router_init": f"router row 0 = unit-length mean final hidden state of this model over {n_docs} sampled {source} training documents",
        "tokenizer_sha256": tokenizer_hash(ws),
        "shared_weights_sha256": shared_weights_hash(model),
        "created_at": dt.datetime.now().replace(microsecond=0).isoformat(),
    }
    if d.is_main:
        with atomic_dir(out) as tmp:
            save_model(model, tmp, experts=[source], extra={"public_hash": card["shared_weights_sha256"]})
            (tmp / "card.json").write_text(json.dumps(card, indent=2))
            load_model(tmp)  # verify before the rename
        shutil.rmtree(run_dir, ignore_errors=True)
    distributed.barrier(d)
    return _result("public", source, out, p, stats, card, model)


def _check_stream(stream: torch.Tensor, cfg: TrainConfig, source: str) -> None:
    if len(stream) < cfg.seq_len + 2:
        raise InputError(
            f"source {source!r} has only {len(stream)} training tokens; it needs more than seq_len={cfg.seq_len} "
            "(add documents or use a smaller profile)"
        )


def _result(kind, source, out, p: Profile, stats: dict, card: dict, model) -> TrainResult:
    return TrainResult(
        kind=kind, source=source, out_dir=out, profile=p.name, steps=stats["steps"], tokens=stats["tokens"],
        final_loss=stats["final_loss"], losses=stats["losses"], seconds=stats["seconds"],
        tokens_per_s=stats["tokens_per_s"], n_params=card["n_params"], resumed_from=stats["resumed_from"],
        card=card, model=model,
    )


def _card_matches(card_path: Path, **expected) -> bool:
    if not card_path.exists():
        return False
    card = json.loads(card_path.read_text())
    return all(card.get(k) == v for k, v in expected.items())


def public_is_current(ws: Workspace, profile: str) -> bool:
    """Is there a public model of this profile, trained with the workspace's tokenizer?"""
    return _card_matches(ws.models_dir / "public" / "card.json", profile=profile, tokenizer_sha256=tokenizer_hash(ws))


def expert_is_current(ws: Workspace, source: str, profile: str) -> bool:
    """Is there an expert package of this profile, trained against the current public model?"""
    card = ws.models_dir / "public" / "card.json"
    if not card.exists():
        return False
    public_hash = json.loads(card.read_text())["shared_weights_sha256"]
    return _card_matches(ws.experts_dir / source / "card.json", profile=profile, public_hash=public_hash,
                         tokenizer_sha256=tokenizer_hash(ws))


def public_model_dir(ws: Workspace) -> Path:
    path = ws.models_dir / "public"
    if not (path / "config.json").exists():
        raise NotFoundError(f"no public model in {path}; run `flexolmo train public` first")
    return path


# ---------------------------------------------------------------------------------------
# expert


def expert_from_public(public, router_row: torch.Tensor | None = None, top_k: int = 2):
    """The 2-expert model [public | copy of public FFN]; router row 1 = `router_row` (or row 0)."""
    import copy

    cfg = copy.deepcopy(public.config)
    cfg.num_experts, cfg.num_experts_per_tok = 2, min(top_k, 2)
    model = build_model(cfg)
    src = public.state_dict()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            s = src[name]
            if is_expert_tensor(name) or name.endswith("mlp.gate.weight"):
                t[0].copy_(s[0])
                t[1].copy_(s[0] if router_row is None or is_expert_tensor(name) else router_row)
            elif name.endswith("mlp.gate.bias"):
                t.zero_()
            else:
                t.copy_(s)
    return model


def trainable_expert_params(model) -> list[torch.nn.Parameter]:
    """Expert 1's FFN slices, router rows and bias live in these fused tensors (slice 0 masked)."""
    out = []
    for name, p_ in model.named_parameters():
        train = is_expert_tensor(name) or name.endswith("mlp.gate.weight") or name.endswith("mlp.gate.bias")
        p_.requires_grad_(train)
        if train:
            out.append(p_)
    return out


def _freeze_slice0(params: list[torch.nn.Parameter]) -> Callable[[], None]:
    """Mask slice 0's gradient; return a post-step function that restores slice 0 exactly
    and clamps the router bias to <= 0."""
    saved = [p_.detach()[0].clone() for p_ in params]
    for p_ in params:
        mask = torch.ones_like(p_)
        mask[0] = 0
        p_.register_hook(lambda g, m=mask: g * m)

    @torch.no_grad()
    def post_step() -> None:
        for p_, s in zip(params, saved):
            p_[0].copy_(s)
            if p_.ndim == 1:  # the router bias: (E,)
                p_.clamp_(max=0.0)

    return post_step


def train_expert(
    ws: Workspace,
    source: str,
    profile: str | Profile = "tiny",
    *,
    steps: int | None = None,
    owner: str | None = None,
    dp: "object | None" = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `source`'s expert against the frozen public model; write `experts/<source>/`.

    :param dp: a `flexolmo.privacy.DPConfig` to train with DP-SGD (per-sample clipping + noise)
    :param stop_after: simulate an interruption after this step (tests)
    """
    d = distributed.setup()
    p = _profile(profile, steps, "expert")
    cfg = p.expert
    src = get_source(ws, source)
    public = load_model(public_model_dir(ws))
    if public.config.num_experts != 1:
        raise InputError(f"{public_model_dir(ws)} holds {public.config.num_experts} experts, not a public model; retrain it")
    public_hash = shared_weights_hash(public)
    emb, n_docs = domain_embedding(public, ws, source, cfg.embed_docs, cfg.seq_len, seed=cfg.seed)
    model = expert_from_public(public, router_row=emb, top_k=p.model.top_k).to(d.device)
    del public
    params = trainable_expert_params(model)
    post_step = _freeze_slice0(params)
    stream = token_stream(ws, source)
    _check_stream(stream, cfg, source)
    config_dict = {"kind": "expert", "source": source, "profile": p.to_dict(), "public_hash": public_hash,
                   "dp": asdict(dp) if dp is not None else None}
    run = _Run(name=f"expert-{source}", cfg=cfg, config_dict=config_dict, stream=stream, post_step=post_step)
    accountant = None
    if dp is not None:
        from .privacy import make_dp_step

        if d.enabled:
            raise InputError("DP-SGD training runs in one process; run it without torchrun")
        run.clip_and_noise, accountant = make_dp_step(dp, params, cfg, n_windows=len(stream) // cfg.seq_len)
    stats, run_dir = _fit(ws, d, model, params, run, progress, stop_after)
    model.eval()

    privacy = {"dp": False}
    if dp is not None:
        from .privacy import privacy_report

        privacy = privacy_report(dp, cfg, n_windows=len(stream) // cfg.seq_len, steps=cfg.steps)
    card = {
        "kind": "expert",
        "format": PACKAGE_FORMAT,
        "source": source,
        "owner": owner or src.owner,
        "domain": src.domain,
        "profile": p.name,
        "config": p.to_dict(),
        "n_params": num_parameters(model),
        "n_trainable": sum(p_[1:].numel() for p_ in params),
        **stats,
        "throughput": f"{stats['tokens_per_s']:,.0f} tokens/s",
        "public_hash": public_hash,
        "tokenizer_sha256": tokenizer_hash(ws),
        "router_init": (
            f"router row = domain embedding: unit-length mean final hidden state of the public model "
            f"over {n_docs} sampled {source} training documents (first {cfg.seq_len} tokens each)"
        ),
        "privacy": privacy,
        "created_at": dt.datetime.now().replace(microsecond=0).isoformat(),
        "created_by": current_user(),
    }
    out = ws.experts_dir / source
    if d.is_main:
        with atomic_dir(out) as tmp:
            write_package(model, tmp, card)
        shutil.rmtree(run_dir, ignore_errors=True)
    distributed.barrier(d)
    return _result("expert", source, out, p, stats, card, model)


def write_package(model, folder: Path, card: dict) -> dict:
    """Expert 1's FFN slices, router rows and bias (safetensors) + card.json with checksums."""
    layers = model.model.layers
    tensors = {
        "gate_up_proj": torch.stack([l.mlp.experts.gate_up_proj.detach()[1] for l in layers]),  # (L, 2I, H)
        "down_proj": torch.stack([l.mlp.experts.down_proj.detach()[1] for l in layers]),  # (L, H, I)
        "router": torch.stack([l.mlp.gate.weight.detach()[1] for l in layers]),  # (L, H)
        "bias": torch.stack([l.mlp.gate.bias.detach()[1] for l in layers]),  # (L,)
    }
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(folder / PACKAGE_FILE),
              metadata={"source": card["source"], "public_hash": card["public_hash"]})
    card = {**card, "files": {PACKAGE_FILE: file_sha256(folder / PACKAGE_FILE)}}
    (folder / "card.json").write_text(json.dumps(card, indent=2))
    return card


