"""The model passes a trace needs, behind one call: the routing that produced given tokens, their
log-probabilities, and how much each falls when an expert is switched off (counterfactual drops).

    out = model_passes(model, tokens, Need(targets=[5, 6, 9], drops="routed"), check=job.check)
    out.experts[i], out.weights[i]    # (L, k): the router's choice at the step producing tokens[targets[i]]
    out.logprobs[i]                   # log p(tokens[t] | tokens[:t]) for t = targets[i]
    out.drops[e][i]                   # how much that log-prob falls with expert e switched off

The passes, per model window (`model_windows`: one window when the tokens fit the model's
positions, else chunks with at least half a window of context before them):

- **base**: one pass over each window cut after its last target (flexolmo/model/counterfactual.py
  `base_windows`), windows of about the same length batched (`window_batches`): the routing and
  the base log-probs, with the last layer and the vocabulary projection at the targets only; it
  keeps the state the expert-off rows reuse.
- **expert-off rows** (exact, the default): up to `batch_rows` experts per batched call
  (`expert_off_rows`), each row recomputing only what switching its expert off changes.
- **reference** (`Need(reference=True)`): one full transformers forward pass per expert, plus
  one for the base; what the tests and the benchmarks compare the rows with.

Every pass calls `check()` before each decoder layer (a batched base pass: before each layer over
all its windows, at most BATCH_TOKENS positions): a service passes its deadline (api/worker.py),
which stops a trace within one layer's time. `generate` and `route` (flexolmo/model/generate.py)
take the same checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from flexolmo.base.errors import InputError
from flexolmo.model.moe import Check, active_experts, no_check

MAX_ROWS = 8  # experts switched off per batched call on a CPU (bounds the batch's memory)
BATCH_TOKENS = 2048  # positions per batched base pass (padding included)
PAD_SHARE = 0.75  # padding a window may take in a batched base pass, as a share of the longest window

Drops = Literal["none", "routed", "all"]


@dataclass(frozen=True)
class Need:
    """What a caller needs from the model for some tokens of a sequence."""

    targets: Sequence[int]  # positions t (1 <= t < len(tokens), ascending) of the tokens asked about
    routing: bool = True  # the routing that produced each target (the base pass gives it for free)
    # experts whose drop is wanted: "routed" the switched-on experts the router gave weight to at some
    # target (the others get none); "all" every switched-on expert. Switched-off experts drop by 0.
    drops: Drops = "none"
    reference: bool = False  # drops by one full forward pass per expert instead of the expert-off rows
    start: int | None = None  # where the windows' chunks begin when the tokens exceed the model's positions
    # (e.g. the response's first token; None: the first target)


@dataclass
class Passes:
    """What `model_passes` computed, one row per target."""

    targets: np.ndarray  # (K,) the targets' positions
    experts: np.ndarray | None = None  # (K, L, k) int64: top-k experts of the step producing each target
    weights: np.ndarray | None = None  # (K, L, k) float32: their weights
    logprobs: np.ndarray | None = None  # (K,) float32 base log-probs (None: only the reference's ran)
    drops: dict[int, np.ndarray] = field(default_factory=dict)  # expert -> (K,) float64 base - expert-off log-prob
    timings: dict[str, float] = field(default_factory=dict)  # ms: "routing" (base passes), "counterfactual"


def model_windows(first: int, end: int, limit: int) -> list[tuple[int, int, int, int]]:
    """Model windows covering the predictions of tokens first..end-1 for a model of `limit` positions.

    Each (a, b, s, e): run the model on tokens[a:b] and keep its predictions for tokens s..e-1.
    One window when it all fits; otherwise consecutive chunks, each with as much preceding
    text as context as fits (at least half a window).
    """
    if end <= limit:
        return [(0, end, first, end)]
    step = max(1, limit // 2)
    out = []
    for s in range(first, end, step):
        e = min(end, s + step)
        out.append((max(0, e - limit), e, s, e))
    return out


def model_passes(model, tokens: Sequence[int], need: Need, check: Check | None = None) -> Passes:
    """Routing, base log-probs and counterfactual drops of `need.targets`, by the fewest passes.

    :param model: a `flexolmo.model.moe.LoadedModel` (or its FlexOlmo module)
    :param tokens: the whole sequence (prompt and response), in the model's token ids
    :param need: the targets and what is wanted about them
    :param check: a cancellation checkpoint, called before every decoder layer of every pass;
        whatever it raises stops the call (None: nothing stops it)
    """
    check = check or no_check
    targets = np.asarray(need.targets, dtype=np.int64)
    if len(targets) and (targets[0] < 1 or targets[-1] >= len(tokens) or (np.diff(targets) <= 0).any()):
        raise InputError(f"targets must be ascending positions in 1..{len(tokens) - 1}")
    on = active_experts(model)
    cfg = model.config
    out = Passes(targets=targets)
    if not len(targets):
        k = min(cfg.num_experts_per_tok, sum(on))
        out.experts = np.zeros((0, cfg.num_hidden_layers, k), dtype=np.int64)
        out.weights, out.logprobs = np.zeros((0, cfg.num_hidden_layers, k), dtype=np.float32), np.zeros(0, np.float32)
        out.drops = {e: np.zeros(0) for e in range(len(on)) if not on[e] and need.drops != "none"}
        return out
    windows = [(a, b, s, e, targets[(targets >= s) & (targets < e)])
               for a, b, s, e in model_windows(min(int(targets[0]), need.start or int(targets[0])), len(tokens),
                                               cfg.max_position_embeddings)]
    t0 = time.perf_counter()
    bases = []
    if need.routing or need.drops == "routed" or (need.drops != "none" and not need.reference):
        bases = _base_passes(model, tokens, windows, out, check)
    out.timings["routing"] = _ms(t0)
    if need.drops == "none":
        return out
    t1 = time.perf_counter()
    run = [e for e in range(len(on)) if on[e]]
    if need.drops == "routed":
        used = np.bincount(out.experts[out.weights > 0], minlength=len(on)) > 0
        run = [e for e in run if used[e]]
    if sum(on) > 1 and run:
        out.drops = (_reference_drops(model, tokens, windows, run, check) if need.reference else
                     _row_drops(model, bases, len(targets), run, check))
    out.drops.update({e: np.zeros(len(targets)) for e in range(len(on)) if not on[e]})  # already off: no change
    out.timings["counterfactual"] = _ms(t1)
    return out


def _base_passes(model, tokens, windows, out: Passes, check: Check) -> list:
    """The base passes of the windows holding targets, batched (`window_batches`); fills `out`'s
    routing and log-probs and returns, per window, (the targets' rows in `out`, its `WindowBase`)."""
    from flexolmo.model.counterfactual import base_windows

    K, L = len(out.targets), model.config.num_hidden_layers
    k = min(model.config.num_experts_per_tok, sum(active_experts(model)))
    out.experts, out.weights = np.zeros((K, L, k), dtype=np.int64), np.zeros((K, L, k), dtype=np.float32)
    out.logprobs = np.zeros(K, dtype=np.float32)
    todo, row = [], 0  # (rows in `out`, (ids, need, targets)) per window holding targets
    for a, _, _, _, ts in windows:
        if len(ts):
            todo.append((np.arange(row, row + len(ts)), (list(tokens[a: int(ts[-1])]), (ts - 1 - a).tolist(),
                                                         [int(tokens[t]) for t in ts])))
            row += len(ts)
    bases: list = [None] * len(todo)
    for batch in window_batches([len(w[0]) for _, w in todo]):
        for i, base in zip(batch, base_windows(model, [todo[i][1] for i in batch], check=check)):
            rows = todo[i][0]
            out.experts[rows] = base.experts[base.need].cpu().numpy()
            out.weights[rows] = base.weights[base.need].cpu().numpy()
            out.logprobs[rows] = base.logprobs.cpu().numpy()
            bases[i] = (rows, base)
    return bases


def window_batches(lengths: list[int]) -> list[list[int]]:
    """Windows (by their lengths) grouped for batched base passes: windows of about the same
    length (the padding at most PAD_SHARE of the batch's longest), at most BATCH_TOKENS
    positions per batch; each batch's indices ascending."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and lengths[i] >= (1 - PAD_SHARE) * lengths[out[-1][0]] and \
                (len(out[-1]) + 1) * lengths[out[-1][0]] <= BATCH_TOKENS:
            out[-1].append(i)
        else:
            out.append([i])
    return [sorted(b) for b in out]


def _row_drops(model, bases, K: int, run: list[int], check: Check) -> dict[int, np.ndarray]:
    """Each target's drop with each expert in `run` off, by expert-off rows: per window, the
    experts ordered by where their rows start to differ (`WindowBase.start`), up to
    `batch_rows` rows per call, each call starting at its first row's start."""
    from flexolmo.model.counterfactual import expert_off_rows

    out = {e: np.zeros(K) for e in run}
    for rows_k, base in bases:
        order = sorted(run, key=base.start)
        rows = batch_rows(model, len(base.ids), len(rows_k), len(run))
        i = 0
        while i < len(order):
            chunk = order[i: i + rows]
            try:
                lp = expert_off_rows(model, base, chunk, check=check)  # (B, K')
            except torch.OutOfMemoryError:
                if rows == 1:
                    raise
                rows = max(1, rows // 2)  # the estimate was off: halve and retry this chunk
                _free_cache(base.ids.device)
                continue
            drop = (base.logprobs[None] - lp).double().cpu().numpy()
            for r, e in enumerate(chunk):
                out[e][rows_k] = drop[r]
            i += len(chunk)
    return out


def batch_rows(model, seq_len: int, kept: int, wanted: int) -> int:
    """How many expert-off rows one batched call runs: MAX_ROWS on a CPU; on a GPU as many as
    half the free memory holds, by a rough per-row estimate (one layer's activations: the k
    token-slot copies in, the experts' intermediates and outputs, keys and values; the kept
    tokens' logits in float32); an out-of-memory error halves it (`_row_drops`)."""
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


def _reference_drops(model, tokens, windows, run: list[int], check: Check) -> dict[int, np.ndarray]:
    """The reference: one full forward pass per window with nothing more off, and one per expert."""
    from flexolmo.model.generate import token_logprobs

    def logprobs(exclude: list[int]) -> np.ndarray:
        return np.concatenate([token_logprobs(model, tokens[a:b], exclude=exclude, check=check)[ts - a - 1].numpy()
                               for a, b, _, _, ts in windows if len(ts)])

    base = logprobs([])
    return {e: (base - logprobs([e])).astype(np.float64) for e in run}


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)
