"""Differential privacy for an owner's whole expert package, in one budget.

    flexolmo train expert --source news --dp-epsilon 8 --dp-delta 1e-6 [--dp-max-grad-norm 1.0]

The unit of privacy is one *window*: the source's training token stream (documents, eos
after each) is cut into N fixed, non-overlapping windows of seq_len + 1 tokens
(`windows`). Adjacent datasets differ by adding or removing one window (a document that
spans k windows is protected at group size k). Three mechanisms read the owner's data,
and all three are Poisson-subsampled Gaussian mechanisms, which is exactly what Opacus'
RDP accountant composes:

    router row    the domain embedding (flexolmo/model/domain.py): each window of a Poisson
                  sample (rate q_r = embed_docs / N) gives its mean final hidden state,
                  clipped to norm C_r; the sum gets N(0, (sigma_r C_r)^2) noise and is
                  divided by the expected count q_r N.            history (sigma_r, q_r, 1)
    classifier    the domain classifier's own-token counts (flexolmo/model/proxy.py): each
                  window's count vector clipped to L2 norm C_c, summed over all windows,
                  N(0, (sigma_c C_c)^2) noise per token id.       history (sigma_c, 1, 1)
    DP-SGD        every step takes a Poisson sample of the windows (rate q = batch_size / N,
                  variable batch size), per-sample gradients of the trainable slices only,
                  each clipped to C, summed, N(0, (sigma C)^2) noise, divided by the
                  expected batch size q N.                        history (sigma, q, steps)

Budget split (`plan`): the router row and the classifier each get a share of epsilon
(5% by default) *on their own*; sigma_r and sigma_c are the smallest noise multipliers
that keep each mechanism alone within its share. The DP-SGD noise multiplier is then the
smallest sigma for which the three composed (RDP, Opacus) reach the target epsilon at
delta. Composition in RDP is tighter than adding epsilons, so DP-SGD gets a little more
than the remaining 90%.

Per-sample gradients come from `torch.func` (vmap of grad over a functional call of the
model) with the experts computed densely (`dense_experts`: every expert on every token,
weighted by the router's top-k weights, zero elsewhere; the same function as transformers'
sparse loop, without data-dependent shapes). `per_sample_grads`, the per-example loop it
replaced, stays as the reference the tests compare against.

What stays outside the guarantee, stated in the card: the loss curve (mean loss of the
DP-SGD batches, for the owner's eyes; strip it before publishing the card), and the
seeded sampling of *public* text (no owner data). Own-text routing shares are not measured.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import types
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from flexolmo.base.errors import InputError
from flexolmo.model.losses import lm_loss
from flexolmo.model.moe import as_module, routers
from flexolmo.model.trainer import Callback, Trainer

SIGMA_MAX = 1000.0  # beyond this the noise swamps any gradient: the target counts as unreachable
# RDP orders: Opacus' defaults (up to 63) plus larger ones, which small per-mechanism shares
# need (with orders up to 63, epsilon cannot go below ~0.1 at delta 1e-5 however large the noise)
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256, 384, 512, 768, 1024]


@dataclass
class DPConfig:
    epsilon: float | None = None  # the target; the DP-SGD noise multiplier is derived (`plan`)
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # C: per-sample clipping norm of DP-SGD (trainable slices only)
    noise_multiplier: float | None = None  # a fixed DP-SGD sigma instead of a target (epsilon is then reported)
    router_share: float = 0.05  # share of epsilon the router row's mechanism may spend on its own
    classifier_share: float = 0.05  # the same for the domain classifier's counts

    def __post_init__(self) -> None:
        check_dp_settings(self)

    def settings(self) -> dict:
        """The settings the package's `config` input hashes: those that are set, the shares only
        when not the defaults (a fixed-sigma config hashes as before the epsilon target existed)."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        for k in ("router_share", "classifier_share"):
            if out[k] == 0.05:
                del out[k]
        return out


