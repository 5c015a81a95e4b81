"""The owner expert's output scale (flexolmo/model/scale.py): louder is a hidden positive logit, and
the cap keeps an owner's expert no louder than the public one."""

from __future__ import annotations

import math

import pytest
import torch

from conftest_model import build_federation

from flexolmo.model.bias import sample_windows
from flexolmo.model.config import get_profile, override
from flexolmo.base.errors import InputError
from flexolmo.model.layout import with_experts
from flexolmo.model.moe import load_model, routers
from flexolmo.model.scale import ScaleCap, cap_scale, output_ratios
from flexolmo.model.stream import token_stream
from flexolmo.model.train import train_expert, train_public


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    ws = build_federation(tmp_path_factory.mktemp("scale"), sources=("public", "news", "code"))
    pub = train_public(ws, "tiny", progress=False)
    return ws, pub.out_dir


def _two_experts(fed):
    ws, public_dir = fed
    model = with_experts(load_model(public_dir), 2, top_k=2).eval()
    return ws, model, sample_windows(token_stream(ws, "public"), 32, 4, seed=3)


def test_a_louder_expert_is_a_larger_router_logit(fed):
    ws, a, windows = _two_experts(fed)
    _, b, _ = _two_experts(fed)
    with torch.no_grad():
        for r in routers(b):
            r.weight[1] += 0.01 * torch.randn_like(r.weight[1])  # two experts that route differently
        for ra, rb in zip(routers(a), routers(b)):
            ra.weight.copy_(rb.weight)
        c = 3.0
        for la, lb in zip(a.model.layers, b.model.layers):
            # the identity holds up to RMSNorm's eps: the tiny model's feed-forward outputs have a mean
            # square near 1e-6 (the demo model's: 27-74), so the test takes the eps out
            la.post_feedforward_layernorm.variance_epsilon = lb.post_feedforward_layernorm.variance_epsilon = 1e-20
            la.mlp.experts.down_proj[1] *= c  # a: expert 1 three times louder
            lb.mlp.gate.bias[1] += math.log(c)  # b: expert 1's logit up by log 3
        out_a = a(input_ids=windows, use_cache=False).logits
        out_b = b(input_ids=windows, use_cache=False).logits
    assert torch.allclose(out_a, out_b, atol=1e-4)
    assert torch.allclose(output_ratios(a, windows), torch.full((len(routers(a)),), c), atol=1e-4)
    assert torch.allclose(output_ratios(b, windows), torch.ones(len(routers(b))), atol=1e-6)


def test_cap_scale_brings_a_loud_expert_down_and_leaves_a_quiet_one(fed):
    _, model, windows = _two_experts(fed)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[1] *= 2.5
        model.model.layers[1].mlp.experts.down_proj[1] *= 0.5
    before = cap_scale(model, windows, cap=1.0)
    assert before[0] == pytest.approx(2.5, rel=1e-4) and before[1] == pytest.approx(0.5, rel=1e-4)
    after = output_ratios(model, windows)
    assert after[0] == pytest.approx(1.0, rel=1e-3) and after[1] == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(InputError, match="must be > 0"):
        ScaleCap(windows, cap=0)
    with pytest.raises(InputError, match="expert_scale_cap must be > 0"):
        override(get_profile("tiny").expert, expert_scale_cap=-1.0)


def test_owner_training_with_the_cap_ends_no_louder_than_the_public_expert(fed, tmp_path):
    ws, _ = fed
    ratios = {}
    for cap in (None, 1.0):
        p = get_profile("tiny")
        p.expert = override(p.expert, expert_scale_cap=cap, steps=20)
        r = train_expert(ws, "news", p, packages_dir=tmp_path / str(cap), progress=False)
        ratios[cap] = r.card.router_bias["expert_output_ratio_at_end"]
        if cap is not None:
            assert r.card.router_bias["scale_cap"]["cap"] == cap
            assert r.card.router_bias["scale_cap"]["largest_ratio_met"] > 1.0  # it had something to cap
            # on the windows it caps on, exactly at most the cap after the last step
            pub_w = sample_windows(token_stream(ws, "public"), p.expert.seq_len, p.expert.calibration_windows, p.expert.seed)
            assert float(output_ratios(r.model, pub_w[:2]).max()) <= cap * 1.001
    assert max(ratios[None]) > 2.0  # uncapped, the owner's expert grows loud even in 20 tiny steps
    assert max(ratios[1.0]) < 1.5 < max(ratios[None])  # capped: near 1 on other public windows too
