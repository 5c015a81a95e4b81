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
The paper asks for both halves: most public text to the public expert, and most of the owner's
own text to its own expert. For an owner whose text resembles public text (news), a bias that
keeps 80% of public text on the public expert kept only 55% of news on its own (run D). With a
`floor` (0.7 by default), the bias gives up public share, down to the floor at most, until the
floor of the owner's own tokens prefer its expert; where both cannot hold it balances them
(`layer_shift`). The floor reads the owner's own windows: data the owner has, but under DP an
extra query on private data, so the DP recipe calibrates on public text alone.

The scale matters as much as the offset. The router rows start from domain embeddings (mean
hidden states, not normalised) and meet the residual stream, whose norm grows with depth: the
owner-vs-public margin has a standard deviation of 8 to 43 logits on public text, and a
different one for every owner and layer. Merged, the softmax over eight such logits is
saturated (each token goes to one expert) and the owners with the largest rows outbid the
others on every domain (docs/eval-diagnosis.md). `scale_margin` therefore first rescales the
owner's row around the public row, per layer, r_1 <- r_0 + s_l (r_1 - r_0), so that the
margin has a standard deviation of `std` (3 logits by default) on public text: every owner's
router then speaks in the same unit, measured on data every owner has, with no data shared.
The owner's expert then moves the residual stream that later layers' routers read, so a
calibration at the start alone drifts (measured: 80% of public-text tokens to the public
expert at the start, 35% after 50 steps); `BiasTracker` recalibrates every few steps and
exactly at the end, like the bias updates of auxiliary-loss-free load balancing
(DeepSeek-V3), so the package keeps the target. The bias also trains by gradient (clamped).
`routing_check` measures, at the end of training, how often the owner's model prefers the
public expert on public text and its own expert on its own text (the card records both).

    scales = scale_margin(model, public_windows, std=3.0)
    biases, report = calibrate(model, public_windows, own_windows, target=0.8, floor=0.7)
    check = routing_check(model, public_windows, own_windows)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexolmo.base.errors import InputError
from flexolmo.model.device import model_device
from flexolmo.model.moe import as_module, routers
from flexolmo.model.trainer import Callback, Trainer


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


class _Read(Exception):
    """Raised by `per_layer`'s hook at the last router it reads: the rest of the pass is not needed."""


@torch.no_grad()
def per_layer(model, windows: torch.Tensor, take, batch_size: int, upto: int | None = None) -> list[torch.Tensor]:
    """`take(router input, router output)` at every layer's router over `windows` (eval mode,
    batches of `batch_size`, on the model's device), concatenated per layer as float. E.g. the
    router's input and logits together: `take = lambda h, out: torch.cat([h.flatten(0, -2), out[0]], 1)`.

    :param upto: read layers 0..upto only (None: all). Each pass stops at that layer's router:
        the layers after it and the LM head are not run (nothing they compute is read, so the
        values are those of a full pass)
    """
    module = as_module(model)
    device = model_device(module)
    was = module.training
    module.eval()
    rs = routers(module)
    last = len(rs) - 1 if upto is None else upto
    if not 0 <= last < len(rs):
        raise InputError(f"upto={upto}: the model has layers 0..{len(rs) - 1}")
    taken: list[list[torch.Tensor]] = [[] for _ in rs[: last + 1]]

    def hook(_m, inp, out, k):
        taken[k].append(take(inp[0], out))
        if k == last:
            raise _Read

    hooks = [r.register_forward_hook(lambda m, inp, out, k=k: hook(m, inp, out, k)) for k, r in enumerate(rs[: last + 1])]
    try:
        for b in range(0, len(windows), batch_size):
            try:
                module(input_ids=windows[b: b + batch_size].to(device), use_cache=False)
            except _Read:
                pass
    finally:
        for h in hooks:
            h.remove()
        module.train(was)
    return [torch.cat(m).float() for m in taken]


