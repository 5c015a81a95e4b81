"""The trace pipeline end to end on a tiny federation: tiny model, tiny indexes, real engine."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
from conftest_model import build_federation
from typer.testing import CliRunner

from cli.main import app
from flexolmo.base import catalog, sources
from flexolmo.model.merge import merge
from flexolmo.model.train import train_expert, train_public
from index.build import build_source, index_dir
from flexolmo.base.errors import InputError
from tracing import story
from tracing.provenance import governance
from tracing.provenance import queries
from tracing.experts import link_experts
from tracing.options import TraceOptions
from flexolmo.model.generate import GenerationOptions
from tracing.trace import Tracer, _stamp

NAMES = ("public", "news", "code", "math")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    ws = build_federation(tmp_path_factory.mktemp("trace"), sources=NAMES, n_docs=40)
    train_public(ws, "tiny", progress=False)
    for s in ("news", "code", "math"):
        train_expert(ws, s, "tiny", progress=False)
    merge(ws, ["news", "code", "math"])
    for s in NAMES:
        build_source(ws, s)
    return ws


def _doc(ws, source: str, i: int = 0) -> dict:
    return sources.load_documents(ws, source, split="train").to_pylist()[i]


def test_copied_passage_traced_to_its_document(fed):
    tracer = Tracer.open(fed)
    doc = _doc(fed, "news", 3)
    words = doc["text"].split(" ")
    passage = " " + " ".join(words[5:30])  # starts at a word boundary
    t = tracer.trace(passage, store=False)
    assert t.spans, "a copied passage must match"
    longest = max(t.spans, key=lambda s: s.end - s.start)
    assert longest.end - longest.start >= 20
    hits = [d for d in longest.documents if d.doc_id == doc["doc_id"]]
    assert hits and hits[0].source == "news" and longest.count_by_source["news"] >= 1
    # the reported token offset is where the span starts in the document
    tok = tracer.tokenizer
    doc_ids = tok(doc["text"], add_special_tokens=False)["input_ids"]
    span_ids = tok(passage, add_special_tokens=False)["input_ids"][longest.start: longest.end]
    off = hits[0].token_offset
    assert doc_ids[off: off + len(span_ids)] == span_ids
    assert hits[0].snippet[slice(*hits[0].snippet_span)] == longest.text


def test_unseen_text_gives_no_span(fed):
    t = Tracer.open(fed).trace("Zyzzyva quokka xylograph jabberwock.", store=False)
    assert t.spans == []


def test_spans_respect_word_boundaries_delimiters_and_k(fed):
    tracer = Tracer.open(fed)
    # many short matches (fragments of several documents between unseen words) and a long one
    frags = [" ".join(_doc(fed, NAMES[i % 4], i)["text"].split(" ")[3: 7]) for i in range(14)]
    text = " " + " qzxv. ".join(frags) + "\n" + _doc(fed, "math", 2)["text"][:200] + ". Zyzzyva."
    ids = tracer.tokenizer(text, add_special_tokens=False)["input_ids"]
    t = tracer.trace(text, store=False)
    bow, delims = set(tracer.bow.tolist()), set(tracer.delims)
    assert 0 < len(t.spans) <= math.ceil(0.05 * len(ids))
    for s in t.spans:
        assert len({(d.source, d.doc_id) for d in s.documents}) == len(s.documents) <= 10  # distinct documents
        assert ids[s.start] in bow
        assert s.end == len(ids) or ids[s.end] in bow
        assert not any(i in delims for i in ids[s.start: s.end - 1])
    # the kept spans are a subset of what the bare engine returns, with the same counts
    from infini_gram.engine import InfiniGramEngine

    eng = InfiniGramEngine(index_dir=[str(index_dir(fed, n)) for n in NAMES], eos_token_id=0,
                           bow_ids_path=str(fed.tokenizer_dir / "bow_ids.txt"), precompute_unigram_logprobs=True)
    ref = eng.attribute(ids, delim_ids=tracer.delims, min_len=1, max_cnt=1_000_000, enforce_bow=True)["spans"]
    k = math.ceil(0.05 * len(ids))
    assert len(ref) > k  # the cap did bite
    expected = sorted(sorted(ref, key=lambda s: s["unigram_logprob_sum"])[:k], key=lambda s: s["l"])
    assert [(s["l"], s["r"], s["count"]) for s in expected] == [(s.start, s.end, s.count) for s in t.spans]


def test_expert_linkage(fed):
    tracer = Tracer.open(fed, options=TraceOptions(exclude=("math",)))
    text = " " + " ".join(_doc(fed, "code", 4)["text"].split(" ")[3:25])
    t = tracer.trace(text, store=False)
    assert t.experts_off == ["math"]
    for s in t.spans:
        shares = {e.source: e.routing_share for e in s.experts}
        assert abs(sum(shares.values()) - 1) < 1e-3
        assert shares["math"] == 0
        off = next(e for e in s.experts if e.source == "math")
        assert off.counterfactual == 0 and not off.active
        assert s.agreement == (s.experts[s.top_expert].source in s.sources)
        assert s.top_expert_by == "counterfactual" and s.top_expert == s.top_by_counterfactual
    assert any(e.counterfactual != 0 for s in t.spans for e in s.experts if e.active)


def _spans_of(tracer, text):
    return tracer.trace(text, prompt="a prompt", store=False)


def test_top_expert_is_the_argmax_of_the_counterfactual_drop(fed):
    tracer = Tracer.open(fed)
    text = " " + " ".join(_doc(fed, "news", 5)["text"].split(" ")[2:40]) + " " + _doc(fed, "math", 1)["text"][:150]
    t = _spans_of(tracer, text)
    assert t.spans
    differ = 0
    for s in t.spans:
        cf = {e.expert: e.counterfactual for e in s.experts if e.active and e.counterfactual is not None}
        share = [e.routing_share for e in s.experts]
        assert s.top_expert_by == "counterfactual" and s.top_expert == max(cf, key=cf.get)
        assert s.top_by_routing == share.index(max(share))
        differ += s.top_by_routing != s.top_by_counterfactual
    record = t.to_dict()["spans"][0]
    assert record["top_expert_by"] == "counterfactual" and {"top_by_routing", "top_by_counterfactual"} <= set(record)
    # without counterfactuals the routing share names it, and says so
    for s in tracer.trace(text, prompt="a prompt", options=TraceOptions(counterfactual=False), store=False).spans:
        assert s.top_expert_by == "routing" and s.top_by_counterfactual is None
        assert s.top_expert == s.top_by_routing and all(e.counterfactual is None for e in s.experts if e.active)


def test_batched_counterfactuals_equal_one_pass_per_expert(fed):
    tracer = Tracer.open(fed, options=TraceOptions(exclude=("code",)))
    for prompt, text in ((None, " " + " ".join(_doc(fed, "public", 3)["text"].split(" ")[1:45])),
                         ("tell me", " " + " ".join(_doc(fed, "math", 6)["text"].split(" ")[4:30]))):
        t = tracer.trace(text, prompt=prompt, store=False)
        ids = tracer.tokenizer(text, add_special_tokens=False)["input_ids"]
        pids = tracer.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        ref = [s.__class__(**{**s.__dict__, "experts": []}) for s in t.spans]
        link_experts(tracer.model, ref, ids, pids, None, counterfactual=True, bos_id=tracer.tokenizer.eos_token_id,
                     method="per_expert")
        computed = 0
        for mine, theirs in zip(t.spans, ref):
            for a, b in zip(mine.experts, theirs.experts):
                assert a.routing_share == b.routing_share and a.active == b.active
                if a.counterfactual is None and a.active:  # skipped: the router never chose it on a kept span
                    assert all(e.routing_share == 0 for s in t.spans for e in s.experts if e.expert == a.expert)
                    continue
                assert a.counterfactual == pytest.approx(b.counterfactual, abs=1e-4), (a, b)
                computed += a.active
            assert mine.top_expert == theirs.top_expert or (
                max(e.counterfactual or 0 for e in theirs.experts) - (theirs.experts[mine.top_expert].counterfactual or 0) < 1e-3)
        assert computed > 0


def test_trace_options_validate_with_clear_errors(fed):
    with pytest.raises(InputError, match="max_docs"):
        TraceOptions.parse(max_docs=-1)
    with pytest.raises(InputError, match="both excluded and included"):
        TraceOptions.parse(exclude="news", include=["news"])
    with pytest.raises(InputError, match="top_p"):
        GenerationOptions.parse(top_p=1.5)
    with pytest.raises(InputError, match="max_new_tokens"):
        GenerationOptions.parse(max_new_tokens=5000)
    opts = TraceOptions(max_docs=2, counterfactual=False, exclude=("math",))
    tracer = Tracer.open(fed, options=opts)
    assert tracer.model.off == {"math": "excluded"}
    t = tracer.trace(" " + " ".join(_doc(fed, "news", 3)["text"].split(" ")[5:30]), store=False)
    assert t.spans and all(len(s.documents) <= 2 for s in t.spans)
    assert all(e.counterfactual is None for s in t.spans for e in s.experts if e.active)
    assert t.settings["max_docs"] == 2 and t.settings["exclude"] == ("math",)
    g = tracer.generate_and_trace("The president", GenerationOptions(max_new_tokens=8), store=False)
    assert 1 <= g.n_tokens <= 8 and g.settings["generation"]["max_new_tokens"] == 8
    with pytest.raises(InputError, match="temperature"):
        tracer.generate_and_trace("The president", GenerationOptions.parse(do_sample=True, temperature=0), store=False)
    with pytest.raises(InputError, match="LoadedModel"):
        Tracer.open(fed, model=tracer.model.module)


def test_per_call_options_merge_over_the_tracers_and_change_nothing(fed):
    tracer = Tracer.open(fed, options=TraceOptions(max_docs=3))
    text = " " + " ".join(_doc(fed, "news", 3)["text"].split(" ")[5:30])
    t = tracer.trace(text, options=TraceOptions(counterfactual=False, exclude=("code",)), store=False)
    assert t.settings["max_docs"] == 3 and t.settings["counterfactual"] is False  # set fields win, others stay
    assert t.experts_off == ["code"] and all(len(s.documents) <= 3 for s in t.spans)
    assert tracer.options == TraceOptions(max_docs=3) and tracer.model.off == {}  # the tracer is as it was
    again = tracer.trace(text, store=False)
    assert again.experts_off == [] and again.settings["counterfactual"] is True
    assert TraceOptions(max_docs=3).merged(TraceOptions(seed=4)) == TraceOptions(max_docs=3, seed=4)


def test_generate_and_trace_uses_captured_routing(fed):
    tracer = Tracer.open(fed)
    t = tracer.generate_and_trace("The president", GenerationOptions(max_new_tokens=20))
    assert t.generated and 1 <= t.n_tokens <= 20
    for s in t.spans:
        assert abs(sum(e.routing_share for e in s.experts) - 1) < 1e-3


def test_policy_inactive_counts_and_takedown(fed):
    doc = _doc(fed, "news", 6)
    passage = " " + " ".join(doc["text"].split(" ")[4:24])
    Tracer.open(fed).trace(passage)  # stored while news is fully visible
    try:
        governance.set_policy(fed, "news", visibility="counts")
        stored = queries.query(fed, "SELECT count(*) FROM span_documents WHERE source = 'news' "
                                  "AND (doc_id IS NOT NULL OR snippet IS NOT NULL)")
        assert stored.rows[0][0] == 0  # stored traces keep counts only
        t = Tracer.open(fed).trace(passage, store=False)
        news_spans = [s for s in t.spans if s.count_by_source.get("news")]
        assert news_spans and all(d.source != "news" for s in news_spans for d in s.documents)

        sources.set_policy(fed, "news", visibility="snippets")
        t = Tracer.open(fed).trace(passage, store=False)
        hits = [d for s in t.spans for d in s.documents if d.source == "news"]
        assert hits and all(d.snippet and d.context is None for d in hits)

        sources.set_policy(fed, "news", active=False)
        tracer = Tracer.open(fed)
        t = tracer.trace(passage, store=False)
        assert "news" not in t.sources_searched and "news" in t.sources_skipped
        assert all("news" not in s.count_by_source for s in t.spans)
        assert "news" in t.experts_off
        assert all(e.routing_share == 0 for s in t.spans for e in s.experts if e.source == "news")
    finally:
        sources.set_policy(fed, "news", active=True, visibility="full")

    before = Tracer.open(fed)
    stored = before.trace(passage)  # stored with the document's text
    assert queries.query(fed, f"SELECT count(*) FROM span_documents WHERE trace_id = '{stored.trace_id}' "
                            f"AND doc_id = '{doc['doc_id']}' AND snippet IS NOT NULL").rows[0][0] > 0
    governance.takedown(fed, "news", doc["doc_id"], reason="owner request")
    assert before.stale()  # a long-running service reopens before its next trace
    t = Tracer.open(fed).trace(passage)
    hits = [d for s in t.spans for d in s.documents if d.doc_id == doc["doc_id"]]
    assert hits and all(d.blocked and d.snippet is None and d.context is None for d in hits)
    # every stored row of it, older traces included, is blocked with no text
    rows = queries.query(fed, f"SELECT blocked, snippet, title FROM span_documents WHERE doc_id = '{doc['doc_id']}'").rows
    assert len(rows) >= 2 and all(r == (True, None, None) for r in rows)


def test_store_query_report_and_cli(fed, tmp_path):
    runner = CliRunner()
    base = ["--workspace", str(fed.root)]
    text = " " + " ".join(_doc(fed, "code", 7)["text"].split(" ")[2:22])
    r = runner.invoke(app, base + ["trace", "--text", text, "--prompt", "show me code", "--json"])
    assert r.exit_code == 0, r.output
    record = json.loads(r.output)
    assert record["spans"] and record["prompt"] == "show me code"
    q = queries.query(fed, f"SELECT count(*) FROM spans WHERE trace_id = '{record['trace_id']}'")
    assert q.rows[0][0] == len(record["spans"])
    c = queries.contribution(fed, "code")
    assert c.spans_matched >= 1 and c.mean_routing_share is not None and c.top_spans
    r = runner.invoke(app, base + ["report", "contribution", "--source", "code"])
    assert r.exit_code == 0 and "top matched spans" in r.output
    r = runner.invoke(app, base + ["query", "DROP TABLE spans"])
    assert r.exit_code == 1 and "read-only" in r.output
    # nothing outside the store either: not the catalog, not a file, not a source's text
    for sql in (f"ATTACH '{fed.catalog_path}' AS c (READ_WRITE)",
                f"COPY spans TO '{tmp_path / 'leak.parquet'}'",
                f"SELECT * FROM read_parquet('{fed.source_dir('news') / 'documents.parquet'}')",
                "SET enable_external_access = true"):
        with pytest.raises(Exception) as err:
            queries.query(fed, sql)
        assert "query failed" in str(err.value)
    assert not (tmp_path / "leak.parquet").exists()
    r = runner.invoke(app, base + ["traces", "export", "--out", str(tmp_path / "x")])
    assert r.exit_code == 0 and (tmp_path / "x" / "span_experts.parquet").exists()
    r = runner.invoke(app, base + ["trace", "--text", "   "])
    assert r.exit_code == 1 and "empty" in r.output


def test_single_expert_left_on_still_traces(fed):
    tracer = Tracer.open(fed, options=TraceOptions(include=("public",)))  # every owner's expert off
    t = tracer.trace(" " + " ".join(_doc(fed, "public", 2)["text"].split(" ")[2:20]), store=False)
    assert t.spans and sorted(t.experts_off) == ["code", "math", "news"]
    for s in t.spans:
        by = {e.source: e for e in s.experts}
        assert by["public"].routing_share == 1 and by["public"].counterfactual is None
        assert all(by[n].counterfactual == 0 and by[n].routing_share == 0 for n in ("code", "math", "news"))


def test_trace_cli_refuses_conflicting_options(fed):
    r = CliRunner().invoke(app, ["--workspace", str(fed.root), "trace", "--generate", "The", "--text", "x"])
    assert r.exit_code == 1 and "--generate" in r.output


def test_copy_of_a_taken_down_document_is_blocked_too(tmp_path):
    """A takedown blocks by content (the diff index), not only by doc_id: a copy is caught."""
    ws = build_federation(tmp_path / "copy", sources=("public", "news"), n_docs=30)
    news = sources.load_documents(ws, "news").to_pylist()
    original = next(d for d in news if d["split"] == "train")
    copies = [{"doc_id": d["doc_id"], "text": d["text"]} for d in news]
    copies.append({"doc_id": "reposted-copy", "text": original["text"]})
    sources.add_records(ws, "news", copies, owner="o", domain="news", licence="CC0", origin="test", replace=True)
    assert sources.split_of("reposted-copy") == "train"
    for s in ("public", "news"):
        build_source(ws, s, force=True)
    governance.takedown(ws, "news", original["doc_id"], reason="owner request")
    passage = " " + " ".join(original["text"].split(" ")[5:30])
    t = Tracer.open(ws, model=None).trace(passage, store=False)
    hits = [d for s in t.spans for d in s.documents if d.doc_id in (original["doc_id"], "reposted-copy")]
    assert {d.doc_id for d in hits} == {original["doc_id"], "reposted-copy"}
    assert all(d.blocked and d.snippet is None for d in hits)


# -- the demo's story (tracing/story.py, cli/demo.py) on this tiny federation --------------------


def test_a_pasted_response_is_traced_back_to_where_each_passage_came_from(fed):
    tracer = Tracer.open(fed)
    pasted = story.pasted_response(tracer, ["news", "code", "math"])
    assert [p.source for p in pasted.pieces] == ["news", "code", "math"]
    t = tracer.trace(pasted.text, prompt=pasted.prompt, store=False)
    rows = story.attributed(t, pasted)
    assert {a.piece.source for a in rows if a.piece} == {"news", "code", "math"}
    for a in rows:  # every span of 8+ tokens lies in a passage, is found in its source and its document
        assert a.piece is not None and a.found_in_origin and a.origin_document, a.span.text
        assert a.top_expert in ("public", "news", "code", "math")
    # the news owner switches off: its documents are gone from the same response's trace
    sources.set_policy(fed, "news", active=False, by="test")
    try:
        after = Tracer.open(fed).trace(pasted.text, prompt=pasted.prompt, store=False)
    finally:
        sources.set_policy(fed, "news", active=True, by="test")
    o = story.opt_out(t, after, "news")
    assert o.documents_before > 0 and o.documents_after == 0 and "news" not in o.tops_after
    assert any("union" in x or "president" in x or x for x in o.lost)


def test_memorisation_probe_finds_the_longest_verbatim_continuation(fed):
    tracer = Tracer.open(fed)
    m = story.memorised(tracer, ["news", "math"], docs_per_source=3, new_tokens=12)
    assert m.tried == 6 and 0 <= m.verbatim_tokens <= 12 and m.source in ("news", "math")
    if m.verbatim_tokens:
        assert m.trace is not None and m.trace.generated


def _dense_model(fed, folder):
    """A tiny random dense causal LM on the index's tokenizer: the stand-in for a real pretrained one."""
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    Olmo2ForCausalLM(Olmo2Config(vocab_size=len(Tracer.open(fed, model=None).tokenizer), hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=256, eos_token_id=0, pad_token_id=1,
                                 bos_token_id=None)).save_pretrained(folder)
    return folder


