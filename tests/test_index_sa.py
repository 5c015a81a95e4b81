"""Suffix arrays: libdivsufsort (the default) writes the same `table.N` as rust_indexing.

    .venv/bin/python -m pytest tests/test_index_sa.py -q

Token files are made here with long repeats (one passage copied into most documents, with
one id changed per copy), document separators, and ids whose bytes stress the byte order
(low byte 0xFF, 0xFFFF as an ordinary u32 id); both constructions run on the same file and
the tables must be byte for byte the same. Then a whole build of a repetitive source with
each construction: same files, and the stock engine's counts equal a brute-force count.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from infini_gram.engine import InfiniGramEngine

from flexolmo.base import sources, tokenizer
from flexolmo.base.errors import InputError
from flexolmo.base.workspace import Workspace
from index import build, format as fmt
from index.suffix_array import SINGLE_PART_BELOW, build_suffix_array, max_shard_bytes
from index.width import U16, U32


def _token_file(width, n_tokens: int, seed: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    special = [0xFF, 0x1FF, 0xFF00, 0xFFFE] + ([0xFFFF, 0x1FFFF, 0x1FEFF, 0x100FF] if width.bytes == 4 else [])
    passage = rng.integers(0, vocab, 1500).astype(np.int64)
    passage[::7] = rng.choice(special, len(passage[::7]))
    docs, n = [], 0
    while n < n_tokens:
        r = rng.random()
        if r < 0.6:  # the passage, or a long prefix of it, with one id changed
            d = passage[: rng.integers(200, len(passage) + 1)].copy()
            d[rng.integers(len(d))] = rng.integers(vocab)
        elif r < 0.7:  # a short exact prefix (a prefix of other documents' suffixes)
            d = passage[: rng.integers(1, 20)].copy()
        else:
            d = rng.integers(0, vocab, rng.integers(1, 400))
        docs += [np.array([width.doc_sep]), d]
        n += len(d) + 1
    return np.concatenate(docs).astype(width.dtype)


@pytest.mark.parametrize("width,vocab", [(U16, 8000), (U32, 131_200)])
@pytest.mark.parametrize("parts", [1, 2])  # rust_indexing's make-part slices
def test_tables_identical_to_rust_indexing(tmp_path, width, vocab, parts):
    n_tokens = 5_000 if parts == 1 else SINGLE_PART_BELOW // width.bytes + 10_000
    ids = _token_file(width, n_tokens, seed=parts + width.bytes, vocab=vocab)
    tok = tmp_path / "tokenized.0"
    ids.tofile(tok)
    tables = {}
    for method in ("rust", "divsufsort"):
        table = tmp_path / f"table.{method}"
        build_suffix_array(tok, table, tmp_path / "work", width, cpus=2, method=method)
        tables[method] = table.read_bytes()
    assert tables["rust"] == tables["divsufsort"]
    ratio = fmt.ptr_size(tok.stat().st_size)
    ptrs = np.frombuffer(tables["divsufsort"], dtype=np.uint8).reshape(-1, ratio)
    offsets = (np.pad(ptrs, ((0, 0), (0, 8 - ratio))).view("<u8").ravel()) // width.bytes
    assert sorted(offsets.tolist()) == list(range(len(ids)))  # every position once
    keys = ids.byteswap()  # the order of the little-endian bytes
    for a, b in zip(offsets[:200], offsets[1:201]):  # adjacent suffixes in order (from the start: repeats)
        x, y = keys[a:], keys[b:]
        k = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), None)
        assert (len(x) < len(y)) if k is None else x[k] < y[k]


def test_u32_sort_uses_the_fewest_bytes_per_id(tmp_path):
    from index.suffix_array import _dense_bytes

    ids = _token_file(U32, 3000, seed=5, vocab=131_200)
    tok = tmp_path / "tokenized.0"
    ids.tofile(tok)
    text, w = _dense_bytes(tok, U32)
    assert len(np.unique(ids)) > 256 and w == 2 and len(text) == 2 * len(ids)


def test_budget_and_method_checked():
    assert max_shard_bytes(8, "rust") == 6 * 1024**3 and max_shard_bytes(8) == int(6 * 1024**3 / 5)
    assert max_shard_bytes(4096) > 2**31  # past 2 GiB: 8-byte pointers, 9 bytes a byte
    with pytest.raises(InputError, match="divsufsort, rust"):
        build.IndexConfig(suffix_array="qsort").check()


def _brute(docs: list[list[int]], q: list[int]) -> int:
    return sum(1 for d in docs for i in range(len(d) - len(q) + 1) if d[i: i + len(q)] == q)


def test_whole_build_on_repeats_same_as_rust_and_counts_right(tmp_path):
    rng = random.Random(3)
    words = "licence warranty copyright holder software permission notice shall included copies".split()
    notice = " ".join(rng.choice(words) for _ in range(300))
    recs = [{"doc_id": f"d{i:03d}", "text": (notice if i % 3 else " ".join(rng.choice(words) for _ in range(40)))
             + f" file {i}."} for i in range(90)]
    roots = {}
    for method in ("rust", "divsufsort"):
        ws = Workspace(tmp_path / method).ensure()
        sources.add_records(ws, "pkgs", recs, owner="o", domain="d", licence="l", origin="test")
        tokenizer.train_tokenizer(ws, vocab_size=300, source="pkgs")
        r = build.build_source(ws, "pkgs", config=build.IndexConfig(suffix_array=method, max_shard_tokens=4000))
        assert r.n_shards > 1
        roots[method] = ws
    a, b = (build.index_dir(roots[m], "pkgs") for m in ("rust", "divsufsort"))
    names = sorted(p.name for p in a.iterdir() if p.name.startswith(("table", "tokenized", "offset")))
    assert names and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    ws = roots["divsufsort"]
    ids = np.concatenate([np.fromfile(b / n, dtype=np.uint16) for n in names if n.startswith("tokenized")])
    docs = [d.tolist() for d in np.split(ids, np.flatnonzero(ids == U16.doc_sep))[1:]]
    docs = [d[1:] for d in docs]
    info = tokenizer.tokenizer_info(ws)
    with fmt.loader_path(b) as p:
        eng = InfiniGramEngine(index_dir=str(p), eos_token_id=info.eos_id)
    for q in (docs[1][:5], docs[1][100:140], docs[0][:3], docs[2][-6:], docs[1][:1]):
        assert eng.count(input_ids=q)["count"] == _brute(docs, q) > 0, q
