"""Model side on the tiny profile: expert freezing, the router recipe (negative bias, z-loss),
merge equivalence, integrity checks, routing capture, opt-out, resume, CLI. Data and
tokenizer are built in tmp folders. Artifact cards and old workspaces: tests/test_artifacts.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest_model import build_federation

from flexolmo.model.config import Profile, get_profile
from flexolmo.base.errors import ConflictError, InputError, IntegrityError
from flexolmo.model.generate import generate, route, token_logprobs
from flexolmo.model.merge import load_merged, merge
from flexolmo.model.domain import domain_embedding
from flexolmo.model.layout import SLICE_KEYS, get_slice, is_expert_tensor, shared_weights_hash, slice_shapes
from flexolmo.model.moe import load_model, routers
from flexolmo.base.sources import set_policy
from flexolmo.base.tokenizer import load_tokenizer
from flexolmo.model.train import train_expert, train_public


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """A trained tiny federation: public model, experts news + code, merged model."""
    ws = build_federation(tmp_path_factory.mktemp("fed"), sources=("public", "news", "code", "math"))
    pub = train_public(ws, "tiny", progress=False)
    experts = {s: train_expert(ws, s, "tiny", progress=False) for s in ("news", "code")}
    merged = merge(ws, ["news", "code"])
    return {"ws": ws, "public": pub, "experts": experts, "merged": merged}


def test_profiles_round_trip():
    for name in ("tiny", "demo", "paper"):
        p = get_profile(name)
        assert Profile.from_dict(p.to_dict()) == p
    with pytest.raises(InputError, match="tiny, demo, paper"):
        get_profile("huge")


def test_public_checkpoint(fed):
    out = fed["public"].out_dir
    for f in ("config.json", "model.safetensors", "router_bias.safetensors", "experts.json", "card.json"):
        assert (out / f).exists(), f
    card = json.loads((out / "card.json").read_text())
    assert card["steps"] == get_profile("tiny").public.steps and card["losses"] and card["tokens_per_s"] > 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_experts == 1


def test_expert_training_freezes_public_half(fed):
    ws = fed["ws"]
    public = load_model(fed["public"].out_dir)
    pub = public.module.state_dict()
    res = fed["experts"]["news"]
    model = res.model
    for name, t in model.module.state_dict().items():
        if name.endswith("mlp.gate.bias"):
            assert t[0].item() == 0.0 and t[1].item() < 0  # the public bias never moves; the owner's is negative
        elif is_expert_tensor(name):
            assert torch.equal(t[0], pub[name][0]), name  # public slice bit-for-bit
            assert not torch.equal(t[1], pub[name][0]), name  # own slice trained
        elif name.endswith("mlp.gate.weight"):
            assert torch.equal(t[0], pub[name][0]), name
        else:
            assert torch.equal(t, pub[name]), name  # embeddings, attention, norms, lm_head
    cfg = get_profile("tiny").expert
    init, _ = domain_embedding(public, ws, "news", cfg.embed_docs, cfg.seq_len, seed=cfg.seed)
    assert not torch.equal(routers(model)[0].weight[1], init)  # router row trained
    card = json.loads((res.out_dir / "card.json").read_text())
    assert card["inputs"]["public_model"] == shared_weights_hash(public)
    assert "domain embedding (domain_mean)" in card["router_init"] and card["privacy"] == {"dp": False}
    # the package is expert 1's slice and nothing else: four tensors of the layout's shapes,
    # bit-for-bit the trained model's, and metadata naming only the source and public model
    from safetensors import safe_open

    with safe_open(str(res.out_dir / "expert.safetensors"), "pt") as f:
        assert set(f.keys()) == set(SLICE_KEYS)
        assert f.metadata() == {"source": "news", "public_model": shared_weights_hash(public)}
        own = get_slice(model, 1)
        for k, shape in slice_shapes(public.config).items():
            assert tuple(f.get_tensor(k).shape) == shape and torch.equal(f.get_tensor(k), own[k]), k
    assert set(card["files"]) == {"expert.safetensors", "domain_classifier.safetensors"}


@pytest.mark.parametrize("top_k", [2, 1])
def test_merged_minus_others_equals_owner_model(fed, top_k):
    ws = fed["ws"]
    x = torch.randint(2, 300, (2, 24))
    for k, source in enumerate(("news", "code"), start=1):
        own = fed["experts"][source].model.eval()
        merged = load_merged(ws, include=[source])
        assert merged.off == {("code" if source == "news" else "news"): "not included"}
        for r in routers(own) + routers(merged):
            r.top_k = top_k
        with torch.no_grad():
            a, b = merged(input_ids=x).logits, own(input_ids=x).logits
        for r in routers(own):
            r.top_k = 2
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_merge_refuses_foreign_and_corrupted_packages(fed, tmp_path):
    ws = fed["ws"]
    pkgs = tmp_path / "pkgs"
    shutil.copytree(ws.experts_dir, pkgs)
    card_path = pkgs / "news" / "card.json"
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "inputs": {**card["inputs"], "public_model": "0" * 64}}))
    with pytest.raises(ConflictError, match="'news' was trained against a different public model"):
        merge(ws, ["news", "code"], out=tmp_path / "m", packages_dir=pkgs)
    card_path.write_text(json.dumps(card))
    blob = bytearray((pkgs / "code" / "expert.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (pkgs / "code" / "expert.safetensors").write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=r"code/expert\.safetensors is corrupted"):
        merge(ws, ["news", "code"], out=tmp_path / "m", packages_dir=pkgs)
    assert not (tmp_path / "m").exists()


def test_routing_capture_consistent_with_gate_logits(fed):
    ws = fed["ws"]
    model = load_merged(ws)
    tok = load_tokenizer(ws)
    g = generate(model, tok, "The president of the", max_new_tokens=6, stop_at_eos=False)
    assert len(g.routing) == len(g.token_ids) == 6
    L, k = model.config.num_hidden_layers, model.config.num_experts_per_tok
    assert all(len(t.experts) == L and all(len(row) == k for row in t.experts) for t in g.routing)
    # route() over prompt + generation reproduces the captured decisions, and its top-k
    # indices are the top-k of the gate's logits
    full = g.prompt_ids + g.token_ids
    r = route(model, full)
    assert r.experts.shape == (len(full), L, k) and r.logits.shape == (len(full), L, model.config.num_experts)
    assert torch.equal(r.experts, torch.topk(r.logits, k, dim=-1).indices)
    for j, t in enumerate(g.routing):
        experts, weights = r.producing(len(g.prompt_ids) + j)
        assert experts.tolist() == t.experts
        torch.testing.assert_close(weights, torch.tensor(t.weights), atol=1e-4, rtol=0)


def test_switched_off_expert_never_selected(fed):
    ws = fed["ws"]
    model = load_merged(ws, exclude=["news"])
    tok = load_tokenizer(ws)
    g = generate(model, tok, "president congress nation", max_new_tokens=8, stop_at_eos=False)
    assert all(1 not in row for t in g.routing for row in t.experts)
    assert g.expert_shares()["news"] == 0.0
    r = route(model, g.prompt_ids + g.token_ids)
    assert not (r.experts == 1).any()
    # token_logprobs: one pass; switching news off here equals loading without it
    full = load_merged(ws)
    lp_off = token_logprobs(full, r.token_ids, exclude=[1])
    torch.testing.assert_close(lp_off, token_logprobs(model, r.token_ids), atol=1e-5, rtol=0)
    assert not torch.allclose(token_logprobs(full, r.token_ids), lp_off)
    assert full.off == {} and full.active == [True, True, True]  # restored after the call
    assert all((r.off == 0).all() for r in routers(full))


def test_catalog_switches_sources_off(fed):
    ws = fed["ws"]
    set_policy(ws, "code", active=False)
    try:
        model = load_merged(ws)
        assert model.off == {"code": "inactive in the catalog"}
        assert load_merged(ws, respect_catalog=False).off == {}
    finally:
        set_policy(ws, "code", active=True)
    set_policy(ws, "news", expires="2001-01-01")
    try:
        assert "news" in load_merged(ws).off
    finally:
        set_policy(ws, "news", expires=None)
    with pytest.raises(InputError, match="no expert for source 'nope'"):
        load_merged(ws, exclude=["nope"])


def test_dp_expert(fed):
    from flexolmo.model.privacy import DPConfig

    ws = fed["ws"]
    res = train_expert(ws, "math", "tiny", steps=3, dp=DPConfig(noise_multiplier=1.0), progress=False)
    priv = res.card.privacy
    assert priv["dp"] and 0 < priv["epsilon"] < float("inf") and priv["accountant"] == "opacus RDPAccountant"
    assert priv["noise_seed"].startswith("secret")
    assert res.card.router_bias["public_share_of_batches"] == "not applied under DP"  # DP-SGD draws its own batches
    pub = load_model(fed["public"].out_dir).module.state_dict()
    for name, t in res.model.module.state_dict().items():
        if is_expert_tensor(name):
            assert torch.equal(t[0], pub[name][0]) and not torch.equal(t[1], pub[name][0])


def test_resume_after_interruption(tmp_path):
    ws = build_federation(tmp_path / "a", sources=("public",))
    ref = train_public(ws, "tiny", progress=False)
    ref_hash = shared_weights_hash(ref.model)
    shutil.rmtree(ws.models_dir / "public")
    stopped = train_public(ws, "tiny", progress=False, stop_after=7)
    assert stopped.stopped == "stopped after step 7 (stop_after)" and stopped.card is None
    assert stopped.fit.steps_done == 7 and not (ws.models_dir / "public").exists()  # nothing written
    assert (ws.root / "runs" / "public" / "state.pt").exists()
    state = torch.load(ws.root / "runs" / "public" / "state.pt", weights_only=False)
    assert state["step"] == 7 and {"optimizer", "config", "rng"} <= set(state)
    res = train_public(ws, "tiny", progress=False)
    assert res.resumed_from == 7 and res.stopped is None
    assert res.losses == ref.losses
    assert shared_weights_hash(res.model) == ref_hash
    assert not (ws.root / "runs" / "public").exists()


def test_cli_merge_and_generate(fed):
    from typer.testing import CliRunner

    from cli.main import app

    ws = fed["ws"]
    runner = CliRunner()
    out = ws.root / "models" / "cli-merged"
    r = runner.invoke(app, ["-w", str(ws.root), "merge", "--experts", "news,code", "--out", str(out), "--top-k", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "experts.json").read_text())["top_k"] == 1
    r = runner.invoke(app, ["-w", str(ws.root), "generate", "The city", "-n", "4", "--exclude", "code", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["expert_names"] == ["public", "news", "code"] and data["switched_off"] == {"code": "excluded"}
    assert len(data["routing"]) == len(data["token_ids"])
    r = runner.invoke(app, ["-w", str(ws.root), "merge", "--experts", "nosuch"])
    assert r.exit_code == 1 and "nosuch" in r.output


def test_load_expert_model_rebuilds_owner_model(fed):
    from flexolmo.model.merge import load_expert_model

    own = fed["experts"]["code"].model
    rebuilt = load_expert_model(fed["ws"], "code")
    a, b = own.module.state_dict(), rebuilt.module.state_dict()
    assert list(a) == list(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert rebuilt.experts == own.experts == ["public", "code"]


def test_owner_bias_starts_negative_and_never_leaks_to_public(fed):
    cfg = get_profile("tiny").expert
    assert cfg.router_bias_init is None and cfg.weight_decay == 0.0  # calibrated
    for source, res in fed["experts"].items():
        for r in routers(res.model):
            assert r.bias[0].item() == 0.0  # the public expert's bias: exactly 0
            assert r.bias[1].item() < 0  # still negative after training (clamped <= 0)
        calib = res.card.router_bias
        assert all(b < 0 for b in calib["bias_per_layer"])
        # by construction, at the start every layer prefers the public expert on >= target of public
        # text, or gave public share up (never below the floor) to keep the floor of own text, or
        # balanced the two where both floors cannot hold
        assert calib["own_text_floor"] == cfg.router_own_floor == 0.7
        eps = 0.02  # the own text is measured at its tokens; the grid of the balance is finite
        for pub, own in calib["at_start"]["per_layer"]:
            assert (pub >= cfg.router_bias_target or (pub >= cfg.router_own_floor - eps and own >= cfg.router_own_floor - eps)
                    or abs(pub - own) <= eps), (source, pub, own)
        assert calib["bias_at_end"] == [round(float(r.bias.detach()[1]), 4) for r in routers(res.model)]
        assert 0 <= calib["at_end"]["own_text_to_own_expert"] <= 1
    # merged: bias 0 and router row 0 are the public model's; every owner's bias is its own
    merged = load_merged(fed["ws"])
    public = load_model(fed["public"].out_dir)
    for r, rp in zip(routers(merged), routers(public)):
        assert r.bias[0].item() == 0.0 and torch.equal(r.weight[0], rp.weight[0])
        assert (r.bias[1:] < 0).all()
    with pytest.raises(InputError, match="router_bias_init must be <= 0"):
        get_profile("tiny").expert.__class__(router_bias_init=0.5)


def test_layer_shift_keeps_the_owners_floor_and_balances_when_both_cannot_hold():
    from flexolmo.model.bias import layer_shift

    g = torch.Generator().manual_seed(0)
    pub = torch.randn(20000, generator=g)  # margins (owner minus public logit) on public text

    def shares(own, d):
        return float((pub + d <= 0).float().mean()), float((own + d > 0).float().mean())

    # own text far from public: the public target binds, the floor is met anyway
    own = torch.randn(20000, generator=g) + 4
    d = layer_shift(pub, own, 0.8, 0.7)
    p_, o_ = shares(own, d)
    assert p_ == pytest.approx(0.8, abs=2e-3) and o_ > 0.9
    assert d == layer_shift(pub, None, 0.8, None)  # public text alone: the same
    # own text closer: at target 0.8 only ~64% of own text would stay; the floor moves the bias
    own = torch.randn(20000, generator=g) + 1.2
    assert shares(own, layer_shift(pub, None, 0.8, None))[1] < 0.66
    p_, o_ = shares(own, layer_shift(pub, own, 0.8, 0.7))
    assert o_ == pytest.approx(0.7, abs=2e-3) and 0.7 <= p_ < 0.8
    # own text like public text: both floors cannot hold, the two shares are balanced
    own = torch.randn(20000, generator=g) + 0.3
    p_, o_ = shares(own, layer_shift(pub, own, 0.8, 0.7))
    assert abs(p_ - o_) < 0.01 and p_ < 0.7
    with pytest.raises(InputError, match="router_own_floor"):
        get_profile("tiny").expert.__class__(router_own_floor=0.9)


def _public_windows(fed, n=8, seq_len=32):
    from flexolmo.model.bias import sample_windows
    from flexolmo.model.stream import token_stream

    return sample_windows(token_stream(fed["ws"], "public"), seq_len, n, seed=7)


def test_router_margin_in_one_unit_and_bias_at_its_target(fed):
    from flexolmo.model.bias import logit_margins, scale_margin, set_quantile
    from flexolmo.model.merge import load_expert_model

    cfg = get_profile("tiny").expert
    assert cfg.router_margin_std == 1.0 and cfg.router_bias_every > 0 and cfg.public_mix == 0.25
    for source, res in fed["experts"].items():
        calib = res.card.router_bias
        assert calib["margin_std_on_public_text"] == cfg.router_margin_std and len(calib["row_scale_per_layer"]) == len(routers(res.model))
        assert calib["recalibrated"]["every_steps"] == cfg.router_bias_every and calib["recalibrated"]["mean_abs_move"]
        assert calib["public_share_of_batches"] == cfg.public_mix

    # rescaling: the margin's std on public text becomes what was asked, per layer; row 0 untouched
    model = load_expert_model(fed["ws"], "news")
    pub = _public_windows(fed)
    row0 = [r.weight[0].clone() for r in routers(model)]
    bias = [float(r.bias.detach()[1]) for r in routers(model)]
    factors = scale_margin(model, pub, std=2.5)
    assert all(f > 0 for f in factors)
    with torch.no_grad():
        for r in routers(model):
            r.bias.zero_()
        stds = logit_margins(model, pub).std(dim=1)
    assert stds[0].item() == pytest.approx(2.5, rel=1e-3)  # layer 0's input does not depend on any router
    assert all(torch.equal(r.weight[0], w) for r, w in zip(routers(model), row0))
    with torch.no_grad():
        for r, b in zip(routers(model), bias):
            r.bias[1] = b
    # the bias set layer by layer: exactly `target` of the public tokens prefer the public expert
    biases = set_quantile(model, pub, 0.75)
    assert all(b < 0 for b in biases)
    share = (logit_margins(model, pub) <= 0).float().mean(dim=1)
    assert torch.all((share - 0.75).abs() <= 1.5 / pub.numel()) or torch.all(share >= 0.75), share
    with pytest.raises(InputError, match="must be > 0"):
        scale_margin(model, pub, std=0.0)


def test_reading_routers_up_to_a_layer_stops_there_with_a_full_pass_values(fed):
    from flexolmo.model.bias import logit_margins, per_layer
    from flexolmo.model.merge import load_expert_model

    model = load_expert_model(fed["ws"], "news")
    pub = _public_windows(fed)
    L = len(routers(model))
    full = logit_margins(model, pub)
    assert full.shape[0] == L
    with torch.no_grad():
        logits = model(input_ids=pub[:2]).logits
    ran = []  # layers whose MoE block ran: a pass read up to layer l runs no further
    hooks = [layer.mlp.register_forward_hook(lambda *_a, k=k: ran.append(k))
             for k, layer in enumerate(model.module.model.layers)]
    try:
        for upto in range(L):
            ran.clear()
            part = logit_margins(model, pub, upto=upto)
            assert part.shape[0] == upto + 1 and torch.equal(part, full[: upto + 1])
            assert max(ran) == upto - 1 if upto else not ran  # the MoE block after the last router read never runs
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():  # the model is whole afterwards: no hook left behind, the same output as before
        assert torch.equal(model(input_ids=pub[:2]).logits, logits)
    assert not any(r._forward_hooks for r in routers(model))
    with pytest.raises(InputError, match="upto=9"):
        per_layer(model, pub, lambda h, out: out[0], 8, upto=9)


def test_classifier_rows_separate_own_from_public_text_per_layer(fed):
    from flexolmo.model.bias import router_inputs, sample_windows
    from flexolmo.model.config import override
    from flexolmo.model.domain import classifier_rows
    from flexolmo.model.privacy import DPConfig
    from flexolmo.model.stream import token_stream

    public = load_model(fed["public"].out_dir)
    pub = _public_windows(fed, n=8)
    own = sample_windows(token_stream(fed["ws"], "code"), 32, 8, seed=7)
    rows, how = classifier_rows(public, pub, own)
    L = len(routers(public))
    assert rows.shape == (L, public.config.hidden_size) and "logistic regression" in how
    # on held-out windows, every layer's margin (row - row 0).x is higher on own text than on public text
    xp = router_inputs(public, sample_windows(token_stream(fed["ws"], "public"), 32, 8, seed=99))
    xo = router_inputs(public, sample_windows(token_stream(fed["ws"], "code"), 32, 8, seed=99))
    for l, r in enumerate(routers(public)):
        w = rows[l] - r.weight.detach()[0]
        assert (xo[l] @ w).mean() > (xp[l] @ w).mean(), l
    # fitting on the owner's text outside the DP budget is refused
    p = get_profile("tiny")
    p.expert = override(p.expert, router_init="classifier")
    with pytest.raises(InputError, match="outside the DP budget"):
        train_expert(fed["ws"], "math", p, dp=DPConfig(noise_multiplier=1.0), progress=False)


def test_public_mix_batches_draw_the_asked_share_from_public_text():
    from flexolmo.model.config import TrainConfig
    from flexolmo.model.stream import Mixture, get_batch

    own, public = torch.arange(0, 1000), torch.arange(5000, 5600)  # disjoint id ranges tell the streams apart
    cfg = TrainConfig(batch_size=8, seq_len=16)
    x, y = get_batch(Mixture(own, public, 0.25), cfg, step=3, rank=0)
    assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    from_public = (x >= 5000).all(dim=1)
    assert from_public.tolist() == [False] * 6 + [True] * 2  # each window from one stream, 2 of 8 public
    assert torch.equal(get_batch(Mixture(own, public, 0.25), cfg, 3, 0)[0], x)  # deterministic: resume sees it again
    assert not torch.equal(get_batch(Mixture(own, public, 0.25), cfg, 4, 0)[0], x)
    # a plain stream draws exactly what it drew before mixtures existed
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 3)
    starts = torch.randint(0, len(own) - cfg.seq_len - 1, (8,), generator=g)
    assert get_batch(own, cfg, 3, 0)[0][:, 0].tolist() == starts.tolist()
    assert Mixture(own, public, 0.01).counts(8) == (7, 1) and Mixture(own, public, 0.99).counts(8) == (1, 7)
    with pytest.raises(InputError, match="public share"):
        Mixture(own, public, 1.0)
    with pytest.raises(InputError, match="public_mix"):
        TrainConfig(public_mix=-0.1)


def test_trainer_lr_scale_moves_a_parameter_proportionally():
    from flexolmo.model.config import TrainConfig
    from flexolmo.model.trainer import Trainer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
    w0 = [p.detach().clone() for p in net.parameters()]
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=8, warmup_steps=0, weight_decay=0.0, checkpoint_every=0, lr=1e-2)
    emb, lin_w, lin_b = net.parameters()

    def loss_fn(model, x, y):
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    Trainer(net, [emb, lin_w, lin_b], cfg, torch.randint(0, 50, (200,)), loss_fn=loss_fn,
            lr_scale={id(lin_w): 0.25, id(lin_b): 0.0}).fit()
    moved = [(p.detach() - w).abs().max().item() for p, w in zip(net.parameters(), w0)]
    # Adam's first step moves every entry by lr (sign of its gradient): here by lr x factor
    assert moved[0] == pytest.approx(1e-2, rel=1e-3) and moved[1] == pytest.approx(0.25e-2, rel=1e-3)
    assert moved[2] == 0.0


def test_router_z_loss_is_part_of_the_loss(fed):
    from flexolmo.model.losses import WithRouterZLoss, lm_loss
    from flexolmo.model.generate import RoutingCapture

    model = fed["experts"]["news"].model.module
    x = torch.randint(2, 300, (2, 16))
    y = torch.randint(2, 300, (2, 16))
    with torch.no_grad():
        with RoutingCapture(model, keep_logits=True) as cap:
            ce = lm_loss(model, x, y)
        _, _, logits = cap.stacked()  # (N, L, E): the FlexRouter's own logits
        z = torch.logsumexp(logits, dim=-1).pow(2).mean(0).mean()  # per layer over tokens, then over layers
        fn = WithRouterZLoss(model, coef=0.5)
        total = fn(model, x, y)
    assert z > 0
    torch.testing.assert_close(total, ce + 0.5 * z, rtol=1e-5, atol=1e-6)
    assert fn.last_z == pytest.approx(z.item(), rel=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(WithRouterZLoss(model, coef=0.0)(model, x, y), ce)
    # the z-loss reaches the owner's router row through its gradient
    w = routers(model)[0].weight
    grads = []
    for coef in (0.0, 1.0):
        w.grad = None
        WithRouterZLoss(model, coef)(model, x, y).backward()
        grads.append(w.grad[1].clone())
    assert not torch.allclose(grads[0], grads[1])


def test_dp_clipping_bounds_each_per_sample_gradient(fed):
    from flexolmo.model.callbacks import train_rows
    from flexolmo.model.losses import lm_loss
    from flexolmo.model.privacy import DPConfig, DPStep, clip_sample, per_sample_grads
    from flexolmo.model.trainer import Trainer

    model = load_expert_model_copy(fed)
    params, _ = train_rows(model, frozen=[0])
    x, y = torch.randint(2, 300, (4, 16)), torch.randint(2, 300, (4, 16))
    C = 1e-3
    samples = list(per_sample_grads(model, lm_loss, params, x, y, frozen_rows=[0]))
    assert len(samples) == 4
    clipped_sum = [torch.zeros_like(p) for p in params]
    for grads, _ in samples:
        assert all((g[0] == 0).all() for g in grads)  # the frozen public slice is outside the norm
        clipped, raw = clip_sample(grads, C)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in clipped)).item()
        assert raw > C and norm <= C * (1 + 1e-6)  # each sample's gradient is bounded by C
        same, _ = clip_sample(grads, 1e9)  # a large C leaves the gradient as it is
        assert all(torch.equal(a, b) for a, b in zip(same, grads))
        for s_, g in zip(clipped_sum, clipped):
            s_.add_(g)
    # DPStep without noise: p.grad is the mean of the clipped per-sample gradients
    cfg = get_profile("tiny").expert
    dp = DPStep(DPConfig(noise_multiplier=0.0, max_grad_norm=C), params, frozen_rows=[0])
    tr = Trainer(model, params, cfg, torch.zeros(100, dtype=torch.long), callbacks=[dp])
    dp.backward(tr, x, y)
    for p, s_ in zip(params, clipped_sum):
        torch.testing.assert_close(p.grad, s_ / 4, rtol=1e-5, atol=1e-9)
    total = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
    assert total <= C * (1 + 1e-6)


def load_expert_model_copy(fed):
    from flexolmo.model.merge import load_expert_model

    return load_expert_model(fed["ws"], "news").module