def test_a_real_models_answer_to_a_documents_opening_is_traced(fed, tmp_path):
    from flexolmo.model.loading import ModelSpec

    tracer = Tracer.open(fed, model=ModelSpec.parse(_dense_model(fed, tmp_path / "dense")))
    doc = _doc(fed, "news", 1)
    a = story.real_answer(tracer, "news", doc["doc_id"], prompt_words=6, new_tokens=12)
    assert a.prompt == " ".join(doc["text"].split(" ")[:6]) and a.source == "news" and a.title == doc.get("title")
    assert a.trace.generated and a.trace.prompt == a.prompt
    # the notable spans: the longest first, at most n (on a pasted passage, where spans are long)
    pasted = story.RealAnswer("news", doc["doc_id"], None, "", tracer.trace(" " + " ".join(doc["text"].split(" ")[2:30]),
                                                                          store=False))
    lengths = [s.end - s.start for s in pasted.notable(3)]
    assert 1 <= len(lengths) <= 3 and lengths == sorted(lengths, reverse=True)
    assert lengths[0] == max(s.end - s.start for s in pasted.trace.spans) >= 8
    with pytest.raises(InputError, match="no train document"):
        story.real_answer(tracer, "news", "no/such-doc")
    with pytest.raises(InputError, match="needs a model"):
        story.real_answer(Tracer.open(fed, model=None), "news", doc["doc_id"])


