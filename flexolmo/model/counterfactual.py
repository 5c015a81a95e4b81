"""Counterfactual log-probs at a fraction of a full pass per expert, exactly: the FlexOlmo decoder
run layer by layer so that each expert-off row recomputes only what switching its expert off changes.

    base = base_window(model, ids, need, targets)    # routing + base log-probs + what rows reuse
    lp = expert_off_rows(model, base, [1, 4, 6])      # (3, K) log-probs with each expert off
    bases = base_windows(model, [(ids, need, targets), ...])  # several windows' bases, one batched pass

`flexolmo/model/passes.py` (`model_passes`) calls these per model window: one window is one model call over T tokens
(positions 0..T-1, cut after the last needed one) whose next-token log-probs are wanted at K
"needed" positions (the kept spans' tokens); its base passes run batched (`base_windows`: the
windows right-padded to the longest, each decoder layer once over all of them, the MoE on real
positions only), its expert-off rows one window at a time. A row with expert e switched off skips, exactly (up
to float rounding):

- **the prefix**: positions before the first one at which any layer's router chose e are
  unchanged at every layer (causal attention, per-token routing), except that the other experts'
  weights are rescaled by 1/(1 - p_e), which the MoE output's RMSNorm removes up to its eps
  (flexolmo/model/scale.py); `WindowBase.start` reuses the prefix only where the eps cannot show.
- **layer 0's attention**: its input is the embedding, the same in every row. Its MoE output is
  the base's times 1/(1 - p_e) where the router did not choose e; where it did, the other k - 1
  experts' outputs are the base's (kept per slot) and only the expert that enters the top-k runs.
- **the last layer away from needed positions**: its keys and values are computed from its input
  at every position, but queries, attention output, MoE, final norm and vocabulary projection
  only at the needed positions.

Layers 1..L-2 are recomputed from the row's start on: with top-4 of 8 every expert is chosen in a
window's first tokens, so in a 4-layer model a row costs about half a full pass. The expert-off
mask is per row ((B, E) additive -inf on the router logits); the MoE runs each expert once over the
tokens that chose it (grouped by expert, as transformers' `grouped_mm` path does). Rows that start
at position 0 (with top-4 of 8, every row on the trained model) attend as a whole window: plain
causal attention, none of the base's keys kept.

`expert_off_rows(..., positions=...)` recomputes given positions only, the others keeping the
base's keys and values: exact when they are all positions from the start on (the default). A
"local" approximation (only each needed position and C before it) was measured and is not
offered: on an 8-expert model upcycled from the trained public model, C = 16 halved the cost
with a mean |error| of 3% of the mean |drop| (max 0.03 nats); on a random model the error was
60% of the drop at every C tried, up to 64 (attention spreads a change over the whole window).

The layer is transformers' `FlexOlmoDecoderLayer` (OLMo 2 post-norm, QK-norm over the full
projection, RoPE), re-stated over its own submodules; tests/test_counterfactual.py checks it
against the module's forward (logits and routing), so that a change upstream fails loudly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.flex_olmo.modeling_flex_olmo import repeat_kv, rotate_half

from flexolmo.model.moe import Check, FlexRouter, as_module, no_check

SCALE_TOL = 1e-6  # largest relative change of a normed MoE output that prefix reuse may ignore


@dataclass
class WindowBase:
    """The base run (nothing more switched off) of one window: what the expert-off rows reuse."""

    ids: torch.Tensor  # (T,) the window's input tokens
    need: torch.Tensor  # (K,) positions (0..T-1) whose next-token log-prob is wanted, ascending
    targets: torch.Tensor  # (K,) the tokens predicted there
    keys: list[torch.Tensor]  # per layer (Hkv, T, D) after k_norm and RoPE
    values: list[torch.Tensor]  # per layer (Hkv, T, D)
    mid0: torch.Tensor  # (T, H) layer 0's residual after attention: the input of its MoE
    moe0: torch.Tensor  # (T, H) layer 0's MoE output before its norm
    slots0: torch.Tensor  # (T, k, H) layer 0's chosen experts' outputs, unweighted, in top-k order
    probs0: torch.Tensor  # (T, E) float32 layer 0's router probabilities
    experts: torch.Tensor  # (T, L, k) top-k experts per position and layer (last layer: at `need` only, else -1)
    weights: torch.Tensor  # (T, L, k) float32 their weights (0 where not computed)
    logprobs: torch.Tensor  # (K,) float32 base log-probs of the targets
    scale_safe: int  # before this position the norm hides a rescaled MoE output (see `start`)

    def start(self, e: int) -> int:
        """Where a row with expert e switched off starts to differ: the first position at which
        some layer's router chose e (T if none), but no later than `scale_safe`.

        Before it the other experts' weights are only rescaled by 1/(1 - p_e); the relative change
        of the normed MoE output is then at most eps / (2 mean(y^2)). In a trained model mean(y^2)
        is tens (flexolmo/model/scale.py), in a freshly initialised one it is near eps:
        `scale_safe` is the first position where that bound exceeds SCALE_TOL at some layer."""
        hit = (self.experts == e).any(dim=2).any(dim=1).nonzero()
        return min(int(hit[0, 0]) if len(hit) else len(self.ids), self.scale_safe)


def base_window(model, ids: list[int], need: list[int], targets: list[int], check: Check = no_check) -> WindowBase:
    """Run one window with nothing more switched off; keep routing, base log-probs and the state
    the expert-off rows reuse (`base_windows` of this one window).

    :param ids: the window's input tokens (T,): nothing after the last needed position
    :param need: positions p (0..T-1, ascending) whose log p(targets[i] | ids[:p + 1]) is wanted
    :param targets: the token predicted at each needed position
    :param check: called before every decoder layer; raises to stop the pass (a deadline)
    """
    return base_windows(model, [(ids, need, targets)], check)[0]


@torch.no_grad()
def base_windows(model, windows: list[tuple[list[int], list[int], list[int]]], check: Check = no_check) -> list[WindowBase]:
    """`base_window` of several windows (ids, need, targets) in one batched pass: each decoder
    layer runs once over all of them, the windows right-padded to the longest. Causal attention
    and per-token routing keep every window's positions what its own pass gives (the padding comes
    after them and is attended by no real position); the MoE runs on real positions only.
    """
    m = as_module(model)
    dev = next(m.parameters()).device
    layers = m.model.layers
    B, L = len(windows), len(layers)
    lens = [len(ids) for ids, _, _ in windows]
    T, N = max(lens), sum(lens)
    x_ids = torch.zeros((B, T), dtype=torch.long, device=dev)
    for b, (ids, _, _) in enumerate(windows):
        x_ids[b, : lens[b]] = torch.tensor(ids, device=dev)
    needs = [torch.tensor(need, device=dev, dtype=torch.long) for _, need, _ in windows]
    off = [0] + list(itertools.accumulate(lens))  # window b's rows in the real positions: off[b]..off[b + 1]
    koff = [0] + list(itertools.accumulate(len(n) for n in needs))  # and in the needed positions
    padded = N < B * T
    real = (torch.arange(T, device=dev)[None] < torch.tensor(lens, device=dev)[:, None]).view(-1).nonzero()[:, 0] \
        if padded else None  # (N,) real positions in the flattened (B T) batch
    need_rows = torch.cat([off[b] + n for b, n in enumerate(needs)])  # (K,) needed positions among the real ones
    q_need = torch.zeros((B, max(len(n) for n in needs)), dtype=torch.long, device=dev)  # (B, Kmax), padded with 0
    for b, n in enumerate(needs):
        q_need[b, : len(n)] = n
    q_rows = torch.cat([b * q_need.shape[1] + torch.arange(len(n), device=dev) for b, n in enumerate(needs)])
    H = m.config.hidden_size
    k = _k(layers[0].mlp.gate, 0)
    experts = torch.full((N, L, k), -1, dtype=torch.long, device=dev)
    weights = torch.zeros((N, L, k), device=dev)
    cos, sin = m.model.rotary_emb(x_ids.float(), torch.arange(T, device=dev)[None])
    x = m.model.embed_tokens(x_ids)  # (B, T, H)
    keys, values, first = [], [], {}
    every = torch.arange(T, device=dev)
    loud = torch.zeros(N, dtype=torch.bool, device=dev)  # positions where the norm's eps could show a rescale
    for li, layer in enumerate(layers):
        check()
        last = li == L - 1 and L > 1  # a one-layer model keeps layer 0 whole (the rows reuse it)
        h, kk, vv = _attention(layer.self_attn, x, every, cos, sin, None, None, q_need if last else None)
        keys.append(kk)
        values.append(vv)
        xs = x.reshape(B * T, H)
        if last:  # the needed positions only (K, H)
            xs, h = (xs[real] if padded else xs)[need_rows], h.reshape(-1, H)[q_rows]
        elif padded:  # the real positions (N, H)
            xs, h = xs[real], h.reshape(B * T, H)[real]
        else:
            h = h.reshape(B * T, H)
        mid = xs + layer.post_attention_layernorm(h)
        idx, w, probs = _route(layer.mlp.gate, mid, None, k)
        if li == 0:  # the rows reuse layer 0's experts' outputs, unweighted
            slots = _expert_outputs(layer.mlp.experts, mid, idx)  # (|at|, k, H)
            moe = (slots * w[..., None]).sum(1)
        else:
            moe = _expert_outputs(layer.mlp.experts, mid, idx, w)
        at = need_rows if last else slice(None)
        experts[at, li], weights[at, li] = idx, w.float()
        out = mid + layer.post_feedforward_layernorm(moe)
        eps = layer.post_feedforward_layernorm.variance_epsilon
        loud[at] |= eps / (2 * moe.float().pow(2).mean(-1)) > SCALE_TOL
        if li == 0:
            first = dict(mid0=mid, moe0=moe, slots0=slots, probs0=probs)
        if last:
            x = out
        elif padded:  # padding positions: zero, finite, attended by no real position
            x = x.new_zeros(B * T, H).index_copy_(0, real, out).view(B, T, H)
        else:
            x = out.view(B, T, H)
    if L == 1:
        x = x.reshape(B * T, H)[real][need_rows] if padded else x.reshape(B * T, H)[need_rows]
    lp = _logprobs(m, x, torch.tensor([t for _, _, ts in windows for t in ts], device=dev, dtype=torch.long))
    out = []
    for b, (ids, _, targets) in enumerate(windows):
        r, kr = slice(off[b], off[b + 1]), slice(koff[b], koff[b + 1])
        safe = loud[r].nonzero()
        out.append(WindowBase(
            ids=x_ids[b, : lens[b]], need=needs[b], targets=torch.tensor(targets, device=dev),
            keys=[kk[b, :, : lens[b]] for kk in keys], values=[vv[b, :, : lens[b]] for vv in values],
            experts=experts[r], weights=weights[r], logprobs=lp[kr],
            scale_safe=int(safe[0, 0]) if len(safe) else lens[b], **{n: t[r] for n, t in first.items()}))
    return out


@torch.no_grad()
def expert_off_rows(model, base: WindowBase, rows: list[int], positions: torch.Tensor | None = None,
                    check: Check = no_check) -> torch.Tensor:
    """(B, K) float32 log-probs of the base's targets, row b with expert rows[b] switched off
    (on top of those already off).

    :param positions: window positions to recompute, ascending (None: exact, every position
        from the rows' first `start` on). Others keep the base's state: exact before the start,
        an approximation elsewhere. Needed positions outside it keep the base's log-prob.
    :param check: called before every decoder layer; raises to stop the pass (a deadline)
    """
    m = as_module(model)
    layers = m.model.layers
    dev = base.ids.device
    T, L, B = len(base.ids), len(layers), len(rows)
    if positions is None:
        positions = torch.arange(min(base.start(e) for e in rows), T, device=dev)
    out = base.logprobs[None].repeat(B, 1)  # (B, K): needed positions not recomputed are unchanged
    live = torch.isin(base.need, positions).nonzero()[:, 0]  # needed positions recomputed
    if not len(live):
        return out
    rows_t = torch.tensor(rows, device=dev)
    off = torch.zeros(B, layers[0].mlp.gate.num_experts, device=dev, dtype=base.mid0.dtype)
    off[torch.arange(B, device=dev), rows_t] = float("-inf")  # (B, E) per-row mask
    k = _k(layers[0].mlp.gate, 1)
    cos, sin = m.model.rotary_emb(base.mid0[None], torch.arange(T, device=dev)[None])

    check()
    x = _layer0(layers[0], base, rows_t, positions, k)  # (B, P, H)
    q_at = torch.searchsorted(positions, base.need[live])  # (K',) needed positions' rows in x
    whole = len(positions) == T  # positions 0..T-1: no base keys to keep, plain causal attention
    for li in range(1, L):
        check()
        layer = layers[li]
        last = li == L - 1
        pk = pv = None  # every position recomputed (the rows start at 0): x is the whole window
        if not whole:
            pk = base.keys[li][None].expand(B, -1, -1, -1)  # (B, Hkv, T, D): the base's where not recomputed
            pv = base.values[li][None].expand(B, -1, -1, -1)
        h, _, _ = _attention(layer.self_attn, x, positions, cos, sin, pk, pv, base.need[live] if last else None)
        mid = (x[:, q_at] if last else x) + layer.post_attention_layernorm(h)  # (B, P or K', H)
        flat = mid.reshape(-1, mid.shape[-1])
        idx, w, _ = _route(layer.mlp.gate, flat, off.repeat_interleave(mid.shape[1], dim=0), k)
        moe = _expert_outputs(layer.mlp.experts, flat, idx, w)
        x = mid + layer.post_feedforward_layernorm(moe.view_as(mid))
    if L == 1:
        x = x[:, q_at]
    n = len(live)
    out[:, live] = _logprobs(m, x.reshape(B * n, -1), base.targets[live].repeat(B)).view(B, n)
    return out


def _layer0(layer, base: WindowBase, rows: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Layer 0's output (B, P, H) at `positions` for rows with expert rows[b] off. Its attention is
    the base's; where the router did not choose the row's expert e, the top-k stays and the
    weights are the base's / (1 - p_e) (the softmax without e; unchanged under norm_topk_prob);
    where it chose e, the new top-k reuses the base's expert outputs and runs only the entrant."""
    gate = layer.mlp.gate
    mid = base.mid0[positions]  # (P, H)
    p_e = base.probs0[positions][:, rows].T  # (B, P)
    scale = torch.ones_like(p_e) if gate.norm_topk_prob else 1 / (1 - p_e)
    y = base.moe0[positions][None] * scale[..., None].to(mid.dtype)  # (B, P, H)
    base_idx = base.experts[positions, 0]  # (P, k0)
    b_i, t_i = (base_idx[None] == rows[:, None, None]).any(-1).nonzero(as_tuple=True)  # (N,) rows, positions
    if len(b_i):
        probs = base.probs0[positions[t_i]].clone()  # (N, E)
        probs[torch.arange(len(b_i), device=mid.device), rows[b_i]] = -1.0  # switched off: never in the top-k
        w, idx = torch.topk(probs, k, dim=-1)  # (N, k): the softmax without e is probs / (1 - p_e)
        w = w / w.sum(-1, keepdim=True) if gate.norm_topk_prob else w / (1 - p_e[b_i, t_i])[:, None]
        match = idx[:, :, None] == base_idx[t_i][:, None, :]  # (N, k, k0): expert already run by the base
        outs = base.slots0[positions[t_i]].gather(1, match.float().argmax(-1)[..., None].expand(-1, -1, mid.shape[1]))
        new = ~match.any(-1)  # (N, k): the entrant(s)
        if new.any():
            n_i, s_i = new.nonzero(as_tuple=True)
            outs[n_i, s_i] = _expert_outputs(layer.mlp.experts, mid[t_i[n_i]], idx[n_i, s_i, None])[:, 0]
        y[b_i, t_i] = (outs * w[..., None].to(mid.dtype)).sum(1)
    return mid[None] + layer.post_feedforward_layernorm(y)


def _attention(attn, x: torch.Tensor, at: torch.Tensor, cos, sin, past_k, past_v, q_pos):
    """FlexOlmoAttention for hidden states x (B, P, H) at window positions `at` (P,), the other
    positions' keys and values taken from past_k/past_v (B, Hkv, T, D) (None: x is the whole
    window); queries at positions q_pos (Q,) or (B, Q) (a subset of `at`; None: all of `at`).
    Returns the projected output (B, Q, H) and the keys and values of `at` (B, Hkv, P, D)."""
    B, P, _ = x.shape
    D = attn.head_dim
    if q_pos is None:
        q_pos, xq = at, x
    elif q_pos.dim() == 1:
        xq = x[:, torch.searchsorted(at, q_pos)]
    else:
        xq = x[torch.arange(B, device=x.device)[:, None], torch.searchsorted(at, q_pos)]
    Q = q_pos.shape[-1]
    q = attn.q_norm(attn.q_proj(xq)).view(B, Q, -1, D).transpose(1, 2)  # (B, Hq, Q, D)
    k = attn.k_norm(attn.k_proj(x)).view(B, P, -1, D).transpose(1, 2)  # (B, Hkv, P, D)
    v = attn.v_proj(x).view(B, P, -1, D).transpose(1, 2)
    q = _rope(q, cos[0][q_pos], sin[0][q_pos])
    k = _rope(k, cos[0][at], sin[0][at])
    keys, vals = k, v
    if past_k is not None:
        keys, vals = past_k.clone(), past_v.clone()
        keys[:, :, at], vals[:, :, at] = k, v
        keys, vals = keys[:, :, : int(at[-1]) + 1], vals[:, :, : int(at[-1]) + 1]  # nothing later is attended
    g = attn.num_key_value_groups
    if past_k is None and q_pos is at:  # the whole window: plain causal attention
        o = F.scaled_dot_product_attention(q, repeat_kv(keys, g), repeat_kv(vals, g), is_causal=True, scale=attn.scaling)
    else:
        kpos = at if past_k is None else torch.arange(keys.shape[2], device=x.device)
        mask = kpos <= q_pos[..., None]  # (Q, S) or (B, Q, S) causal
        mask = mask[:, None] if mask.dim() == 3 else mask
        o = F.scaled_dot_product_attention(q, repeat_kv(keys, g), repeat_kv(vals, g), attn_mask=mask, scale=attn.scaling)
    return attn.o_proj(o.transpose(1, 2).reshape(B, Q, -1)), k, v


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' `apply_rotary_pos_emb` on one of q, k (B, heads, P, D), with cos/sin (P, D) or (B, P, D),
    in x's dtype."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return ((x * cos) + (rotate_half(x) * sin)).to(x.dtype)


def _k(gate: FlexRouter, more_off: int) -> int:
    """Experts per token with `more_off` more experts switched off (as `FlexRouter.forward`)."""
    assert isinstance(gate, FlexRouter), "expects flexolmo.model.moe.FlexRouter routers"
    return min(gate.top_k, gate.n_on - more_off)


def _route(gate: FlexRouter, x: torch.Tensor, off: torch.Tensor | None, k: int):
    """`FlexRouter.forward` on tokens x (N, H), plus a per-token mask `off` (N, E) of experts
    switched off for that token's row. Returns top-k experts (N, k), their weights (N, k) in
    x's dtype and the router probabilities (N, E) in float32."""
    logits = F.linear(x, gate.weight) + gate.bias + gate.off  # (N, E)
    if off is not None:
        logits = logits + off
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    if gate.norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w.to(x.dtype), probs


def _expert_outputs(ex, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Outputs of experts idx (N, k) on tokens x (N, H) of a layer's fused experts (gate_up_proj
    (E, 2I, H), down_proj (E, H, I)): each expert runs once, on its tokens. Unweighted (N, k, H) in
    top-k order; with weights w (N, k), their weighted sum (N, H)."""
    N, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (N k,) token-slot pairs grouped by expert
    counts = torch.bincount(flat, minlength=ex.num_experts).tolist()
    tokens = order // k
    scale = None if w is None else w.reshape(-1)[order]  # (N k,) each pair's weight, grouped by expert
    out = x.new_empty(N * k, x.shape[-1])
    i = 0
    for e, c in enumerate(counts):
        if c:
            gate, up = F.linear(x.index_select(0, tokens[i: i + c]), ex.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(ex.act_fn(gate).mul_(up), ex.down_proj[e])  # act_fn returns a new tensor
            out.index_copy_(0, order[i: i + c], y if scale is None else y.mul_(scale[i: i + c, None]))
            i += c
    return out.view(N, k, -1) if w is None else out.view(N, k, -1).sum(1)


def _logprobs(m, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) (K,) in float32 from the last layer's output x (K, H)."""
    logits = m.lm_head(m.model.norm(x)).float()
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
