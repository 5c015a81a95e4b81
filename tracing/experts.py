"""Expert linkage: which experts shaped each kept span, by routing and by counterfactual.

For every span and every expert of the merged model:

    routing_share    share of the router weight over the span's tokens, layers and top-k slots
                     (where the router *sent* the tokens)
    counterfactual   drop in the span's log-probability when that expert is switched off
                     (whose expert the span *needs*: the causal answer)

When counterfactuals are computed the span's top expert is the argmax of the drop over the
switched-on experts (`top_expert_by="counterfactual"`), else the argmax of the routing share
(`"routing"`); both argmaxes are kept on the span (`top_by_routing`, `top_by_counterfactual`).

Cost (issues 8, 24). One base pass per model window (tracing/counterfactual.py `base_window`)
gives the routing *and* the base log-probabilities, cut after the last kept span's last token
(the model is causal) and with the last layer and the vocabulary projection only at the kept
spans' tokens; it keeps the keys, values and layer 0's state. The counterfactuals are then
rows of one batched call per window (`expert_off_rows`): row b has expert b switched off and
recomputes only what that changes (layer 0's MoE where the router chose the expert, the layers
after it from the expert's first choice on, the last layer at the kept tokens), exactly. Experts
the router gave no weight on any kept span's token are skipped: their `counterfactual` is None,
like the last expert on (which cannot be switched off); an expert already off has a drop of 0.
`method="per_expert"` runs one full transformers forward pass per expert (the reference the
tests and `bench/trace.py` compare against).
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch

from .results import ExpertLink, Span

Method = Literal["batched", "per_expert"]
MAX_ROWS = 8  # experts switched off per batched call (bounds the batch's memory)


def model_windows(P: int, n: int, limit: int) -> list[tuple[int, int, int, int]]:
    """Model windows over prompt (P tokens) + response (n tokens) for a model of `limit` positions.

    Each (a, b, s, e): run the model on seq[a:b] and keep its predictions for tokens s..e-1
    (in sequence coordinates). One window when it all fits; otherwise consecutive chunks of
    the response, each with as much preceding text as context as fits (at least half).
    """
    if P + n <= limit:
        return [(0, P + n, P, P + n)]
    step = max(1, limit // 2)
    out = []
    for s in range(P, P + n, step):
        e = min(P + n, s + step)
        out.append((max(0, e - limit), e, s, e))
    return out


def link_experts(model, spans: list[Span], ids: list[int], prompt_ids: list[int],
                 routing: tuple[np.ndarray, np.ndarray] | None, *, counterfactual: bool, bos_id: int,
                 method: Method = "batched", ranges: list[tuple[int, int]] | None = None) -> dict[str, float]:
    """Fill `experts`, `top_expert`, `top_expert_by`, `agreement` of every span; return timings (ms).

    :param model: a `flexolmo.model.moe.LoadedModel`
    :param ids: the response in the *model's* token ids
    :param routing: (experts (n, L, k), weights (n, L, k)) of the step that produced each
        response token, captured while generating; None: computed here by one forward pass
    :param bos_id: put in front of a response without a prompt, so its first token has a
        producing step (the end-of-text token)
    :param method: "batched" (tracing/counterfactual.py) or "per_expert" (the reference)
    :param ranges: each span's model tokens [start, end) in `ids` (None: the span's own
        start/end, when the index and the model share one tokenizer)
    """
    names, on = list(model.experts), list(model.active)
    E, n = len(names), len(ids)
    ranges = ranges if ranges is not None else [(s.start, s.end) for s in spans]
    ctx = list(prompt_ids) if prompt_ids else [int(bos_id)]
    seq, P = ctx + list(ids), len(ctx)
    windows = model_windows(P, n, model.config.max_position_embeddings)
    need = np.zeros(n, dtype=bool)  # the kept spans' tokens: the only ones whose routing and log-probs are read
    for a, b in ranges:
        need[a: b] = True
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    bases = []
    if routing is None or (counterfactual and method == "batched"):
        r_experts, r_weights, bases = routing_pass(model, seq, windows, P, need)
        if routing is None:
            routing = (r_experts, r_weights)
    experts, weights = routing
    timings["routing"] = _ms(t0)

    drops: dict[int, np.ndarray | None] = {}
    if counterfactual:
        t1 = time.perf_counter()
        if sum(on) > 1:
            if method == "batched":
                used = routed_experts(experts, weights, need, E)
                drops.update(batched_drops(model, bases, n, [e for e in range(E) if on[e] and used[e]]))
            else:
                drops.update(per_expert_drops(model, seq, windows, [e for e in range(E) if on[e]]))
        drops.update({e: np.zeros(n) for e in range(E) if not on[e]})  # already off: switching it off changes nothing
        timings["counterfactual"] = _ms(t1)

    for span, (a, b) in zip(spans, ranges):
        rows = slice(a, b)
        sel_e = experts[rows].reshape(-1)
        sel_w = weights[rows].reshape(-1).astype(np.float64)
        share = np.bincount(sel_e, weights=sel_w, minlength=E)
        share = share / share.sum() if share.sum() > 0 else share
        cf = {e: float(d[rows].sum()) for e, d in drops.items() if d is not None}
        span.experts = [ExpertLink(expert=e, source=names[e], routing_share=round(float(share[e]), 5),
                                   counterfactual=round(cf[e], 5) if e in cf else None, active=on[e])
                        for e in range(E)]
        span.top_by_routing = int(np.argmax(share))
        candidates = [e for e in cf if on[e]]
        span.top_by_counterfactual = max(candidates, key=lambda e: cf[e]) if candidates else None
        if span.top_by_counterfactual is not None:
            span.top_expert, span.top_expert_by = span.top_by_counterfactual, "counterfactual"
        else:
            span.top_expert, span.top_expert_by = span.top_by_routing, "routing"
        span.agreement = names[span.top_expert] in span.sources
    return timings


def routed_experts(experts: np.ndarray, weights: np.ndarray, need: np.ndarray, E: int) -> np.ndarray:
    """(E,) bool: experts the router gave weight to on some token where `need` is True."""
    sel = experts[need][weights[need] > 0]
    return np.bincount(sel.reshape(-1), minlength=E) > 0


def routing_pass(model, seq: list[int], windows, P: int, need: np.ndarray):
    """One base pass per window holding needed response tokens, cut after the last of them
    (tracing/counterfactual.py `base_window`). Returns the routing (n, L, k) of the step
    producing each needed response token and its weights (other tokens: expert 0, weight 0),
    and per window (response positions (K,), its `WindowBase`: base log-probs, reusable state)."""
    from .counterfactual import base_window

    L = model.config.num_hidden_layers
    k = min(model.config.num_experts_per_tok, sum(model.active))
    ex, wt = np.zeros((len(need), L, k), dtype=np.int64), np.zeros((len(need), L, k), dtype=np.float32)
    bases = []
    for a, b, s, e in windows:
        targets = [t for t in range(s, e) if need[t - P]]  # sequence positions of needed tokens
        if not targets:
            continue
        base = base_window(model, seq[a: targets[-1]], [t - 1 - a for t in targets], [seq[t] for t in targets])
        resp = np.asarray(targets) - P
        ex[resp] = base.experts[base.need].cpu().numpy()
        wt[resp] = base.weights[base.need].cpu().numpy()
        bases.append((resp, base))
    return ex, wt, bases


def batched_drops(model, bases, n: int, run: list[int]) -> dict[int, np.ndarray]:
    """Drop of each needed response token's log-prob with each expert in `run` off: per window,
    the experts ordered by where their rows start to differ (`WindowBase.start`), up to
    `batch_rows` rows per call, each call starting at its first row's start."""
    from .counterfactual import expert_off_rows

    out = {e: np.zeros(n) for e in run}
    for resp, base in bases:
        order = sorted(run, key=base.start)
        rows = batch_rows(model, len(base.ids), len(resp), len(run))
        i = 0
        while i < len(order):
            chunk = order[i: i + rows]
            try:
                lp = expert_off_rows(model, base, chunk)  # (B, K)
            except torch.OutOfMemoryError:
                if rows == 1:
                    raise
                rows = max(1, rows // 2)  # the estimate was off: halve and retry this chunk
                _free_cache(model.device)
                continue
            drop = (base.logprobs[None] - lp).double().cpu().numpy()
            for row, x in enumerate(chunk):
                out[x][resp] = drop[row]
            i += len(chunk)
    return out


def batch_rows(model, seq_len: int, kept: int, wanted: int) -> int:
    """How many experts-off rows one batched call runs: MAX_ROWS on a CPU; on a GPU as many as
    half the free memory holds, by a rough per-row estimate (one layer's activations: the k
    token-slot copies in, the experts' intermediates and outputs, keys and values; the kept
    tokens' logits in float32); an out-of-memory error halves it (`batched_drops`)."""
    if model.device.type != "cuda":
        return min(MAX_ROWS, wanted)
    cfg = model.config
    width = next(model.module.parameters()).element_size()
    H, inter, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
    per_row = seq_len * width * (k * 3 * (H + inter) + 8 * H) + kept * cfg.vocab_size * 4 * 2
    free, _ = torch.cuda.mem_get_info(model.device)
    return max(1, min(wanted, int(free * 0.5 // max(per_row, 1))))


def _free_cache(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def per_expert_drops(model, seq: list[int], windows, run: list[int]) -> dict[int, np.ndarray]:
    """The reference: one full forward pass of the response per expert (and one for the base)."""
    from flexolmo.model.generate import token_logprobs

    def logprobs(exclude: list[int]) -> np.ndarray:
        return np.concatenate([token_logprobs(model, seq[a:b], exclude=exclude)[s - a - 1: e - a - 1].numpy()
                               for a, b, s, e in windows])

    base = logprobs([])
    return {e: base - logprobs([e]) for e in run}


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)
