"""DP-SGD for an owner's expert: per-sample clipping and Gaussian noise on the trainable
slices only, with Opacus' RDP accountant reporting epsilon at a given delta.

    flexolmo train expert --source news --dp-noise-multiplier 1.0 --dp-max-grad-norm 1.0

What is protected, stated plainly: a "sample" is one training window of `seq_len` tokens
(drawn uniformly at random from the source's token stream). The accountant assumes
Poisson sampling at rate q = batch_size / number_of_windows; we draw fixed-size batches
uniformly, the usual approximation. A document longer than one window appears in several
windows, so the guarantee is per window, not per document (group privacy would scale it).

Per-sample gradients come from a loop over the batch (one backward per window). That costs
throughput, but it is exact and needs no changes to the transformers model. `DPStep` is the
Trainer callback (flexolmo/trainer.py) that replaces the plain backward with this.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Iterator

import torch

from .config import TrainConfig
from .errors import InputError
from .trainer import Callback, Trainer


@dataclass
class DPConfig:
    noise_multiplier: float = 1.0  # sigma: noise std = sigma * max_grad_norm
    max_grad_norm: float = 1.0  # C: per-sample clipping norm (trainable slices only)
    delta: float = 1e-5  # epsilon is reported at this delta

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or self.max_grad_norm <= 0 or not 0 < self.delta < 1:
            raise InputError("DP settings out of range: noise multiplier >= 0, max grad norm > 0, 0 < delta < 1")


def clip_sample(grads: list[torch.Tensor], max_grad_norm: float) -> tuple[list[torch.Tensor], float]:
    """One sample's gradients scaled to total L2 norm at most C; returns (clipped, the raw norm)."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    factor = min(1.0, max_grad_norm / (norm + 1e-6))
    return [g * factor for g in grads], norm


def per_sample_grads(model, loss_fn, params: list[torch.nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                     frozen_rows: list[int]) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """(gradients, loss) of each window of the batch, with the frozen rows' gradient zeroed:
    the clipping norm covers the trainable slices only."""
    for i in range(x.size(0)):
        loss = loss_fn(model, x[i : i + 1], y[i : i + 1])
        grads = [_zero_rows(g, frozen_rows) for g in torch.autograd.grad(loss, params)]
        yield grads, loss.detach()


def _zero_rows(g: torch.Tensor, rows: list[int]) -> torch.Tensor:
    g = g.clone()
    g[rows] = 0
    return g


class DPStep(Callback):
    """DP-SGD in place of the plain backward: per-sample clipping to C, Gaussian noise of std
    sigma * C on the trainable slices, mean over the batch (`p.grad`).

    The noise comes from a generator seeded from the operating system's secret randomness,
    never from the run's (published) seed: whoever holds the package cannot regenerate it.
    """

    def __init__(self, dp: DPConfig, params: list[torch.nn.Parameter], frozen_rows: list[int]):
        self.dp, self.params, self.frozen_rows = dp, params, frozen_rows
        self.g_noise = torch.Generator().manual_seed(secrets.randbits(63))

    def pre_train(self, tr: Trainer) -> None:
        if tr.d.enabled:
            raise InputError("DP-SGD training runs in one process; run it without torchrun")

    def backward(self, tr: Trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dp = self.dp
        summed = [torch.zeros_like(p) for p in self.params]
        losses = []
        for grads, loss in per_sample_grads(tr.model, tr.loss_fn, self.params, x, y, self.frozen_rows):
            clipped, _ = clip_sample(grads, dp.max_grad_norm)
            for s, g in zip(summed, clipped):
                s.add_(g)
            losses.append(loss)
        for p, s in zip(self.params, summed):
            noise = torch.randn(s.shape, generator=self.g_noise).to(s.device) * (dp.noise_multiplier * dp.max_grad_norm)
            p.grad = (s + _zero_rows(noise, self.frozen_rows)) / x.size(0)  # noise on the trainable slices only
        return torch.stack(losses).mean()


def privacy_report(dp: DPConfig, cfg: TrainConfig, n_windows: int, steps: int) -> dict:
    """Epsilon at `dp.delta` after `steps` steps (Opacus RDP accountant), for the card."""
    from opacus.accountants import RDPAccountant

    q = min(1.0, cfg.batch_size / max(1, n_windows))
    acc = RDPAccountant()
    acc.history = [(dp.noise_multiplier, q, steps)]
    eps = float("inf") if dp.noise_multiplier == 0 else acc.get_epsilon(delta=dp.delta)
    return {
        "dp": True,
        "mechanism": "DP-SGD: per-sample clipping + Gaussian noise on the expert's own slices only",
        "noise_multiplier": dp.noise_multiplier,
        "max_grad_norm": dp.max_grad_norm,
        "delta": dp.delta,
        "epsilon": eps,
        "sample_rate": q,
        "steps": steps,
        "accountant": "opacus RDPAccountant",
        "unit": f"one training window of {cfg.seq_len} tokens (not one document)",
        "noise_seed": "secret (operating-system randomness), not recorded",
        "not_covered": "the router row's initial value, a mean hidden state over up to embed_docs of the "
                       "owner's documents, is computed without DP and ships in the package",
    }