def test_the_demo_story_prints_a_screen_per_step(fed, tmp_path):
    from rich.console import Console

    from cli import demo

    out = Console(record=True, width=100, file=open("/dev/null", "w"))
    saved = demo.console
    demo.console = out
    real = demo.RealModel(_dense_model(fed, tmp_path / "dense"), "a tiny dense test model", "news", _doc(fed, "news", 1)["doc_id"])
    try:
        demo.tell_story(fed, real)
        demo.what_next(fed)
    finally:
        demo.console = saved
    text = out.export_text()
    for title in ("7. a pasted response", "8. a model's own words", "9. memorisation", "10. the news owner", "what next"):
        assert title in text
    assert "was pasted together by the demo" in text and "flexolmo serve" in text
    assert "a tiny dense test model" in text and "greedy answer in bold" in text and "A dense model has no experts" in text
    assert len(text.splitlines()) < 140


def test_open_loads_what_the_first_search_would(fed):
    """Tracer.open warms every local index (its unigram counts, the compiled span search), so that a
    process's first trace costs what the others do; the federation's unigram log-probs are ready."""
    tracer = Tracer.open(fed, model=None)
    assert tracer.fed.local and all(ix._unigram is not None for ix in tracer.fed.local.values())
    assert tracer.fed._ulp is not None and tracer.fed._ulp[0] == tuple((n, ix.build_id) for n, ix in tracer.fed.local.items())


