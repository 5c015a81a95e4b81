"""Router tuning on the tiny profile: only router tensors change, the proxy set is training
data only, the proxy loss goes down, opt-out and load_merged still work, CLI."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest_model import build_federation

import flexolmo.model.router_tuning as rt
from flexolmo.model.artifacts.merged_model import MergedModelCard
from flexolmo.base.errors import InputError
from flexolmo.model.generate import route
from flexolmo.model.merge import load_merged, merge
from flexolmo.model.layout import shared_weights_hash
from flexolmo.model.moe import load_model
from flexolmo.base.sources import set_policy
from flexolmo.model.train import train_expert, train_public


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """Tiny federation (public + news + code merged), then router tuning in place, recording
    which splits the proxy set read."""
    ws = build_federation(tmp_path_factory.mktemp("rt"), sources=("public", "news", "code"))
    train_public(ws, "tiny", progress=False)
    for s in ("news", "code"):
        train_expert(ws, s, "tiny", progress=False)
    merge(ws, ["news", "code"])
    merged = ws.models_dir / "merged"
    original = load_model(merged).module.state_dict()
    splits = []
    import flexolmo.base.tokens as tokens

    real = tokens.source_tokens

    def spy(ws_, source, split="train", **kw):
        splits.append((source, split))
        return real(ws_, source, split, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(tokens, "source_tokens", spy)
    try:
        res = rt.tune_router(ws, docs_per_source=20, steps=30, lr=2e-2, batch_size=6, seq_len=32, progress=False)
    finally:
        mp.undo()
    return {"ws": ws, "res": res, "original": original, "splits": splits}


def test_only_router_tensors_change(fed):
    res = fed["res"]
    assert res.out_dir == fed["ws"].models_dir / "merged"
    tuned = load_model(res.out_dir).module.state_dict()
    changed = set()
    for name, t in fed["original"].items():
        if name.endswith("mlp.gate.weight") or name.endswith("mlp.gate.bias"):
            assert torch.equal(t[0], tuned[name][0]), name  # the public row / bias stays
            if not torch.equal(t, tuned[name]):
                changed.add(name.rsplit(".", 1)[1])
            if name.endswith("bias"):
                assert (tuned[name] <= 0).all()
        else:
            assert torch.equal(t, tuned[name]), name  # experts, attention, embeddings, norms: bit-for-bit
    assert changed == {"weight", "bias"}
    assert shared_weights_hash(load_model(res.out_dir)) == res.card.public_model == res.card.inputs["public_model"]


def test_untuned_model_kept(fed):
    res = fed["res"]
    assert res.untuned_dir == fed["ws"].models_dir / "merged-untuned"
    for name, t in load_model(res.untuned_dir).module.state_dict().items():
        assert torch.equal(t, fed["original"][name]), name
    assert MergedModelCard.read(res.untuned_dir).router_tuning is None
    assert MergedModelCard.read(res.out_dir).router_tuning["steps"] == 30


def test_proxy_set_is_public_data_picked_by_the_owners_classifiers(fed):
    splits = fed["splits"]
    assert set(splits) == {("public", "train")}  # no owner's text without consent, never validation
    card = fed["res"].card.router_tuning
    assert card["proxy_set"]["docs"] == {"public": 20, "news": 20, "code": 20}
    assert "classifier" in card["proxy_set"]["from"]["news"] and "classifier" in card["proxy_set"]["from"]["code"]
    assert "validation documents are never used" in card["proxy_set"]["split"]
    assert card["active_while_tuning"].startswith("all 3 switched-on experts")


def test_classifier_picks_public_documents_like_the_domain(fed):
    from flexolmo.model.artifacts import expert_package
    from flexolmo.model.proxy import pick_proxy
    from flexolmo.base.tokens import source_tokens

    ws = fed["ws"]
    clf = expert_package.read(expert_package.folder(ws, "code")).classifier()
    own, pub = source_tokens(ws, "code"), source_tokens(ws, "public")
    # the owner's own documents score above public ones on average
    own_s = clf.scores([own.doc(i) for i in range(own.n_docs)]).mean()
    pub_docs = [pub.doc(i) for i in range(pub.n_docs)]
    assert own_s > clf.scores(pub_docs).mean()
    top = pick_proxy(clf, pub_docs, 5)
    assert clf.scores([pub_docs[i] for i in top]).min() >= clf.scores(pub_docs).median()


def test_consenting_owner_contributes_its_own_sample(fed, tmp_path):
    ws = fed["ws"]
    res = rt.tune_router(ws, ws.models_dir / "merged-untuned", out=tmp_path / "t", docs_per_source=5, steps=2,
                         batch_size=4, seq_len=16, consent=("news",), progress=False)
    frm = res.card.router_tuning["proxy_set"]["from"]
    assert "consented" in frm["news"] and "classifier" in frm["code"]
    with pytest.raises(InputError, match="--consent names no expert"):
        rt.tune_router(ws, ws.models_dir / "merged-untuned", out=tmp_path / "u", steps=2, consent=("nobody",), progress=False)


def test_proxy_loss_decreases(fed):
    res = fed["res"]
    assert res.loss_after < res.loss_before
    card = res.card.router_tuning
    assert card["proxy_loss"] == {"before": res.loss_before, "after": res.loss_after}
    assert card["steps"] == 30 and card["losses"]
    assert abs(sum(res.share_after.values()) - 1) < 1e-3 and set(res.share_after) == {"public", "news", "code"}
    assert not (fed["ws"].root / "runs" / rt.RUN_NAME).exists()


def test_opt_out_and_load_merged_on_tuned_model(fed):
    ws = fed["ws"]
    model = load_merged(ws, exclude=["news"])
    assert model.off == {"news": "excluded"}
    r = route(model, list(range(3, 40)))
    assert torch.isneginf(r.logits[..., 1]).all()
    assert not (r.experts == 1).any()
    assert load_merged(ws).off == {}


def test_inactive_source_is_not_used_nor_tuned(fed, tmp_path):
    ws = fed["ws"]
    set_policy(ws, "code", active=False)
    try:
        out = tmp_path / "tuned"
        res = rt.tune_router(ws, ws.models_dir / "merged-untuned", out=out, docs_per_source=5, steps=3,
                             batch_size=4, seq_len=16, progress=False)
    finally:
        set_policy(ws, "code", active=True)
    assert res.untuned_dir is None and set(res.proxy_docs) == {"public", "news"}
    assert res.card.router_tuning["not_tuned"] == {"code": "inactive in the catalog"}
    before, after = load_model(ws.models_dir / "merged-untuned").module.state_dict(), load_model(out).module.state_dict()
    for name, t in before.items():
        if name.endswith("mlp.gate.weight") or name.endswith("mlp.gate.bias"):
            assert torch.equal(t[2], after[name][2]), name  # code's row untouched
    assert load_model(out).experts == ["public", "news", "code"]


def test_cli_tune_router(fed, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    ws = fed["ws"]
    out = tmp_path / "cli-tuned"
    runner = CliRunner()
    r = runner.invoke(app, ["-w", str(ws.root), "tune-router", "--model", str(ws.models_dir / "merged-untuned"),
                            "--out", str(out), "--steps", "2", "--docs-per-source", "4"])
    assert r.exit_code == 0, r.output
    assert "proxy loss" in r.output and (out / "card.json").exists()
    r = runner.invoke(app, ["-w", str(ws.root), "tune-router", "--model", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "no merged model" in r.output
    shutil.rmtree(out)
