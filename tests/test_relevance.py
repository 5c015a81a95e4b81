"""Relevance buckets that rank: a copied passage rates its document high (also when the passage
recurs in many documents), a shared common short phrase does not; the sources' document-frequency
tables round-trip and are verified; spans made only of whitespace and punctuation are not kept.

Small sources (prose and indented code; one where a licence paragraph recurs in 20 of 80
documents) with real indexes; traces without a model.
"""

from __future__ import annotations

import random
from collections import Counter

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


def test_documents_sharing_only_a_common_short_phrase_do_not_rate_high(tracer):
    rng = random.Random(2)
    rated = []
    for _ in range(8):
        t = tracer.trace(" " + _unindexed(rng, 80), store=False)
        for s in t.spans:
            assert s.end - s.start <= 4  # only short common phrases are shared
            rated += [d.bucket for d in s.documents]
    assert len(rated) > 20 and "high" not in rated
    assert rated.count("low") >= 0.9 * len(rated), Counter(rated)


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


# -- collection statistics: a passage that recurs in many documents ---------------------------

LICENCE = ("Permission is hereby granted free of charge to any person obtaining a copy of this software and "
           "associated documentation files to deal in the software without restriction including without limitation "
           "the rights to use copy modify merge publish distribute sublicense and sell copies of the software "
           "subject to the following conditions the above copyright notice and this permission notice shall be "
           "included in all copies or substantial portions of the software")


@pytest.fixture(scope="module")
def recurring(tmp_path_factory):
    """One source of 80 prose documents, 20 of which hold the same licence paragraph."""
    from textcorpus import prose_docs

    from flexolmo.base import tokenizer
    from flexolmo.base.workspace import Workspace
    from index import build

    ws = Workspace(tmp_path_factory.mktemp("recurring") / "ws")
    docs = prose_docs("pkg", 80, 5)
    for d in docs[:20]:
        half = len(d["text"]) // 2
        d["text"] = d["text"][:half] + "\n\n" + LICENCE + "\n\n" + d["text"][half:]
    sources.add_records(ws, "pkgs", docs, owner="o", domain="d", licence="l", origin="test")
    tokenizer.train_tokenizer(ws, vocab_size=600, texts=[d["text"] for d in docs])
    build.build_source(ws, "pkgs")
    return Tracer.open(ws, model=None), docs


def test_passage_recurring_in_20_documents_rates_its_origin_high(recurring):
    from tracing.options import TraceOptions

    tracer, docs = recurring
    words = LICENCE.split(" ")
    held = {d["doc_id"] for d in docs[:20]}
    rated_before = []
    rng = random.Random(7)
    for a in (0, 12, 25):
        passage = " " + " ".join(words[a: a + 40])
        prompt = _unindexed(rng, 15)  # a question in words the corpus does not hold
        t = tracer.trace(passage, prompt, options=TraceOptions(max_docs=20), store=False)
        hits = [d for s in t.spans for d in s.documents if s.end - s.start >= 8]
        assert {d.doc_id for d in hits} == held  # every copy is found, the origin among them
        assert all(d.bucket == "high" for d in hits), [(d.doc_id, d.relevance_norm) for d in hits]
        assert "relevance_fallback" not in t.settings
        # the windows' own IDF (the fallback's) rates the same windows low: every shared word's IDF ~ 0
        scores, bound = relevance.bm25([d.context for d in hits], prompt + " " + passage)
        rated_before += [relevance.bucket(relevance.normalise(s, bound), relevance.FALLBACK_HIGH,
                                          relevance.FALLBACK_MEDIUM) for s in scores]
    assert rated_before.count("high") == 0


def test_common_short_phrase_in_a_recurring_corpus_does_not_rate_high(recurring):
    tracer, docs = recurring
    rng = random.Random(6)
    rated = []
    for _ in range(6):
        t = tracer.trace(" " + _unindexed(rng, 60) + " of the software " + _unindexed(rng, 20), store=False)
        for s in t.spans:
            assert s.end - s.start <= 6
            rated += [d.bucket for d in s.documents]
    assert len(rated) > 20 and "high" not in rated


