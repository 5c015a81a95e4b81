"""The token cache: each source tokenized once per tokenizer, for training and indexing alike."""

from __future__ import annotations

import numpy as np

from flexolmo.base import sources, tokenizer
from flexolmo.base.tokens import source_tokens
from flexolmo.model.stream import token_stream


def _setup(ws, n=40):
    docs = [{"doc_id": f"d{i:03d}", "text": f"Entry {i}: the river city had {i * 3} bridges and one king."} for i in range(n)]
    sources.add_records(ws, "public", docs, owner="o", domain="d", licence="l", origin="test")
    tokenizer.train_tokenizer(ws, vocab_size=300)
    return docs


def test_cache_matches_tokenizer_and_is_reused(ws):
    _setup(ws)
    first = source_tokens(ws, "public", "train")
    again = source_tokens(ws, "public", "train")
    assert not first.cached and again.cached
    tok = tokenizer.load_raw_tokenizer(ws)
    texts = sources.load_documents(ws, "public", split="train").column("text").to_pylist()
    assert first.n_docs == len(texts)
    for i, t in enumerate(texts):
        assert again.doc(i).tolist() == tok.encode(t, add_special_tokens=False).ids
    # training's stream: every document followed by the end-of-text id
    eos = tokenizer.tokenizer_info(ws).eos_id
    expected = [x for t in texts for x in tok.encode(t, add_special_tokens=False).ids + [eos]]
    assert token_stream(ws, "public").tolist() == expected


def test_cache_follows_tokenizer_and_source_content(ws):
    docs = _setup(ws)
    source_tokens(ws, "public", "train")
    caches = lambda: sorted(p.name for p in ws.source_dir("public").glob("tokens-*"))  # noqa: E731
    assert len(caches()) == 1
    tokenizer.train_tokenizer(ws, vocab_size=320)  # a new tokenizer: a new cache, the old one unused
    t = source_tokens(ws, "public", "train")
    assert not t.cached and len(caches()) == 2
    assert int(np.max(t.ids)) < 320
    # re-registering the source replaces its folder, caches included
    sources.add_records(ws, "public", docs[:10], owner="o", domain="d", licence="l", origin="test", replace=True)
    assert caches() == []
    assert source_tokens(ws, "public", "train").n_docs == sum(1 for d in docs[:10] if sources.split_of(d["doc_id"]) == "train")


def test_cache_card_decides_freshness(ws):
    from flexolmo.base.artifacts import token_cache
    from flexolmo.base.artifacts.token_cache import TokenCacheCard

    _setup(ws)
    first = source_tokens(ws, "public", "train")
    folder = next(ws.source_dir("public").glob("tokens-train-*"))
    card = TokenCacheCard.read(folder)
    src = sources.get_source(ws, "public")
    tok = tokenizer.tokenizer_hash(ws)
    assert card.inputs == {"tokenizer": tok, "source": src.content_hash}
    assert token_cache.is_current(folder, token_cache.inputs_for(tok, src.content_hash))
    assert not token_cache.is_current(folder, token_cache.inputs_for(tok, "0" * 64))
    # a cache whose card names other inputs is rebuilt, not read
    card.model_copy(update={"inputs": {**card.inputs, "source": "0" * 64}}).save(folder)
    again = source_tokens(ws, "public", "train")
    assert not again.cached and again.ids.tolist() == first.ids.tolist()
    assert source_tokens(ws, "public", "train").cached
