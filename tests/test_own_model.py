"""Bring your own model (issue 22): a stock FlexOlmo checkpoint without the project's sidecars,
a dense causal LM, and a model whose tokenizer is not the index's, each traced with --model.

Every model here is a tiny random one the test saves with `save_pretrained`; nothing is downloaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest_model import build_federation
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2Config, Olmo2ForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from cli.main import app
from flexolmo.base import sources
from flexolmo.base.errors import ConflictError, InputError, IntegrityError
from flexolmo.model.generate import GenerationOptions, route
from flexolmo.model.loading import ModelSpec, read_expert_names
from index.build import build_source
from tracing.options import TraceOptions
from tracing.trace import Tracer

NAMES = ("public", "news", "code")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    w = build_federation(tmp_path_factory.mktemp("own") / "ws", sources=NAMES, n_docs=30)
    for s in NAMES:
        build_source(w, s)
    return w


def _passage(ws, source="news", i=2) -> str:
    words = sources.load_documents(ws, source, split="train").to_pylist()[i]["text"].split(" ")
    return " " + " ".join(words[3:28])


def _flexolmo(folder, vocab: int, experts: int = 3, seed: int = 0) -> None:
    """A stock transformers FlexOlmo (its own router, no bias, no experts.json), saved as is."""
    torch.manual_seed(seed)
    cfg = FlexOlmoConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         num_experts=experts, num_experts_per_tok=2, norm_topk_prob=False, eos_token_id=0,
                         pad_token_id=1, bos_token_id=None)
    FlexOlmoForCausalLM(cfg).save_pretrained(folder)


def _char_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per character): model token j is character j."""
    chars = sorted({c for t in texts for c in t})
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")  # Oniguruma: (?m) lets . match newlines
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def test_a_stock_flexolmo_checkpoint_gives_routing_and_counterfactuals(ws, tmp_path):
    folder = tmp_path / "stock"
    _flexolmo(folder, vocab=len(Tracer.open(ws, model=None).tokenizer))
    assert not (folder / "experts.json").exists() and not (folder / "router_bias.safetensors").exists()
    tracer = Tracer.open(ws, model=ModelSpec.parse(folder, experts="public,news,code"))
    assert tracer.model.experts == ["public", "news", "code"] and tracer.model_tokenizer is None
    t = tracer.trace(_passage(ws), store=False)
    assert t.spans
    for s in t.spans:
        assert [e.source for e in s.experts] == ["public", "news", "code"]
        assert sum(e.routing_share for e in s.experts) == pytest.approx(1.0, abs=1e-3)
        assert any(e.counterfactual is not None for e in s.experts)
        assert s.top_expert_by == "counterfactual"
    assert t.settings["model"]["kind"] == "flexolmo" and t.settings["model"]["expert_linkage"] is None
    # the same through the command line, names from a mapping file
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"experts": ["public", "news", "code"]}))
    r = CliRunner().invoke(app, ["-w", str(ws.root), "trace", "--model", str(folder), "--experts", str(names),
                                 "--text", _passage(ws), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["spans"] and out["spans"][0]["experts"][1]["source"] == "news"


def test_expert_names_must_fit_the_model(ws, tmp_path):
    folder = tmp_path / "stock"
    _flexolmo(folder, vocab=len(Tracer.open(ws, model=None).tokenizer))
    with pytest.raises(IntegrityError, match="names 2 experts, the model has 3"):
        Tracer.open(ws, model=ModelSpec.parse(folder, experts="public,news"))
    with pytest.raises(InputError, match="twice"):
        read_expert_names("public,news,public")
    default = Tracer.open(ws, model=ModelSpec.parse(folder))
    assert default.model.experts == ["public", "expert1", "expert2"]


def test_a_dense_model_gives_spans_and_documents_only(ws, tmp_path):
    folder = tmp_path / "dense"
    vocab = len(Tracer.open(ws, model=None).tokenizer)
    torch.manual_seed(0)
    Olmo2ForCausalLM(Olmo2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                 eos_token_id=0, pad_token_id=1, bos_token_id=None)).save_pretrained(folder)
    passage = _passage(ws)
    plain = Tracer.open(ws, model=None).trace(passage, store=False)
    tracer = Tracer.open(ws, model=ModelSpec.parse(folder))
    assert not tracer.model.is_moe
    t = tracer.trace(passage, store=False)
    assert [(s.start, s.end, s.count) for s in t.spans] == [(s.start, s.end, s.count) for s in plain.spans]
    assert t.spans and all(s.experts == [] and s.top_expert is None for s in t.spans)
    assert "not applicable" in t.settings["model"]["expert_linkage"]
    g = tracer.generate_and_trace(" President", GenerationOptions(max_new_tokens=8), store=False)  # generation works, no routing
    assert g.generated and all(s.experts == [] for s in g.spans)
    with pytest.raises(InputError, match="dense model"):
        Tracer.open(ws, model=ModelSpec.parse(folder), options=TraceOptions(exclude=("news",)))
    r = CliRunner().invoke(app, ["-w", str(ws.root), "trace", "--model", str(folder), "--text", passage])
    assert r.exit_code == 0, r.output
    assert "expert linkage: not applicable" in r.output


@pytest.fixture(scope="module")
def char_model(ws, tmp_path_factory):
    """A FlexOlmo model with a character-level tokenizer of its own, saved beside it."""
    folder = tmp_path_factory.mktemp("charmodel")
    texts = [d["text"] for s in NAMES for d in sources.load_documents(ws, s, split="train").to_pylist()]
    tok = _char_tokenizer(texts + [" President"])
    _flexolmo(folder, vocab=len(tok), seed=1)
    tok.save_pretrained(folder)
    return folder


def test_another_tokenizer_gives_the_same_spans_and_routing_at_the_right_characters(ws, char_model):
    passage = _passage(ws, "code", 4)
    shared = Tracer.open(ws, model=None).trace(passage, store=False)
    tracer = Tracer.open(ws, model=ModelSpec.parse(char_model, experts="public,news,code"))
    assert tracer.model_tokenizer is not None  # not the index's: spans are mapped by characters
    t = tracer.trace(passage, store=False)
    key = lambda s: (s.start, s.end, s.count, s.char_start, s.char_end, s.text)  # noqa: E731
    assert [key(s) for s in t.spans] == [key(s) for s in shared.spans] and t.spans
    assert [(g.start, g.end, g.text) for g in t.groups] == [(g.start, g.end, g.text) for g in shared.groups]
    # routing: the model's token j is character j, so a span's share comes from the routing rows
    # that produced characters char_start..char_end-1 (row t-1 produces token t; row 0 is <eos>)
    model_ids = tracer.model_tokenizer(passage, add_special_tokens=False)["input_ids"]
    assert len(model_ids) == len(passage)
    r = route(tracer.model, [tracer.model_tokenizer.eos_token_id] + model_ids)
    for s in t.spans:
        e = r.experts[s.char_start: s.char_end].reshape(-1).numpy()
        w = r.weights[s.char_start: s.char_end].reshape(-1).double().numpy()
        share = np.bincount(e, weights=w, minlength=3)
        share /= share.sum()
        assert [x.routing_share for x in s.experts] == pytest.approx(share.tolist(), abs=1e-4)
        assert any(x.counterfactual is not None for x in s.experts)


def test_generation_with_another_tokenizer(ws, char_model):
    tracer = Tracer.open(ws, model=ModelSpec.parse(char_model, experts="public,news,code"))
    t = tracer.generate_and_trace(" President", GenerationOptions(max_new_tokens=24), store=False)
    assert t.generated and t.response and t.settings["model"]["tokenizer"] == "own"
    for s in t.spans:
        assert t.response[s.char_start: s.char_end] == s.text
    # an owner's --max-verbatim limit is enforced on index ids: this model cannot be guarded
    sources.set_policy(ws, "news", max_verbatim=5)
    try:
        with pytest.raises(ConflictError, match="cannot be guarded"):
            tracer.generate_and_trace(" President", GenerationOptions(max_new_tokens=4), store=False)
        assert tracer.trace(" the nation", store=False) is not None  # tracing text stays allowed
    finally:
        sources.set_policy(ws, "news", max_verbatim=None)


def test_model_options_are_checked_before_loading(ws, tmp_path):
    with pytest.raises(InputError, match="no CUDA GPU"):
        ModelSpec.parse(None, device="cuda")
    with pytest.raises(InputError, match="not a device"):
        ModelSpec.parse(None, device="tpu")
    with pytest.raises(InputError, match="not supported"):
        ModelSpec.parse(None, dtype="float16")
    r = CliRunner().invoke(app, ["-w", str(ws.root), "trace", "--model", str(tmp_path), "--text", "x"])
    assert r.exit_code != 0 and "no config.json" in r.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tracing_on_cuda_matches_the_cpu(ws, tmp_path):
    """The same stock FlexOlmo traced on the GPU (fp32, then bf16) and on the CPU: the same spans,
    routing shares and counterfactuals (fp32 to 1e-3; bf16 within its precision), generation too."""
    folder = tmp_path / "stock"
    _flexolmo(folder, vocab=len(Tracer.open(ws, model=None).tokenizer))
    passage, names = _passage(ws), "public,news,code"
    cpu = Tracer.open(ws, model=ModelSpec.parse(folder, experts=names)).trace(passage, store=False)
    for dtype, tol in (("float32", 1e-3), ("bfloat16", 5e-2)):
        tracer = Tracer.open(ws, model=ModelSpec.parse(folder, experts=names, device="cuda", dtype=dtype))
        assert tracer.model.device.type == "cuda" and tracer.model_card()["dtype"] == dtype
        t = tracer.trace(passage, store=False)
        assert [(s.start, s.end, s.count) for s in t.spans] == [(s.start, s.end, s.count) for s in cpu.spans]
        for s, c in zip(t.spans, cpu.spans):
            assert [e.routing_share for e in s.experts] == pytest.approx([e.routing_share for e in c.experts], abs=tol)
            cf = [e.counterfactual or 0.0 for e in s.experts]
            assert cf == pytest.approx([e.counterfactual or 0.0 for e in c.experts], abs=tol * 10)
        g = tracer.generate_and_trace(" President", GenerationOptions(max_new_tokens=8), store=False)
        assert g.generated and len(g.response) > 0
