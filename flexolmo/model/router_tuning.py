"""Router tuning (the FlexOlmo paper's optional last step): train only the routers of a merged
model on a small proxy set of every domain, everything else frozen.

    flexolmo tune-router                                  # models/merged, in place
    flexolmo tune-router --out flexolmo-work/models/merged-tuned --steps 200 --docs-per-source 64

Why: every owner trained its router row against the public expert alone, never against
the other owners' experts, so in the merged model the rows are not calibrated against each
other (docs/bench-model.md: the demo model never routes to the public expert).

Proxy set, as in the paper (section 3.3.3): no owner's text is needed. Each owner's
package carries a small domain classifier (flexolmo/model/proxy.py, trained at home: own vs
public documents); for every switched-on owner, the `docs_per_source` public training
documents its classifier scores highest stand in for its domain, and a seeded sample of
the remaining public documents stands for public text. An owner who consents (`consent`)
contributes a seeded sample of its own training documents instead. Validation documents are
never read. Sources the catalog marks inactive or expired give no data: their experts are
switched off during tuning and their router rows stay as they were.

While tuning, every switched-on expert is active (top-k = their number), so each router
row receives gradient on every token, as in the paper; the saved model keeps its top-k.

What trains: in every layer the router rows of experts 1..E-1 and their biases (clamped to
<= 0). Row 0 and bias 0 (the public expert) stay fixed, so the tuned model keeps the public
hash (`shared_weights_hash`) merge recorded. That loses nothing: the softmax is invariant
to adding the same vector to every row, so any router (W, b) has an equivalent with row 0
fixed (the bias clamp aside: owners' biases can only go below the public one). Embeddings,
attention, norms, lm_head and every expert FFN are frozen (`requires_grad=False`; the test
checks them bit-for-bit). Loss: next-token cross-entropy on random windows of the proxy
stream, where each source's proxy stream is repeated to the same length so that every domain
weighs the same. The loop, LR schedule, resume state (`runs/router-tune/`) and progress
bar are the Trainer's (trainer.py), with the `FrozenRows` callback on the router tensors.

Output: an ordinary merged-model folder (same format, `load_merged` loads it, opt-out works
as before), written atomically, in place of the input (the untuned model is kept beside it
as `<name>-untuned`, e.g. `models/merged-untuned`) or to `out`. Its card.json is the merged
card plus a `router_tuning` section: proxy documents and tokens per source, steps, losses,
time, and the proxy-set loss and per-expert routing share before and after.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flexolmo.model import distributed
from flexolmo.model.artifacts import merged_model
from flexolmo.model.artifacts.merged_model import MergedModelCard
from flexolmo.model.bias import router_lr_scale
from flexolmo.model.callbacks import standard_callbacks, train_rows
from flexolmo.model.config import TrainConfig
from flexolmo.model.device import DEVICE, DTYPE, autocast, model_device, resolve_dtype
from flexolmo.base.errors import InputError, NotFoundError
from flexolmo.model.generate import RoutingCapture
from flexolmo.model.layout import shared_weights_hash
from flexolmo.model.merge import load_merged
from flexolmo.model.moe import as_module, expert_names, routers, set_active
from flexolmo.base.sources import get_source
from flexolmo.base.tokenizer import tokenizer_info
from flexolmo.model.trainer import Trainer
from flexolmo.base.workspace import Workspace, atomic_dir, file_sha256

RUN_NAME = "router-tune"


@dataclass
class RouterTuneResult:
    out_dir: Path
    untuned_dir: Path | None  # where the untuned model was kept (in-place tuning), else None
    experts: list[str]
    steps: int
    proxy_docs: dict[str, int]  # source -> documents in the proxy set
    loss_before: float  # mean next-token loss on the proxy windows
    loss_after: float
    share_before: dict[str, float]  # expert -> share of top-k selections on the proxy windows
    share_after: dict[str, float]
    seconds: float
    card: MergedModelCard
    stopped: str | None = None  # why tuning stopped early (then nothing was written)


# ---------------------------------------------------------------------------------------
# the proxy set


def proxy_streams(ws: Workspace, sources: list[str], public_source: str, docs_per_source: int, seed: int,
                  consent: set[str] = frozenset()) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, str]]:
    """Per source: its proxy documents as one id stream (each document followed by eos), the
    number of documents, and where they came from. Only train splits are read."""
    from flexolmo.model.artifacts import expert_package
    from flexolmo.model.proxy import pick_proxy
    from flexolmo.base.tokens import source_tokens

    eos = tokenizer_info(ws).eos_id
    pub = source_tokens(ws, public_source)
    pub_docs = [pub.doc(i) for i in range(pub.n_docs)]
    picks: dict[str, list[np.ndarray]] = {}
    how: dict[str, str] = {}
    taken: set[int] = set()
    for k, source in enumerate(sources):
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        if source == public_source:
            continue
        if source in consent:
            own = source_tokens(ws, source)
            if own.n_docs == 0:
                raise InputError(f"source {source!r} has no training documents for the proxy set")
            idx = sorted(torch.randperm(own.n_docs, generator=g)[:docs_per_source].tolist())
            picks[source] = [own.doc(i) for i in idx]
            how[source] = "a seeded sample of the owner's own training documents (the owner consented)"
            continue
        clf = expert_package.read(expert_package.folder(ws, source)).classifier()
        if clf is None:
            raise InputError(f"the expert package of {source!r} has no domain classifier (it predates them); "
                             f"retrain it with `flexolmo train expert --source {source}`, or pass --consent {source} "
                             "if its owner agrees to share a sample of its data")
        idx = pick_proxy(clf, pub_docs, docs_per_source, exclude=taken)
        taken |= set(idx)
        picks[source] = [pub_docs[i] for i in idx]
        how[source] = (f"the {len(idx)} public documents its owner's classifier scores most like its domain "
                       f"(held-out accuracy {clf.accuracy:.3f})")
    if public_source in sources:
        g = torch.Generator().manual_seed(seed * 1_000_003 + len(sources))
        rest = [i for i in torch.randperm(len(pub_docs), generator=g).tolist() if i not in taken][:docs_per_source]
        picks[public_source] = [pub_docs[i] for i in sorted(rest)]
        how[public_source] = "a seeded sample of the other public documents"
    streams = {s: torch.from_numpy(np.concatenate([np.append(np.asarray(d, dtype=np.int64), eos) for d in docs]))
               for s, docs in picks.items()}
    return streams, {s: len(d) for s, d in picks.items()}, how


def balanced_stream(streams: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each source's stream repeated (cyclically) to the longest one's length, concatenated:
    random windows then come from every domain equally often."""
    n = max(len(s) for s in streams.values())
    return torch.cat([s.repeat(-(-n // len(s)))[:n] for s in streams.values()])


def eval_windows(stream: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """Up to `n` non-overlapping windows (n, seq_len + 1) from the start of a stream."""
    m = min(n, (len(stream) - 1) // seq_len)
    return torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(m)])


@torch.no_grad()
def proxy_eval(model, windows: dict[str, torch.Tensor]) -> dict:
    """Next-token loss and share of top-k selections per expert, per source and overall (on the
    model's device; call it under the run's autocast)."""
    names = expert_names(model)
    module = as_module(model)
    device = model_device(module)
    was_training = module.training
    module.eval()
    per_source, total_counts, losses = {}, torch.zeros(len(names)), []
    for source, w in windows.items():
        w = w.to(device)
        with RoutingCapture(model) as cap:
            logits = model(input_ids=w[:, :-1], use_cache=False).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1)).item()
        idx, _, _ = cap.stacked()  # (N, L, k)
        counts = torch.bincount(idx.reshape(-1).cpu(), minlength=len(names)).float()
        total_counts += counts
        losses.append(loss)
        per_source[source] = {"loss": round(loss, 4), "share": _shares(names, counts)}
    module.train(was_training)
    return {"loss": round(sum(losses) / len(losses), 4), "share": _shares(names, total_counts), "per_source": per_source}


def _shares(names: list[str], counts: torch.Tensor) -> dict[str, float]:
    s = counts.sum().item() or 1.0
    return {n: round(counts[i].item() / s, 4) for i, n in enumerate(names)}


# ---------------------------------------------------------------------------------------
# tune


def _row_lr_scale(model, card: MergedModelCard, sources: list[str]) -> dict[int, float]:
    """`lr_scale` from the median, per layer, of the switched-on owners' router-row scale factors
    (each package rescaled its row to one margin std on public text; the merged card records
    them): the rows tune at lr times their scale, as each owner trained its own (flexolmo/model/bias.py
    `router_lr_scale`). Packages without factors (the raw-scale recipe) count 1."""
    per_owner = [e.get("row_scale_per_layer") for e in card.experts[1:] if e["source"] in sources]
    factors = [float(torch.tensor([f[l] if f else 1.0 for f in per_owner]).median()) if per_owner else 1.0
               for l in range(len(routers(model)))]
    return router_lr_scale(model, factors)


def tune_router(
    ws: Workspace,
    model_dir: Path | None = None,
    *,
    out: Path | None = None,
    docs_per_source: int = 64,
    steps: int = 200,
    lr: float = 3e-3,
    batch_size: int = 16,
    seq_len: int | None = None,
    eval_windows_per_source: int = 8,
    seed: int = 0,
    consent: tuple[str, ...] = (),
    device: str = DEVICE,
    dtype: str = DTYPE,
    progress: bool = True,
    stop_after: int | None = None,
) -> RouterTuneResult:
    """Tune the routers of a merged model on a small proxy set; everything else frozen.

    :param model_dir: the merged model (default `<workspace>/models/merged`)
    :param out: output folder; default: in place of `model_dir`, keeping the untuned model
        as `<model_dir>-untuned` (not overwritten if it exists already)
    :param docs_per_source: training documents sampled per source for the proxy set
    :param steps: optimizer steps (AdamW, warmup then cosine decay, no weight decay)
    :param lr: peak learning rate
    :param batch_size: windows per step
    :param seq_len: tokens per window (default: 128, or the model's positions - 1 if fewer)
    :param eval_windows_per_source: fixed proxy windows per source for the before/after
        loss and routing share in the card
    :param seed: proxy sampling and batch order
    :param consent: owners who agree to share a sample of their own training documents;
        every other owner is represented by public documents its classifier picks
    :param device: `cpu`, `cuda` or `auto`: where the model is tuned and measured
    :param dtype: `float32`, or `bfloat16` (forward passes under autocast, float32 weights)
    :param stop_after: stop after this step (an interruption, in tests): the resume state is
        kept, nothing is written, and the result's `stopped` says so
    """
    for name, v in (("steps", steps), ("docs_per_source", docs_per_source), ("batch_size", batch_size),
                    ("eval_windows_per_source", eval_windows_per_source)):
        if v < 1:
            raise InputError(f"{name} must be at least 1, got {v}")
    if lr <= 0:
        raise InputError(f"lr must be positive, got {lr}")
    d = distributed.setup()
    run_device, run_dtype = distributed.run_device(d, device), resolve_dtype(dtype)  # refused before any work
    model_dir = Path(model_dir) if model_dir else ws.models_dir / "merged"
    if not (model_dir / "config.json").exists():
        raise NotFoundError(f"no merged model in {model_dir}; run `flexolmo merge --experts ...` first")
    card = MergedModelCard.read(model_dir)
    model = load_merged(model_dir, ws=ws)  # switches off what the catalog marks inactive/expired
    model.module.to(run_device)
    seq_len = seq_len or min(128, model.config.max_position_embeddings - 1)
    if not 8 <= seq_len <= model.config.max_position_embeddings - 1:
        raise InputError(f"seq_len must be in 8..{model.config.max_position_embeddings - 1}, got {seq_len}")
    names = expert_names(model)
    if len(names) < 2:
        raise InputError(f"{model_dir} holds one expert: nothing to route")
    public_hash = shared_weights_hash(model)
    off = dict(model.off)
    sources = [n for n in names if n not in off]
    for s in sources:
        get_source(ws, s)  # NotFoundError names the missing source

    # data: the proxy set (train split only), balanced over domains
    t0 = time.time()
    unknown = sorted(set(consent) - set(names))
    if unknown:
        raise InputError(f"--consent names no expert of this model: {', '.join(unknown)} (experts: {', '.join(names)})")
    streams, n_docs, how = proxy_streams(ws, sources, names[0], docs_per_source, seed, set(consent))
    short = [s for s, st in streams.items() if len(st) < 2]
    if short:
        raise InputError(f"proxy set of {', '.join(short)} is empty after tokenizing; raise docs_per_source")
    windows = {s: eval_windows(st, min(seq_len, len(st) - 1), eval_windows_per_source) for s, st in streams.items()}
    stream = balanced_stream(streams)
    if len(stream) < seq_len + 2:
        raise InputError(f"the proxy set has only {len(stream)} tokens, fewer than seq_len={seq_len}; raise docs_per_source or lower seq_len")

    # model: only router rows 1.. of switched-on experts and their biases train
    frozen = [0] + [i for i, n in enumerate(names) if n in off]
    with autocast(run_device, run_dtype):
        before = proxy_eval(model, windows)
    params, frozen_rows = train_rows(model, frozen, routers_only=True)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=max(1, steps // 10),
                      weight_decay=0.0, seed=seed, checkpoint_every=max(0, min(50, steps - 1)),
                      log_every=max(1, steps // 20), device=device, dtype=dtype)
    config_dict = {"kind": "router-tune", "model": str(model_dir), "model_sha256": file_sha256(model_dir / "model.safetensors"),
                   "sources": sources, "docs_per_source": docs_per_source, "train": cfg.recipe()}
    callbacks, ckpt = standard_callbacks(ws, RUN_NAME, config_dict, progress, stop_after)
    lr_scale = _row_lr_scale(model, card, sources)
    top_k = [r.top_k for r in routers(model)]
    for r in routers(model):  # every switched-on expert active while tuning (the paper)
        r.top_k = len(sources)
    try:
        fit = Trainer(model, params, cfg, stream, callbacks=[frozen_rows, *callbacks], dist=d, lr_scale=lr_scale).fit()
    finally:
        for r, k in zip(routers(model), top_k):
            r.top_k = k
    if not fit.completed:  # an interruption (tests): resume state kept, nothing written
        return RouterTuneResult(
            out_dir=Path(out) if out else model_dir, untuned_dir=None, experts=names, steps=fit.steps_done,
            proxy_docs=n_docs, loss_before=before["loss"], loss_after=before["loss"], share_before=before["share"],
            share_after=before["share"], seconds=round(time.time() - t0, 2), card=card, stopped=fit.stopped)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    with autocast(run_device, run_dtype):
        after = proxy_eval(model, windows)
    assert shared_weights_hash(model) == public_hash  # row 0 and everything shared untouched

    previous = card.router_tuning
    seconds = round(time.time() - t0, 2)
    tuning = {
        "proxy_set": {
            "split": "train (validation documents are never used)",
            "from": how,
            "docs": n_docs,
            "tokens": {s: len(st) for s, st in streams.items()},
            "docs_per_source": docs_per_source,
            "seed": seed,
        },
        "active_while_tuning": f"all {len(sources)} switched-on experts (top-k {len(sources)}); saved with top-k {top_k[0]}",
        "trained": "router rows and biases of experts " + ", ".join(n for i, n in enumerate(names) if i not in frozen)
        + " in every layer (biases clamped <= 0); row 0 / bias 0 (public) and all other weights frozen",
        "not_tuned": {n: r for n, r in off.items()},
        "from": str(model_dir),
        "from_sha256": config_dict["model_sha256"],
        "previous_tuning": previous,
        "steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": seq_len,
        "lr_factor_per_layer": [round(lr_scale[id(r.weight)], 5) for r in routers(model)],
        "losses": fit.losses,
        "proxy_loss": {"before": before["loss"], "after": after["loss"]},
        "routing_share": {"what": "share of top-k selections over all layers on the proxy eval windows",
                          "before": before["share"], "after": after["share"]},
        "per_source": {s: {"before": before["per_source"][s], "after": after["per_source"][s]} for s in sources},
        "seconds": seconds,
        "train_seconds": fit.seconds,
        "created_at": dt.datetime.now().replace(microsecond=0).isoformat(),
    }
    card = card.model_copy(update={"router_tuning": tuning})

    untuned = None
    target = Path(out) if out else model_dir
    if d.is_main:
        model.off = {}
        set_active(model, [True] * len(names))  # saved with every expert on; load_merged applies the catalog again
        if out is None:
            untuned = model_dir.parent / f"{model_dir.name}-untuned"
            # keep the untuned model: a fresh merge replaces an older copy; a model that was
            # itself tuned already leaves the copy of its untuned original alone
            already_tuned = previous is not None
            if not (already_tuned and (untuned / "config.json").exists()):
                with atomic_dir(untuned) as tmp:
                    shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        merged_model.write(model, target, names, card)
        ckpt.clear()
    distributed.barrier(d)
    return RouterTuneResult(
        out_dir=target, untuned_dir=untuned, experts=names, steps=steps, proxy_docs=n_docs,
        loss_before=before["loss"], loss_after=after["loss"], share_before=before["share"],
        share_after=after["share"], seconds=seconds, card=card,
    )
