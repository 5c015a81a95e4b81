"""DP for the whole expert package (flexolmo/model/privacy.py) on the tiny profile: vmap per-sample
gradients equal the per-example loop, clipping bounds, the derived noise multiplier meets
the target through the accountant, frozen tensors unchanged, the router row's and the
classifier's noise at their stated scale, bad input refused before anything is written."""

from __future__ import annotations

import pytest
import torch

from conftest_model import build_federation

from flexolmo.model.callbacks import train_rows
from flexolmo.model.config import get_profile
from flexolmo.base.errors import InputError
from flexolmo.model.layout import is_expert_tensor
from flexolmo.model.losses import WithRouterZLoss
from flexolmo.model.moe import build_model, load_model
from flexolmo.model.privacy import (DPConfig, DPStep, clip_factors, epsilon_of, gaussian_sum, per_sample_grads, plan,
                              poisson_sample, vmap_grads, windows)
from flexolmo.model.train import train_expert, train_public

TINY = get_profile("tiny")


def _model(seed: int = 0):
    return build_model(TINY.model.hf_config(vocab_size=300, eos_id=0, pad_id=1, num_experts=2, top_k=2), seed=seed)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    ws = build_federation(tmp_path_factory.mktemp("dpfed"), sources=("public", "news", "math"))
    pub = train_public(ws, "tiny", progress=False)
    return {"ws": ws, "public": pub}


@pytest.mark.parametrize("z_coef", [0.0, 1e-3])
def test_vmap_per_sample_grads_equal_the_loop(z_coef):
    model = _model()
    params, _ = train_rows(model, frozen=[0])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(2, 300, (5, 16), generator=g), torch.randint(2, 300, (5, 16), generator=g)
    per, losses = vmap_grads(model, params, [0], x, y, z_coef=z_coef, chunk=2)
    ref = list(per_sample_grads(model, WithRouterZLoss(model, z_coef), params, x, y, frozen_rows=[0]))
    for i, (grads, loss) in enumerate(ref):
        for k, gk in enumerate(grads):
            assert (gk[0] == 0).all()  # the frozen row is outside the gradient
            torch.testing.assert_close(per[k][i][0], gk[1], atol=1e-6, rtol=0)
    assert model.config._attn_implementation == "sdpa"  # restored after the dense/eager pass


def test_clipping_bounds_every_per_sample_norm():
    model = _model(1)
    params, _ = train_rows(model, frozen=[0])
    x, y = torch.randint(2, 300, (6, 16)), torch.randint(2, 300, (6, 16))
    per, _ = vmap_grads(model, params, [0], x, y)
    C = 1e-3
    factor, norms = clip_factors(per, C)
    clipped = torch.sqrt(sum((g.double() * factor.double().view(-1, *[1] * (g.ndim - 1))).pow(2).flatten(1).sum(1)
                             for g in per))
    assert (norms > C).all() and (clipped <= C * (1 + 1e-6)).all()
    # DPStep without noise: p.grad = mean of clipped per-sample grads, zero on the frozen row
    dp = DPStep(DPConfig(noise_multiplier=0.0, max_grad_norm=C), params, frozen_rows=[0])
    from flexolmo.model.trainer import Trainer

    tr = Trainer(model, params, TINY.expert, torch.zeros(100, dtype=torch.long), callbacks=[dp])
    dp.backward(tr, x, y)
    for p, g in zip(params, per):
        want = torch.einsum("b,b...->...", factor.to(g.dtype), g) / 6
        torch.testing.assert_close(p.grad[1], want[0], atol=1e-9, rtol=1e-5)
        assert (p.grad[0] == 0).all()


@pytest.mark.parametrize("eps,delta,steps", [(8.0, 1e-6, 200), (1.0, 1e-5, 50), (3.0, 1e-6, 1000)])
def test_derived_noise_meets_the_target(eps, delta, steps):
    p = plan(DPConfig(epsilon=eps, delta=delta), n_windows=2000, batch_size=16, steps=steps, embed_docs=256, seq_len=128)
    got = p.epsilon()
    assert got <= eps * 1.0001 and got >= eps * 0.99  # within 1% of the target, never above it
    # the router row and the classifier stay within their shares on their own
    assert epsilon_of([(p.router_sigma, p.router_rate, 1)], delta) <= 0.05 * eps * 1.0001
    assert epsilon_of([(p.classifier_sigma, 1.0, 1)], delta) <= 0.05 * eps * 1.0001
    # DP-SGD alone at that sigma is below the target: the other two mechanisms are composed in
    assert epsilon_of([(p.sigma, p.sample_rate, steps)], delta) < got


