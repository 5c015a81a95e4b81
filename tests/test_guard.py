"""The verbatim guard (tracing/guard.py) on a tiny workspace: a source built from the
model's own unguarded output tempts it to repeat a long run; with --max-verbatim N no run
longer than N gets through (checked by infini-gram's own counts, not the guard's search),
a generation that never touches a guarded source is unchanged, traces record where the
guard acted, and bad limits are refused before anything changes."""

from __future__ import annotations

import pytest
import torch
from conftest_model import build_federation
from typer.testing import CliRunner

from cli.main import app
from flexolmo.base import sources
from flexolmo.model.config import get_profile
from flexolmo.base.errors import InputError
from flexolmo.model.generate import GenerationOptions, generate
from tracing.guard import VerbatimGuard, guarded_sources, longest_run
from flexolmo.model.moe import LoadedModel, build_model
from flexolmo.base.tokenizer import load_tokenizer, tokenizer_info
from index.build import build_source
from index.source import SourceIndex

PROMPT = "The history of the river"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    ws = build_federation(tmp_path_factory.mktemp("guard"), sources=("public", "news"))
    info = tokenizer_info(ws)
    hf = get_profile("tiny").model.hf_config(vocab_size=info.vocab_size, eos_id=info.eos_id, pad_id=info.pad_id,
                                             num_experts=1)
    model = LoadedModel(module=build_model(hf, seed=3).eval(), experts=["public"])
    tok = load_tokenizer(ws)
    runs = {}
    for sample in (False, True):  # the model's own outputs, greedy and sampled: a source built to tempt it
        r = generate(model, tok, PROMPT, max_new_tokens=48, do_sample=sample, seed=5, temperature=1.0, top_p=1.0,
                     stop_at_eos=False)
        runs[sample] = r.token_ids
    docs = [{"doc_id": f"tempt-{i}", "text": tok.decode(runs[i % 2 == 1])} for i in range(8)]
    sources.add_records(ws, "tempt", docs, owner="o", domain="d", licence="CC0", origin="test")
    for s in ("tempt", "news"):
        build_source(ws, s)
    return {"ws": ws, "model": model, "tok": tok, "runs": runs}


def _max_run_by_engine(ix: SourceIndex, ids: list[int], n: int) -> bool:
    """Does any run of n + 1 consecutive ids occur in the source? (infini-gram's count)"""
    return any(ix.count(ids[i : i + n + 1]) > 0 for i in range(len(ids) - n))


@pytest.mark.parametrize("sample", [False, True])
def test_guard_never_lets_a_long_run_through(world, sample):
    ws, model, tok = world["ws"], world["model"], world["tok"]
    ix = SourceIndex(ws, "tempt")
    unguarded = world["runs"][sample]
    tempt = longest_run(guarded_sources_for(ws, "tempt", 10**6), unguarded)
    assert tempt >= 6  # the temptation is real: unguarded, the model repeats a long run of the source
    for n in sorted({1, 3, tempt - 1}):
        sources.set_policy(ws, "tempt", max_verbatim=n)
        guard = VerbatimGuard.open(ws)
        r = generate(model, tok, PROMPT, max_new_tokens=48, do_sample=sample, seed=5, temperature=1.0, top_p=1.0,
                     stop_at_eos=False, guard=guard)
        assert len(r.token_ids) == 48
        assert not _max_run_by_engine(ix, r.token_ids, n), (n, r.token_ids)
        assert longest_run(guard.sources[0].shards, r.token_ids) <= n
        assert r.guard and all(e["source"] == "tempt" and e["limit"] == n for e in r.guard)
        assert r.token_ids != unguarded
    sources.set_policy(ws, "tempt", max_verbatim=None)
    assert VerbatimGuard.open(ws) is None


def guarded_sources_for(ws, name, limit):
    sources.set_policy(ws, name, max_verbatim=limit)
    try:
        return next(g for g in guarded_sources(ws) if g.name == name).shards
    finally:
        sources.set_policy(ws, name, max_verbatim=None)