def _settle(ws) -> None:
    """The catalog's files as if last written a minute ago (a stamp is trusted once settled)."""
    then = time.time_ns() - 60 * 10**9
    for p in (ws.catalog_path, ws.catalog_path.with_name(ws.catalog_path.name + ".wal")):
        if p.exists():
            os.utime(p, ns=(then, then))


def test_a_tracer_sees_a_policy_change_from_another_process_at_its_next_check(fed, monkeypatch):
    """`stale()` reads only the catalog files' stamps until they change; a write that changes
    nothing a trace depends on keeps the tracer, a policy change makes it stale. A stamp is
    trusted only once its files are older than a clock tick's doubt (`catalog.SETTLED_S`)."""
    from tracing import trace as trace_mod

    _settle(fed)
    tracer = Tracer.open(fed, model=None)
    assert tracer.stamp[1] is not None
    read = trace_mod.catalog_fingerprint
    monkeypatch.setattr(trace_mod, "catalog_fingerprint", lambda ws: pytest.fail("read the catalog"))
    assert not tracer.stale() and not tracer.stale()  # settled, unchanged: the stamps alone
    monkeypatch.setattr(trace_mod, "catalog_fingerprint", read)
    before = sources.get_source(fed, "news").visibility
    with catalog.connect(fed) as con:  # a write the tracer does not depend on
        con.execute("CREATE TABLE IF NOT EXISTS scratch_note (x INTEGER)")
        con.execute("INSERT INTO scratch_note VALUES (1)")
    assert _stamp(fed)[1] is None and not tracer.stale()  # just written: not trusted, the catalog read
    _settle(fed)
    assert tracer.stamp != _stamp(fed) and not tracer.stale() and tracer.stamp == _stamp(fed)
    sources.set_policy(fed, "news", visibility="snippets" if before != "snippets" else "full")
    _settle(fed)  # a policy change whose stamp is settled (and one that is not: both read the catalog)
    try:
        assert tracer.stale()
        assert not Tracer.open(fed, model=None).stale()
    finally:
        sources.set_policy(fed, "news", visibility=before)
