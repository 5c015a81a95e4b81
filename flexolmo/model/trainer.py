"""One training loop for every recipe: the public model, an owner's expert, router tuning.

    trainer = Trainer(model, params, cfg, stream, callbacks=[
        Progress("public"), Checkpoint(ws, "public", run_config), EarlyStop(after=7)])
    result = trainer.fit()                  # FitResult: losses, tokens/s, stopped early?

The loop (nanoGPT style) is in `fit`: learning rate, batch, forward and backward, update,
logging, then the callbacks (flexolmo/model/callbacks.py; OLMo-core's `Callback` hooks). What
differs between recipes lives in the callbacks and the loss function:

    FrozenRows    rows of fused tensors that must not move (the public expert; router
                  tuning's frozen rows); clamps the router bias <= 0
    DPStep        DP-SGD: per-sample clipping + noise replace the plain backward (privacy.py)
    Progress      the tqdm bar
    Checkpoint    resume state in runs/<name>/ (an HF model folder + state.pt, a plain dict)
    EarlyStop     stop after a given step (an interruption, in tests); the result says so
    loss_fn       `losses.lm_loss`, or `losses.WithRouterZLoss` for owner training

Where: `cfg.device` (the model is moved there, batches go there; under torchrun each rank's own
GPU) in `cfg.dtype`: bfloat16 runs the forward pass under autocast while the weights and
AdamW's state stay float32 (the master copy), and the loss is taken in float32. The fused
experts run with transformers' implementation in `TRAINING_EXPERTS` for the device (CPU: eager).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from flexolmo.model import distributed
from flexolmo.model.config import TrainConfig
from flexolmo.model.device import autocast, resolve_dtype
from flexolmo.model.losses import lm_loss
from flexolmo.model.moe import as_module, experts_implementation
from flexolmo.model.stream import Mixture, get_batch


# transformers' experts implementation while training, per device type (else its default,
# grouped_mm). On the CPU "eager" ran the owner model's steps (16 x 256 tokens, 2 experts) at
# 0.93x-1.27x grouped_mm's speed over six runs on 2026-12-05, median about 1.05x, and a demo
# expert's whole fit at 1.10x (95.4 s -> 86.9 s); a small gain inside the cores' noise. For
# the public model (1 expert) it is a wash or a small loss: 1.02x in an interleaved run, 0.84x
# and 0.95x in two runs of bench/train_throughput.py (the demo installs a shipped public model).
TRAINING_EXPERTS = {"cpu": "eager"}


def get_lr(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio (nanoGPT)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    ratio = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))
    return cfg.lr * (cfg.min_lr_ratio + coeff * (1 - cfg.min_lr_ratio))


class Callback:
    """Hooks into `Trainer.fit`; callbacks run in ascending `order`."""

    order = 0

    def pre_train(self, tr: "Trainer") -> None:
        """Before the first step (resume state is restored here)."""

    def backward(self, tr: "Trainer", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Compute the gradients and return the loss, replacing the plain backward; None: don't."""
        return None

    def post_step(self, tr: "Trainer") -> None:
        """After each optimizer step; `tr.step` counts the steps done."""

    def post_train(self, tr: "Trainer") -> None:
        """After the last step (or an early stop)."""


@dataclass
class FitResult:
    steps: int  # steps asked for
    steps_done: int
    tokens: int
    final_loss: float
    losses: list[tuple[int, float]]  # (step, loss) every log_every steps
    seconds: float  # training time, resumed runs included
    tokens_per_s: float  # of this process's run
    resumed_from: int | None
    world_size: int
    stopped: str | None = None  # why the run stopped early; None when it completed

    @property
    def completed(self) -> bool:
        return self.stopped is None

    def stats(self) -> dict:
        """The training record every card carries."""
        return {"steps": self.steps, "tokens": self.tokens, "final_loss": self.final_loss, "losses": self.losses,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s, "resumed_from": self.resumed_from,
                "world_size": self.world_size}


