"""Generation with routing capture, routing of given text, and per-token log-probabilities.

    flexolmo generate "The river" --exclude news --json

Router decisions are read by forward hooks on every layer's gate (`layers[i].mlp.gate`),
whose output is `(logits, topk_weights, topk_indices)` for the tokens of that forward
call. Alignment, used throughout: the decisions "for" token t are those taken at the
position that *predicted* it (position t-1, whose hidden state produced token t's
distribution). In `generate`, generated token j's routing is that of the forward step that
produced it; `route(model, ids)` returns the decisions at every position, so the routing
that produced `ids[t]` is row t-1 (`Routing.producing(t)`).

For tracing:
    route(model, input_ids)                        one forward pass, per-position top-k
    token_logprobs(model, input_ids, exclude=[i])  log p(ids[t] | ids[:t]) for t >= 1 with
                                                   experts i switched off: one forward pass
(the trace pipeline asks `flexolmo/model/passes.py` for routing and counterfactual drops).
Every pass takes a `check`: a cancellation checkpoint called before every decoder layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch

from flexolmo.base.errors import InputError
from flexolmo.model.device import model_device
from flexolmo.model.specs import MAX_NEW_TOKENS, GenerationOptions  # noqa: F401 (the CLI and the API import them from here)
from flexolmo.model.moe import (Check, active_experts, as_module, expert_names, experts_off, has_routers,
                                layer_checkpoints, routers)


class RoutingCapture:
    """Forward hooks on every gate; collects (top-k indices, top-k weights[, logits]) per call."""

    def __init__(self, model, keep_logits: bool = False):
        self.model = model
        self.keep_logits = keep_logits
        self.calls: list[list[tuple]] = [[] for _ in routers(model)]  # [layer][call]
        self._handles = []

    def __enter__(self) -> "RoutingCapture":
        for i, gate in enumerate(routers(self.model)):
            self._handles.append(gate.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        store = self.calls[layer]
        keep = self.keep_logits

        def hook(_module, _inputs, output):
            logits, weights, indices = output
            store.append((indices, weights, logits if keep else None))

        return hook

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """All captured rows, on the CPU: indices (N, L, k), weights (N, L, k) and logits (N, L, E)
        in float32, or None."""
        idx = torch.stack([torch.cat([c[0] for c in layer]) for layer in self.calls], dim=1).cpu()
        w = torch.stack([torch.cat([c[1] for c in layer]) for layer in self.calls], dim=1).float().cpu()
        lg = None
        if self.keep_logits:
            lg = torch.stack([torch.cat([c[2] for c in layer]) for layer in self.calls], dim=1).float().cpu()
        return idx, w, lg


@dataclass
class TokenRouting:
    """The router decisions that produced one token: per layer, the selected experts and weights."""

    position: int  # index of the token in prompt + generation
    token_id: int
    token: str
    experts: list[list[int]]  # [layer][k] expert indices
    weights: list[list[float]]  # [layer][k] their routing weights


@dataclass
class GenerationResult:
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str  # generated text only
    routing: list[TokenRouting]  # one per generated token (empty when not captured)
    expert_names: list[str]  # index -> source
    active: list[bool]  # switched on?
    seconds: float = 0.0
    guard: list[dict] = field(default_factory=list)  # where the verbatim guard acted (tracing/guard.py)

    def expert_shares(self) -> dict[str, float]:
        """Share of all (token, layer, k) routing weight that went to each expert."""
        tot = torch.zeros(len(self.expert_names), dtype=torch.float64)
        for r in self.routing:
            for e_row, w_row in zip(r.experts, r.weights):
                for e, w in zip(e_row, w_row):
                    tot[e] += w
        s = tot.sum().item() or 1.0
        return {n: round(tot[i].item() / s, 4) for i, n in enumerate(self.expert_names)}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["expert_shares"] = self.expert_shares()
        return d


@dataclass
class Routing:
    """Router decisions at every position of a sequence (one forward pass)."""

    token_ids: list[int]
    experts: torch.Tensor  # (T, L, k) long: decisions at position t, which predict token t+1
    weights: torch.Tensor  # (T, L, k) float
    logits: torch.Tensor  # (T, L, E) float: router logits incl. bias and the -inf of switched-off experts
    expert_names: list[str] = field(default_factory=list)

    def producing(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts (L, k), weights (L, k)) of the step that produced token t (t >= 1)."""
        if not 1 <= t < len(self.token_ids):
            raise InputError(f"token position {t} has no producing step: use 1..{len(self.token_ids) - 1}")
        return self.experts[t - 1], self.weights[t - 1]


