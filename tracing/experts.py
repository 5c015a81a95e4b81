"""Expert linkage: which experts shaped each kept span, by routing and by counterfactual.

For every span and every expert of the merged model:

    routing_share    share of the router weight over the span's tokens, layers and top-k slots
                     (where the router *sent* the tokens)
    counterfactual   drop in the span's log-probability when that expert is switched off
                     (whose expert the span *needs*: the causal answer)

When counterfactuals are computed the span's top expert is the argmax of the drop over the
switched-on experts (`top_expert_by="counterfactual"`), else the argmax of the routing share
(`"routing"`); both argmaxes are kept on the span (`top_by_routing`, `top_by_counterfactual`).

The model work is one call into the model layer (flexolmo/model/passes.py `model_passes`):
one base pass per model window gives the routing and the base log-probabilities of the kept
spans' tokens; the drops are rows of one batched call per window, each recomputing exactly
what switching its expert off changes. Experts the router gave no weight on any kept span's
token are skipped: their `counterfactual` is None, like the last expert on (which cannot be
switched off); an expert already off has a drop of 0. `method="per_expert"` asks for the
reference instead: one full forward pass per expert (what the tests and `bench/trace.py`
compare against). A `check` callable stops every pass before its next decoder layer.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from flexolmo.model.moe import Check
from flexolmo.model.passes import Need, model_passes

from .results import ExpertLink, Span

Method = Literal["batched", "per_expert"]


def link_experts(model, spans: list[Span], ids: list[int], prompt_ids: list[int],
                 routing: tuple[np.ndarray, np.ndarray] | None, *, counterfactual: bool, bos_id: int,
                 method: Method = "batched", ranges: list[tuple[int, int]] | None = None,
                 check: Check | None = None) -> dict[str, float]:
    """Fill `experts`, `top_expert`, `top_expert_by`, `agreement` of every span; return timings (ms).

    :param model: a `flexolmo.model.moe.LoadedModel`
    :param ids: the response in the *model's* token ids
    :param routing: (experts (n, L, k), weights (n, L, k)) of the step that produced each
        response token, captured while generating; None: computed here by one forward pass
    :param bos_id: put in front of a response without a prompt, so its first token has a
        producing step (the end-of-text token)
    :param method: "batched" (the exact expert-off rows) or "per_expert" (the reference)
    :param ranges: each span's model tokens [start, end) in `ids` (None: the span's own
        start/end, when the index and the model share one tokenizer)
    :param check: a cancellation checkpoint called before every decoder layer (api/worker.py
        passes its deadline); what it raises stops the call
    """
    names, on = list(model.experts), list(model.active)
    E, n = len(names), len(ids)
    ranges = ranges if ranges is not None else [(s.start, s.end) for s in spans]
    ctx = list(prompt_ids) if prompt_ids else [int(bos_id)]
    need = np.zeros(n, dtype=bool)  # the kept spans' tokens: the only ones whose routing and log-probs are read
    for a, b in ranges:
        need[a: b] = True
    at = np.flatnonzero(need)
    want = Need(targets=(at + len(ctx)).tolist(), routing=routing is None,
                drops=("routed" if method == "batched" else "all") if counterfactual else "none",
                reference=method == "per_expert", start=len(ctx))
    got = model_passes(model, ctx + list(ids), want, check=check)
    if routing is None:
        L, k = got.experts.shape[1:]
        experts, weights = np.zeros((n, L, k), dtype=np.int64), np.zeros((n, L, k), dtype=np.float32)
        experts[at], weights[at] = got.experts, got.weights  # other tokens: expert 0, weight 0
    else:
        experts, weights = routing
    drops: dict[int, np.ndarray] = {}  # expert -> (n,) drop per response token (kept spans' tokens only)
    for e, d in got.drops.items():
        drops[e] = np.zeros(n)
        drops[e][at] = d

    for span, (a, b) in zip(spans, ranges):
        rows = slice(a, b)
        sel_e = experts[rows].reshape(-1)
        sel_w = weights[rows].reshape(-1).astype(np.float64)
        share = np.bincount(sel_e, weights=sel_w, minlength=E)
        share = share / share.sum() if share.sum() > 0 else share
        cf = {e: float(d[rows].sum()) for e, d in drops.items()}
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
    return got.timings
