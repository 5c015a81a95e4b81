"""Counterfactual drops at a fraction of a full pass per expert, exactly: the FlexOlmo decoder run
layer by layer so that each expert-off row recomputes only what switching its expert off changes.

    base = base_window(model, window_ids, need)            # routing + base log-probs + what rows reuse
    lp = expert_off_rows(model, base, rows=[1, 4, 6])      # (3, K) log-probs with each expert off

`tracing/experts.py` calls these per model window. One window is one model call over
seq[a:b] (positions 0..T-1) whose log-probs are wanted at K "needed" positions (the kept spans'
tokens). What a row with expert e switched off can skip, exactly (up to float rounding):

- **the prefix**: positions before the first one at which any layer's router put e in its top-k
  are unchanged at every layer (causal attention, per-token routing; switching e off rescales the
  other experts' weights by 1/(1 - p_e), which the post-norm RMSNorm of the MoE output removes up
  to its eps: flexolmo/model/scale.py). Rows start at their chunk's first such position, with the
  base pass's keys and values before it.
- **layer 0's attention, and its MoE where e was not chosen**: the layer's input is the
  embedding, the same in every row, so its attention output is the base's and its MoE output
  changes only at the tokens where layer 0 chose e (about k/E of them).
- **the last layer away from needed positions**: its keys and values are computed from its input
  at every position, but queries, attention output, MoE, final norm and vocabulary projection only
  at the needed positions.

Everything between (layers 1..L-2 from the row's start on) is recomputed; the expert-off mask is
per row (a (B, E) additive -inf mask on the router logits), the MoE runs each expert once on the
tokens that chose it (grouped, as transformers' `grouped_mm` does).

The layer is transformers' `FlexOlmoDecoderLayer` (OLMo 2 post-norm, QK-norm over the full
projection, RoPE), re-stated here over its own submodules and weights; tests/test_counterfactual.py
checks it against the module's forward (logits and routing) so that a change upstream fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.flex_olmo.modeling_flex_olmo import apply_rotary_pos_emb, repeat_kv

from flexolmo.model.moe import FlexRouter, as_module

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
    probs0: torch.Tensor  # (T, E) float32 layer 0's router probabilities
    out0: torch.Tensor  # (T, H) layer 0's output
    experts: torch.Tensor  # (T, L, k) top-k experts per position and layer (last layer: at `need` only, else -1)
    weights: torch.Tensor  # (T, L, k) their weights (0 where not computed)
    logprobs: torch.Tensor  # (K,) float32 base log-probs of the targets
    scale_safe: int  # positions before this one hide a rescaled MoE output under the norm (see `start`)

    def start(self, e: int) -> int:
        """Where a row with expert e switched off starts to differ: the first position at which
        some layer's router chose e (T if none), but no later than `scale_safe`.

        Before it the other experts' weights are only rescaled by 1/(1 - p_e), which the MoE
        output's RMSNorm removes up to its eps: the relative change of the normed output is at
        most eps / (2 mean(y^2)). In a trained model mean(y^2) is tens (flexolmo/model/scale.py),
        in a freshly initialised one it is near eps; `scale_safe` is the first position where the
        bound exceeds SCALE_TOL at some layer, so the prefix is reused only where it is exact."""
        hit = (self.experts == e).any(dim=2).any(dim=1).nonzero()
        return min(int(hit[0, 0]) if len(hit) else len(self.ids), self.scale_safe)


@torch.no_grad()
def base_window(model, ids: list[int], need: list[int], targets: list[int]) -> WindowBase:
    """Run one window with nothing more switched off; keep routing, base log-probs and the caches.

    :param ids: the window's input tokens (T,): nothing after the last needed position
    :param need: positions p (0..T-1, ascending) whose log p(targets[i] | ids[:p + 1]) is wanted
    :param targets: the token predicted at each needed position
    """
    m = as_module(model)
    dev = next(m.parameters()).device
    x_ids = torch.tensor(ids, device=dev)
    need_t = torch.tensor(need, device=dev, dtype=torch.long)
    tgt = torch.tensor(targets, device=dev, dtype=torch.long)
    layers = m.model.layers
    T, L = len(ids), len(layers)
    gate = layers[0].mlp.gate
    k = min(gate.top_k, gate.n_on)
    experts = torch.full((T, L, k), -1, dtype=torch.long, device=dev)
    weights = torch.zeros((T, L, k), device=dev)
    cos, sin = m.model.rotary_emb(x_ids[None].float(), torch.arange(T, device=dev)[None])
    x = m.model.embed_tokens(x_ids)[None]  # (1, T, H)
    keys, values = [], []
    mid0 = out0 = None
    loud = torch.zeros(T, dtype=torch.bool, device=dev)  # positions where the norm's eps could show a rescale
    for li, layer in enumerate(layers):
        last = li == L - 1 and L > 1  # a one-layer model keeps layer 0 whole (the rows reuse it)
        q_at = need_t if last else None
        h, kk, vv = _attention(layer.self_attn, x, cos, sin, 0, None, None, q_at)
        keys.append(kk[0])
        values.append(vv[0])
        res = x[:, need_t] if last else x
        mid = res + layer.post_attention_layernorm(h)
        moe, idx, w, probs = _moe(layer.mlp, mid.reshape(-1, mid.shape[-1]), None)
        rows = need_t if last else slice(None)
        experts[rows, li], weights[rows, li] = idx, w.float()
        x = mid + layer.post_feedforward_layernorm(moe.view_as(mid))
        eps = layer.post_feedforward_layernorm.variance_epsilon
        loud[rows] |= eps / (2 * moe.float().pow(2).mean(-1)) > SCALE_TOL
        if li == 0:
            mid0, moe0, probs0, out0 = mid[0], moe, probs, x[0]
    if L == 1:
        x = x[:, need_t]
    lp = _logprobs(m, x[0], tgt)
    return WindowBase(ids=x_ids, need=need_t, targets=tgt, keys=keys, values=values, mid0=mid0,
                      moe0=moe0, probs0=probs0, out0=out0, experts=experts, weights=weights, logprobs=lp,
                      scale_safe=int(loud.nonzero()[0, 0]) if loud.any() else T)


@torch.no_grad()
def expert_off_rows(model, base: WindowBase, rows: list[int], start: int | None = None) -> torch.Tensor:
    """(B, K) float32 log-probs of the base's targets, row b with expert rows[b] switched off
    (on top of those already off), recomputing from position `start` on (default: the rows'
    first choice; earlier positions are the base's, unchanged)."""
    m = as_module(model)
    layers = m.model.layers
    dev = base.ids.device
    T, L, B = len(base.ids), len(layers), len(rows)
    E = layers[0].mlp.gate.num_experts
    start = min(base.start(e) for e in rows) if start is None else start
    out = base.logprobs[None].repeat(B, 1)  # (B, K): needed positions before `start` are unchanged
    live = (base.need >= start).nonzero()[:, 0]  # needed positions that can change
    if not len(live):
        return out
    off = torch.zeros(B, E, device=dev, dtype=base.out0.dtype)
    off[torch.arange(B, device=dev), torch.tensor(rows, device=dev)] = float("-inf")  # (B, E) per-row mask
    n_on = layers[0].mlp.gate.n_on - 1
    cos, sin = m.model.rotary_emb(base.out0[None], torch.arange(T, device=dev)[None])
    cos, sin = cos[:, start:], sin[:, start:]

    # layer 0: attention as the base (same input). Where the router did not choose the row's
    # expert e, the top-k stays and the weights are the base's / (1 - p_e) (softmax without e;
    # unchanged under norm_topk_prob); where it chose e, the MoE is recomputed
    rows_t = torch.tensor(rows, device=dev)
    chose = (base.experts[start:, 0, :, None] == rows_t).any(dim=1).T  # (B, T - start)
    p_e = base.probs0[start:, rows_t].T  # (B, T - start)
    scale = torch.ones_like(p_e) if layers[0].mlp.gate.norm_topk_prob else 1 / (1 - p_e)
    y = base.moe0[None, start:] * scale[..., None].to(base.moe0.dtype)  # (B, T - start, H)
    b_idx, t_idx = chose.nonzero(as_tuple=True)
    if len(b_idx):
        y[b_idx, t_idx] = _moe(layers[0].mlp, base.mid0[start:][t_idx], off[b_idx], n_on)[0]
    x = base.mid0[None, start:] + layers[0].post_feedforward_layernorm(y)  # (B, T - start, H)

    q_at = base.need[live] - start  # (K', ) needed positions in the recomputed slice
    for li in range(1, L):
        layer = layers[li]
        last = li == L - 1
        pk = base.keys[li][None, :, :start].expand(B, -1, -1, -1)
        pv = base.values[li][None, :, :start].expand(B, -1, -1, -1)
        h, _, _ = _attention(layer.self_attn, x, cos, sin, start, pk, pv, q_at if last else None)
        res = x[:, q_at] if last else x
        mid = res + layer.post_attention_layernorm(h)
        flat = mid.reshape(-1, mid.shape[-1])
        moe = _moe(layer.mlp, flat, off.repeat_interleave(mid.shape[1], dim=0), n_on)[0]
        x = mid + layer.post_feedforward_layernorm(moe.view_as(mid))
    if L == 1:
        x = x[:, q_at]
    K = len(live)
    lp = _logprobs(m, x.reshape(B * K, -1), base.targets[live].repeat(B))
    out[:, live] = lp.view(B, K)
    return out


def _attention(attn, x: torch.Tensor, cos, sin, start: int, past_k, past_v, q_at):
    """FlexOlmoAttention over x (B, T', H) at positions start..start+T'-1, after cached keys and
    values (B, Hkv, start, D) of positions 0..start-1; queries only at rows `q_at` of x (None: all).
    Returns the projected output (B, Tq, H) and this call's keys and values (B, Hkv, T', D)."""
    B, Tn, _ = x.shape
    D = attn.head_dim
    xq = x if q_at is None else x[:, q_at]
    q = attn.q_norm(attn.q_proj(xq)).view(B, xq.shape[1], -1, D).transpose(1, 2)  # (B, Hq, Tq, D)
    k = attn.k_norm(attn.k_proj(x)).view(B, Tn, -1, D).transpose(1, 2)  # (B, Hkv, T', D)
    v = attn.v_proj(x).view(B, Tn, -1, D).transpose(1, 2)
    q_cos, q_sin = (cos, sin) if q_at is None else (cos[:, q_at], sin[:, q_at])
    q, _ = apply_rotary_pos_emb(q, q, q_cos, q_sin)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    keys = k if past_k is None or start == 0 else torch.cat([past_k, k], dim=2)
    vals = v if past_v is None or start == 0 else torch.cat([past_v, v], dim=2)
    g = attn.num_key_value_groups
    if q_at is None and start == 0:
        o = F.scaled_dot_product_attention(q, repeat_kv(keys, g), repeat_kv(vals, g), is_causal=True, scale=attn.scaling)
    else:
        qpos = start + (torch.arange(Tn, device=x.device) if q_at is None else q_at)  # (Tq,)
        mask = torch.arange(keys.shape[2], device=x.device)[None, :] <= qpos[:, None]  # (Tq, S) causal
        o = F.scaled_dot_product_attention(q, repeat_kv(keys, g), repeat_kv(vals, g), attn_mask=mask, scale=attn.scaling)
    o = o.transpose(1, 2).reshape(B, q.shape[2], -1)
    return attn.o_proj(o), k, v


def _moe(mlp, x: torch.Tensor, off: torch.Tensor | None, n_on: int | None = None):
    """The MoE block on tokens x (N, H): the router (`FlexRouter.forward`, plus a per-token mask
    `off` (N, E) of experts switched off for that token's row) then each expert once over the
    tokens that chose it. Returns (output (N, H), top-k experts (N, k), weights (N, k),
    router probabilities (N, E) float32)."""
    gate, ex = mlp.gate, mlp.experts
    assert isinstance(gate, FlexRouter), "expects flexolmo.model.moe.FlexRouter routers"
    logits = F.linear(x, gate.weight) + gate.bias + gate.off  # (N, E)
    if off is not None:
        logits = logits + off
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    k = min(gate.top_k, n_on if n_on is not None else gate.n_on)
    w, idx = torch.topk(probs, k, dim=-1)  # (N, k)
    if gate.norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    w = w.to(x.dtype)
    flat = idx.reshape(-1)  # (N k,) token-slot pairs, grouped by expert below
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=ex.num_experts).tolist()
    tok = order // k
    xs = x[tok]  # (N k, H)
    ys = torch.empty_like(xs)
    i = 0
    for e, c in enumerate(counts):
        if c:
            gate_h, up = F.linear(xs[i: i + c], ex.gate_up_proj[e]).chunk(2, dim=-1)
            ys[i: i + c] = F.linear(ex.act_fn(gate_h) * up, ex.down_proj[e])
            i += c
    ys = ys * w.reshape(-1)[order, None]
    out = torch.zeros_like(x).index_add_(0, tok, ys)
    return out, idx, w, probs


def _logprobs(m, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) (K,) in float32 from the last layer's output x (K, H)."""
    logits = m.lm_head(m.model.norm(x)).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
