"""Per-source indexes: build, upstream engine, counts, doc mapping, atomic builds, takedowns, verify.

    .venv/bin/python -m pytest tests/test_index.py -x -q

One tiny corpus is built once per module in a folder whose path holds `table` and `offset`
(infini-gram's loader classifies files by substring of the whole path); tests that damage
an index work on a copy.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flexolmo.base import sources, tokenizer
from flexolmo.base.errors import ConflictError, InputError, IntegrityError, NotFoundError
from flexolmo.base.workspace import Workspace
from index import build, catalog, format as fmt, takedown, verify
from index.engine import Federation

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on a mat while dogs ran over green hills and rivers under blue skies of old red "
         "stone towns where people sang songs about ships trains letters numbers gardens and clocks").split()


def _records(seed: int, n: int, prefix: str) -> list[dict]:
    rng = random.Random(seed)
    return [{"doc_id": f"{prefix}{i:04d}", "title": f"{prefix} title {i}", "metadata": {"path": f"{prefix}/{i}.txt"},
             "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 90))) + "."} for i in range(n)]


def _make_ws(root: Path) -> Workspace:
    ws = Workspace(root).ensure()
    sources.add_records(ws, "news", _records(1, 320, "n"), owner="A", domain="news", licence="cc0", origin="test")
    sources.add_records(ws, "forum", _records(2, 120, "f"), owner="B", domain="forum", licence="cc0", origin="test")
    tokenizer.train_tokenizer(ws, vocab_size=400, source="news")
    return ws


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Workspace:
    ws = _make_ws(tmp_path_factory.mktemp("ws_table_offset") / "w")
    results = build.build_all(ws)
    assert sorted(r.source for r in results) == ["forum", "news"] and not any(r.skipped for r in results)
    return ws


@pytest.fixture
def copy_ws(built: Workspace, tmp_path: Path) -> Workspace:
    dst = tmp_path / "copy_metadata"
    shutil.copytree(built.root, dst)
    return Workspace(dst)


def _train_ids(ws: Workspace, name: str) -> dict[str, list[int]]:
    """doc_id -> ids of every train document, tokenized independently of the index code."""
    tok = tokenizer.load_raw_tokenizer(ws)
    t = sources.load_documents(ws, name, split="train")
    return {d: tok.encode(x, add_special_tokens=False).ids
            for d, x in zip(t.column("doc_id").to_pylist(), t.column("text").to_pylist())}


def _brute(docs: list[list[int]], q: list[int]) -> int:
    n = len(q)
    return sum(1 for d in docs for i in range(len(d) - n + 1) if d[i:i + n] == q)


# ---------------------------------------------------------------------------------------


def test_upstream_engine_loads_the_index(built: Workspace):
    from infini_gram.engine import InfiniGramEngine

    folder = built.indexes_dir / "news"
    assert "table" in str(folder)  # the hazard the loader path works around
    names = {p.name for p in folder.iterdir()}
    assert {"tokenized.0", "table.0", "offset.0", "metadata.0", "metaoff.0", "unigram.0", "bow_ids.txt"} <= names
    ids = _train_ids(built, "news")
    with fmt.loader_path(folder) as path:
        assert "table" not in path
        eng = InfiniGramEngine(index_dir=path, eos_token_id=tokenizer.tokenizer_info(built).eos_id,
                               bow_ids_path=str(folder / "bow_ids.txt"))
    assert eng.get_total_doc_cnt() == len(ids)
    assert eng.engine.get_tok_cnt(s=0) == sum(len(v) for v in ids.values()) + len(ids)
    # unigram file: counts including one separator per document
    counts = fmt.read_unigram(folder / "unigram.0")
    assert counts[fmt.DOC_SEP] == len(ids) and counts.sum() == eng.engine.get_tok_cnt(s=0)
    rec = catalog.get_index(built, "news")
    assert rec.n_docs == len(ids) and rec.tokenizer_hash == tokenizer.tokenizer_hash(built)
    assert set(rec.files) >= {"table.0", "tokenized.0"} and all(len(f["sha256"]) == 64 for f in rec.files.values())


def test_count_of_random_ngrams_equals_brute_force(built: Workspace):
    docs = list(_train_ids(built, "news").values())
    fed = Federation.open(built)
    rng = random.Random(7)
    vocab = tokenizer.tokenizer_info(built).vocab_size
    checked = 0
    for i in range(300):
        if i % 3 == 2:  # random ids: mostly absent
            q = [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
        else:
            d = rng.choice(docs)
            n = rng.randint(1, 10)
            s = rng.randrange(max(1, len(d) - n))
            q = d[s:s + n]
        assert fed.count(q)["news"] == _brute(docs, q), q
        checked += 1
    assert checked == 300
    with pytest.raises(InputError):
        fed.count([70000])


def test_each_document_maps_back_to_its_doc_id(built: Workspace):
    ids = _train_ids(built, "forum")
    ix = Federation.open(built).source("forum")
    for doc_id, toks in ids.items():
        ref = ix.document(doc_id)
        assert ref.doc_id == doc_id and ref.source == "forum" and ref.title.startswith("f title")
        assert ref.metadata["meta"]["path"] == ref.path == f"f/{int(doc_id[1:])}.txt"
        assert ix.document_tokens(ref) == toks
        # the pointer of its first token maps back to it
        start = int(np.fromfile(fmt.shard_file(ix.folder, "offset", 0), dtype=np.uint64)[ref.doc_ix]) + 2
        assert ix.doc_at(0, start).doc_id == doc_id
    # attribute -> pointers -> documents containing the span
    some = list(ids)[5]
    spans = ix.attribute(ids[some][:40], enforce_bow=False)
    assert spans and any(ix.doc_at(d.shard, d.ptr).doc_id == some for s in spans for d in s.docs)
    # every occurrence of a span, as `documents` returns it, holds the span at its offset
    fed = Federation.open(built, ["forum"])
    span = max(fed.find_spans(ids[some][:40], [], None, enforce_bow=False), key=lambda s: s.length)
    docs = fed.documents(span, n=1000, context_tokens=3)
    assert some in {d.doc_id for d in docs} and len(docs) == len({d.doc_id for d in docs})
    for d in docs:
        assert d.token_ids[d.needle_offset:d.needle_offset + d.needle_len] == list(span.ids)
        assert ids[d.doc_id][d.token_offset:d.token_offset + span.length] == list(span.ids)


def test_validation_documents_are_not_findable(built: Workspace):
    tok = tokenizer.load_raw_tokenizer(built)
    val = sources.load_documents(built, "news", split="validation")
    assert val.num_rows >= 1
    fed = Federation.open(built)
    for doc_id, text in zip(val.column("doc_id").to_pylist(), val.column("text").to_pylist()):
        with pytest.raises(NotFoundError):
            fed.document("news", doc_id)
        assert fed.count(tok.encode(text, add_special_tokens=False).ids)["news"] == 0
    n_train = sources.get_source(built, "news").n_docs_train
    assert fed.source("news").n_docs == n_train


def test_unchanged_source_is_skipped_and_shards_agree(built: Workspace, copy_ws: Workspace):
    r = build.build_source(built, "news")
    assert r.skipped and "content hash" in r.reason
    r2 = build.build_source(copy_ws, "news", shards=3)
    assert not r2.skipped and r2.n_shards == 3
    docs = list(_train_ids(copy_ws, "news").values())
    fed = Federation.open(copy_ws)
    rng = random.Random(3)
    for _ in range(60):
        d = rng.choice(docs)
        q = d[5:5 + rng.randint(1, 6)]
        assert fed.count(q)["news"] == _brute(docs, q)
    assert sorted(fed.document("news", "n0007").metadata) and len(fed.source("news").manifest.shards) == 3
    # the compiled search over three shards finds what infini-gram's attribute finds
    fed = Federation.open(copy_ws, ["news"])
    for d in docs[:10]:
        ref = fed.source("news").attribute(d[:60], min_len=1, enforce_bow=False)
        mine = fed.find_spans(d[:60], [], None, enforce_bow=False)
        assert [(s.l, s.r, s.count) for s in ref] == [(s.l, s.r, s.count) for s in mine]
    with pytest.raises(InputError, match="1..256"):
        build.build_source(copy_ws, "news", shards=257)
    # more than 10 shards: names padded so the loader, which sorts them, pairs them right
    r3 = build.build_source(copy_ws, "news", shards=12)
    names = {p.name for p in (copy_ws.indexes_dir / "news").iterdir()}
    assert r3.n_shards == 12 and {"tokenized.00", "table.11", "unigram.05"} <= names and "tokenized.0" not in names
    fed = Federation.open(copy_ws, ["news"])
    for d in docs[:5]:
        ref = fed.source("news").attribute(d[:60], min_len=1, enforce_bow=False)
        assert [(s.l, s.r, s.count) for s in ref] == [(s.l, s.r, s.count) for s in
                                                      fed.find_spans(d[:60], [], None, enforce_bow=False)]
        assert fed.count(d[3:6])["news"] == _brute(docs, d[3:6])


def test_size_based_shards_and_streamed_sources(copy_ws: Workspace):
    import math

    import pyarrow as pa

    from index.build import IndexConfig

    r = build.build_source(copy_ws, "news", config=IndexConfig(max_shard_tokens=3000))
    assert r.n_shards == math.ceil((r.n_tokens + r.n_docs) / 3000) > 1
    docs = list(_train_ids(copy_ws, "news").values())
    fed = Federation.open(copy_ws, ["news"])
    assert all(fed.count(d[2:5])["news"] == _brute(docs, d[2:5]) for d in docs[:20])
    assert verify.verify_index(copy_ws, "news").ok
    assert build.build_source(copy_ws, "news", config=IndexConfig(max_shard_tokens=3000)).skipped  # same ask: current
    res = CliRunner().invoke(_app(), ["-w", str(copy_ws.root), "index", "build", "--source", "forum",
                                      "--max-shard-tokens", "2500", "--mem-gib", "1", "--cpus", "1"])
    assert res.exit_code == 0, res.output
    assert fmt.read_manifest(copy_ws.indexes_dir / "forum").n_shards > 1
    # a source registered in batches (as a large one is) is the same source as one given whole
    recs = _records(9, 50, "s")
    a = sources.add_records(copy_ws, "whole", recs, owner="o", domain="d", licence="l", origin="t")
    table = sources.documents_table(recs)
    b = sources.add_document_batches(copy_ws, "streamed", (table.slice(i, 7) for i in range(0, 50, 7)),
                                     owner="o", domain="d", licence="l", origin="t")
    assert (a.content_hash, a.n_docs_train, a.n_chars_train) == (b.content_hash, b.n_docs_train, b.n_chars_train)
    got = [d for t in sources.iter_document_batches(copy_ws, "streamed", "train", ["doc_id"], 8)
           for d in t.column("doc_id").to_pylist()]
    assert got == sources.load_documents(copy_ws, "whole", "train", ["doc_id"]).column("doc_id").to_pylist()
    backwards = pa.concat_tables([table.slice(10, 5), table.slice(0, 5)])
    with pytest.raises(InputError, match="doc_ids must increase"):
        sources.add_document_batches(copy_ws, "bad", [backwards], owner="o", domain="d", licence="l", origin="t")
    assert "bad" not in {s.name for s in sources.list_sources(copy_ws)} and not (copy_ws.root / "sources" / "bad").exists()


_KILL_SCRIPT = """
import sys, time
from pathlib import Path
from flexolmo.base.workspace import Workspace
from index import build
marker = Path(sys.argv[2])
def progress(source, step, done, total, unit):
    if step.startswith("suffix array") and done == total:
        marker.write_text("in suffix array")
        time.sleep(60)  # killed here: the new files are written, not yet renamed
