"""DP-SGD for an owner's expert: per-sample clipping and Gaussian noise on the trainable
slices only, with Opacus' RDP accountant reporting epsilon at a given delta.

    flexolmo train expert --source news --dp-noise-multiplier 1.0 --dp-max-grad-norm 1.0

What is protected, stated plainly: a "sample" is one training window of `seq_len` tokens
(drawn uniformly at random from the source's token stream). The accountant assumes
Poisson sampling at rate q = batch_size / number_of_windows; we draw fixed-size batches
uniformly, the usual approximation. A document longer than one window appears in several
windows, so the guarantee is per window, not per document (group privacy would scale it).

Per-sample gradients come from a loop over the batch (one backward per window). That costs
throughput, but it is exact and needs no changes to the transformers model.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .errors import InputError


@dataclass
class DPConfig:
    noise_multiplier: float = 1.0  # sigma: noise std = sigma * max_grad_norm
    max_grad_norm: float = 1.0  # C: per-sample clipping norm (trainable slices only)
    delta: float = 1e-5  # epsilon is reported at this delta

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or self.max_grad_norm <= 0 or not 0 < self.delta < 1:
            raise InputError("DP settings out of range: noise multiplier >= 0, max grad norm > 0, 0 < delta < 1")


def _mask0(g: torch.Tensor) -> torch.Tensor:
    """Zero slice 0 (the frozen public expert / router row / bias) of a fused gradient."""
    g = g.clone()
    g[0] = 0
    return g


def make_dp_step(dp: DPConfig, params: list[torch.nn.Parameter], cfg: TrainConfig, n_windows: int):
    """A replacement for loss.backward(): sets `p.grad` to the clipped, noised mean gradient.

    The noise comes from a generator seeded from the operating system's secret randomness,
    never from the run's (published) seed: whoever holds the package cannot regenerate it.
    """
    g_noise = torch.Generator().manual_seed(secrets.randbits(63))

    def clip_and_noise(model, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        summed = [torch.zeros_like(p_) for p_ in params]
        losses = []
        for i in range(x.size(0)):  # per-sample gradients
            logits = model(input_ids=x[i : i + 1], use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[i].reshape(-1))
            grads = [_mask0(g) for g in torch.autograd.grad(loss, params)]
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
            factor = min(1.0, dp.max_grad_norm / (norm + 1e-6))  # clip to C
            for s, g in zip(summed, grads):
                s.add_(g, alpha=factor)
            losses.append(loss.detach())
        for p_, s in zip(params, summed):
            noise = torch.randn(s.shape, generator=g_noise).to(s.device) * (dp.noise_multiplier * dp.max_grad_norm)
            p_.grad = (s + _mask0(noise)) / x.size(0)  # noise on the trainable slices only
        return torch.stack(losses).mean()

    return clip_and_noise, None


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
