"""The owner expert's router bias: calibrated at the start of owner training, checked at the end.

FlexOlmo (arXiv 2507.07024, section 3.3.2) adds a bias b_1 <= 0 to the owner expert's
router logit, so that in the owner's 2-expert model [public | own] the owner's expert is
preferred only where r_1.x + b_1 > r_0.x: it trains on the tokens where it is really
better, and after merging it does not outbid the public expert on text that is not its own.
A bias that starts at 0 never moves (its gradient pushes it up against the clamp): that is
the paper's no-bias ablation, and merged, the public expert starves.

How negative? The router logits' scale depends on the hidden states and on the router rows
(domain embeddings, not normalised), and differs per layer, so a fixed number means
something different in every model. `calibrate` therefore sets each layer's starting bias
from data the owner has, public text: in layer l, b_l = -q_l where q_l is the `target`
quantile of (r_1 - r_0).x_l over public-text tokens (and at least a tenth of their standard
deviation below 0, so the bias never starts at the clamp). At the start, the owner's model then
prefers the public expert on a fraction `target` of public-text tokens in every layer.
`routing_check` measures, at the end of training, how often the owner's model prefers the
public expert on public text and its own expert on its own text (the card records both).

    biases, report = calibrate(model, public_windows, own_windows, target=0.8)
    check = routing_check(model, public_windows, own_windows)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError
from .model import as_module, routers


@dataclass(frozen=True)
class RoutingCheck:
    public_to_public: float  # share of (public-text token, layer) decisions preferring expert 0
    own_to_own: float  # share of (own-text token, layer) decisions preferring the owner's expert
    per_layer: list[tuple[float, float]]  # the same two shares in each layer

    def to_dict(self) -> dict:
        return {"public_text_to_public_expert": round(self.public_to_public, 4),
                "own_text_to_own_expert": round(self.own_to_own, 4),
                "per_layer": [[round(a, 4), round(b, 4)] for a, b in self.per_layer]}


def sample_windows(stream: torch.Tensor, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """`n` seeded random windows (n, seq_len) of a token stream."""
    if len(stream) <= seq_len:
        raise InputError(f"a stream of {len(stream)} tokens has no window of {seq_len} tokens")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (n,), generator=g).tolist()
    return torch.stack([stream[s: s + seq_len] for s in starts])


@torch.no_grad()
def logit_margins(model, windows: torch.Tensor, expert: int = 1, batch_size: int = 8) -> torch.Tensor:
    """(L, N) router logit of `expert` minus that of expert 0, bias included, at every token."""
    module = as_module(model)
    was = module.training
    module.eval()
    per_layer: list[list[torch.Tensor]] = [[] for _ in routers(module)]
    hooks = [r.register_forward_hook(lambda _m, _i, out, k=k: per_layer[k].append(out[0][:, expert] - out[0][:, 0]))
             for k, r in enumerate(routers(module))]
    try:
        for b in range(0, len(windows), batch_size):
            module(input_ids=windows[b: b + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        module.train(was)
    return torch.stack([torch.cat(m).float() for m in per_layer])


@torch.no_grad()
def calibrate(model, public_windows: torch.Tensor, own_windows: torch.Tensor, target: float,
              expert: int = 1) -> tuple[list[float], dict]:
    """Set expert `expert`'s bias in every layer so that a fraction `target` of public-text
    tokens prefer the public expert; returns the biases and a report for the card."""
    if not 0.5 <= target < 1:
        raise InputError(f"the public-text target share must be in [0.5, 1), got {target}")
    rs = routers(as_module(model))
    for r in rs:
        r.bias[expert] = 0.0
    margins = logit_margins(model, public_windows, expert)  # (L, N), bias 0
    # never exactly 0 (a bias at the clamp cannot move): at least a tenth of a standard deviation below
    biases = [min(-float(torch.quantile(m, target)), -0.1 * float(m.std())) for m in margins]
    for r, b in zip(rs, biases):
        r.bias[expert] = b
    start = routing_check(model, public_windows, own_windows, expert)
    return biases, {"target_public_text_to_public_expert": target, "bias_per_layer": [round(b, 4) for b in biases],
                    "at_start": start.to_dict()}


def routing_check(model, public_windows: torch.Tensor, own_windows: torch.Tensor, expert: int = 1) -> RoutingCheck:
    """How often the owner's model prefers the public expert on public text, and its own on its own."""
    pub = (logit_margins(model, public_windows, expert) <= 0).float().mean(dim=1)
    own = (logit_margins(model, own_windows, expert) > 0).float().mean(dim=1)
    return RoutingCheck(float(pub.mean()), float(own.mean()), list(zip(pub.tolist(), own.tolist())))


def bias_summary(model, expert: int = 1) -> list[float]:
    return [round(float(r.bias.detach()[expert]), 4) for r in routers(as_module(model))]