build.build_source(Workspace(Path(sys.argv[1])), "news", force=True, progress=progress)
"""


def test_build_killed_partway_leaves_the_old_index(copy_ws: Workspace, tmp_path: Path):
    before = catalog.get_index(copy_ws, "news")
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(copy_ws.root), str(marker)], env=env, cwd=REPO)
    try:
        for _ in range(600):
            if marker.exists() or p.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), "the build subprocess never reached the suffix-array step"
        assert list(copy_ws.indexes_dir.glob(".tmp-news-*")), "the build should be writing a temporary folder"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    after = catalog.get_index(copy_ws, "news")
    assert after == before
    assert fmt.read_manifest(copy_ws.indexes_dir / "news").build_id == before.build_id
    assert verify.verify_index(copy_ws, "news").ok
    docs = list(_train_ids(copy_ws, "news").values())
    assert Federation.open(copy_ws).count(docs[0][:3])["news"] == _brute(docs, docs[0][:3])
    # the killed build's folder stays until the next build of the source removes it
    assert list(copy_ws.indexes_dir.glob(".tmp-news-*"))
    assert build.build_source(copy_ws, "news").skipped
    assert not list(copy_ws.indexes_dir.glob(".tmp-news-*"))


def test_a_running_build_holds_the_source(copy_ws: Workspace):
    """The next build removes every leftover folder, so two builds of a source may not overlap."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with fmt.source_lock(copy_ws, "news"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(30)
        with pytest.raises(ConflictError, match="running"):
            build.build_source(copy_ws, "news")
        with pytest.raises(ConflictError, match="running"):
            takedown.takedown(copy_ws, "news", "n0003", reason="r")
        assert build.build_source(copy_ws, "forum").skipped  # other sources are free
    finally:
        release.set()
        t.join()
    assert build.build_source(copy_ws, "news").skipped


