"""Counterfactual drops (flexolmo/model/counterfactual.py, behind flexolmo/model/passes.py)
against the reference: one full forward pass of transformers' module per switched-off expert;
and the cancellation checkpoint that stops every model pass within one decoder layer. Tiny
random models, no federation."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from flexolmo.model.config import get_profile
from flexolmo.model.generate import RoutingCapture, token_logprobs
from flexolmo.model.moe import LoadedModel, build_model, routers, set_active
from flexolmo.model.counterfactual import base_window, base_windows, expert_off_rows
from tracing.experts import link_experts
from tracing.results import Span

VOCAB = 300
LOUD = 3e6  # the tiny model's MoE outputs have mean square ~1e-13; times LOUD ~ 1, as a trained model's


def tiny(experts: int = 4, top_k: int = 2, layers: int = 3, loud: float | None = None,
         bias: dict[int, float] | None = None, norm_topk: bool = False, seed: int = 0) -> LoadedModel:
    """A tiny random model (64 positions). loud: scale the experts' outputs to a trained model's
    size (mean square far above the norm's eps); bias: router bias per expert, every layer."""
    cfg = replace(get_profile("tiny").model, num_layers=layers).hf_config(vocab_size=VOCAB, eos_id=0, pad_id=1,
                                                                         num_experts=experts, top_k=top_k)
    cfg.norm_topk_prob = norm_topk
    module = build_model(cfg, seed=seed).eval()
    with torch.no_grad():
        for layer in module.model.layers:
            if loud:
                layer.mlp.experts.down_proj.mul_(loud)
        for r in routers(module):
            for e, b in (bias or {}).items():
                r.bias[e] = b
    return LoadedModel(module=module, experts=["public"] + [f"x{i}" for i in range(1, experts)])


def window(T: int = 60, seed: int = 0) -> tuple[list[int], list[int]]:
    """Tokens (T + 1) and needed positions: a span at the very start, some spread, the last one."""
    g = np.random.default_rng(seed)
    ids = g.integers(2, VOCAB, T + 1).tolist()
    need = sorted({0, 1, 2, *g.choice(np.arange(3, T - 1), 15, replace=False).tolist(), T - 1})
    return ids, need


def reference_drops(model, ids: list[int], need: list[int], e: int) -> np.ndarray:
    return (token_logprobs(model, ids) - token_logprobs(model, ids, exclude=[e]))[need].double().numpy()


def drops(model, ids, need, rows, base=None):
    base = base or base_window(model, ids[:-1], need, [ids[p + 1] for p in need])
    return base, (base.logprobs[None] - expert_off_rows(model, base, rows)).double().cpu().numpy()


def test_base_window_is_the_models_forward():
    model = tiny()
    ids, need = window()
    base = base_window(model, ids[:-1], need, [ids[p + 1] for p in need])
    with torch.no_grad(), RoutingCapture(model.module) as cap:
        logits = model.module(input_ids=torch.tensor([ids[:-1]]), use_cache=False).logits[0]
    idx, w, _ = cap.stacked()
    lp = torch.log_softmax(logits.float(), -1)[need, [ids[p + 1] for p in need]]
    assert torch.allclose(base.logprobs, lp, atol=1e-5)
    L = idx.shape[1]
    assert torch.equal(base.experts[:, : L - 1], idx[:, : L - 1])  # every position below the last layer
    assert torch.equal(base.experts[need, L - 1], idx[need, L - 1])  # the last layer: needed positions only
    assert (base.experts[[p for p in range(len(ids) - 1) if p not in need], L - 1] == -1).all()
    assert torch.allclose(base.weights[need], w[need], atol=1e-6)


@pytest.mark.parametrize("kind", ["fresh", "loud", "norm_topk", "3 experts top-3", "2 layers"])
def test_expert_off_rows_equal_one_pass_per_expert(kind):
    model = {"fresh": lambda: tiny(), "loud": lambda: tiny(loud=LOUD), "norm_topk": lambda: tiny(norm_topk=True),
             "3 experts top-3": lambda: tiny(experts=3, top_k=3), "2 layers": lambda: tiny(layers=2)}[kind]()
    ids, need = window()
    rows = list(range(len(model.experts)))
    _, got = drops(model, ids, need, rows)  # every expert off in one batched call
    for b, e in enumerate(rows):
        ref = reference_drops(model, ids, need, e)
        assert np.abs(got[b] - ref).max() < 1e-5, (kind, e)
    assert np.abs(got).max() > 1e-3  # the experts matter: a drop of 0 everywhere would pass vacuously


@pytest.mark.parametrize("lengths", [(60, 60), (60, 57, 40), (60,)])
def test_batched_windows_equal_one_window_at_a_time(lengths):
    # one batched base pass over windows of equal and of different lengths (right-padded): every
    # window's routing, log-probs and kept state, and its expert-off rows, as its own pass gives
    model = tiny(loud=LOUD, layers=3)
    wins = []
    for seed, T in enumerate(lengths):
        ids, need = window(T, seed)
        wins.append((ids[:-1], need, [ids[p + 1] for p in need]))
    batched = base_windows(model, wins)
    assert len(batched) == len(wins)
    for w, got in zip(wins, batched):
        one = base_window(model, *w)
        assert torch.equal(got.ids, one.ids) and torch.equal(got.need, one.need)
        assert torch.equal(got.experts, one.experts) and got.scale_safe == one.scale_safe
        for name in ("weights", "logprobs", "mid0", "moe0", "slots0", "probs0"):
            assert torch.allclose(getattr(got, name), getattr(one, name), atol=1e-5, rtol=1e-4), name
        for a, b in zip(got.keys + got.values, one.keys + one.values):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        rows = list(range(len(model.experts)))
        assert torch.allclose(expert_off_rows(model, got, rows), expert_off_rows(model, one, rows), atol=1e-5)


def test_a_bfloat16_model_runs_in_its_own_dtype():
    # the rotary embedding's cos/sin are float32: queries, keys and values stay in the model's dtype
    model = tiny(loud=LOUD)
    model.module.to(torch.bfloat16)
    ids, need = window()
    base = base_window(model, ids[:-1], need, [ids[p + 1] for p in need])
    assert all(k.dtype == v.dtype == torch.bfloat16 for k, v in zip(base.keys, base.values))
    with torch.no_grad():
        logits = model.module(input_ids=torch.tensor([ids[:-1]]), use_cache=False).logits[0]
    lp = torch.log_softmax(logits.float(), -1)[need, [ids[p + 1] for p in need]]
    assert torch.allclose(base.logprobs, lp, atol=0.05)  # bfloat16's own rounding, not float32's
    assert torch.isfinite(expert_off_rows(model, base, list(range(len(model.experts))))).all()


def test_window_batches_group_windows_of_about_the_same_length():
    from flexolmo.model.passes import BATCH_TOKENS, window_batches

    assert window_batches([129, 256, 256, 250]) == [[0, 1, 2, 3]]  # a 450-token input's windows: one batch
    assert window_batches([40, 256, 60]) == [[1], [0, 2]]  # 216 padded positions in 256: apart
    assert window_batches([100]) == [[0]] and window_batches([]) == []
    many = window_batches([256] * 20)
    assert sorted(sum(many, [])) == list(range(20)) and max(len(b) for b in many) * 256 <= BATCH_TOKENS


def test_prefix_before_the_experts_first_choice_is_reused_exactly():
    # a trained model's scale, and expert 3 disfavoured: the router first chooses it at position 8
    model = tiny(loud=LOUD, bias={3: -0.2})
    ids, need = window(seed=3)
    base = base_window(model, ids[:-1], need, [ids[p + 1] for p in need])
    assert base.scale_safe == len(ids) - 1  # the norm's eps cannot show a rescale anywhere
    start = base.start(3)
    assert 3 <= start < len(ids) - 1, start
    _, got = drops(model, ids, need, [3], base)
    assert np.abs(got[0] - reference_drops(model, ids, need, 3)).max() < 1e-5
    early = [i for i, p in enumerate(need) if p < start]
    assert early and (got[0][early] == 0).all()  # not recomputed: the base's own log-prob


def test_an_expert_never_chosen_changes_nothing():
    model = tiny(loud=LOUD, bias={2: -30.0})
    ids, need = window()
    base, got = drops(model, ids, need, [2])
    assert base.start(2) == len(ids) - 1 and (got == 0).all()
    assert np.abs(reference_drops(model, ids, need, 2)).max() < 1e-5


def test_a_freshly_initialised_model_reuses_no_prefix():
    # its MoE outputs' mean square is far below the norm's eps, so the rescale of the other
    # experts' weights shows through the norm from the first token: no prefix may be reused
    model = tiny(bias={3: -0.14})
    ids, need = window(seed=3)
    base = base_window(model, ids[:-1], need, [ids[p + 1] for p in need])
    first = int((base.experts == 3).any(2).any(1).nonzero()[0])
    assert first >= 1 and base.scale_safe == 0 and base.start(3) == 0
    ref = reference_drops(model, ids, need, 3)
    reused = expert_off_rows(model, base, [3], torch.arange(first, len(ids) - 1))  # as if the prefix were unchanged
    assert np.abs((base.logprobs - reused[0]).double().numpy() - ref).max() > 1e-4
    assert np.abs(drops(model, ids, need, [3], base)[1][0] - ref).max() < 1e-5


def _spans(ranges):
    return [Span(index=i, start=a, end=b, char_start=0, char_end=0, text="", count=1, count_by_source={},
                 unigram_logprob_sum=0.0, group=0) for i, (a, b) in enumerate(ranges)]


@pytest.mark.parametrize("prompt", [[], [5, 6, 7]])
def test_link_experts_batched_equals_per_expert_over_several_windows(prompt):
    model = tiny(experts=5, loud=LOUD, bias={4: -3.0})
    set_active(model, [True, True, False, True, True])  # expert 2 already off
    ids = np.random.default_rng(1).integers(2, VOCAB, 150).tolist()  # 150 tokens: five 64-position windows
    ranges = [(0, 3), (20, 26), (40, 41), (70, 80), (95, 99), (131, 140), (147, 150)]
    got, ref = _spans(ranges), _spans(ranges)
    link_experts(model, got, ids, prompt, None, counterfactual=True, bos_id=0)
    link_experts(model, ref, ids, prompt, None, counterfactual=True, bos_id=0, method="per_expert")
    computed = 0
    for a, b in zip(got, ref):
        for x, y in zip(a.experts, b.experts):
            assert x.routing_share == y.routing_share and x.active == y.active
            if x.expert == 2:
                assert x.counterfactual == 0 and not x.active
            elif x.counterfactual is None:  # skipped: no routing weight on any kept span
                assert all(s.experts[x.expert].routing_share == 0 for s in got)
            else:
                assert x.counterfactual == pytest.approx(y.counterfactual, abs=1e-4)
                computed += 1
        mine = {x.expert: y.counterfactual for x, y in zip(a.experts, b.experts) if x.active and x.counterfactual is not None}
        assert a.top_expert == max(mine, key=mine.get)  # the reference's argmax over the experts computed
    assert computed >= 3 * len(ranges)


# -- the cancellation checkpoint -------------------------------------------------------------


class Stop(Exception):
    """What the tests' checkpoints raise (a service raises its own `Stopped`)."""


class Checkpoint:
    """Counts its calls and raises Stop at call `stop_at` (None: never); records every module
    of the model that runs after it raised (there must be none)."""

    def __init__(self, model: LoadedModel, stop_at: int | None = None):
        self.calls, self.stop_at, self.after = 0, stop_at, []
        self.handles = [m.register_forward_pre_hook(self._ran) for m in model.module.modules()]

    def _ran(self, module, _args):
        if self.stop_at is not None and self.calls >= self.stop_at:
            self.after.append(type(module).__name__)

    def __call__(self) -> None:
        self.calls += 1
        if self.stop_at is not None and self.calls >= self.stop_at:
            raise Stop

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _pass(what: str, model: LoadedModel, check) -> None:
    from flexolmo.model.generate import route
    from flexolmo.model.passes import Need, model_passes

    ids, need = window()
    targets = [p + 1 for p in need]
    if what == "routing":
        model_passes(model, ids, Need(targets=targets), check=check)
    elif what == "expert-off rows":
        model_passes(model, ids, Need(targets=targets, drops="routed"), check=check)
    elif what == "reference":
        model_passes(model, ids, Need(targets=targets, routing=False, drops="all", reference=True), check=check)
    elif what == "route":
        route(model, ids, check=check)
    else:  # generation, as `generate` runs it: transformers' generate with its key-value cache
        from flexolmo.model.moe import layer_checkpoints

        with torch.no_grad(), layer_checkpoints(model, check):
            model.module.generate(torch.tensor([ids[:10]]), max_new_tokens=5, do_sample=False, pad_token_id=1)


@pytest.mark.parametrize("what", ["routing", "expert-off rows", "reference", "route", "generation"])
def test_every_model_pass_stops_at_the_checkpoint_before_the_next_layer(what):
    model = tiny()
    L = model.config.num_hidden_layers
    full = Checkpoint(model)
    _pass(what, model, full)
    full.close()
    passes = {"routing": 1, "expert-off rows": 2, "reference": 1 + len(model.experts), "route": 1, "generation": 5}[what]
    assert full.calls >= passes * L, (what, full.calls)  # at least once per decoder layer of every pass
    for stop_at in sorted({1, min(L + 1, full.calls), full.calls}):  # the first layer, the second pass, the last
        check = Checkpoint(model, stop_at)
        with pytest.raises(Stop):
            _pass(what, model, check)
        check.close()
        assert check.calls == stop_at and not check.after, (what, stop_at, check.after)  # nothing ran after


def test_a_deadline_stops_a_counterfactual_pass_within_one_layers_time():
    """A model made slow on purpose (0.5 s more per decoder layer's attention): the pass with
    counterfactual rows takes seconds; a deadline at 0.5 s stops it within one layer's time
    (the longest gap between two checkpoints of the same pass run to its end)."""
    from flexolmo.model.passes import Need, model_passes

    model = tiny()
    layer_s = 0.5
    slow = [layer.self_attn.q_proj.register_forward_pre_hook(lambda *_: time.sleep(layer_s))
            for layer in model.module.model.layers]
    ids, need = window()
    want = Need(targets=[p + 1 for p in need], drops="routed")
    try:
        stamps = []
        model_passes(model, ids, want, check=lambda: stamps.append(time.monotonic()))
        layer = float(np.diff(stamps + [time.monotonic()]).max())  # the longest layer, checkpoint to checkpoint
        assert stamps[-1] - stamps[0] > 4 * layer_s  # the base pass's 3 layers and the rows' 2 at least

        deadline = time.monotonic() + layer_s

        def check():
            if time.monotonic() > deadline:
                raise Stop

        with pytest.raises(Stop):
            model_passes(model, ids, want, check=check)
        late = time.monotonic() - deadline
    finally:
        for h in slow:
            h.remove()
    assert late < layer + 0.25, (late, layer)  # stopped within one layer's time of its deadline
