"""The owner expert's output scale: a router bias that no clamp sees, and its cap.

In this architecture (OLMo 2's post-norm, as transformers' FlexOlmo and the paper's model)
a layer adds `RMSNorm(sum_k w_k E_k(x))` to the residual stream, so only the experts'
*relative* contributions w_k ||E_k(x)|| matter (up to the norm's eps, 1e-6 against mean squares of
27-74 in the demo model). Scaling expert k's output by c is exactly
adding log c to its router logit after the top-k choice: an expert that grows louder outbids
the others without its router row or bias moving. FlexOlmo's bias b_k <= 0 is there so that an
owner's expert never outbids the public expert on text that is not its own; a louder expert
undoes it. Measured on the demo federation (run G's recipe, 50 steps; bench/mixing_probe.py):
every owner's expert came out 1.8-3.6x louder than the public expert in the merged model, on
public text as on its own (+0.6 to +1.3 logits each, unclamped), and the public expert made 16%
of the merged model's feed-forward output on public text (docs/eval-diagnosis.md, run H).

`ScaleCap` holds the owner's expert to at most `cap` times the public expert's mean output
norm in every layer, measured after every step on a few public-text windows (data every owner
has: no privacy cost), by rescaling its `down_proj` slice (the output is linear in it). Below
the cap nothing changes; above it, the owner's expert can gain weight only through its router
row and its clamped bias, which the bias calibration keeps honest.

    ratios = output_ratios(model, public_windows)       # (L,) owner / public, per layer
    callbacks.append(ScaleCap(public_windows, cap=1.0))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexolmo.model.bias import router_inputs
from flexolmo.base.errors import InputError
from flexolmo.model.moe import as_module
from flexolmo.model.trainer import Callback, Trainer


def expert_output(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `e`'s output (N, H) for feed-forward inputs x (N, H) of a layer's fused experts."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


@torch.no_grad()
def output_ratios(model, windows: torch.Tensor, expert: int = 1, reference: int = 0) -> torch.Tensor:
    """(L,) mean ||E_expert(x)|| / mean ||E_reference(x)|| over the feed-forward inputs x of
    `windows` (N, T) in every layer (eval mode, one pass; the router's input is the layer's
    feed-forward input)."""
    out = []
    for layer, x in zip(as_module(model).model.layers, router_inputs(model, windows, batch_size=len(windows))):
        ex = layer.mlp.experts
        own, ref = expert_output(ex, expert, x).norm(dim=-1).mean(), expert_output(ex, reference, x).norm(dim=-1).mean()
        out.append(float(own / ref.clamp_min(1e-12)))
    return torch.tensor(out)


@torch.no_grad()
def cap_scale(model, windows: torch.Tensor, cap: float, expert: int = 1) -> torch.Tensor:
    """Rescale `expert`'s down_proj in every layer where its output is louder than `cap` x the
    public expert's on `windows`; returns the per-layer ratios before the cap."""
    if cap <= 0:
        raise InputError(f"the expert scale cap must be > 0, got {cap}")
    ratios = output_ratios(model, windows, expert)
    for layer, r in zip(as_module(model).model.layers, ratios.tolist()):
        if r > cap:
            layer.mlp.experts.down_proj[expert].mul_(cap / r)
    return ratios


class ScaleCap(Callback):
    """After every step, `cap_scale` on the public windows: the owner's expert never louder than
    `cap` x the public one. Records the largest ratio it met (before capping) in `peaks`."""

    order = -15  # after FrozenRows, before the bias is recalibrated on the capped model

    def __init__(self, public_windows: torch.Tensor, cap: float = 1.0, expert: int = 1):
        if cap <= 0:
            raise InputError(f"the expert scale cap must be > 0, got {cap}")
        self.windows, self.cap, self.expert = public_windows, cap, expert
        self.peaks: list[float] = []

    def post_step(self, tr: Trainer) -> None:
        with tr.autocast():
            self.peaks.append(round(float(cap_scale(tr.model, self.windows, self.cap, self.expert).max()), 4))