def test_a_windows_rating_does_not_depend_on_the_other_windows(recurring):
    from tracing.results import DocHit

    tracer, docs = recurring

    def hit():
        return DocHit(source="pkgs", doc_id="x", title=None, shard=0, doc_ix=0, token_offset=0, blocked=False,
                      snippet=None, snippet_span=None, context="c", context_span=None)

    window = docs[0]["text"][:1500]
    alone = hit()
    relevance.rate([(alone, window)], "a prompt about software", LICENCE, tracer.fed.indexes)
    crowd = [hit() for _ in range(8)]
    relevance.rate([(crowd[0], window)] + [(h, docs[i]["text"][:1500]) for i, h in enumerate(crowd[1:], 1)],
                   "a prompt about software", LICENCE, tracer.fed.indexes)
    assert alone.relevance_norm > 0 and (alone.relevance, alone.relevance_norm) == (crowd[0].relevance,
                                                                                    crowd[0].relevance_norm)


def test_doc_freq_table_round_trips_and_is_verified(recurring, tmp_path):
    import shutil

    from index import doc_freq, format as fmt, verify

    tracer, docs = recurring
    ws = tracer.ws
    folder = fmt.index_dir(ws, "pkgs")
    m = fmt.read_manifest(folder)
    assert {doc_freq.TABLE_FILE, doc_freq.STATS_FILE} <= set(m.files)  # checksummed with the rest
    t = doc_freq.open_table(folder)
    train = sources.load_documents(ws, "pkgs", split="train").to_pylist()
    assert t.n_docs == m.n_docs == len(train)
    brute: dict[str, int] = {}
    for d in train:
        for w in set(doc_freq.words(d["text"])):
            brute[w] = brute.get(w, 0) + 1
    probe = sorted(brute)[::7] + ["permission", "hereby", "zzzabsent"]
    assert t.df(probe).tolist() == [brute.get(w, 0) for w in probe]
    assert brute["hereby"] == sum(1 for d in train if "hereby" in d["text"])
    stats = t.lookup(["software"])
    assert stats.n_words == sum(len(doc_freq.words(d["text"])) for d in train)
    assert verify.verify_index(ws, "pkgs").ok

    # a damaged table: verify says what is wrong (structure and checksum)
    copy = tmp_path / "pkgs"
    shutil.copytree(folder, copy)
    rows = np.load(copy / doc_freq.TABLE_FILE)
    rows["df"][0] = t.n_docs + 5
    np.save(copy / doc_freq.TABLE_FILE, rows)
    problems = verify.verify_folder(copy, m, n_ngrams=4)
    assert any("sha256" in p for p in problems)
    assert any("outside 1.." in p for p in doc_freq.check_folder(copy, m.n_docs, m.files))
    (copy / doc_freq.STATS_FILE).unlink()
    assert any("incomplete" in p for p in doc_freq.check_folder(copy, m.n_docs, m.files))


def test_an_index_without_a_table_falls_back_and_says_so(recurring, tmp_path):
    import shutil

    from flexolmo.base.workspace import Workspace
    from index import doc_freq, format as fmt

    tracer, _ = recurring
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(tracer.ws.root, ws.root)
    folder = fmt.index_dir(ws, "pkgs")
    m = fmt.read_manifest(folder)
    for name in (doc_freq.TABLE_FILE, doc_freq.STATS_FILE):  # as an index built before the table
        (folder / name).unlink()
        del m.files[name]
    m.save(folder)
    t = Tracer.open(ws, model=None).trace(" " + " ".join(LICENCE.split(" ")[:40]), store=False)
    why = t.settings["relevance_fallback"]["pkgs"]
    assert "without a document-frequency table" in why and "--force" in why
    assert t.spans and all(d.bucket in ("high", "medium", "low") for s in t.spans for d in s.documents)