def logit_margins(model, windows: torch.Tensor, expert: int = 1, batch_size: int = 8,
                  upto: int | None = None) -> torch.Tensor:
    """(L, N) router logit of `expert` minus that of expert 0, bias included, at every token
    (layers 0..upto only when `upto` is given: (upto + 1, N))."""
    return torch.stack(per_layer(model, windows, lambda _h, out: out[0][:, expert] - out[0][:, 0], batch_size, upto))


def router_inputs(model, windows: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Every layer's router input (N, H) at every token of `windows`."""
    return per_layer(model, windows, lambda h, _out: h.reshape(-1, h.shape[-1]), batch_size)


@torch.no_grad()
def scale_margin(model, public_windows: torch.Tensor, std: float, expert: int = 1) -> list[float]:
    """Rescale expert `expert`'s router row around row 0 in every layer so that its logit
    margin over expert 0 (bias left out) has standard deviation `std` on public-text tokens;
    returns the per-layer factors s_l."""
    if std <= 0:
        raise InputError(f"the router margin's standard deviation must be > 0, got {std}")
    rs = routers(as_module(model))
    saved = [float(r.bias[expert]) for r in rs]
    for r in rs:
        r.bias[expert] = 0.0
    margins = logit_margins(model, public_windows, expert)  # (L, N)
    scales = []
    for r, m, b in zip(rs, margins, saved):
        s = std / max(float(m.std()), 1e-6)
        r.weight[expert] = r.weight[0] + s * (r.weight[expert] - r.weight[0])
        r.bias[expert] = b
        scales.append(s)
    return scales


def router_lr_scale(model, factors: list[float]) -> dict[int, float]:
    """The Trainer's `lr_scale` for rows rescaled by `factors` (one per layer): Adam moves every
    entry by about lr per step whatever its scale, so layer l's router weight and bias train at
    lr x factors[l], as far relative to their scale as unscaled rows at lr."""
    return {id(t): f for r, f in zip(routers(as_module(model)), factors) for t in (r.weight, r.bias)}


def layer_shift(public: torch.Tensor, own: torch.Tensor | None, target: float, floor: float | None) -> float:
    """The shift d of one layer's router margins (owner minus public logit, bias included) so that
    a fraction `target` of public-text tokens prefer the public expert (margin + d <= 0), unless
    that leaves fewer than `floor` of the owner's own tokens preferring its own expert: then d rises
    until they do, giving up public share down to `floor` at most. Where both floors cannot hold
    (own text that looks like public text), d is where the two shares are equal: the larger of
    the two smaller shares."""
    d = -float(torch.quantile(public, target))
    if own is None or floor is None:
        return d
    need = -float(torch.quantile(own, 1 - floor))  # own share >= floor needs d >= need
    if d >= need:
        return d
    cap = -float(torch.quantile(public, floor))  # public share >= floor needs d <= cap
    if need <= cap:
        return need
    grid = torch.linspace(cap, need, 401, device=public.device)
    pub_share = (public[None] + grid[:, None] <= 0).float().mean(1)
    own_share = (own[None] + grid[:, None] > 0).float().mean(1)
    return float(grid[torch.minimum(pub_share, own_share).argmax()])


@torch.no_grad()
def set_quantile(model, public_windows: torch.Tensor, target: float, expert: int = 1,
                 sequential: bool = True, own_windows: torch.Tensor | None = None,
                 floor: float | None = None) -> list[float]:
    """Move expert `expert`'s bias in every layer so that a fraction `target` of public-text
    tokens prefer the public expert; with `own_windows` and `floor`, never so far that fewer
    than `floor` of the owner's own tokens prefer its expert (`layer_shift`). Never less than a
    tenth of the public margin's standard deviation below 0: a bias at the clamp cannot move.
    Layer by layer when `sequential` (a layer's routing changes the next layer's input); else
    all layers from one pass. Returns the biases."""
    if not 0.5 <= target < 1:
        raise InputError(f"the public-text target share must be in [0.5, 1), got {target}")
    if floor is not None and not 0.5 <= floor <= target:
        raise InputError(f"the calibration floor must be in [0.5, target={target}], got {floor}")
    rs = routers(as_module(model))
    passes = [[l] for l in range(len(rs))] if sequential else [range(len(rs))]  # the layers each pass sets
    use_own = own_windows is not None and floor is not None
    for layers in passes:
        upto = max(layers)  # a pass reads the layers it sets, and runs no further
        margins = logit_margins(model, public_windows, expert, upto=upto)  # (upto + 1, N), biases included
        own = logit_margins(model, own_windows, expert, upto=upto) if use_own else None
        for l in layers:
            b = float(rs[l].bias.detach()[expert])
            d = layer_shift(margins[l], own[l] if use_own else None, target, floor)
            rs[l].bias[expert] = min(b + d, -0.1 * float(margins[l].std()))
    return [float(r.bias[expert]) for r in rs]


@torch.no_grad()
def calibrate(model, public_windows: torch.Tensor, own_windows: torch.Tensor, target: float,
              expert: int = 1, floor: float | None = None) -> tuple[list[float], dict]:
    """Set expert `expert`'s starting bias in every layer so that a fraction `target` of
    public-text tokens prefer the public expert (with `floor`: but at least `floor` of the own
    windows' tokens prefer the owner's, `set_quantile`); returns the biases and a report for the card."""
    for r in routers(as_module(model)):
        r.bias[expert] = 0.0
    biases = set_quantile(model, public_windows, target, expert, own_windows=own_windows, floor=floor)
    start = routing_check(model, public_windows, own_windows, expert)
    return biases, {"target_public_text_to_public_expert": target, "own_text_floor": floor,
                    "bias_per_layer": [round(b, 4) for b in biases], "at_start": start.to_dict()}


class BiasTracker(Callback):
    """Keeps a calibrated bias at its target while the expert trains: every `every` steps the
    bias is moved so that `target` of the public windows' tokens prefer the public expert (one
    pass), and after the last step exactly, layer by layer. With `own_windows` and `floor`, never
    so far that fewer than `floor` of the owner's own tokens prefer its expert (`layer_shift`);
    without them it reads public text only (no privacy cost: the DP recipe's choice)."""

    order = -10  # after FrozenRows' clamp, before a checkpoint is written

    def __init__(self, public_windows: torch.Tensor, target: float, every: int, expert: int = 1,
                 own_windows: torch.Tensor | None = None, floor: float | None = None):
        self.windows, self.target, self.every, self.expert = public_windows, target, every, expert
        self.own, self.floor = own_windows, floor
        self.moves: list[float] = []  # mean |change of the bias| at each recalibration

    def _set(self, tr: Trainer, sequential: bool) -> None:
        rs = routers(as_module(tr.model))
        before = torch.tensor([float(r.bias.detach()[self.expert]) for r in rs])
        after = torch.tensor(set_quantile(tr.model, self.windows, self.target, self.expert, sequential,
                                          own_windows=self.own, floor=self.floor))
        self.moves.append(round(float((after - before).abs().mean()), 4))

    def post_step(self, tr: Trainer) -> None:
        if self.every and tr.step % self.every == 0 and tr.step < tr.cfg.steps:
            with tr.autocast():
                self._set(tr, sequential=False)

    def post_train(self, tr: Trainer) -> None:
        if tr.stop_reason is None:
            with tr.autocast():
                self._set(tr, sequential=True)


def routing_check(model, public_windows: torch.Tensor, own_windows: torch.Tensor, expert: int = 1) -> RoutingCheck:
    """How often the owner's model prefers the public expert on public text, and its own on its own."""
    pub = (logit_margins(model, public_windows, expert) <= 0).float().mean(dim=1)
    own = (logit_margins(model, own_windows, expert) > 0).float().mean(dim=1)
    return RoutingCheck(float(pub.mean()), float(own.mean()), list(zip(pub.tolist(), own.tolist())))


def bias_summary(model, expert: int = 1) -> list[float]:
    return [round(float(r.bias.detach()[expert]), 4) for r in routers(as_module(model))]

