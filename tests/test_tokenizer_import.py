"""`flexolmo tokenizer import DIR` from a plain Hugging Face folder: a SentencePiece-style one,
what is derived from it, and the folders it refuses (with why).

    .venv/bin/python -m pytest tests/test_tokenizer_import.py -q
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from bigtok import metaspace_folder
from textcorpus import word_records

from flexolmo.base import sources, tokenizer
from flexolmo.base.artifacts import tokenizer as tok_artifact
from flexolmo.base.errors import ConflictError, InputError
from flexolmo.base.workspace import Workspace
from index import build
from index.engine import Federation


@pytest.fixture(scope="module")
def texts():
    return [r["text"] for r in word_records("t", random.Random(3), n_docs=150, max_sentences=20)]


def test_sentencepiece_folder_imports_and_indexes(tmp_path, texts):
    folder = metaspace_folder(tmp_path / "sp", texts)
    ws = Workspace(tmp_path / "ws")
    r = CliRunner().invoke(_app(), ["-w", str(ws.root), "tokenizer", "import", str(folder)])
    assert r.exit_code == 0, r.output
    assert "uint16 in indexes" in r.output and "'</s>'" in r.output
    card = tok_artifact.read(ws)
    tok = tokenizer.load_raw_tokenizer(ws)
    assert card.style == "metaspace" and card.pad_token == "<pad>" and card.pad_note is None
    assert (card.eos_id, card.pad_id) == (tok.token_to_id("</s>"), tok.token_to_id("<pad>"))
    bow, delim = set(tokenizer.read_bow_ids(ws)), set(tokenizer.read_delimiter_ids(ws))
    ids = tok.encode("the cat.\nthe w1").ids
    pieces = [tok.id_to_token(i) for i in ids]
    assert "<0x0A>" in pieces  # the newline by byte fallback, as in Llama-2's tokenizer
    assert [i in bow for i in ids] == [p.startswith("▁") or p == "<0x0A>" for p in pieces]
    assert {tok.token_to_id("."), tok.token_to_id("<0x0A>"), tok.token_to_id("<0x2E>")} == delim
    assert tokenizer.load_tokenizer(ws).eos_token == "</s>"
    # it indexes (u16: 856 ids) and its spans are the engine's
    sources.add_records(ws, "s", [{"doc_id": f"d{i}", "text": t} for i, t in enumerate(texts)], owner="o",
                        domain="d", licence="l", origin="test")
    build.build_source(ws, "s")
    fed = Federation.open(ws)
    q = tok.encode(texts[4][10:200] + " w7 w9.\n" + texts[9][:120]).ids
    ref = fed.source("s").attribute(q, sorted(delim), enforce_bow=True)
    assert [(s.l, s.r, s.count) for s in ref] == [(s.l, s.r, s.count) for s in fed.find_spans(q, sorted(delim), sorted(bow))]
    assert any(s.length > 5 for s in ref)
    # a trained tokenizer would replace the imported one only when forced
    with pytest.raises(ConflictError, match="imported from"):
        tokenizer.train_tokenizer(ws, vocab_size=300, source="s")


def test_folders_it_cannot_use_are_refused_with_why(tmp_path, texts):
    ws = Workspace(tmp_path / "ws")
    good = metaspace_folder(tmp_path / "good", texts)

    def variant(name: str, edit) -> str:
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return str(d)

    cases = {
        "it has no tokenizer.json": variant("none", lambda d: (d / "tokenizer.json").unlink()),
        "tokenizer.json does not load": variant("broken", lambda d: (d / "tokenizer.json").write_text('{"model": 1}')),
        "eos token is unknown": variant("nocfg", lambda d: (d / "tokenizer_config.json").unlink()),
        "no eos token": variant("noeos", lambda d: _edit_config(d, lambda c: c.pop("eos_token"))),
        "'</z>' is not in tokenizer.json's vocabulary": variant("badeos", lambda d: _edit_config(
            d, lambda c: c.update(eos_token="</z>"))),
        "does not parse as JSON": variant("badjson", lambda d: (d / "tokenizer_config.json").write_text("{")),
    }
    for why, folder in cases.items():
        with pytest.raises(InputError, match=why):
            tokenizer.import_tokenizer(ws, folder)
    # a tokenizer of neither family: word starts cannot be derived
    wl = tmp_path / "wordlevel"
    t = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<eos>": 2, "<unk>": 3}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>").save_pretrained(str(wl))
    r = CliRunner().invoke(_app(), ["-w", str(ws.root), "tokenizer", "import", str(wl)])
    assert r.exit_code == 1 and "neither a byte-level BPE" in r.output
    assert not (ws.tokenizer_dir / "tokenizer.json").exists()  # nothing was written by any refusal


def _edit_config(d, change) -> None:
    path = d / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def _app():
    from cli.main import app

    return app
