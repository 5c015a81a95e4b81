"""A synthetic corpus for index benchmarks at scale, with a tokenizer of more than 65,535 ids.

    folder = tokenizer_folder(Path("/tmp/x/tok"))       # a plain HF folder: tokenizer.json + config
    for batch in document_batches(n_docs, seed=0): ...  # pyarrow tables in the stored layout

Words are made of syllables (consonant + vowel, 105 of them); the tokenizer is a byte-level
BPE whose merges build every syllable, then "Ġ" + syllable, then two- and three-syllable
words, so every word of the corpus is one token and the vocabulary holds WORDS + ~500 ids
(110,592 words: ids far past 65,535, so its indexes are u32). As in Llama 3's tokenizer
(`ignore_merges`), a word that is a token is looked up whole rather than merged step by step.
Documents draw words from a
Zipf distribution (s = 1.1, as natural text roughly follows), with sentence ends (". ") and
paragraph breaks ("\\n") between. Document i depends only on (seed, i), so a corpus of n
documents is a prefix of a larger one, and any document can be rebuilt on its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

CONSONANTS = "bcdfghjklmnpqrstvwxyz"
VOWELS = "aeiou"
SYLLABLES = [c + v for c in CONSONANTS for v in VOWELS]  # 105
WORDS = 110_592
ZIPF_S = 1.1
WORDS_PER_DOC = (400, 1600)
EOS = "<|endoftext|>"


def word_list() -> list[str]:
    """Two-syllable words first (the most frequent ranks), then three-syllable ones."""
    two = [a + b for a in SYLLABLES for b in SYLLABLES]
    three = [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES]
    return (two + three)[:WORDS]


def tokenizer_folder(out: Path) -> Path:
    """Write the byte-level BPE (module docstring) as `save_pretrained` would."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from flexolmo.base.pieces import byte_decoder

    alphabet = sorted(byte_decoder(), key=byte_decoder().get)  # the 256 byte stand-ins, in byte order
    vocab: dict[str, int] = {EOS: 0}
    merges: list[list[str]] = []

    def add(a: str, b: str) -> None:
        if a + b not in vocab:
            merges.append([a, b])
            vocab[a + b] = len(vocab)

    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for s in SYLLABLES:
        add(s[0], s[1])
    for s in SYLLABLES:
        add("Ġ", s)
    words = word_list()
    for w in words:  # "Ġ" + two syllables, then a third
        add("Ġ" + w[:2], w[2:4])
    for w in words:
        if len(w) == 6:
            add("Ġ" + w[:4], w[4:])
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 0, "content": EOS, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                                  "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": vocab, "merges": merges}}
    tok = Tokenizer.from_str(json.dumps(spec))
    out.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(out))
    return out


def _cdf() -> np.ndarray:
    w = 1.0 / np.arange(1, WORDS + 1) ** ZIPF_S
    return np.cumsum(w) / w.sum()


def document(i: int, seed: int, words: np.ndarray, cdf: np.ndarray) -> str:
    """Document i: Zipfian words, ". " every 6-20 words, a newline every ~8 sentences."""
    rng = np.random.default_rng([seed, i])
    n = int(rng.integers(*WORDS_PER_DOC))
    picked = words[np.searchsorted(cdf, rng.random(n))]
    ends = np.cumsum(rng.integers(6, 21, size=n // 6 + 1))
    ends = ends[ends < n]
    parts, a = [], 0
    for k, e in enumerate(ends.tolist() + [n]):
        parts.append(" ".join(picked[a:e].tolist()) + (".\n" if k % 8 == 7 else ". "))
        a = e
    return "".join(parts).rstrip()


def document_batches(n_docs: int, seed: int = 0, batch: int = 2048) -> Iterator[pa.Table]:
    """Documents 0..n_docs-1 in the stored layout (doc_id order), `batch` rows at a time."""
    from flexolmo.base.documents import DOC_SCHEMA, split_of

    words, cdf = np.array(word_list(), dtype=object), _cdf()
    for a in range(0, n_docs, batch):
        ids = [f"d{i:09d}" for i in range(a, min(n_docs, a + batch))]
        texts = [document(i, seed, words, cdf) for i in range(a, a + len(ids))]
        yield pa.table({"doc_id": ids, "text": texts, "title": [None] * len(ids), "split": [split_of(d) for d in ids],
                        "metadata": ["{}"] * len(ids)}, schema=DOC_SCHEMA)


def words_and_cdf() -> tuple[np.ndarray, np.ndarray]:
    return np.array(word_list(), dtype=object), _cdf()
