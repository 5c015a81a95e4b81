"""Training recipes: the public model, and one data owner's expert against the frozen public model.

    flexolmo train public --profile demo
    flexolmo train expert --source news --profile demo
    torchrun --nproc_per_node 2 -m cli.main train public --profile tiny     # DDP, same output

Public model: a 1-expert FlexOlmo (a dense FFN) trained on the public source's train split.
At the end its router row is set to the public domain embedding (flexolmo/model/domain.py), so
that expert 0 arrives in every merged model with a meaningful router row. Output:
`models/public/` (flexolmo/model/artifacts/public_model.py).

Expert (FlexOlmo recipe, arXiv 2507.07024 section 3.3.2, appendix D.2): a 2-expert model
[public | copy of the public FFN]. Embeddings, attention, norms, lm_head, expert 0's FFN
slice, router row 0 and bias 0 are frozen (`FrozenRows`: masked gradients, restored bit
for bit after each step); expert 1's FFN slice, router row 1 and its bias train. The bias
starts *negative* and is clamped to <= 0, so the owner's expert is chosen only where
r_1.x + b_1 > r_0.x and trains on the tokens where it is really better. Its starting value
is calibrated per layer on public text (flexolmo/model/bias.py: the owner's model starts by
preferring the public expert on `router_bias_target` of public-text tokens) and kept there
while the expert trains (recalibrated every `router_bias_every` steps and at the end), or
fixed by `router_bias_init`. Before that, router row 1 is rescaled around row 0 so that its
margin has a standard deviation of `router_margin_std` logits on public text (every owner's
router in one unit; the row then trains at lr times its scale). At the end, the card records
how often the owner's model prefers the public expert on public text and its own expert on its
own text.
Router row 1 starts from the source's domain embedding (`router_init`). A share `public_mix`
(a quarter) of every batch is public text, which every owner has: the expert and its router row
also learn where the public expert is better (not under DP, whose batches are Poisson samples of
the owner's windows). Loss: next-token cross-entropy + `router_z_loss` x router z-loss; weight
decay 0 (the profiles). Output: the expert package `experts/<source>/`
(flexolmo/model/artifacts/expert_package.py).

The loop, resume state (`runs/<name>/`) and progress bar are the Trainer's (trainer.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexolmo.model import distributed
from flexolmo.model.artifacts import expert_package, public_model
from flexolmo.base.artifacts.card import sha256_json
from flexolmo.model.artifacts.expert_package import ExpertPackageCard
from flexolmo.model.artifacts.public_model import PublicModelCard
from flexolmo.model.bias import BiasTracker, bias_summary, calibrate, router_lr_scale, routing_check, sample_windows, scale_margin
from flexolmo.model.callbacks import standard_callbacks, train_rows
from flexolmo.model.config import Profile, get_profile, override
from flexolmo.model.device import autocast, resolve_dtype
from flexolmo.model.domain import classifier_rows, router_row
from flexolmo.base.errors import InputError
from flexolmo.model.layout import shared_weights_hash, with_experts
from flexolmo.model.losses import WithRouterZLoss
from flexolmo.model.moe import LoadedModel, build_model, num_parameters, routers
from flexolmo.model.scale import ScaleCap, output_ratios
from flexolmo.base.sources import get_source
from flexolmo.model.stream import Mixture, check_stream, token_stream
from flexolmo.base.tokenizer import tokenizer_info
from flexolmo.model.trainer import FitResult, Trainer
from flexolmo.base.workspace import Workspace, current_user


@dataclass
class TrainResult:
    kind: str  # "public" | "expert"
    source: str
    out_dir: Path
    profile: str
    fit: FitResult
    n_params: int
    card: PublicModelCard | ExpertPackageCard | None  # None when the run stopped early
    model: LoadedModel = field(repr=False)  # the trained model (rank 0), in memory

    # the training record, as the CLI reports it
    steps = property(lambda self: self.fit.steps)
    tokens = property(lambda self: self.fit.tokens)
    final_loss = property(lambda self: self.fit.final_loss)
    losses = property(lambda self: self.fit.losses)
    seconds = property(lambda self: self.fit.seconds)
    tokens_per_s = property(lambda self: self.fit.tokens_per_s)
    resumed_from = property(lambda self: self.fit.resumed_from)
    stopped = property(lambda self: self.fit.stopped)


def _profile(profile: str | Profile, steps: int | None, part: str, device: str | None, dtype: str | None) -> Profile:
    p = get_profile(profile).on(device, dtype)
    if steps is not None:
        if steps < 1:
            raise InputError(f"--steps must be at least 1, got {steps}")
        setattr(p, part, override(getattr(p, part), steps=steps))
    return p


def _throughput(fit: FitResult) -> dict:
    return {**fit.stats(), "throughput": f"{fit.tokens_per_s:,.0f} tokens/s"}


# ---------------------------------------------------------------------------------------
# public model


def train_public(
    ws: Workspace,
    profile: str | Profile = "tiny",
    *,
    source: str = "public",
    steps: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the public model (1 expert) on `source`'s train split; save `models/public/`.

    :param profile: `tiny`, `demo`, `paper`, `gpu` or a `Profile`
    :param steps: override the profile's step count
    :param device: `cpu`, `cuda` or `auto`; dtype: `float32` or `bfloat16` (autocast); None: the
        profile's (cpu, float32). Not part of the model's inputs
    :param stop_after: stop after this step, keeping the resume state (an interruption, in
        tests); the result's `stopped` says so and nothing is written
    """
    # settings
    d = distributed.setup()
    p = _profile(profile, steps, "public", device, dtype)
    cfg = p.public
    device, dtype = distributed.run_device(d, cfg.device), resolve_dtype(cfg.dtype)  # refused here, before any work
    get_source(ws, source)
    inputs = public_model.inputs(ws, p, source)

    # data
    stream = token_stream(ws, source)
    check_stream(stream, cfg, source)

    # model: the single router row gets no useful gradient (softmax over one expert is 1):
    # frozen here, set to the public domain embedding at the end
    info = tokenizer_info(ws)
    hf = p.model.hf_config(vocab_size=info.vocab_size, eos_id=info.eos_id, pad_id=info.pad_id, num_experts=1, top_k=1)
    model = build_model(hf, seed=cfg.seed).to(device)
    for n, p_ in model.named_parameters():
        p_.requires_grad_("mlp.gate." not in n)
    params = [p_ for p_ in model.parameters() if p_.requires_grad]

    # train
    callbacks, ckpt = standard_callbacks(ws, "public", {"kind": "public", "inputs": inputs}, progress, stop_after)
    fit = Trainer(model, params, cfg, stream, callbacks=callbacks, dist=d).fit()
    out = public_model.folder(ws)
    loaded = LoadedModel(module=model.eval(), experts=[source])
    if not fit.completed:
        return TrainResult("public", source, out, p.name, fit, num_parameters(model), None, loaded)

    # router row 0 = the public domain embedding; write the artifact
    with autocast(device, dtype):
        row, how = router_row(model, ws, source, cfg, public_source=source)
    with torch.no_grad():
        for r in routers(model):
            r.weight[0].copy_(row)
    card = PublicModelCard(
        inputs=inputs, source=source, profile=p.name, config=p.to_dict(), weights=shared_weights_hash(model),
        n_params=num_parameters(model), router_init=f"router row 0 = {how}", **_throughput(fit),
    )
    if d.is_main:
        public_model.write(ws, model, card, source)
        ckpt.clear()
    distributed.barrier(d)
    return TrainResult("public", source, out, p.name, fit, card.n_params, card, loaded)


