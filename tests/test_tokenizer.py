"""The shared tokenizer: trained on the public source only, u16-sized, lossless on every domain."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from flexolmo.base import sources, tokenizer
from flexolmo.base.errors import InputError, NotFoundError

# One short text in the style of each of the eight sample domains, with the characters that
# trip byte-level tokenizers: accents, CJK, emoji, tabs, CRLF, runs of spaces, TeX, NUL-free.
DOMAIN_TEXTS = {
    "public": "Ångström (Å) is a unit of length equal to 10⁻¹⁰ m; named after Anders Jonas Ångström.",
    "news": "Fellow-Citizens of the Senate and House of Representatives:\n\nI embrace with great satisfaction…",
    "creative": "**HAMLET**  \nTo be, or not to be, that is the question:  \n_Exit OPHELIA_\n",
    "code": "def f(x: int) -> int:\r\n\treturn x ** 2  # squares\r\n\n\nclass A:\n    pass\n",
    "academic": "\\section{Model} We fit $y_i = \\beta_0 + \\beta_1 x_i + \\varepsilon_i$ with \\pkg{lme4}.",
    "educational": ":mod:`multiprocessing` --- Process-based parallelism\n=====================================\n",
    "math": "$( The axiom of extensionality. $)\n  ax-ext $a |- ( A. z ( z e. x <-> z e. y ) -> x = y ) $.",
    "forum": "Subject: Re: 宇宙 launch?\n\n>> quoted   text\n:-) 🚀 see <http://x.y/z?q=1&r=2>\n",
}


@pytest.fixture
def trained(ws):
    wiki = [f"{w} is a topic of article number {i}. It was studied in {1800 + i}." for i, w in
            enumerate(["Physics", "Music", "History", "Biology", "Art", "Chemistry"] * 40)]
    sources.add_records(ws, "public", [{"doc_id": str(i), "text": t} for i, t in enumerate(wiki)],
                        owner="o", domain="d", licence="l", origin="test")
    sources.add_records(ws, "secret", [{"doc_id": "s", "text": "zyzzyva quixotic xylophone " * 50}],
                        owner="o", domain="d", licence="l", origin="test")
    return tokenizer.train_tokenizer(ws, vocab_size=400)


@pytest.mark.parametrize("domain", sorted(DOMAIN_TEXTS))
def test_round_trip_on_every_domain(ws, trained, domain):
    tok = tokenizer.load_tokenizer(ws)
    text = DOMAIN_TEXTS[domain]
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert max(ids) < trained.vocab_size <= tokenizer.MAX_VOCAB


def test_trained_on_public_only(ws, trained):
    raw = tokenizer.load_raw_tokenizer(ws)
    vocab = raw.get_vocab()
    # merges learnt from the public text exist; the private source's words were never seen
    assert "Ġarticle" in vocab
    assert "Ġxylophone" not in vocab and "Ġquixotic" not in vocab
    assert trained.source == "public"


def test_files_card_and_bow_ids(ws, trained):
    assert isinstance(Tokenizer.from_file(str(ws.tokenizer_dir / "tokenizer.json")), Tokenizer)
    raw = tokenizer.load_raw_tokenizer(ws)
    bow = set(tokenizer.read_bow_ids(ws))
    assert len(bow) == trained.n_bow
    ids = raw.encode("It was studied in Music").ids
    starts = [raw.decode([i])[:1] == " " for i in ids]
    assert [i in bow for i in ids] == starts
    assert trained.eos_id == 0 and trained.pad_id == 1
    assert tokenizer.tokenizer_hash(ws) == trained.sha256


def test_vocab_size_bounds(ws):
    texts = [f"Entry {i}: the river city had {i * 3} bridges and one king." for i in range(50)]
    # 256 byte ids + 2 special tokens fill 258 ids: the smallest vocabulary that learns a merge is 259
    with pytest.raises(InputError, match=r"259\.\.4294967295"):
        tokenizer.train_tokenizer(ws, vocab_size=258, texts=texts, whitespace_runs=False)
    with pytest.raises(InputError, match=r"265\.\.4294967295"):  # and 6 more with the whitespace runs
        tokenizer.train_tokenizer(ws, vocab_size=264, texts=texts, whitespace_runs=True)
    with pytest.raises(InputError, match="u32 index ids"):  # beyond 65,535 ids the indexes store u32
        tokenizer.train_tokenizer(ws, vocab_size=2**32, texts=texts)
    info = tokenizer.train_tokenizer(ws, vocab_size=259, texts=texts, whitespace_runs=False)
    assert info.vocab_size == 259
    ids = tokenizer.load_raw_tokenizer(ws).encode(texts[7]).ids
    assert max(ids) < 259 and len(ids) < len(texts[7].encode())  # the one merge is used


def test_missing_tokenizer_says_what_to_run(tmp_path):
    from flexolmo.base.workspace import Workspace

    with pytest.raises(NotFoundError, match="tokenizer train"):
        tokenizer.load_tokenizer(Workspace(tmp_path / "empty"))


def test_tokenizer_card_decides_freshness(ws, trained):
    from flexolmo.base.artifacts import tokenizer as artifact

    card = artifact.read(ws)
    src = sources.get_source(ws, "public")
    assert card.sha256 == trained.sha256 == tokenizer.tokenizer_hash(ws)
    runs = {"whitespace_runs": tokenizer.WHITESPACE_RUNS} if card.whitespace_runs else {}  # the default's
    assert card.is_current(artifact.inputs_for(src.content_hash, {"vocab_size": 400, **runs}))
    assert not card.is_current(artifact.inputs_for(src.content_hash, {"vocab_size": 420, **runs}))
    assert "settings" in card.stale_reason(artifact.inputs_for(src.content_hash, {"vocab_size": 420, **runs}))
    # trained from given texts (tests): names the texts, so never current for a source
    tokenizer.train_tokenizer(ws, vocab_size=400, texts=["some text", "more text"])
    assert not artifact.read(ws).is_current(artifact.inputs_for(src.content_hash, {"vocab_size": 400, **runs}))


def test_whitespace_runs_get_tokens_and_words_keep_their_start(ws, trained):
    tokenizer.train_tokenizer(ws, vocab_size=400, whitespace_runs=False, force=True)
    plain = tokenizer.load_raw_tokenizer(ws)
    assert plain.token_to_id("ĠĠ") is None  # encyclopedia-like text teaches no run of spaces
    text = DOMAIN_TEXTS["code"] + "        return x\n" + " " * 40 + "y\t\t\t\tz"
    before = plain.encode(text)
    info = tokenizer.train_tokenizer(ws, vocab_size=400, whitespace_runs=True, force=True)
    from flexolmo.base.artifacts import tokenizer as artifact

    card = artifact.read(ws)
    assert info.vocab_size == 400 and card.whitespace_runs == {"space": [2, 4, 8, 16], "tab": [2, 4]}
    src = sources.get_source(ws, "public")
    assert not card.is_current(artifact.inputs_for(src.content_hash, {"vocab_size": 400}))  # another recipe
    assert card.is_current(artifact.inputs_for(src.content_hash, {"vocab_size": 400, "whitespace_runs": tokenizer.WHITESPACE_RUNS}))
    tok = tokenizer.load_raw_tokenizer(ws)
    after = tok.encode(text)
    assert tok.decode(after.ids) == text  # lossless
    assert len(after.ids) < len(before.ids) - 20  # 8 spaces: 3 tokens instead of 8; 40: 4 instead of 40
    pieces = [tok.decode([i]) for i in after.ids]
    assert " " * 16 in pieces and "\t" * 2 in pieces, pieces  # a run leaves its last character to the next piece
    # the run's last space stays on the word: "return" keeps its word-start token, as in plain text
    word = tok.encode(" return").ids
    indented = tok.encode("\n        return").ids
    assert indented[-len(word):] == word and [tok.decode([i]) for i in indented[:-len(word)]] == ["\n", " " * 4, " " * 2, " "]
    for domain, t in DOMAIN_TEXTS.items():
        assert tok.decode(tok.encode(t).ids) == t, domain
    # the whitespace ids begin a word (spans may start there)
    bow = set(tokenizer.read_bow_ids(ws))
    assert tok.token_to_id("ĠĠĠĠ") in bow
    with pytest.raises(InputError, match="out of range"):
        tokenizer.train_tokenizer(ws, vocab_size=262, whitespace_runs=True, force=True)


def test_whitespace_runs_keep_runs_the_bpe_learned_itself():
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["def f():\n    return 1\n    pass\n"] * 50, trainer=trainer)
    assert tok.token_to_id("ĠĠ") is not None  # indented text: the BPE learned a run itself
    before = tok.get_vocab()
    out = tokenizer.with_whitespace_runs(tok)
    after = out.get_vocab()
    assert all(after[t] == i for t, i in before.items())  # every id keeps its number
    assert set(after) - set(before) >= {"Ġ" * 8, "Ġ" * 16, "ĉĉ", "ĉ" * 4}
    text = "x\n" + " " * 37 + "y\t\t\tz"
    assert out.decode(out.encode(text).ids) == text


def test_unchanged_source_keeps_tokenizer(ws, trained):
    tokenizer.train_tokenizer(ws, vocab_size=400, force=True)
    first = tokenizer.tokenizer_hash(ws)
    mtime = (ws.tokenizer_dir / "tokenizer.json").stat().st_mtime_ns
    tokenizer.train_tokenizer(ws, vocab_size=400)
    assert (ws.tokenizer_dir / "tokenizer.json").stat().st_mtime_ns == mtime
    tokenizer.train_tokenizer(ws, vocab_size=420)
    assert tokenizer.tokenizer_hash(ws) != first