@pytest.mark.parametrize("kwargs,match", [
    ({"epsilon": 0}, "dp-epsilon must be a number > 0"), ({"epsilon": -1}, "dp-epsilon"),
    ({"epsilon": 8, "delta": 0}, r"dp-delta must be in \(0, 1\)"), ({"epsilon": 8, "delta": 1}, "dp-delta"),
    ({"epsilon": 8, "max_grad_norm": 0}, "dp-max-grad-norm must be > 0"), ({}, "target epsilon"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(InputError, match=match):
        DPConfig(**kwargs)


def test_unreachable_target_and_sampling_rate():
    with pytest.raises(InputError, match="cannot be reached"):
        plan(DPConfig(epsilon=0.01, delta=1e-6), n_windows=2000, batch_size=16, steps=100, embed_docs=256, seq_len=128)
    with pytest.raises(InputError, match="fewer than the batch size"):
        plan(DPConfig(epsilon=8), n_windows=10, batch_size=16, steps=100, embed_docs=256, seq_len=128)


def test_gaussian_sum_noise_at_its_stated_scale():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 40_000, generator=g) * 3  # norms ~600: every row is clipped
    clip, sigma = 2.0, 1.7
    noisy, noise = gaussian_sum(rows, clip, sigma, g)
    assert abs(float(noise.std()) / (sigma * clip) - 1) < 0.02 and abs(float(noise.mean())) < 0.05
    clipped_sum = noisy - noise
    assert float(clipped_sum.norm()) <= 50 * clip * (1 + 1e-9)
    # Poisson sampling: the sample size has the right mean
    sizes = [len(poisson_sample(1000, 0.05, g)) for _ in range(200)]
    assert abs(sum(sizes) / len(sizes) - 50) < 2


def test_router_row_mechanism_noise_matches_the_plan(fed):
    from flexolmo.model.domain import dp_router_row, mean_hidden
    from flexolmo.model.stream import token_stream

    ws, public = fed["ws"], load_model(fed["public"].out_dir)
    own = windows(token_stream(ws, "news"), 32)
    pub = windows(token_stream(ws, "public"), 32)
    p = plan(DPConfig(epsilon=4.0), len(own), 4, 10, 50, 32)
    rows = mean_hidden(public, own[:, :32])
    # many draws with the same window sample (rate 1): the row's spread is sigma C / expected count
    p.router_rate = 1.0
    draws = torch.stack([dp_router_row(public, own, pub, p, torch.Generator().manual_seed(s))[0] for s in range(60)])
    clip = p.router_clip
    want = p.router_sigma * clip / len(own)
    assert abs(float(draws.std(0).mean()) / want - 1) < 0.15
    factor = (clip / rows.norm(dim=1)).clamp(max=1.0)
    exact = (rows * factor[:, None]).sum(0) / len(own)
    torch.testing.assert_close(draws.mean(0).double(), exact, atol=4 * want / 60 ** 0.5, rtol=0)


def test_dp_expert_package(fed):
    ws, public = fed["ws"], load_model(fed["public"].out_dir)
    res = train_expert(ws, "math", "tiny", steps=4, dp=DPConfig(epsilon=8.0, delta=1e-6), progress=False)
    pr = res.card.privacy
    assert pr["dp"] and pr["epsilon"] <= 8.0 * 1.0001 and pr["epsilon"] >= 8.0 * 0.99
    assert pr["accountant"] == "opacus RDPAccountant" and pr["sampling"].startswith("Poisson")
    split = pr["budget_split"]
    assert split["router_row"]["clip"] > 0 and split["classifier"]["clip"] > 0
    assert split["router_row"]["noise_std_of_sum"] == pytest.approx(split["router_row"]["noise_multiplier"] * split["router_row"]["clip"])
    assert "own_text_to_own_expert" not in str(res.card.router_bias).replace("'own_text_to_own_expert': 'not measured under DP'", "")
    clf = (res.out_dir / "domain_classifier.safetensors")
    assert clf.exists()
    # frozen tensors unchanged under DP: every shared weight and the public slice
    pub = public.module.state_dict()
    for name, t in res.model.module.state_dict().items():
        if is_expert_tensor(name) or name.endswith("mlp.gate.weight"):
            assert torch.equal(t[0], pub[name][0]) and not torch.equal(t[1], pub[name][0])
        elif not name.endswith("mlp.gate.bias"):
            assert torch.equal(t, pub[name]), name


def test_bad_dp_input_writes_nothing(fed):
    from typer.testing import CliRunner

    from cli.main import app

    ws = fed["ws"]
    before = sorted(p.relative_to(ws.root) for p in ws.root.rglob("*"))
    for args, msg in ([["--dp-epsilon", "0"], "dp-epsilon"], [["--dp-epsilon", "8", "--dp-delta", "1.5"], "dp-delta"],
                      [["--dp-epsilon", "8", "--dp-max-grad-norm", "0"], "max-grad-norm"],
                      [["--dp-epsilon", "0.001", "--dp-delta", "1e-9"], "cannot be reached"]):
        r = CliRunner().invoke(app, ["--workspace", str(ws.root), "train", "expert", "--source", "news",
                                     "--profile", "tiny", *args])
        assert r.exit_code == 1 and msg in r.output, r.output
    assert sorted(p.relative_to(ws.root) for p in ws.root.rglob("*")) == before
