"""u32 indexes: a tokenizer of more than 65,535 ids, imported from a plain Hugging Face folder.

    .venv/bin/python -m pytest tests/test_index_u32.py -q

The tokenizer (tests/bigtok.py) spreads its real tokens over 131,200 ids, with a frequent
word at 0xFFFF (the u16 separator) and '.' at 0x1FFFF, so the byte order of 4-byte keys
and the separator 0xFFFFFFFF are exercised. Two sources are indexed once per module; the
stock infini-gram engine (token_dtype="u32") is the reference for counts and spans.
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
from infini_gram.engine import InfiniGramEngine

from bigtok import N_IDS, byte_level_folder
from textcorpus import word_records, word_text

from flexolmo.base import sources, tokenizer
from flexolmo.base.artifacts import tokenizer as tok_artifact
from flexolmo.base.errors import InputError
from flexolmo.base.tokens import source_tokens
from flexolmo.base.workspace import Workspace
from index import build, format as fmt, protocol as P, search, takedown, verify
from index.engine import Federation
from index.node import Node
from index.width import U32

NAMES = ("alpha", "beta")


@pytest.fixture(scope="module")
def u32(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    rng = random.Random(0)
    recs = {n: word_records(n, rng, n_docs=120, max_sentences=30) for n in NAMES}
    folder = byte_level_folder(root / "hf-tokenizer", [r["text"] for rs in recs.values() for r in rs])
    ws = Workspace(root / "ws")
    for n, rs in recs.items():
        sources.add_records(ws, n, rs, owner="o", domain="d", licence="l", origin="test")
    tokenizer.import_tokenizer(ws, folder)
    for n in NAMES:
        build.build_source(ws, n)
    info = tokenizer.tokenizer_info(ws)
    with fmt.loader_path(root) as p:
        engine = InfiniGramEngine(index_dir=[f"{p}/ws/indexes/{n}" for n in NAMES], eos_token_id=info.eos_id,
                                  vocab_size=N_IDS, token_dtype="u32", bow_ids_path=str(ws.tokenizer_dir / "bow_ids.txt"),
                                  precompute_unigram_logprobs=True)
    tok = tokenizer.load_raw_tokenizer(ws)
    train = {n: {d: tok.encode(t).ids for d, t in zip(*[sources.load_documents(ws, n, split="train").column(c).to_pylist()
                                                        for c in ("doc_id", "text")])} for n in NAMES}
    return dict(ws=ws, root=root, folder=folder, engine=engine, tok=tok, train=train, fed=Federation.open(ws),
                bow=tokenizer.read_bow_ids(ws), delim=tokenizer.read_delimiter_ids(ws), recs=recs)


def _brute(docs, q: list[int]) -> int:
    n = len(q)
    return sum(1 for d in docs for i in range(len(d) - n + 1) if d[i:i + n] == q)


def _inputs(u, n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.6:
                d = rng.choice(u["recs"][rng.choice(NAMES)])["text"]
                a = rng.randint(0, len(d) - 1)
                parts.append(d[a: a + rng.randint(5, 300)])
            else:
                parts.append(word_text(rng, 2))
        yield u["tok"].encode("".join(parts)).ids


def test_plain_folder_imports_with_derived_ids(u32):
    card = tok_artifact.read(u32["ws"])
    tok = u32["tok"]
    assert card.vocab_size == N_IDS > 65535 and card.imported_from == str(u32["folder"]) and card.style == "byte_level"
    assert card.eos_token == "<|endoftext|>" and card.pad_id == card.eos_id and "pad = eos" in card.pad_note
    assert tokenizer.ids_dtype(card.vocab_size) == np.uint32
    bow, delim = set(u32["bow"]), set(u32["delim"])
    assert tok.token_to_id("Ġw") == 0xFFFF and tok.token_to_id(".") == 0x1FFFF  # as bigtok placed them
    assert tok.token_to_id("Ġw") in bow and tok.token_to_id("w") not in bow and card.eos_id in bow
    assert delim == {tok.token_to_id("Ċ"), tok.token_to_id(".")}
    assert len(bow) == card.n_bow_ids and card.n_delimiter_ids == 2
    # the index records its width, and the token files hold 4 bytes per id
    m = fmt.read_manifest(u32["ws"].indexes_dir / "alpha")
    assert m.token_dtype == "u32" and m.vocab_size == N_IDS and m.max_id == N_IDS - 1
    assert (u32["ws"].indexes_dir / "alpha" / "tokenized.0").stat().st_size == 4 * (m.n_tokens + m.n_docs)


def test_stock_engine_loads_it_with_equal_counts(u32):
    eng, fed = u32["engine"], u32["fed"]
    docs = {n: list(u32["train"][n].values()) for n in NAMES}
    assert eng.get_total_doc_cnt() == sum(len(d) for d in docs.values())
    rng = random.Random(1)
    for i in range(150):
        if i % 3 == 2:
            q = [rng.randrange(N_IDS) for _ in range(rng.randint(1, 3))]
        else:
            d = rng.choice(docs[rng.choice(NAMES)])
            s = rng.randrange(max(1, len(d) - 8))
            q = d[s: s + rng.randint(1, 8)]
        want = {n: _brute(docs[n], q) for n in NAMES}
        assert fed.count(q) == want and eng.count(input_ids=q)["count"] == sum(want.values()), q
    assert fed.count([0xFFFF])["alpha"] > 10  # the u16 separator's value is an ordinary id here
    # unigram counts: our sparse file = the engine's count of each id (separator included); they sum to
    # every position of the index, so no other id occurs
    ours = sum(fed.source(n).unigram_counts for n in NAMES)
    assert len(ours) == N_IDS + 1 and ours[-1] == eng.count(input_ids=[U32.doc_sep])["count"] == eng.get_total_doc_cnt()
    assert all(eng.count(input_ids=[int(i)])["count"] == ours[i] for i in np.flatnonzero(ours[:-1]))
    assert ours.sum() == sum(eng.engine.get_tok_cnt(s=s) for s in range(2))
    with pytest.raises(InputError, match=f"0, {N_IDS - 1}"):
        fed.count([N_IDS])


@pytest.mark.parametrize("enforce_bow,max_cnt", [(True, 1_000_000), (False, 3)])
def test_spans_identical_to_engine_attribute(u32, enforce_bow, max_cnt):
    checked = 0
    for ids in _inputs(u32, 25, seed=int(enforce_bow) + max_cnt):
        ref = u32["engine"].attribute(input_ids=ids, delim_ids=u32["delim"], min_len=1, max_cnt=max_cnt,
                                      enforce_bow=enforce_bow)["spans"]
        mine = u32["fed"].find_spans(ids, u32["delim"], u32["bow"], max_cnt=max_cnt, enforce_bow=enforce_bow)
        assert [(s["l"], s["r"], s["count"]) for s in ref] == [(s.l, s.r, s.count) for s in mine]
        assert np.allclose([s["unigram_logprob_sum"] for s in ref], [s.unigram_logprob_sum for s in mine])
        checked += len(mine)
    assert checked > 20


def test_documents_windows_and_token_cache(u32):
    fed, ws = u32["fed"], u32["ws"]
    ix = fed.source("beta")
    toks = source_tokens(ws, "beta")
    assert toks.cached and toks.ids.dtype == np.uint32 and isinstance(toks.ids, np.memmap)
    for i, (doc_id, ids) in enumerate(list(u32["train"]["beta"].items())[:40]):
        ref = ix.document(doc_id)
        assert ix.document_tokens(ref) == ids == toks.doc(i).tolist() == toks.read(i, i + 1).tolist()
        start = int(np.fromfile(fmt.shard_file(ix.folder, "offset", 0), dtype=np.uint64)[ref.doc_ix]) + 4
        assert ix.doc_at(0, start).doc_id == doc_id
    with pytest.raises(InputError, match="multiple of 4"):
        ix.doc_at(0, 2)
    ids = next(iter(u32["train"]["beta"].values()))[:30]
    span = max(fed.find_spans(ids, [], None, enforce_bow=False), key=lambda s: s.length)
    docs = fed.documents(span, n=50, context_tokens=3)
    assert docs and all(d.token_ids[d.needle_offset:d.needle_offset + d.needle_len] == list(span.ids) for d in docs)


def test_stored_byte_table_read_not_rebuilt(u32, tmp_path, monkeypatch):
    """The tokenizer's byte table is written at import and read by a new tokenizer object, never
    rebuilt from the vocabulary; a table made from another tokenizer.json is ignored."""
    from flexolmo.base import pieces
    from index import snippets

    ws = u32["ws"]
    folder = ws.tokenizer_dir
    built = pieces.token_bytes(u32["tok"])
    stored = tokenizer.stored_token_bytes(folder)
    assert (folder / tokenizer.TOKEN_BYTES_FILE).exists() and len(stored) == len(built) == N_IDS
    assert list(stored) == built and stored[0xFFFF] == built[0xFFFF] != b""
    tok = tokenizer.load_tokenizer(ws)

    def no_rebuild(_tok):
        raise AssertionError("the byte table was rebuilt from the vocabulary")

    monkeypatch.setattr(pieces, "token_bytes", no_rebuild)
    ids = next(iter(u32["train"]["alpha"].values()))[:40]
    text, (a, b) = snippets.marked(tok, ids[:10], ids[10:30], ids[30:])
    assert text == u32["tok"].decode(ids) and text[a:b] == u32["tok"].decode(ids[10:30])
    monkeypatch.undo()
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(folder / "tokenizer.json", other / "tokenizer.json")
    tokenizer.write_token_bytes(other, u32["tok"], "0" * 64)  # made from another tokenizer.json
    assert tokenizer.stored_token_bytes(other) is None
    tokenizer.write_token_bytes(other, u32["tok"], tokenizer.file_sha256(other / "tokenizer.json"))
    assert list(tokenizer.stored_token_bytes(other)) == built
    with open(other / tokenizer.TOKEN_BYTES_FILE, "r+b") as f:  # cut short
        f.truncate(f.seek(0, 2) - 5)
    assert tokenizer.stored_token_bytes(other) is None


def test_verify_takedown_guard_and_node_on_u32(u32, tmp_path):
    ws = Workspace(tmp_path / "copy")
    shutil.copytree(u32["ws"].root, ws.root)
    assert verify.verify_index(ws, "alpha").ok
    victim, ids = next(iter(u32["train"]["alpha"].items()))
    takedown.takedown(ws, "alpha", victim, reason="owner request")
    fed = Federation.open(ws, ["alpha"])
    span = fed.find_spans(ids[:20], [], None, enforce_bow=False)[0]
    got = {d.doc_id: d for d in fed.documents(span, n=1000)}
    assert got[victim].blocked and got[victim].token_ids == [] and verify.verify_index(ws, "alpha").ok
    # the guard's incremental match over u32 shards equals a fresh search at every step
    shards = fed.source("alpha")._search
    m = search.IncrementalMatch(shards)
    q = ids[:12] + [u32["tok"].token_to_id("Ġw"), 5] + ids[3:15]
    for t, tok in enumerate(q):
        m.push(tok)
        fresh = max((n for n in range(t + 1, 0, -1) if search.rank_ranges(shards, q[t + 1 - n: t + 1])[0][1]
                     > search.rank_ranges(shards, q[t + 1 - n: t + 1])[0][0]), default=0)
        assert m.length == fresh, t
    assert all(0 <= x < N_IDS for x in m.next_tokens(1))
    # an owner node's identity carries the sparse unigram counts, the separator under 0xFFFFFFFF
    node = Node(ws, "alpha", keys=None)
    ident = P.Identity.model_validate(node.identity())
    assert U32.doc_sep in ident.unigrams.ids
    assert np.array_equal(U32.from_sparse(ident.unigrams.ids, ident.unigrams.counts, N_IDS),
                          fed.source("alpha").unigram_counts)