def check_dp_settings(dp: DPConfig) -> None:
    """Every DP setting in its range (one helper, one message per setting)."""
    if dp.epsilon is None and dp.noise_multiplier is None:
        raise InputError("DP needs a target epsilon (--dp-epsilon) or a noise multiplier (--dp-noise-multiplier)")
    if dp.epsilon is not None and not (dp.epsilon > 0 and math.isfinite(dp.epsilon)):
        raise InputError(f"--dp-epsilon must be a number > 0, got {dp.epsilon}")
    if not 0 < dp.delta < 1:
        raise InputError(f"--dp-delta must be in (0, 1), got {dp.delta}")
    if not dp.max_grad_norm > 0:
        raise InputError(f"--dp-max-grad-norm must be > 0, got {dp.max_grad_norm}")
    if dp.noise_multiplier is not None and not dp.noise_multiplier >= 0:
        raise InputError(f"--dp-noise-multiplier must be >= 0, got {dp.noise_multiplier}")
    for name in ("router_share", "classifier_share"):
        if not 0 < getattr(dp, name) < 0.5:
            raise InputError(f"{name} must be in (0, 0.5), got {getattr(dp, name)}")


# ---------------------------------------------------------------------------------------
# the budget


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at `delta` of a composition of Poisson-subsampled Gaussian mechanisms
    [(sigma, sample rate, steps), ...] (Opacus' RDP accountant)."""
    from opacus.accountants import RDPAccountant

    if any(s == 0 for s, _, _ in history):
        return float("inf")
    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha" at small epsilons
        return float(acc.get_epsilon(delta=delta, alphas=ALPHAS))


def solve_sigma(target: float, delta: float, q: float, steps: int, fixed: list = ()) -> float:
    """The smallest sigma (to 0.05%) for which (sigma, q, steps) composed with `fixed` stays
    within `target` at `delta`; InputError when even SIGMA_MAX does not."""
    eps = lambda s: epsilon_of([*fixed, (s, q, steps)], delta)  # noqa: E731
    if eps(SIGMA_MAX) > target:
        raise InputError(
            f"epsilon {target:g} at delta {delta:g} cannot be reached with {steps} step(s) at sampling rate {q:.4g}: "
            f"even noise multiplier {SIGMA_MAX:g} gives epsilon {eps(SIGMA_MAX):.3g} (the accountant's floor); "
            "raise the target or delta, or plan fewer steps")
    lo, hi = 0.05, SIGMA_MAX
    if eps(lo) <= target:
        return lo
    while hi / lo > 1.0005:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi


@dataclass
class DPPlan:
    """What the budget buys: each mechanism's noise multiplier and sampling rate."""

    dp: DPConfig
    n_windows: int
    seq_len: int
    batch_size: int  # the expected batch size q N
    steps: int
    sample_rate: float  # q of DP-SGD
    sigma: float  # DP-SGD noise multiplier
    router_rate: float  # q_r of the router row's mechanism
    router_sigma: float
    classifier_sigma: float
    router_clip: float | None = None  # C_r, set from public text when the row is computed
    classifier_clip: float | None = None  # C_c
    notes: dict = field(default_factory=dict)

    def history(self) -> list[tuple[float, float, int]]:
        return [(self.router_sigma, self.router_rate, 1), (self.classifier_sigma, 1.0, 1),
                (self.sigma, self.sample_rate, self.steps)]

    def epsilon(self) -> float:
        return epsilon_of(self.history(), self.dp.delta)


def plan(dp: DPConfig, n_windows: int, batch_size: int, steps: int, embed_docs: int, seq_len: int) -> DPPlan:
    """Derive every noise multiplier for `steps` DP-SGD steps over `n_windows` windows
    (InputError for a sampling rate out of range or a target out of reach)."""
    if n_windows < batch_size:
        raise InputError(f"the source has only {n_windows} windows of {seq_len + 1} tokens, fewer than the batch size "
                         f"{batch_size}: the sampling rate would exceed 1; add documents or use a smaller batch")
    q = batch_size / n_windows
    if q * n_windows < 1:
        raise InputError(f"sampling rate {q:.3g} gives fewer than one window per step on average")
    q_r = min(1.0, embed_docs / n_windows)
    if dp.epsilon is None:  # a fixed sigma: the router row and classifier use it too
        s = dp.noise_multiplier
        return DPPlan(dp, n_windows, seq_len, batch_size, steps, q, s, q_r, s, s)
    s_r = solve_sigma(dp.router_share * dp.epsilon, dp.delta, q_r, 1)
    s_c = solve_sigma(dp.classifier_share * dp.epsilon, dp.delta, 1.0, 1)
    s = solve_sigma(dp.epsilon, dp.delta, q, steps, fixed=[(s_r, q_r, 1), (s_c, 1.0, 1)])
    return DPPlan(dp, n_windows, seq_len, batch_size, steps, q, s, q_r, s_r, s_c)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The fixed partition of a token stream into (N, seq_len + 1) windows (the unit of privacy)."""
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].view(n, seq_len + 1)


def poisson_sample(n: int, rate: float, g: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: each of n items independently with probability `rate`."""
    return (torch.rand(n, generator=g) < rate).nonzero().flatten()


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """Noise and sampling come from the operating system's secret randomness, never from the
    run's (published) seed: whoever holds the package cannot regenerate them. On `device`, so
    that DP-SGD's noise is drawn where the gradients are."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def gaussian_sum(rows: torch.Tensor, clip: float, sigma: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian mechanism on a sum: each row of (n, D) scaled to L2 norm <= clip, summed,
    plus N(0, (sigma clip)^2) per coordinate. Returns (noisy sum (D,), the noise added)."""
    rows = rows.double()
    factor = (clip / rows.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
    noise = (torch.randn(rows.size(1), generator=g, dtype=torch.float64, device=g.device) * (sigma * clip)).to(rows.device)
    return (rows * factor[:, None]).sum(0) + noise, noise


# ---------------------------------------------------------------------------------------
# per-sample gradients


def clip_sample(grads: list[torch.Tensor], max_grad_norm: float) -> tuple[list[torch.Tensor], float]:
    """One sample's gradients scaled to total L2 norm at most C; returns (clipped, the raw norm)."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    factor = min(1.0, max_grad_norm / (norm + 1e-6))
    return [g * factor for g in grads], norm


def per_sample_grads(model, loss_fn, params: list[torch.nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                     frozen_rows: list[int]) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """The reference loop: (gradients, loss) of each window, one backward each, frozen rows zeroed."""
    for i in range(x.size(0)):
        loss = loss_fn(model, x[i : i + 1], y[i : i + 1])
        grads = [_zero_rows(g, frozen_rows) for g in torch.autograd.grad(loss, params)]
        yield grads, loss.detach()


def _zero_rows(g: torch.Tensor, rows: list[int]) -> torch.Tensor:
    g = g.clone()
    g[rows] = 0
    return g


def _dense_forward(self, hidden_states, top_k_index, top_k_weights):
    """Every expert on every token, weighted by the top-k weights (0 for unselected experts)."""
    w = torch.zeros(hidden_states.size(0), self.num_experts, dtype=top_k_weights.dtype,
                    device=hidden_states.device).scatter(1, top_k_index, top_k_weights)  # (N, E)
    gate, up = torch.einsum("nh,eoh->neo", hidden_states, self.gate_up_proj).chunk(2, dim=-1)  # (N, E, I)
    out = torch.einsum("nei,ehi->neh", self.act_fn(gate) * up, self.down_proj)  # (N, E, H)
    return (out * w[..., None].to(out.dtype)).sum(1)


@contextlib.contextmanager
def dense_experts(model):
    """Within: the model's experts run densely (vmap-able) and attention is eager."""
    module = as_module(model)
    experts = [layer.mlp.experts for layer in module.model.layers]
    attn = module.config._attn_implementation
    for e in experts:
        e.forward = types.MethodType(_dense_forward, e)
    module.set_attn_implementation("eager")  # sdpa has no vmap batching rule on CPU (a per-sample loop)
    try:
        yield module
    finally:
        for e in experts:
            del e.forward
        module.set_attn_implementation(attn)


def vmap_grads(model, params: list[torch.nn.Parameter], frozen_rows: list[int], x: torch.Tensor, y: torch.Tensor,
               z_coef: float = 0.0, chunk: int = 16, autocast=contextlib.nullcontext) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample gradients of the trainable rows (`torch.func.vmap(grad(...))`): a list of
    (B, n_trainable_rows, ...) tensors, one per param, and the per-sample losses (B,).
    Loss: next-token cross-entropy + z_coef x router z-loss (the owner recipe's loss), in float32;
    `autocast()` wraps the model's forward pass (the Trainer's, for bfloat16)."""
    from torch.func import functional_call, grad, vmap

    module = as_module(model)
    names = {id(p): n for n, p in module.named_parameters()}
    E = params[0].size(0)
    train = [r for r in range(E) if r not in set(frozen_rows)]
    live = [p.detach()[train] for p in params]  # what the function differentiates

    def full(p, t):  # the param with its trainable rows replaced by t, in row order
        parts, j = [], 0
        for r in range(E):
            if r in train:
                parts.append(t[j : j + 1]); j += 1
            else:
                parts.append(p.detach()[r : r + 1])
        return torch.cat(parts)

    def loss(ts, xi, yi):
        logits = []
        hooks = [r.register_forward_hook(lambda _m, _i, out: logits.append(out[0])) for r in routers(module)]
        try:
            with autocast():
                out = functional_call(module, {names[id(p)]: full(p, t) for p, t in zip(params, ts)}, (xi[None],),
                                      {"use_cache": False}).logits[0]
            out = out.float()
        finally:
            for h in hooks:
                h.remove()
        ce = F.cross_entropy(out, yi)
        z = torch.stack([torch.logsumexp(lg.float(), -1).pow(2).mean() for lg in logits]).mean() if z_coef else 0.0
        return ce + z_coef * z, ce.detach()

    per = [[] for _ in params]
    losses = []
    with dense_experts(module):
        for b in range(0, x.size(0), chunk):
            g, ce = vmap(grad(loss, has_aux=True), in_dims=(None, 0, 0))(live, x[b : b + chunk], y[b : b + chunk])
            for acc, gi in zip(per, g):
                acc.append(gi)
            losses.append(ce)
    return [torch.cat(a) for a in per], torch.cat(losses)


def clip_factors(per: list[torch.Tensor], max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample scale factors min(1, C / ||g_i||) over all params, and the raw norms (B,)."""
    sq = sum(g.double().pow(2).flatten(1).sum(1) for g in per)
    norms = sq.sqrt()
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0), norms


class DPStep(Callback):
    """DP-SGD in place of the plain backward: per-sample gradients (vmap), clipping to C,
    Gaussian noise of std sigma C on the trainable rows, divided by the batch size (`p.grad`).

    With a `plan` and the `windows`, each step draws its own Poisson sample of the windows
    (the Trainer's fixed-size batch is ignored) and divides by the expected batch size q N;
    without, it uses the batch given and divides by its size (tests, benchmarks)."""

    def __init__(self, dp: DPConfig, params: list[torch.nn.Parameter], frozen_rows: list[int], *,
                 plan: DPPlan | None = None, windows: torch.Tensor | None = None, z_coef: float = 0.0):
        self.dp, self.params, self.frozen_rows, self.plan, self.windows = dp, params, frozen_rows, plan, windows
        self.sigma = plan.sigma if plan is not None else (dp.noise_multiplier or 0.0)
        self.z_coef = z_coef
        self.g_noise = secret_generator()
        self.g_sample = secret_generator()
        self.batch_sizes: list[int] = []
        self.last_loss = torch.tensor(float("nan"))

    def pre_train(self, tr: Trainer) -> None:
        if tr.d.enabled:
            raise InputError("DP-SGD training runs in one process; run it without torchrun")
        self.g_noise = secret_generator(tr.device)  # the noise is drawn where the gradients are

    def backward(self, tr: Trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        C, denom, x0, y0 = self.dp.max_grad_norm, x.size(0), x, y
        if self.plan is not None and self.windows is not None:
            batch = self.windows[poisson_sample(len(self.windows), self.plan.sample_rate, self.g_sample)].to(x.device)
            x, y, denom = batch[:, :-1], batch[:, 1:], self.plan.sample_rate * len(self.windows)
        self.batch_sizes.append(x.size(0))
        train = [r for r in range(self.params[0].size(0)) if r not in set(self.frozen_rows)]
        summed = [torch.zeros_like(p[train]) for p in self.params]
        if x.size(0):
            per, losses = vmap_grads(tr.model, self.params, self.frozen_rows, x, y, self.z_coef, autocast=tr.autocast)
            factor, _ = clip_factors(per, C)
            summed = [torch.einsum("b,b...->...", factor.to(g.dtype), g) for g in per]
            self.last_loss = losses.mean()
        elif self.last_loss.isnan():  # an empty first batch: a loss for the curve only, no gradient
            with torch.no_grad(), tr.autocast():
                self.last_loss = lm_loss(tr.model, x0, y0)
        for p, s in zip(self.params, summed):
            noise = torch.randn(s.shape, generator=self.g_noise, dtype=s.dtype, device=self.g_noise.device) * (self.sigma * C)
            grad = torch.zeros_like(p)
            grad[train] = (s + noise.to(s.device)) / denom  # noise on the trainable rows only
            p.grad = grad
        return self.last_loss


def privacy_report(p: DPPlan) -> dict:
    """The card's privacy section: the guarantee, the mechanisms and how the budget is split."""
    dp = p.dp
    eps = p.epsilon()
    alone = lambda s, q, n: round(epsilon_of([(s, q, n)], dp.delta), 4)  # noqa: E731
    return {
        "dp": True,
        "epsilon": eps,
        "delta": dp.delta,
        "target_epsilon": dp.epsilon,
        "noise_multiplier": p.sigma,
        "max_grad_norm": dp.max_grad_norm,
        "sample_rate": p.sample_rate,
        "steps": p.steps,
        "accountant": "opacus RDPAccountant",
        "rdp_orders": f"Opacus' defaults plus {ALPHAS[-9:]}",
        "sampling": f"Poisson: each step takes each of the {p.n_windows} windows independently with probability "
                    f"{p.sample_rate:.4g} (variable batch size, expected {p.batch_size}); the accountant's assumption",
        "unit": f"one window of {p.seq_len + 1} consecutive tokens of the source's training stream (a fixed partition); "
                "a document spanning k windows is protected at group size k",
        "covers": "the whole package: expert FFN, router row (its start and training), router bias, domain classifier",
        "budget_split": {
            "router_row": {"mechanism": "Poisson-sampled windows' mean final hidden state, each clipped to C_r, "
                                        "summed + Gaussian noise, / expected count", "noise_multiplier": p.router_sigma,
                           "sample_rate": p.router_rate, "clip": p.router_clip, "noise_std_of_sum": _std(p.router_sigma, p.router_clip),
                           "epsilon_alone": alone(p.router_sigma, p.router_rate, 1), "share_of_target": dp.router_share},
            "classifier": {"mechanism": "every window's token-count vector clipped to L2 norm C_c, summed + Gaussian "
                                        "noise per token id", "noise_multiplier": p.classifier_sigma, "sample_rate": 1.0,
                           "clip": p.classifier_clip, "noise_std": _std(p.classifier_sigma, p.classifier_clip),
                           "epsilon_alone": alone(p.classifier_sigma, 1.0, 1), "share_of_target": dp.classifier_share},
            "dp_sgd": {"mechanism": "per-sample gradients of the expert's own slices (torch.func vmap), clipped to C, "
                                    "summed + Gaussian noise, / expected batch size", "noise_multiplier": p.sigma,
                       "epsilon_alone": alone(p.sigma, p.sample_rate, p.steps)},
            "composed": "the three in Opacus' RDP accountant: epsilon above (at most the target)",
        },
        "noise_seed": "secret (operating-system randomness), not recorded; Poisson sampling likewise",
        "not_covered": "the loss curve in this card (means over DP-SGD batches, for the owner; strip it before "
                       "publishing) and the number of windows (the dataset size, public as usual in DP-SGD); "
                       "own-text routing shares are not measured under DP",
        **p.notes,
    }


def _std(sigma: float, clip: float | None) -> float | None:
    return None if clip is None else sigma * clip