def test_takedown_makes_the_document_blocked(copy_ws: Workspace):
    ids = _train_ids(copy_ws, "news")
    victim = sorted(ids)[10]
    with pytest.raises(NotFoundError):
        takedown.takedown(copy_ws, "news", "no-such-doc", reason="x")
    with pytest.raises(InputError):
        takedown.takedown(copy_ws, "news", victim, reason="  ")
    t = takedown.takedown(copy_ws, "news", victim, reason="owner request", by="alice")
    assert (t.source, t.doc_id, t.requested_by) == ("news", victim, "alice")
    with pytest.raises(ConflictError):
        takedown.takedown(copy_ws, "news", victim, reason="again")
    assert [x.doc_id for x in takedown.list_takedowns(copy_ws)] == [victim]

    fed = Federation.open(copy_ws)
    ix = fed.source("news")
    assert ix.diff_folder is not None and ix.document(victim).blocked
    q = ids[victim][:30]
    spans = ix.attribute(q, enforce_bow=False)
    hits = [(s, d) for s in spans for d in s.docs if ix.doc_at(d.shard, d.ptr).doc_id == victim]
    assert hits
    span, doc = hits[0]
    # the upstream diff engine itself marks the window blocked
    raw = ix.engine.get_docs_by_ptrs_2_grouped([{"docs": [{"s": doc.shard, "ptr": doc.ptr}], "span_ids": q[span.l:span.r],
                                                 "needle_len": span.length, "max_ctx_len": 20}])
    assert raw[0][0]["blocked"] and raw[0][0]["token_ids"] == []
    # the first token of the victim is common (a 40-word vocabulary): the victim among many
    two = fed.find_spans(q[:1], [], None, enforce_bow=False)[0]
    assert two.count_by_source["news"] > 10
    docs = fed.documents(two, n=1000)
    blocked = [d for d in docs if d.blocked]
    assert [d.doc_id for d in blocked] == [victim] and blocked[0].title is None and blocked[0].token_ids == []
    assert len(docs) > 10 and all(d.token_ids and d.title for d in docs if d.doc_id != victim)
    # a rebuild keeps the takedown in force
    build.build_source(copy_ws, "news", force=True)
    assert Federation.open(copy_ws).source("news").document(victim).blocked


