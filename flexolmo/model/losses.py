"""Training losses: next-token cross-entropy, and the router z-loss of owner training.

Router z-loss (ST-MoE; FlexOlmo uses 1e-3): per layer, the mean over tokens of
logsumexp(router logits)^2, averaged over layers. It keeps router logits small, so the
softmax stays trainable. The logits are the FlexRouter's first output (bias included),
captured by forward hooks on every layer's router during the model's own forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexolmo.model.moe import routers


def lm_loss(net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `net` on inputs x (B, T) and targets y (B, T)."""
    logits = net(input_ids=x, use_cache=False).logits.float()  # (B, T, V); float32 under bfloat16 autocast too
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def router_z_loss(layer_logits: list[torch.Tensor]) -> torch.Tensor:
    """mean over layers of mean over tokens of logsumexp(logits)^2; each entry (N, E)."""
    return torch.stack([torch.logsumexp(lg.float(), dim=-1).pow(2).mean() for lg in layer_logits]).mean()


class WithRouterZLoss:
    """A loss function: cross-entropy + coef * router z-loss of the same forward pass.

    `last_ce` and `last_z` hold the two parts of the latest call (floats, for the card)."""

    def __init__(self, model, coef: float):
        self.model, self.coef = model, coef
        self.last_ce = self.last_z = float("nan")

    def __call__(self, net, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hooks = [r.register_forward_hook(lambda _m, _i, out: captured.append(out[0])) for r in routers(self.model)]
        try:
            ce = lm_loss(net, x, y)
        finally:
            for h in hooks:
                h.remove()
        z = router_z_loss(captured)
        self.last_ce, self.last_z = ce.item(), z.item()
        return ce + self.coef * z
