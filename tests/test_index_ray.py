"""`index build --ray`: a source's shards sorted as Ray tasks on a local cluster give the plain build's index.

    .venv/bin/python -m pytest tests/test_index_ray.py -q

One source, forced into several small shards, built plainly and then on Ray
(`ray.init(num_cpus=2)`): every shard file byte for byte the same, the same counts and the
same spans; a plain build never imports Ray.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from textcorpus import prose_docs

from flexolmo.base import sources, tokenizer
from flexolmo.base.errors import InputError
from flexolmo.base.workspace import Workspace
from index import build
from index.engine import Federation

REPO = Path(__file__).resolve().parents[1]
CONFIG = build.IndexConfig(max_shard_tokens=3000)


def _ws(root: Path) -> Workspace:
    ws = Workspace(root).ensure()
    docs = prose_docs("wiki", 160, seed=4)
    docs += [{**d, "doc_id": f"copy-{i}"} for i, d in enumerate(docs[:30])]  # long repeats across shards
    sources.add_records(ws, "wiki", docs, owner="o", domain="d", licence="l", origin="test")
    tokenizer.train_tokenizer(ws, vocab_size=500, source="wiki")
    return ws


def _files(ws: Workspace) -> dict[str, bytes]:
    folder = build.index_dir(ws, "wiki")
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "manifest.json"}


def _answers(ws: Workspace) -> tuple[list, list]:
    fed = Federation.open(ws)
    tok = tokenizer.load_raw_tokenizer(ws)
    texts = [r["text"] for r in prose_docs("wiki", 160, seed=4)]
    rng = random.Random(0)
    queries = []
    for _ in range(12):
        ids = tok.encode(rng.choice(texts), add_special_tokens=False).ids
        s = rng.randrange(max(1, len(ids) - 60))
        queries.append(ids[s: s + 60] + tok.encode(" unseen words here", add_special_tokens=False).ids)
    delim, bow = tokenizer.read_delimiter_ids(ws), tokenizer.read_bow_ids(ws)
    counts = [fed.count(q[:k]) for q in queries for k in (1, 3, 8)]
    spans = [[(m.l, m.r, m.count) for m in fed.find_spans(q, delim, bow)] for q in queries]
    return counts, spans


def test_ray_build_equals_the_plain_build(tmp_path):
    ray = pytest.importorskip("ray")
    ws = _ws(tmp_path / "w")
    plain = build.build_source(ws, "wiki", config=CONFIG)
    assert plain.n_shards >= 4
    files, answers = _files(ws), _answers(ws)
    assert any(c["wiki"] > 1 for c in answers[0]) and any(answers[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        r = build.build_source(ws, "wiki", force=True, config=build.IndexConfig(max_shard_tokens=3000, ray=True))
    finally:
        ray.shutdown()
    assert not r.skipped and r.n_shards == plain.n_shards and r.n_tokens == plain.n_tokens
    assert _files(ws) == files
    assert _answers(ws) == answers


def test_ray_address_needs_ray():
    with pytest.raises(InputError, match="add --ray"):
        build.IndexConfig(ray_address="auto").check()


def test_a_plain_build_never_imports_ray(tmp_path):
    _ws(tmp_path / "w")
    code = ("import sys; from pathlib import Path; from flexolmo.base.workspace import Workspace; from index import build; "
            f"build.build_source(Workspace(Path({str(tmp_path / 'w')!r})), 'wiki', config=build.IndexConfig(max_shard_tokens=3000)); "
            "assert 'ray' not in sys.modules, 'ray imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