def test_verify_catches_a_corrupted_table(copy_ws: Workspace):
    assert verify.verify_index(copy_ws, "news").ok
    table = copy_ws.indexes_dir / "news" / "table.0"
    data = bytearray(table.read_bytes())
    data[len(data) // 2], data[len(data) // 2 + 1] = data[len(data) // 2 + 1] ^ 0xFF, data[len(data) // 2] ^ 0x55
    table.write_bytes(bytes(data))
    r = verify.verify_index(copy_ws, "news")
    assert not r.ok and any("table.0" in p for p in r.problems)
    res = CliRunner().invoke(_app(), ["-w", str(copy_ws.root), "index", "verify", "--source", "news"])
    assert res.exit_code == 1 and "FAILED" in res.output
    # a truncated file is refused when serving
    table.write_bytes(bytes(data[:-3]))
    with pytest.raises(IntegrityError, match="table.0"):
        Federation.open(copy_ws)
    (copy_ws.indexes_dir / "news" / "offset.0").unlink()
    with pytest.raises(IntegrityError, match="offset.0 is missing"):
        Federation.open(copy_ws, ["news"])


@pytest.mark.parametrize("damage", ["table", "metadata"])
def test_a_same_size_damaged_index_is_refused_and_only_its_source_skipped(copy_ws: Workspace, damage: str):
    """A file overwritten with other bytes of the same size: the table (caught by the sampled
    suffix-array order at open) or one byte of a title (caught by the build's checksum)."""
    folder = copy_ws.indexes_dir / "news"
    if damage == "table":
        path = folder / "table.0"
        path.write_bytes(bytes(reversed(path.read_bytes())))
    else:
        path = folder / "metadata.0"
        data = path.read_bytes()
        i = data.index(b"n title 5")
        path.write_bytes(data[:i] + b"N" + data[i + 1:])
    with pytest.raises(IntegrityError, match=path.name):
        Federation.open(copy_ws)
    fed = Federation.open(copy_ws, strict=False)
    assert fed.names == ["forum"] and fed.skipped["news"].startswith("damaged index") and path.name in fed.skipped["news"]
    docs = list(_train_ids(copy_ws, "forum").values())
    assert fed.count(docs[0][:3]) == {"forum": _brute(docs, docs[0][:3])}
    assert fed.find_spans(docs[0][:20], [], None, enforce_bow=False)  # the other source still searches

    from tracing.trace import Tracer

    t = Tracer.open(copy_ws, model=None).trace("the cat sat on a mat", store=False)
    assert t.sources_searched == ["forum"] and "damaged index" in t.sources_skipped["news"]
    assert all(set(s.count_by_source) == {"forum"} for s in t.spans)


def _old_manifest(m) -> dict:
    """The manifest as the version before typed cards wrote it (a plain dict, no `inputs`)."""
    return {"engine": "infini-gram", "version": 4, "token_dtype": "u16", "build_id": m.build_id, "source": m.source,
            "split": "train", "n_docs": m.n_docs, "n_tokens": m.n_tokens, "n_shards": m.n_shards,
            "shards": [st.model_dump() for st in m.shards], "eos_id": m.eos_id, "tokenizer_hash": m.tokenizer_hash,
            "content_hash": m.content_hash, "built_at": m.built_at,
            "files": {k: {"bytes": f.bytes, "sha256": f.sha256} for k, f in m.files.items()}}


def test_manifest_is_a_card_with_one_rule_and_old_ones_load(copy_ws: Workspace):
    import json

    from index.manifest import IndexManifest, inputs_for
    from index.width import U16, U32

    folder = copy_ws.indexes_dir / "news"
    m = fmt.read_manifest(folder)
    tok, content = tokenizer.tokenizer_hash(copy_ws), sources.get_source(copy_ws, "news").content_hash
    assert isinstance(m, IndexManifest) and m.kind == "index" and m.token_dtype == "u16"
    assert m.is_current(inputs_for(tok, content, shards=1, width=U16))
    assert m.stale_reason(inputs_for(tok, content, shards=2, width=U16)) == "settings changed since it was built"
    assert "settings" in m.stale_reason(inputs_for(tok, content, shards=1, width=U32))
    assert m.stale_reason(inputs_for(tok, "0" * 64, shards=1, width=U16)) == "source changed since it was built"
    assert m.serve_problem(tok) is None and "another tokenizer" in m.serve_problem("0" * 64)
    # a manifest of the previous version loads, upgraded, every input recovered: current, kept, served
    (folder / fmt.MANIFEST).write_text(json.dumps(_old_manifest(m)))
    old = fmt.read_manifest(folder)
    assert old.upgraded_from == 1 and old.inputs == m.inputs and old.files == m.files
    assert build.build_source(copy_ws, "news").skipped and verify.verify_index(copy_ws, "news").ok
    assert Federation.open(copy_ws, ["news"]).count([1])["news"] == fmt.read_unigram(folder / "unigram.0")[1]
    # one it cannot read says how to rebuild, and the next build replaces it
    broken = {k: v for k, v in _old_manifest(m).items() if k != "content_hash"}
    (folder / fmt.MANIFEST).write_text(json.dumps(broken))
    with pytest.raises(IntegrityError, match=r"cannot be read .*flexolmo index build --source news --force"):
        Federation.open(copy_ws, ["news"])
    r = build.build_source(copy_ws, "news")
    assert not r.skipped and fmt.read_manifest(folder).upgraded_from is None


def test_large_files_are_checked_at_sampled_blocks_on_open(copy_ws: Workspace, monkeypatch):
    """Opening costs the same at any size: files over the threshold are checked at sampled blocks
    (here every file, the threshold set to 0), whole checksums are `index verify`'s."""
    from index import source

    monkeypatch.setattr(fmt, "SPOT_ABOVE", 0)
    monkeypatch.setattr(source, "OPEN_HASH_MAX", 0)
    build.build_source(copy_ws, "news", force=True)
    m = fmt.read_manifest(copy_ws.indexes_dir / "news")
    assert all(len(f.blocks) == fmt.SPOT_BLOCKS for f in m.files.values())
    Federation.open(copy_ws, ["news"]).count([1])  # sound: opens
    path = copy_ws.indexes_dir / "news" / "metadata.0"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="metadata.0 fails its sha256"):
        Federation.open(copy_ws, ["news"])
    assert any("metadata.0" in p for p in verify.verify_index(copy_ws, "news").problems)