def _ids(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise InputError("route/token_logprobs take one sequence (batch size 1)")
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() == 0:
        raise InputError("input_ids must be a non-empty 1-D sequence of token ids")
    return ids


def _check_range(model, ids: torch.Tensor) -> torch.Tensor:
    """`ids` checked against the model's vocabulary and positions, on the model's device."""
    V, T = model.config.vocab_size, model.config.max_position_embeddings
    if ids.min() < 0 or ids.max() >= V:
        raise InputError(f"input_ids must be integers in range [0, {V - 1}]")
    if ids.numel() > T:
        raise InputError(f"{ids.numel()} tokens exceed the model's {T} positions; shorten the text")
    return ids.to(model_device(as_module(model)))


@torch.no_grad()
def route(model, input_ids, check: Check | None = None) -> Routing:
    """Per-position, per-layer top-k experts and weights for given text, by one forward pass.

    :param check: called before every decoder layer; raises to stop the pass (a deadline)"""
    ids = _check_range(model, _ids(input_ids))
    with RoutingCapture(model, keep_logits=True) as cap, layer_checkpoints(model, check):
        model(input_ids=ids[None], use_cache=False)
    idx, w, lg = cap.stacked()
    return Routing(token_ids=ids.tolist(), experts=idx, weights=w, logits=lg, expert_names=expert_names(model))


@torch.no_grad()
def token_logprobs(model, input_ids, exclude: Iterable[int] = (), check: Check | None = None) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..T-1 (shape (T-1,)), with experts `exclude` (indices)
    switched off for this call only; one forward pass over the whole sequence.

    :param check: called before every decoder layer; raises to stop the pass (a deadline)"""
    ids = _check_range(model, _ids(input_ids))
    exclude = list(exclude)
    ctx = experts_off(model, exclude) if exclude else contextlib.nullcontext()
    with ctx, layer_checkpoints(model, check):
        logits = model(input_ids=ids[None], use_cache=False).logits[0].float()  # (T, V)
    lp = torch.log_softmax(logits[:-1], dim=-1)
    return lp.gather(1, ids[1:, None])[:, 0].cpu()


@torch.no_grad()
def generate(model, tokenizer, prompt: str, options: GenerationOptions | None = None, *, capture: bool = True,
             stop_at_eos: bool = True, guard=None, check: Check | None = None, **overrides) -> GenerationResult:
    """Generate a continuation of `prompt`, recording the router decisions for every new token.

    :param model: a `LoadedModel` (e.g. from `load_merged`) or a bare torch module
    :param tokenizer: the model's tokenizer (the shared one: `flexolmo.base.tokenizer.load_tokenizer(ws)`)
    :param options: length and sampling; `overrides` (e.g. max_new_tokens=8) replace its fields, validated
    :param capture: record routing (False: plain `model.generate`, for the overhead benchmark)
    :param stop_at_eos: stop at the end-of-text token (False: always `max_new_tokens` tokens)
    :param guard: a `tracing.guard.VerbatimGuard` (`VerbatimGuard.open(ws)`): no run longer than
        a guarded source's `max_verbatim` is emitted; the result's `guard` says where it acted
    :param check: called before every decoder layer of every step; raises to stop the generation
    """
    import time

    o = (options or GenerationOptions()).replace(**overrides)
    max_new_tokens, do_sample, temperature, top_p, top_k, seed = (o.max_new_tokens, o.do_sample, o.temperature,
                                                                   o.top_p, o.top_k, o.seed)
    if not prompt:
        raise InputError("the prompt is empty; give some text to continue")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    limit = model.config.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > limit:
        raise InputError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's {limit} positions; shorten one"
        )
    module = as_module(model)
    capture = capture and has_routers(module)  # a dense model has no router to capture
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model_device(module))
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else module.generation_config.eos_token_id
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else \
        (eos[0] if isinstance(eos, list) else eos)  # models without a pad token pad with eos, as transformers does
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=pad,
        eos_token_id=eos if stop_at_eos else None,
        attention_mask=torch.ones_like(ids),
    )
    if do_sample:
        torch.manual_seed(seed)
    if guard is not None:
        guard = guard.fresh()
        k = top_k if top_k is not None else (as_module(model).generation_config.top_k or 50)  # transformers' default
        off = dict(temperature=1.0, top_p=1.0, top_k=0) if do_sample else dict(temperature=None, top_p=None, top_k=None)
        kwargs.update(**off, logits_processor=_processors(guard, do_sample, temperature, k, top_p))
    elif do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, **({"top_k": top_k} if top_k is not None else {}))
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    module.eval()
    t0 = time.perf_counter()
    with RoutingCapture(module) if capture else contextlib.nullcontext() as cap, layer_checkpoints(module, check):
        out = module.generate(ids, **kwargs)
    seconds = time.perf_counter() - t0
    new = out[0, len(prompt_ids):].tolist()
    routing: list[TokenRouting] = []
    if capture and new:
        idx, w, _ = cap.stacked()  # (P + n - 1, L, k): prompt positions, then one row per decode step
        rows = slice(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(new))
        idx, w = idx[rows].tolist(), w[rows].tolist()
        for j, tok in enumerate(new):
            routing.append(
                TokenRouting(
                    position=len(prompt_ids) + j,
                    token_id=tok,
                    token=tokenizer.decode([tok]),
                    experts=idx[j],
                    weights=[[round(x, 5) for x in row] for row in w[j]],
                )
            )
    return GenerationResult(
        prompt=prompt,
        prompt_ids=list(prompt_ids),
        token_ids=new,
        text=tokenizer.decode(new, skip_special_tokens=True),
        routing=routing,
        expert_names=expert_names(model) if has_routers(module) else [],
        active=active_experts(model) if has_routers(module) else [],
        seconds=round(seconds, 4),
        guard=guard.record() if guard is not None else [],
    )


def _processors(guard, do_sample: bool, temperature: float, top_k: int | None, top_p: float):
    """The guard first, then the sampling warpers: the vetoed tokens leave the candidate set
    before temperature, top-k and top-p form it."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = LogitsProcessorList([guard])
    if do_sample:
        if temperature != 1.0:
            out.append(TemperatureLogitsWarper(temperature))
        if top_k:
            out.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            out.append(TopPLogitsWarper(top_p))
    return out