@pytest.mark.parametrize("sample", [False, True])
def test_generation_that_never_touches_a_guarded_source_is_unchanged(world, sample):
    ws, model, tok = world["ws"], world["model"], world["tok"]
    sources.set_policy(ws, "news", max_verbatim=6)
    try:
        guard = VerbatimGuard.open(ws)
        plain = generate(model, tok, PROMPT, max_new_tokens=40, do_sample=sample, seed=11, top_p=0.9)
        guarded = generate(model, tok, PROMPT, max_new_tokens=40, do_sample=sample, seed=11, top_p=0.9, guard=guard)
        assert longest_run(guard.sources[0].shards, plain.token_ids) <= 6  # never touches the limit
        assert guarded.token_ids == plain.token_ids and guarded.guard == []
        assert guarded.routing == plain.routing
    finally:
        sources.set_policy(ws, "news", max_verbatim=None)


def test_incremental_match_equals_a_fresh_search(world):
    """Pushing tokens one by one gives, at every step, the longest suffix found by a full search."""
    ws = world["ws"]
    shards = guarded_sources_for(ws, "tempt", 5)
    ix = SourceIndex(ws, "tempt")
    from index.search import IncrementalMatch

    g = torch.Generator().manual_seed(0)
    run = world["runs"][False]
    ids = run[:20] + torch.randint(2, 300, (5,), generator=g).tolist() + run[5:30]
    m = IncrementalMatch(shards)
    for t in range(len(ids)):
        got = m.push(ids[t])
        want = max((k for k in range(1, t + 2) if ix.count(ids[t + 1 - k : t + 1]) > 0), default=0)
        assert got == want, t


def test_trace_records_where_the_guard_acted(world):
    from tracing.trace import Tracer

    ws = world["ws"]
    sources.set_policy(ws, "tempt", max_verbatim=4)
    try:
        tracer = Tracer.open(ws, model=world["model"])
        t = tracer.generate_and_trace(PROMPT, GenerationOptions(max_new_tokens=30), store=False)
        g = t.settings["verbatim_guard"]
        assert g["limits"] == {"tempt": 4} and g["acted"] and g["acted"][0]["source"] == "tempt"
    finally:
        sources.set_policy(ws, "tempt", max_verbatim=None)


def test_bad_limits_are_refused(world):
    ws = world["ws"]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="max-verbatim must be a whole number"):
            sources.set_policy(ws, "tempt", max_verbatim=bad)
    r = CliRunner().invoke(app, ["--workspace", str(ws.root), "sources", "set", "tempt", "--inactive",
                                 "--max-verbatim", "0"])
    assert r.exit_code == 1 and "max-verbatim" in r.output
    assert sources.get_source(ws, "tempt").active and sources.get_source(ws, "tempt").max_verbatim is None
    r = CliRunner().invoke(app, ["--workspace", str(ws.root), "sources", "set", "tempt", "--max-verbatim", "7"])
    assert r.exit_code == 0 and "max_verbatim=7" in r.output
    assert any(e["field"] == "max_verbatim" and e["new_value"] == "7" for e in sources.policy_log(ws, "tempt"))
    sources.set_policy(ws, "tempt", max_verbatim=None)


def test_guarded_source_without_index_fails_closed(world, tmp_path):
    from flexolmo.base.errors import ConflictError

    ws = world["ws"]
    sources.add_records(ws, "noidx", [{"doc_id": "n-0", "text": "a b c"}, {"doc_id": "n-1", "text": "d e"}],
                        owner="o", domain="d", licence="CC0", origin="test")
    sources.set_policy(ws, "noidx", max_verbatim=3)
    try:
        with pytest.raises(ConflictError, match="no index here"):
            VerbatimGuard.open(ws)
    finally:
        sources.set_policy(ws, "noidx", max_verbatim=None)