def test_changed_tokenizer_refuses_to_serve(copy_ws: Workspace):
    tokenizer.train_tokenizer(copy_ws, vocab_size=350, source="forum")
    with pytest.raises(ConflictError, match="rebuild"):
        Federation.open(copy_ws)
    assert not verify.verify_index(copy_ws, "news").ok
    assert not build.build_source(copy_ws, "forum").skipped  # stale: rebuilt, not skipped
    docs = list(_train_ids(copy_ws, "forum").values())  # tokenized with the new tokenizer
    fed = Federation.open(copy_ws, ["forum"])
    for q in ([1], docs[0][:3], docs[7][2:4]):
        assert fed.count(q)["forum"] == _brute(docs, q)


def test_bad_input_and_policy(copy_ws: Workspace):
    with pytest.raises(NotFoundError):
        build.build_source(copy_ws, "nosuch")
    # a source whose only documents are in the validation split
    val_ids = [f"v{i}" for i in range(5000) if sources.split_of(f"v{i}") == "validation"][:2]
    sources.add_records(copy_ws, "heldout", [{"doc_id": d, "text": "a b c"} for d in val_ids], owner="C",
                        domain="x", licence="cc0", origin="test")
    with pytest.raises(InputError, match="no train documents"):
        build.build_source(copy_ws, "heldout")
    assert not (copy_ws.indexes_dir / "heldout").exists() and catalog.get_index(copy_ws, "heldout") is None
    with pytest.raises(InputError, match="YYYY-MM-DD"):
        sources.set_policy(copy_ws, "forum", expires="next tuesday")
    # inactive and expired sources are not served
    sources.set_policy(copy_ws, "forum", active=False, by="bob")
    fed = Federation.open(copy_ws, strict=False)
    assert "forum" not in fed.names and fed.skipped["forum"] == "inactive"
    with pytest.raises(NotFoundError):
        fed.source("forum")
    sources.set_policy(copy_ws, "forum", active=True, expires="2000-01-01")
    assert "forum" not in Federation.open(copy_ws, strict=False).names
    log = sources.policy_log(copy_ws, "forum")
    assert [e["field"] for e in log] == ["active", "active", "expires"] and log[0]["changed_by"] == "bob"
    with pytest.raises(ConflictError):
        Federation.open(copy_ws, ["forum"])


def _app():
    from cli.main import app

    return app


def test_cli_commands(copy_ws: Workspace):
    runner = CliRunner()
    w = ["-w", str(copy_ws.root)]
    res = runner.invoke(_app(), [*w, "index", "build", "--all"])
    assert res.exit_code == 0, res.output
    assert "unchanged" in res.output
    res = runner.invoke(_app(), [*w, "index", "build"])
    assert res.exit_code == 1
    res = runner.invoke(_app(), [*w, "index", "verify"])
    assert res.exit_code == 0 and "news: ok" in res.output
    res = runner.invoke(_app(), [*w, "index", "takedown", "--source", "forum", "--doc-id", "f0003", "--reason", "r"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(_app(), [*w, "index", "takedowns", "--json"])
    assert res.exit_code == 0 and '"f0003"' in res.output
    res = runner.invoke(_app(), [*w, "index", "list", "--json"])
    assert res.exit_code == 0 and '"takedowns": 1' in res.output
