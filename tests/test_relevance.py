"""Relevance buckets that rank (issue 14): a copied passage rates its document high, a shared
common short phrase rates low; spans made only of whitespace and punctuation are not kept.

Three small sources (prose and indented code) with real indexes; traces without a model.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from textcorpus import COMMON, build_workspace

from flexolmo.base import sources
from tracing import relevance
from tracing.trace import Tracer, has_words


@pytest.fixture(scope="module")
def tracer(tmp_path_factory):
    return Tracer.open(build_workspace(tmp_path_factory.mktemp("rel") / "ws"), model=None)


def _train(tracer, source: str) -> list[dict]:
    return sources.load_documents(tracer.ws, source, split="train").to_pylist()


def _unindexed(rng: random.Random, n: int) -> str:
    """Text of words no source holds, with the common words every source uses."""
    return " ".join(rng.choice(COMMON) if rng.random() < 0.3 else f"zq{rng.randint(0, 9999)}x" for _ in range(n))


@pytest.mark.parametrize("source", ["news", "public", "code"])
def test_copied_passage_rates_its_document_high(tracer, source):
    rng = random.Random(1)
    checked = 0
    for doc in rng.sample([d for d in _train(tracer, source) if len(d["text"].split(" ")) > 70], 6):
        words = doc["text"].split(" ")
        a = rng.randint(0, len(words) - 60)
        t = tracer.trace(" " + " ".join(words[a: a + rng.randint(30, 60)]), store=False)
        hits = [d for s in t.spans for d in s.documents if d.doc_id == doc["doc_id"]]
        assert hits, "the passage's own document must be retrieved"
        assert all(h.bucket == "high" for h in hits), [(h.relevance_norm, h.bucket) for h in hits]
        checked += 1
    assert checked == 6


def test_documents_sharing_only_a_common_short_phrase_rate_low(tracer):
    rng = random.Random(2)
    rated = []
    for _ in range(8):
        t = tracer.trace(" " + _unindexed(rng, 80), store=False)
        for s in t.spans:
            assert s.end - s.start <= 4  # only short common phrases are shared
            rated += [d.bucket for d in s.documents]
    assert len(rated) > 20 and set(rated) == {"low"}


def test_embedded_passage_rates_its_document_above_the_rest(tracer):
    rng = random.Random(3)
    doc = next(d for d in _train(tracer, "news") if len(d["text"].split(" ")) > 80)
    passage = " ".join(doc["text"].split(" ")[10:60])
    t = tracer.trace(" " + _unindexed(rng, 40) + " " + passage + " " + _unindexed(rng, 40), store=False)
    hits = [d for s in t.spans for d in s.documents]
    origin = [d.relevance_norm for d in hits if d.doc_id == doc["doc_id"]]
    others = [d.relevance_norm for d in hits if d.doc_id != doc["doc_id"]]
    assert origin and others and min(origin) > max(others)
    assert max(origin) >= relevance.MEDIUM  # 50 of 130 words: at least medium, and first


def test_formula_is_the_share_of_the_querys_bound():
    docs = ["alpha beta gamma delta", "alpha beta", "zeta eta theta", ""]
    scores, bound = relevance.bm25(docs, "alpha beta gamma delta")
    assert bound > 0 and np.all(scores < bound) and np.all(scores >= 0)
    assert int(np.argmax(scores)) == 0 and scores[2] == scores[3] == 0
    norm = [relevance.normalise(s, bound) for s in scores]
    assert 0 < norm[1] < norm[0] < 1
    # words absent from every window raise the bound (they count with the largest IDF), not the scores
    scores2, bound2 = relevance.bm25(docs, "alpha beta gamma delta omega")
    assert np.allclose(scores, scores2) and bound2 > bound
    assert relevance.bm25([], "x") == (pytest.approx(np.zeros(0)), 0.0)
    assert relevance.bucket(relevance.HIGH) == "high" and relevance.bucket(relevance.MEDIUM) == "medium"
    assert relevance.bucket(relevance.MEDIUM - 1e-9) == "low"
    assert relevance.olmotrace_bucket(0.7 * 0.18 * 100, 100) == "high"


def test_no_kept_span_is_only_whitespace_or_punctuation_or_crosses_a_line(tracer):
    code = [d["text"] for d in _train(tracer, "code")]
    rng = random.Random(4)
    delims = set(tracer.delims)
    dropped = 0
    for _ in range(10):
        text = "\n\n        ".join(c[rng.randint(0, len(c) // 2):][:300] for c in rng.sample(code, 3)) + "\n    ):\n"
        ids = tracer.tokenizer(text, add_special_tokens=False)["input_ids"]
        t = tracer.trace(text, store=False)
        for s in t.spans:
            assert has_words(s.text), repr(s.text)
            assert not any(i in delims for i in ids[s.start: s.end - 1])
        dropped += sum(not has_words(tracer.tokenizer.decode(list(s.ids)))
                       for s in tracer.fed.find_spans(ids, tracer.delims, tracer.bow))
    assert dropped > 0  # such spans exist in the search's answer; the tracer does not keep them
    assert not has_words(" \n\t.,;:()[]") and has_words("  x ") and has_words("+") and has_words("7")