@dataclass
class Trainer:
    """Trains `params` of `model` on random windows of `stream` (see the module docstring)."""

    model: object  # a torch module (or LoadedModel)
    params: list[torch.nn.Parameter]
    cfg: TrainConfig
    stream: torch.Tensor | Mixture  # token ids; a Mixture draws a share of each batch from a second stream
    callbacks: list[Callback] = field(default_factory=list)
    loss_fn: Callable = lm_loss  # (net, x, y) -> scalar loss
    dist: distributed.Dist | None = None
    # learning-rate multipliers for some parameters (id(param) -> factor), e.g. an owner's router
    # rows rescaled by flexolmo/model/bias.py `scale_margin`: Adam's steps do not shrink with a
    # parameter's scale, so a row scaled by s trains at lr * s to move as much relative to itself
    lr_scale: dict[int, float] = field(default_factory=dict)
    # the state a checkpoint keeps (a resumed run restores it)
    step: int = 0
    losses: list = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None
    stop_reason: str | None = None
    last_loss: float = float("nan")

    def __post_init__(self) -> None:
        self.model = as_module(self.model)
        self.d = self.dist or distributed.setup()
        self.device, self.dtype = distributed.run_device(self.d, self.cfg.device), resolve_dtype(self.cfg.dtype)
        self.model.to(self.device)  # in place: `params` stay the model's parameters
        self.callbacks = sorted(self.callbacks, key=lambda c: c.order)
        groups: dict[tuple[float, float], list] = {}  # (weight decay, lr factor) -> params
        for p in self.params:
            wd = self.cfg.weight_decay if p.ndim >= 2 else 0.0  # never on norms or the router bias
            groups.setdefault((wd, self.lr_scale.get(id(p), 1.0)), []).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": ps, "weight_decay": wd, "lr_scale": f} for (wd, f), ps in groups.items()],
            lr=self.cfg.lr, betas=(0.9, 0.95),
        )

    def fit(self) -> FitResult:
        cfg, d = self.cfg, self.d
        for cb in self.callbacks:
            cb.pre_train(self)
        self.model.train()
        self.net = distributed.wrap(d, self.model)
        per_step = cfg.tokens_per_step(d.world_size)
        start, seconds0, t0 = self.step, self.seconds, time.time()
        with experts_implementation(self.model, TRAINING_EXPERTS.get(self.device.type)):
            while self.step < cfg.steps and self.stop_reason is None:
                step = self.step
                # learning rate
                for g in self.opt.param_groups:
                    g["lr"] = get_lr(cfg, step) * g.get("lr_scale", 1.0)
                # forward, backward, update
                x, y = get_batch(self.stream, cfg, step, d.rank)
                loss = self._backward(x.to(self.device), y.to(self.device))
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.step, self.tokens = step + 1, self.tokens + per_step
                # logging
                self.last_loss = loss.item()
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    self.losses.append((step, round(distributed.mean(d, self.last_loss), 4)))
                self.seconds = seconds0 + time.time() - t0
                self.tokens_per_s = (self.step - start) * per_step / max(1e-9, time.time() - t0)
                # frozen rows, progress, early stop, checkpoint (in this order)
                for cb in self.callbacks:
                    cb.post_step(self)
        for cb in self.callbacks:
            cb.post_train(self)
        return FitResult(
            steps=cfg.steps, steps_done=self.step, tokens=self.tokens,
            final_loss=self.losses[-1][1] if self.losses else self.last_loss, losses=self.losses,
            seconds=round(self.seconds, 2),
            tokens_per_s=round((self.step - start) * per_step / max(1e-9, time.time() - t0), 1),
            resumed_from=self.resumed_from, world_size=d.world_size, stopped=self.stop_reason,
        )

    def autocast(self):
        """The forward pass's precision (`cfg.dtype`): wrap forward passes in it, not backward ones."""
        return autocast(self.device, self.dtype)

    def _backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradients of the loss on one batch: a callback's (DP-SGD), else plain with clipping."""
        for cb in self.callbacks:
            loss = cb.backward(self, x, y)
            if loss is not None:
                return loss
        with self.autocast():
            loss = self.loss_fn(self.net, x, y)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        return loss