# ---------------------------------------------------------------------------------------
# expert


def train_expert(
    ws: Workspace,
    source: str,
    profile: str | Profile = "tiny",
    *,
    steps: int | None = None,
    owner: str | None = None,
    dp: "object | None" = None,
    packages_dir: Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `source`'s expert against the frozen public model; write `experts/<source>/`.

    :param packages_dir: write the package to `<packages_dir>/<source>/` instead (the
        evaluation's ablations keep their packages apart)
    :param dp: a `flexolmo.model.privacy.DPConfig`: the whole package under one (epsilon, delta) budget
        (DP-SGD, the router row's start and the domain classifier; flexolmo/model/privacy.py)
    :param device: `cpu`, `cuda` or `auto`; dtype: `float32` or `bfloat16`; None: the profile's.
        Everything runs there: the router-row start, the bias calibration, DP-SGD and its noise
    :param stop_after: stop after this step, keeping the resume state (tests); nothing is written
    """
    # settings
    d = distributed.setup()
    p = _profile(profile, steps, "expert", device, dtype)
    cfg = p.expert
    device, dtype = distributed.run_device(d, cfg.device), resolve_dtype(cfg.dtype)
    src = get_source(ws, source)
    public, _ = public_model.load(ws)
    public_hash, public_name = shared_weights_hash(public), public.experts[0]
    public.module.to(device)
    dp_settings = dp.settings() if dp is not None else None
    inputs = expert_package.inputs(ws, p, source, public_hash, dp_settings)

    # data
    stream = token_stream(ws, source)
    check_stream(stream, cfg, source)
    plan = own_windows = None
    if dp is not None:  # the budget first: a target out of reach fails before anything runs
        from flexolmo.model.privacy import plan as dp_plan, windows

        own_windows = windows(stream, cfg.seq_len)
        plan = dp_plan(dp, len(own_windows), cfg.batch_size, cfg.steps, cfg.embed_docs, cfg.seq_len)

    # model: [public | copy of the public FFN]; router row 1 from the domain embedding, its
    # bias negative; everything but slice 1 of the fused tensors frozen
    public_stream = token_stream(ws, public_name)
    pub_w, own_w = _check_windows(public_stream, stream, cfg, seed=cfg.seed)
    if cfg.router_init in ("classifier", "embedder") and dp is not None:
        raise InputError(f"router_init {cfg.router_init!r} reads the owner's text outside the DP budget; "
                         "use domain_mean (the default) with --dp-epsilon")
    with autocast(device, dtype):  # forward passes only, in the run's precision
        if cfg.router_init == "classifier":
            rows, how = classifier_rows(public, pub_w, own_w)
        elif plan is not None and cfg.router_init != "random":
            rows, how = _dp_router_row(public, public_stream, own_windows, plan, cfg)
        else:
            rows, how = router_row(public, ws, source, cfg, public_source=public_name)
    model = with_experts(public, 2, top_k=p.model.top_k).to(device)
    del public
    with torch.no_grad():
        for l, r in enumerate(routers(model)):
            r.weight[1].copy_(rows[l] if rows.ndim == 2 else rows)  # one row per layer, or the same in all
    floor = cfg.router_own_floor if dp is None else None  # the floor reads own text: outside a DP budget
    with autocast(device, dtype):
        bias_report, factors = _start_bias(model, pub_w, own_w, cfg, floor)
    params, frozen = train_rows(model, frozen=[0])
    run = f"expert-{source}" if packages_dir is None else f"expert-{source}-{sha256_json(str(packages_dir))[:8]}"
    callbacks, ckpt = standard_callbacks(ws, run, {"kind": "expert", "inputs": inputs}, progress, stop_after)
    callbacks.append(frozen)
    tracker = None
    if cfg.router_bias_init is None:  # keep the calibrated bias at its target as the expert trains
        tracker = BiasTracker(pub_w, cfg.router_bias_target, cfg.router_bias_every, own_windows=own_w, floor=floor)
        callbacks.append(tracker)
    capper = None
    if cfg.expert_scale_cap is not None:  # public windows only: no privacy cost, DP or not
        capper = ScaleCap(pub_w[:2], cfg.expert_scale_cap)
        callbacks.append(capper)
    if dp is not None:
        from flexolmo.model.privacy import DPStep

        dp_step = DPStep(dp, params, frozen_rows=[0], plan=plan, windows=own_windows, z_coef=cfg.router_z_loss)
        callbacks.append(dp_step)
    loss_fn = WithRouterZLoss(model, cfg.router_z_loss)

    # train
    mixed = cfg.public_mix > 0 and dp is None
    data = Mixture(stream, public_stream, cfg.public_mix) if mixed else stream
    fit = Trainer(model, params, cfg, data, callbacks=callbacks, loss_fn=loss_fn, dist=d,
                  lr_scale=router_lr_scale(model, factors)).fit()
    model.eval()
    out = expert_package.folder(ws, source, packages_dir)
    loaded = LoadedModel(module=model, experts=[public_name, source])
    if not fit.completed:
        return TrainResult("expert", source, out, p.name, fit, num_parameters(model), None, loaded)

    # the package
    check_pub, check_own = _check_windows(public_stream, stream, cfg, seed=cfg.seed + 1)
    with autocast(device, dtype):
        bias_report["at_end"] = routing_check(model, check_pub, check_own).to_dict()
        # how loud the owner's expert is against the public one on public text, per layer (flexolmo/model/scale.py)
        bias_report["expert_output_ratio_at_end"] = [round(float(r), 4) for r in output_ratios(model, check_pub[:4])]
    bias_report["bias_at_end"] = bias_summary(model)
    if capper is not None:
        bias_report["scale_cap"] = {"cap": cfg.expert_scale_cap, "largest_ratio_met": max(capper.peaks, default=None)}
    bias_report["public_share_of_batches"] = cfg.public_mix if mixed else ("not applied under DP" if cfg.public_mix else 0.0)
    if tracker is not None:
        bias_report["recalibrated"] = {"every_steps": cfg.router_bias_every, "mean_abs_move": tracker.moves}
    privacy = {"dp": False}
    classifier = _domain_classifier(ws, source, public_name, plan, own_windows)
    if dp is not None:
        from flexolmo.model.privacy import privacy_report

        bs = dp_step.batch_sizes or [0]
        plan.notes["batch_sizes_this_run"] = {"mean": round(sum(bs) / len(bs), 2), "min": min(bs), "max": max(bs)}
        privacy = privacy_report(plan)
        bias_report = _public_only(bias_report)
    card = ExpertPackageCard(
        inputs=inputs, source=source, owner=owner or src.owner, domain=src.domain, profile=p.name,
        config=p.to_dict(), n_params=num_parameters(model), n_trainable=sum(p_[1:].numel() for p_ in params),
        router_z_loss=None if dp is not None else round(loss_fn.last_z, 4), router_init=f"router row = {how}",
        router_bias_init=cfg.router_bias_init, router_bias=bias_report, privacy=privacy, created_by=current_user(), **_throughput(fit),
    )
    if d.is_main:
        card = expert_package.write(out, model, card, classifier=classifier)
        ckpt.clear()
    distributed.barrier(d)
    return TrainResult("expert", source, out, p.name, fit, card.n_params, card, loaded)


def _check_windows(public: torch.Tensor, own: torch.Tensor, cfg, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded windows of public text and of the owner's own text (data the owner has)."""
    n = cfg.calibration_windows
    return sample_windows(public, cfg.seq_len, n, seed), sample_windows(own, cfg.seq_len, n, seed)


def _start_bias(model, pub_w: torch.Tensor, own_w: torch.Tensor, cfg, floor: float | None) -> tuple[dict, list[float]]:
    """Scale the owner's router row (`router_margin_std`) and set its starting bias, calibrated per
    layer (own-text `floor` or None) or the fixed value, from public and own windows; the card's
    report and the row's per-layer scale factors."""
    scale, factors = {}, [1.0] * len(routers(model))
    if cfg.router_margin_std is not None:
        factors = scale_margin(model, pub_w, cfg.router_margin_std)
        scale = {"margin_std_on_public_text": cfg.router_margin_std, "row_scale_per_layer": [round(f, 5) for f in factors]}
    if cfg.router_bias_init is None:
        _, report = calibrate(model, pub_w, own_w, cfg.router_bias_target, floor=floor)
        return {**scale, **report}, factors
    with torch.no_grad():
        for r in routers(model):
            r.bias[1] = cfg.router_bias_init
    return {**scale, "fixed": cfg.router_bias_init, "at_start": routing_check(model, pub_w, own_w).to_dict()}, factors


def _domain_classifier(ws: Workspace, source: str, public_source: str, plan=None, own_windows=None):
    """The owner's domain classifier (own vs public training documents), for router tuning's
    proxy selection: it ships in the package instead of any text (flexolmo/model/proxy.py). Under
    DP, from noisy clipped counts of the owner's windows (its clip recorded in `plan`)."""
    from flexolmo.model.proxy import DomainClassifier
    from flexolmo.base.tokens import source_tokens

    own, pub = source_tokens(ws, source), source_tokens(ws, public_source)
    if plan is not None:
        from flexolmo.model.privacy import secret_generator

        clf, plan.classifier_clip = DomainClassifier.train_dp(
            own_windows, [pub.doc(i) for i in range(pub.n_docs)], tokenizer_info(ws).vocab_size,
            sigma=plan.classifier_sigma, g=secret_generator())
        return clf
    return DomainClassifier.train([own.doc(i) for i in range(own.n_docs)], [pub.doc(i) for i in range(pub.n_docs)],
                                  tokenizer_info(ws).vocab_size)


def _dp_router_row(public, public_stream: torch.Tensor, own_windows: torch.Tensor, plan, cfg) -> tuple[torch.Tensor, str]:
    """Router row 1's start under DP (flexolmo/model/domain.py `dp_router_row`); unit length for domain_unit."""
    from flexolmo.model.domain import dp_router_row
    from flexolmo.model.privacy import secret_generator

    pub_w = sample_windows(public_stream, cfg.seq_len, 64, seed=cfg.seed)
    row, how = dp_router_row(public, own_windows, pub_w, plan, secret_generator())
    if cfg.router_init == "domain_unit":
        row, how = row / row.norm().clamp_min(1e-8), how + ", scaled to unit length"
    return row, how


def _public_only(report):
    """The bias report without own-text shares: under DP they would be statistics of the
    owner's data outside the budget (they are not published)."""
    if isinstance(report, dict):
        return {k: ("not measured under DP" if k == "own_text_to_own_expert" else
                    [r[0] for r in v] if k == "per_layer" else _public_only(v)) for k, v in report.items()}
    return report
