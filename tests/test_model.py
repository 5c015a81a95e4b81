"""Model side on the tiny profile: expert freezing, merge equivalence, integrity checks,
routing capture, opt-out, resume, CLI. Data and tokenizer are built in tmp folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest_model import build_federation

from flexolmo.config import Profile, get_profile
from flexolmo.errors import ConflictError, InputError, IntegrityError
from flexolmo.generate import generate, route, token_logprobs
from flexolmo.merge import load_merged, merge
from flexolmo.model import is_expert_tensor, load_model, routers, shared_weights_hash
from flexolmo.sources import set_policy
from flexolmo.tokenizer import load_tokenizer
from flexolmo.train import domain_embedding, train_expert, train_public


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
    pub = public.state_dict()
    res = fed["experts"]["news"]
    model = res.model
    for name, t in model.state_dict().items():
        if name.endswith("mlp.gate.bias"):
            assert t[0].item() == 0.0 and (t <= 0).all()
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
    assert card["public_hash"] == shared_weights_hash(public)
    assert "domain embedding" in card["router_init"] and card["privacy"] == {"dp": False}
    # the package holds tensors only: no training text
    blob = (res.out_dir / "expert.safetensors").read_bytes()
    assert b"president" not in blob and set(json.loads((res.out_dir / "card.json").read_text())["files"]) == {"expert.safetensors"}


@pytest.mark.parametrize("top_k", [2, 1])
def test_merged_minus_others_equals_owner_model(fed, top_k):
    ws = fed["ws"]
    x = torch.randint(2, 300, (2, 24))
    for k, source in enumerate(("news", "code"), start=1):
        own = fed["experts"][source].model.eval()
        merged = load_merged(ws, include=[source])
        assert merged.flexolmo_off == {("code" if source == "news" else "news"): "not included"}
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
    card_path.write_text(json.dumps({**card, "public_hash": "0" * 64}))
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
    assert all(full.flexolmo_off == {} for _ in [0]) and all(routers(full)[0].off == 0)  # restored


def test_catalog_switches_sources_off(fed):
    ws = fed["ws"]
    set_policy(ws, "code", active=False)
    try:
        model = load_merged(ws)
        assert model.flexolmo_off == {"code": "inactive in the catalog"}
        assert load_merged(ws, respect_catalog=False).flexolmo_off == {}
    finally:
        set_policy(ws, "code", active=True)
    set_policy(ws, "news", expires="2001-01-01")
    try:
        assert "news" in load_merged(ws).flexolmo_off
    finally:
        set_policy(ws, "news", clear_expiry=True)
    with pytest.raises(InputError, match="no expert for source 'nope'"):
        load_merged(ws, exclude=["nope"])


def test_dp_expert(fed):
    from flexolmo.privacy import DPConfig

    ws = fed["ws"]
    res = train_expert(ws, "math", "tiny", steps=3, dp=DPConfig(noise_multiplier=1.0), progress=False)
    priv = res.card["privacy"]
    assert priv["dp"] and 0 < priv["epsilon"] < float("inf") and priv["accountant"] == "opacus RDPAccountant"
    assert priv["noise_seed"].startswith("secret")
    pub = load_model(fed["public"].out_dir).state_dict()
    for name, t in res.model.state_dict().items():
        if is_expert_tensor(name):
            assert torch.equal(t[0], pub[name][0]) and not torch.equal(t[1], pub[name][0])


def test_resume_after_interruption(tmp_path):
    ws = build_federation(tmp_path / "a", sources=("public",))
    ref = train_public(ws, "tiny", progress=False)
    ref_hash = shared_weights_hash(ref.model)
    with pytest.raises(KeyboardInterrupt):
        train_public(ws, "tiny", progress=False, stop_after=7)
    assert (ws.root / "runs" / "public" / "state.pt").exists()
    state = torch.load(ws.root / "runs" / "public" / "state.pt", weights_only=False)
    assert state["step"] == 7 and {"optimizer", "config", "rng"} <= set(state)
    res = train_public(ws, "tiny", progress=False)
    assert res.resumed_from == 7
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
    from flexolmo.merge import load_expert_model

    own = fed["experts"]["code"].model
    rebuilt = load_expert_model(fed["ws"], "code")
    for (n, a), (_, b) in zip(own.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), n
    assert rebuilt.flexolmo_experts == ["public", "code"]


def test_current_checks_for_a_rerun(fed):
    from flexolmo.train import expert_is_current, public_is_current

    ws = fed["ws"]
    assert public_is_current(ws, "tiny") and not public_is_current(ws, "demo")
    assert expert_is_current(ws, "news", "tiny") and not expert_is_current(ws, "news", "demo")
    assert not expert_is_current(ws, "forum", "tiny")  # no package for it
