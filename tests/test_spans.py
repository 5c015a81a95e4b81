"""The compiled span search returns exactly what infini-gram's `engine.attribute` returns."""

from __future__ import annotations

import random

import numpy as np
import pytest
from infini_gram.engine import InfiniGramEngine

from flexolmo import sources, tokenizer
from index import build
from index import format as fmt
from tracing.spans import Shard, find_spans, unigram_logprobs

NAMES = ("public", "alpha", "beta")
WORDS = "the a of to and in is was it for on that with as by at from an be this which or are had".split() + [
    f"w{i}" for i in range(150)]


def _text(rng: random.Random, sentences: int) -> str:
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([". ", ".\n", ", ", " "])
                   for _ in range(sentences))


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    from flexolmo.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("spans") / "ws")
    rng = random.Random(0)
    for name in NAMES:
        sources.add_records(ws, name, [{"doc_id": f"{name}{i}", "text": _text(rng, rng.randint(5, 40))} for i in range(120)],
                            owner="o", domain="d", licence="l", origin="test")
    tokenizer.train_tokenizer(ws, vocab_size=400)
    for name in NAMES:
        build.build_source(ws, name)
    tok = tokenizer.load_raw_tokenizer(ws)
    dirs = [build.index_dir(ws, n) for n in NAMES]
    engine = InfiniGramEngine(index_dir=[str(d) for d in dirs], eos_token_id=0, vocab_size=65535,
                              bow_ids_path=str(ws.tokenizer_dir / "bow_ids.txt"), precompute_unigram_logprobs=True)
    shards = [Shard.open(n, 0, d / "tokenized.0", d / "table.0") for n, d in zip(NAMES, dirs)]
    counts = sum(fmt.read_unigram(d / "unigram.0") for d in dirs)
    docs = {n: sources.load_documents(ws, n, split="train").column("text").to_pylist() for n in NAMES}
    return dict(ws=ws, tok=tok, engine=engine, shards=shards, ulp=unigram_logprobs(counts), docs=docs,
                bow=set(tokenizer.read_bow_ids(ws)), delim=[tok.token_to_id("Ċ"), tok.token_to_id(".")])


def _random_inputs(fed, n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.6:  # a piece of a training document
                d = rng.choice(fed["docs"][rng.choice(NAMES)])
                a = rng.randint(0, len(d) - 1)
                parts.append(d[a: a + rng.randint(5, 300)])
            else:  # new text from the same vocabulary
                parts.append(_text(rng, 2))
        yield fed["tok"].encode("".join(parts)).ids


@pytest.mark.parametrize("min_len,max_cnt,enforce_bow", [(1, 1_000_000, True), (1, 5, True), (2, 1000, False)])
def test_spans_equal_engine_attribute(fed, min_len, max_cnt, enforce_bow):
    checked = 0
    for ids in _random_inputs(fed, 40, seed=min_len * 7 + max_cnt):
        ref = fed["engine"].attribute(ids, delim_ids=fed["delim"], min_len=min_len, max_cnt=max_cnt,
                                      enforce_bow=enforce_bow)["spans"]
        mine = find_spans(fed["shards"], ids, fed["delim"], fed["bow"], fed["ulp"], min_len=min_len,
                          max_cnt=max_cnt, enforce_bow=enforce_bow)
        assert [(s["l"], s["r"], s["count"]) for s in ref] == [(s.l, s.r, s.count) for s in mine]
        assert np.allclose([s["unigram_logprob_sum"] for s in ref], [s.unigram_logprob_sum for s in mine])
        checked += len(mine)
    assert checked > 25  # the inputs did contain spans


def test_counts_per_shard_match_engine_count(fed):
    ids = next(_random_inputs(fed, 1, seed=3))
    for span in find_spans(fed["shards"], ids, fed["delim"], fed["bow"], fed["ulp"]):
        q = ids[span.l: span.r]
        assert span.count == fed["engine"].count(q)["count"]
        for shard, (lo, hi) in zip(fed["shards"], span.rank_range_by_shard):
            windows = np.lib.stride_tricks.sliding_window_view(np.asarray(shard.ds).view(np.uint16), len(q))
            assert hi - lo == int((windows == np.asarray(q, dtype=np.uint16)).all(axis=1).sum())


def test_unseen_text_gives_no_span(fed):
    ids = fed["tok"].encode("zzqx qqjv xxkz jjqz").ids
    assert find_spans(fed["shards"], ids, fed["delim"], fed["bow"], fed["ulp"]) == []
