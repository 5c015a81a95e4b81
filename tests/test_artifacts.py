"""Artifact cards (flexolmo/artifacts): `is_current` of every kind, and a workspace whose cards
were written by the previous version (keys tokenizer_sha256, shared_weights_sha256,
public_hash; no `inputs`): it loads, or says clearly to rebuild."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest_model import build_federation

from flexolmo.model.artifacts import expert_package, merged_model, public_model
from flexolmo.base.artifacts import tokenizer as tok_artifact
from flexolmo.model.artifacts.expert_package import ExpertPackageCard
from flexolmo.model.artifacts.merged_model import MergedModelCard
from flexolmo.model.artifacts.public_model import PublicModelCard
from flexolmo.model.config import get_profile
from flexolmo.base.errors import OutdatedError
from flexolmo.model.layout import shared_weights_hash
from flexolmo.model.merge import load_merged, merge
from flexolmo.model.moe import load_model
from flexolmo.model.privacy import DPConfig
from flexolmo.base.tokenizer import tokenizer_hash
from flexolmo.base.tokens import source_tokens
from flexolmo.model.train import train_expert, train_public
from flexolmo.base.workspace import Workspace

TINY = get_profile("tiny")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    ws = build_federation(tmp_path_factory.mktemp("art"), sources=("public", "news", "code", "math"))
    train_public(ws, "tiny", progress=False)
    for s in ("news", "code"):
        train_expert(ws, s, "tiny", progress=False)
    merge(ws, ["news", "code"])
    return ws


def _public_hash(ws) -> str:
    return public_model.read(ws).weights


def test_public_model_is_current(fed):
    ws = fed
    card = public_model.read(ws)
    inputs = public_model.inputs(ws, TINY)
    assert card.is_current(inputs) and public_model.status(ws, TINY) is None
    assert card.weights == shared_weights_hash(load_model(public_model.folder(ws)))
    assert "config" in public_model.status(ws, get_profile("demo"))
    assert not card.is_current({**inputs, "tokenizer": "0" * 64})
    assert card.stale_reason({**inputs, "tokenizer": "0" * 64}) == "tokenizer changed since it was built"
    empty = Workspace(ws.root.parent / "empty-ws")
    assert PublicModelCard.status(public_model.folder(empty), inputs) == "no public model yet"


def test_expert_package_is_current(fed):
    ws = fed
    h = _public_hash(ws)
    assert expert_package.status(ws, TINY, "news", h) is None
    card = expert_package.read(expert_package.folder(ws, "news")).card
    assert card.is_current(expert_package.inputs(ws, TINY, "news", h, None))
    assert expert_package.status(ws, TINY, "news", "0" * 64) == "public_model changed since it was built"
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    assert expert_package.status(ws, TINY, "news", h, dp) == "config changed since it was built"
    assert expert_package.status(ws, TINY, "math", h) == "no expert package yet"
    assert expert_package.status(ws, TINY, "news", None) == "no public model yet"


def test_merged_model_is_current(fed):
    ws = fed
    h = _public_hash(ws)
    assert merged_model.status(ws, h, ["news", "code"], top_k=3) is None
    assert MergedModelCard.read(merged_model.folder(ws)).top_k == 3  # default 4, clamped to 3 experts
    assert merged_model.status(ws, h, ["news", "code"], top_k=2) == "settings changed since it was built"
    assert merged_model.status(ws, h, ["code", "news"], top_k=3) == "settings changed since it was built"
    assert merged_model.status(ws, h, ["news"], top_k=2) is not None
    assert merged_model.status(ws, h, ["news", "math"], top_k=3) == "no expert package for 'math'"


def test_retrained_expert_makes_merged_stale(fed, tmp_path):
    ws = Workspace(tmp_path / "copy")
    shutil.copytree(fed.root, ws.root)
    h = _public_hash(ws)
    train_expert(ws, "news", "tiny", steps=3, progress=False)
    assert "config" in expert_package.status(ws, TINY, "news", h)  # 3 steps is another recipe than the profile's
    assert merged_model.status(ws, h, ["news", "code"], top_k=3) == "expert:news changed since it was built"
    train_expert(ws, "math", "tiny", dp=DPConfig(noise_multiplier=1.0), steps=2, progress=False)
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    p = get_profile("tiny")
    p.expert.steps = 2
    assert expert_package.status(ws, p, "math", h, dp) is None


# ---------------------------------------------------------------------------------------
# a workspace written by the previous version


def _old_config(card_config: dict) -> dict:
    """The profile dict as the previous code wrote it: no router recipe fields, top_k 2."""
    old = json.loads(json.dumps(card_config))
    old["model"]["top_k"] = 2
    for part in ("public", "expert"):
        for k in ("router_bias_init", "router_z_loss", "router_init"):
            old[part].pop(k)
    return old


def _write_old_cards(ws: Workspace) -> None:
    """Rewrite every card in the format of the previous writers (train.py, merge.py,
    tokenizer.py and tokens.py before typed artifacts)."""
    t = json.loads((ws.tokenizer_dir / "card.json").read_text())
    (ws.tokenizer_dir / "card.json").write_text(json.dumps({
        "kind": "byte-level BPE (HF tokenizers)", "vocab_size": t["vocab_size"], "eos_token": t["eos_token"],
        "eos_id": t["eos_id"], "pad_token": t["pad_token"], "pad_id": t["pad_id"], "trained_on": t["trained_on"],
        "source_content_hash": t["inputs"].get("source"), "n_texts": t["n_texts"], "n_bow_ids": t["n_bow_ids"],
        "bow_rule": t["bow_rule"], "sha256": t["files"]["tokenizer.json"], "seconds": t["seconds"]}, indent=2))
    for cache in ws.sources_dir.glob("*/tokens-*"):
        c = json.loads((cache / "card.json").read_text())
        (cache / "card.json").write_text(json.dumps({k: c[k] for k in ("source", "split", "n_docs", "n_tokens")}
                                                    | {"tokenizer_sha256": c["inputs"]["tokenizer"]}))
    stats = ("steps", "tokens", "final_loss", "losses", "seconds", "tokens_per_s", "resumed_from", "world_size",
             "throughput", "n_params")
    p = json.loads((ws.models_dir / "public" / "card.json").read_text())
    (ws.models_dir / "public" / "card.json").write_text(json.dumps({
        "kind": "public", "source": p["source"], "profile": p["profile"], "config": _old_config(p["config"]),
        **{k: p[k] for k in stats}, "router_init": p["router_init"], "tokenizer_sha256": p["inputs"]["tokenizer"],
        "shared_weights_sha256": p["weights"], "created_at": p["created_at"]}, indent=2))
    for folder in ws.experts_dir.iterdir():
        e = json.loads((folder / "card.json").read_text())
        (folder / "card.json").write_text(json.dumps({
            "kind": "expert", "format": 1, "source": e["source"], "owner": e["owner"], "domain": e["domain"],
            "profile": e["profile"], "config": _old_config(e["config"]), "n_trainable": e["n_trainable"],
            **{k: e[k] for k in stats}, "public_hash": e["inputs"]["public_model"],
            "tokenizer_sha256": e["inputs"]["tokenizer"], "router_init": e["router_init"], "privacy": e["privacy"],
            "created_at": e["created_at"], "created_by": e["created_by"], "files": e["files"]}, indent=2))
    m = json.loads((ws.models_dir / "merged" / "card.json").read_text())
    (ws.models_dir / "merged" / "card.json").write_text(json.dumps({
        "kind": "merged", "experts": m["experts"], "top_k": m["top_k"], "public_hash": m["public_model"],
        "n_params": m["n_params"], "router_bias": m["router_bias"], "created_at": m["created_at"]}, indent=2))


def test_workspace_of_the_previous_version_loads(fed, tmp_path):
    ws = Workspace(tmp_path / "old")
    shutil.copytree(fed.root, ws.root)
    _write_old_cards(ws)
    h = _public_hash(fed)

    # tokenizer: every input was recorded, so it is current and kept
    card = tok_artifact.read(ws)
    assert card.upgraded_from == 1 and card.sha256 == tokenizer_hash(ws)
    # public model: loads; trained with the previous recipe (unit-length router row): not current
    pub = public_model.read(ws)
    assert pub.upgraded_from == 1 and pub.weights == h
    assert "config" in public_model.status(ws, TINY)
    model, _ = public_model.load(ws)
    assert shared_weights_hash(model) == h
    # expert packages: load and merge; not current (the source's content was not recorded)
    pkg = expert_package.read(expert_package.folder(ws, "news"))
    assert pkg.card.upgraded_from == 1 and pkg.card.public_model == h and pkg.card.router_bias_init == 0.0
    why = expert_package.status(ws, TINY, "news", h)
    assert "source (not recorded by an older version)" in why and "config" in why
    # merged model: every input is recoverable from the old card, so it is current
    assert MergedModelCard.read(merged_model.folder(ws)).upgraded_from == 1
    assert merged_model.status(ws, h, ["news", "code"], top_k=3) is None
    assert load_merged(ws).experts == ["public", "news", "code"]
    merge(ws, ["news", "code"], out=ws.models_dir / "remerged")
    assert MergedModelCard.read(ws.models_dir / "remerged").upgraded_from is None
    # token cache: the previous card did not record the source: rebuilt once, then read
    assert not source_tokens(ws, "news").cached and source_tokens(ws, "news").cached


def test_unreadable_old_card_says_how_to_rebuild(fed, tmp_path):
    ws = Workspace(tmp_path / "old")
    shutil.copytree(fed.root, ws.root)
    _write_old_cards(ws)
    path = ws.experts_dir / "news" / "card.json"
    old = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in old.items() if k != "public_hash"}))
    with pytest.raises(OutdatedError, match=r"written by another version of flexolmo .*rebuild it with "
                                            r"`flexolmo train expert --source news`"):
        merge(ws, ["news", "code"], out=tmp_path / "m")
    assert "rebuild it with" in expert_package.status(ws, TINY, "news", _public_hash(fed))
    path.write_text(json.dumps({**old, "format": 9, "inputs": {}}))
    with pytest.raises(OutdatedError, match="newer flexolmo"):
        ExpertPackageCard.read(path.parent)
    (ws.models_dir / "public" / "card.json").write_text("{not json")
    with pytest.raises(OutdatedError, match="damaged.*flexolmo train public"):
        PublicModelCard.read(ws.models_dir / "public")
