"""Batch tracing on a tiny federation built here: bad rows, resume after kill -9, reports with
planted rates, contamination with planted items, the CLI, and the Ray engine."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest_model import build_federation
from typer.testing import CliRunner

from cli.main import app
from flexolmo.base import sources
from flexolmo.base.tokenizer import load_tokenizer
from index.build import build_source
from tracing.batch import BatchSpec, batch_report, export_flagged, run_batch
from tracing.batch.layout import BatchDir
from tracing.batch.report import longest_png
from tracing.provenance import queries
from tracing.trace import Tracer

NAMES = ("public", "news", "code")
ROOT = Path(__file__).resolve().parents[1]
NO_MODEL = BatchSpec.parse(use_model=False)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    ws = build_federation(tmp_path_factory.mktemp("batch"), sources=NAMES, n_docs=40)
    for s in NAMES:
        build_source(ws, s)
    return ws


def _docs(ws, source: str) -> list[str]:
    return [d["text"] for d in sources.load_documents(ws, source, split="train").to_pylist()]


def _filler(rng: random.Random, words: int) -> str:
    """Words of q, z and j only: no source holds these letters, so no match runs into them."""
    return " ".join("".join(rng.choice("qzj") for _ in range(rng.randint(3, 6))) for _ in range(words))


def _passage(tok, text: str, lo: int, hi: int, rng: random.Random) -> str:
    """A run of whole words of `text` (no sentence end) whose tokens number in [lo, hi]."""
    words = text.rstrip(".").split(" ")
    for _ in range(1000):
        a = rng.randrange(1, len(words) - 2)
        for b in range(a + 1, len(words)):
            n = len(tok(" " + " ".join(words[a:b]), add_special_tokens=False)["input_ids"])
            if lo <= n <= hi:
                return " ".join(words[a:b])
            if n > hi:
                break
    raise AssertionError(f"no passage of {lo}-{hi} tokens")


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _json(d: dict) -> bytes:
    return json.dumps(d).encode()


def test_200_rows_with_bad_rows_each_reported_none_lost_rest_as_single_traces(fed, tmp_path):
    rng = random.Random(0)
    news = _docs(fed, "news")
    lines, bad = [], {}
    for i in range(200):
        rid = f"r{i}"
        if i % 20 == 7:
            kind = ["empty", "spaces", "utf8", "json", "long", "nul", "number", "dup", "nofield", "array"][(i // 20) % 10]
            bad[i] = kind
            lines.append({"empty": _json({"id": rid, "text": ""}),
                          "spaces": _json({"id": rid, "text": "  \n "}),
                          "utf8": b'{"id": "' + rid.encode() + b'", "text": "caf\xe9 latte"}',
                          "json": b'{"id": "' + rid.encode() + b'", "text": ',
                          "long": _json({"id": rid, "text": "president " * 400}),
                          "nul": _json({"id": rid, "text": "a\x00b"}),
                          "number": _json({"id": rid, "text": 12345}),
                          "dup": _json({"id": "r0", "text": "the nation"}),
                          "nofield": _json({"id": rid, "response": "the nation"}),
                          "array": b'["not", "an", "object"]'}[kind])
            continue
        words = news[i % len(news)].split(" ")
        text = f" {_filler(rng, 3)} {' '.join(words[2:2 + rng.randint(5, 25)])} {_filler(rng, 2)}."
        lines.append(_json({"id": rid, "text": text, "prompt": "Tell me about the nation."}))
    inp = _write(tmp_path / "in.jsonl", lines)
    spec = BatchSpec.parse(use_model=False, max_chars=2000)
    res = run_batch(fed, inp, spec, workers=1, chunk_rows=40, stream=open(os.devnull, "w"))
    assert res.complete and res.total == 200 and res.errors == len(bad) == 10

    b = BatchDir(fed, res.batch_id)
    resp = pq.read_table(b.root / "responses.parquet").to_pylist()
    assert [r["row"] for r in resp] == list(range(200))  # every row once, in order
    reasons = {r["row"]: r["error"] for r in resp if r["status"] == "error"}
    assert set(reasons) == set(bad)
    expect = {"empty": "empty text", "spaces": "empty text", "utf8": "not UTF-8", "json": "not JSON",
              "long": "over the size limit", "nul": "NUL", "number": "int, not a string", "dup": "repeats the id 'r0'",
              "nofield": "no text", "array": "JSON list, not an object"}
    for row, kind in bad.items():
        assert expect[kind] in reasons[row], (kind, reasons[row])

    # every good row: the same spans and documents as `flexolmo trace` gives it alone
    tracer = Tracer.open(fed, model=None)
    spans = pq.read_table(b.root / "spans.parquet").to_pylist()
    docs = pq.read_table(b.root / "documents.parquet").to_pylist()
    src = {json.loads(l)["id"]: json.loads(l) for i, l in enumerate(lines) if i not in bad}
    for r in resp:
        if r["status"] != "ok":
            continue
        one = tracer.trace(src[r["id"]]["text"], prompt=src[r["id"]]["prompt"], store=False)
        mine = [s for s in spans if s["row"] == r["row"]]
        assert [(s["start_token"], s["end_token"], s["text"], s["count"], s["unigram_logprob_sum"]) for s in mine] == \
               [(s.start, s.end, s.text, s.count, s.unigram_logprob_sum) for s in one.spans]
        assert [(s["sources"], s["source_counts"]) for s in mine] == \
               [([k for k, v in s.count_by_source.items() if v], [v for v in s.count_by_source.values() if v])
                for s in one.spans]
        assert [(d["span_index"], d["source"], d["doc_id"], d["relevance"], d["bucket"])
                for d in docs if d["row"] == r["row"]] == \
               [(s.index, d.source, d.doc_id, d.relevance, d.bucket) for s in one.spans for d in s.documents]
        assert r["n_tokens"] == one.n_tokens and r["longest_span"] == max((s.end - s.start for s in one.spans), default=0)

    # and the provenance store holds each traced row once, under the batch id
    got = queries.query(fed, "SELECT trace_id, json_extract_string(settings, '$.batch.id') AS b, "
                             "json_extract(settings, '$.batch.row')::INT AS row FROM traces", limit=None)
    mine = [r for r in got.rows if r[1] == res.batch_id]
    assert sorted(r[2] for r in mine) == sorted(r["row"] for r in resp if r["status"] == "ok")
    assert {r[0] for r in mine} == {r["trace_id"] for r in resp if r["status"] == "ok"}

    # a rerun finds the batch done: nothing traced again
    again = run_batch(fed, inp, spec, workers=1, stream=open(os.devnull, "w"))
    assert again.batch_id == res.batch_id and again.run_rows == 0 and again.resumed_from == 200


def _corpus(ws, n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    news = _docs(ws, "news")
    return [_json({"id": f"k{i}", "text": f" {_filler(rng, 2)} {' '.join(news[i % len(news)].split(' ')[1:9])} "
                                           f"{_filler(rng, 2)}."}) for i in range(n)]


def test_a_batch_killed_mid_way_resumes_with_every_row_once(fed, tmp_path):
    inp = _write(tmp_path / "kill.jsonl", _corpus(fed, 300, 1))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "-w", str(fed.root), "trace-batch", str(inp), "--no-model",
                             "--workers", "1", "--chunk-rows", "10"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    units = fed.root / "batches"
    earlier = set(units.glob("*"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(len(list((d / "units").glob("*"))) >= 3 for d in set(units.glob("*")) - earlier):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the batch finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (bdir,) = [p for p in units.glob("*") if (p / "batch.json").is_file() and json.loads(
        (p / "batch.json").read_text())["input"] == str(inp.resolve())]
    b = BatchDir(fed, bdir.name)
    before = b.done_rows("responses")
    assert 0 < len(before) < 300 and not (b.root / "responses.parquet").exists()

    # a crash between a chunk's store commit and its unit's rename: the unit goes, its traces stay stored
    last = sorted((b.root / "units").glob("*"))[-1]
    lost = set(pq.read_table(last / "responses.parquet").column("row").to_pylist())
    import shutil

    shutil.rmtree(last)
    res = run_batch(fed, inp, NO_MODEL, workers=1, chunk_rows=60, stream=open(os.devnull, "w"))
    assert res.batch_id == b.id and res.complete and res.resumed_from == len(before) - len(lost)
    rows = pq.read_table(b.root / "responses.parquet").column("row").to_pylist()
    assert rows == list(range(300))  # every row exactly once
    got = queries.query(fed, "SELECT json_extract(settings, '$.batch.row')::INT FROM traces "
                             "WHERE json_extract_string(settings, '$.batch.id') = '" + b.id + "'", limit=None)
    stored = [r[0] for r in got.rows]
    assert sorted(stored) == list(range(300)), "each row stored once: none lost, none twice"


def test_report_figures_match_the_planted_rates(fed, tmp_path):
    rng = random.Random(2)
    tok = load_tokenizer(fed)
    news, code = _docs(fed, "news"), _docs(fed, "code")
    lines, texts = [], []
    want_tokens = {"news": 0, "code": 0}
    for i in range(200):
        if i < 50:  # a long news passage (>= 13 tokens); the first 10 all from one document
            p = _passage(tok, news[0 if i < 10 else 1 + i % (len(news) - 1)], 16, 30, rng)
            kind = "news"
        elif i < 80:  # a code passage of 9 to 11 tokens: >= 8, < 13
            p, kind = _passage(tok, code[i % len(code)], 9, 11, rng), "code"
        else:
            p, kind = None, None
        text = f" {_filler(rng, 3)}" + (f" {p}" if p else "") + f" {_filler(rng, 3)}"
        if kind:
            want_tokens[kind] += len(tok(" " + p, add_special_tokens=False)["input_ids"])
        texts.append(text)
        lines.append(_json({"id": f"p{i}", "text": text}))
    inp = _write(tmp_path / "planted.jsonl", lines)
    res = run_batch(fed, inp, NO_MODEL, workers=1, stream=open(os.devnull, "w"))
    rep = batch_report(fed, res.batch_id, top_documents=3)
    total = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    by = {s["source"]: s for s in rep.sources}
    assert set(by) == {"news", "code"}
    assert (by["news"]["share_ge_8"], by["news"]["share_ge_13"]) == (50 / 200, 50 / 200)
    assert (by["code"]["share_ge_8"], by["code"]["share_ge_13"]) == (30 / 200, 0.0)
    assert (rep.overall["share_ge_8"], rep.overall["share_ge_13"]) == (80 / 200, 50 / 200)
    assert by["news"]["token_share_ge_8"] == pytest.approx(want_tokens["news"] / total)
    assert by["code"]["token_share_ge_8"] == pytest.approx(want_tokens["code"] / total)
    assert by["code"]["token_share_ge_13"] == 0.0
    assert by["news"]["owner"] == "news-owner"
    top = rep.documents[0]
    assert (top["source"], top["responses"]) == ("news", 10)
    assert top["doc_id"] == sources.load_documents(fed, "news", split="train").to_pylist()[0]["doc_id"]
    h = rep.longest["histogram"]
    assert sum(h.values()) == 200 and sum(v for k, v in h.items() if k >= 13) == 50
    assert sum(v for k, v in h.items() if 9 <= k <= 11) == 30
    png = longest_png(rep, tmp_path / "longest.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_contamination_flags_exactly_the_planted_items(fed, tmp_path):
    rng = random.Random(3)
    tok = load_tokenizer(fed)
    news, code = _docs(fed, "news"), _docs(fed, "code")
    items, planted = [], set()
    for i in range(60):
        q = f"Question {_filler(rng, 4)}?"
        if i % 10 == 0:  # a news passage of 12-20 tokens in the answer
            a, _ = _passage(tok, news[i % len(news)], 12, 20, rng), planted.add(f"q{i}")
        elif i % 10 == 1:  # exactly 8 tokens of code in the question: at the threshold
            q, _ = f"{_filler(rng, 2)} {_passage(tok, code[i % len(code)], 8, 8, rng)} {_filler(rng, 1)}", planted.add(f"q{i}")
            a = _filler(rng, 2)
        elif i % 10 == 2:  # exactly 7 tokens: under it
            a = f"{_filler(rng, 1)} {_passage(tok, code[i % len(code)], 7, 7, rng)}"
        else:
            a = _filler(rng, 3)
        items.append({"qid": f"q{i}", "q": q, "a": a})
    lines = [_json({"id": it["qid"], "q": it["q"], "a": it["a"]}) for it in items] + [_json({"id": "x", "q": ""})]
    inp = _write(tmp_path / "bench.jsonl", lines)
    r = CliRunner().invoke(app, ["-w", str(fed.root), "trace-batch", str(inp), "--contamination", "--question-field", "q",
                                 "--answer-field", "a", "--workers", "1", "--flagged", str(tmp_path / "flagged.jsonl"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    c = out["report"]["contamination"]
    assert {it["id"] for it in c["flagged_items"]} == planted and c["flagged"] == len(planted) == 12
    assert out["report"]["n_errors"] == 1 and out["report"]["errors"][0]["reason"] == "empty q"
    exported = [json.loads(l) for l in (tmp_path / "flagged.jsonl").read_text().splitlines()]
    assert {e["id"] for e in exported} == planted
    at = {e["id"]: e for e in exported}
    assert all(at[f"q{i}"]["longest"] == 8 and at[f"q{i}"]["longest_source"] == "code" for i in range(1, 60, 10))
    bid = out["run"]["batch_id"]
    items_t = BatchDir(fed, bid).read("items").to_pylist()
    assert all(r["longest"] == 7 for r in items_t if r["id"] in {f"q{i}" for i in range(2, 60, 10)})
    path, n = export_flagged(fed, bid, tmp_path / "flagged.csv")
    assert n == 12 and path.read_text().count("\n") == 13


def test_cli_trace_batch_and_report(fed, tmp_path):
    inp = _write(tmp_path / "cli.jsonl", _corpus(fed, 12, 4) + [_json({"id": "e", "text": ""})])
    r = CliRunner().invoke(app, ["-w", str(fed.root), "trace-batch", str(inp), "--no-model", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "reproduction per source" in r.output and "1 bad rows" in r.output
    bid = r.output.split("batch ")[1].split(":")[0].strip()
    r = CliRunner().invoke(app, ["-w", str(fed.root), "report", "batch", bid, "--json", "--plot", str(tmp_path / "l.png")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert rep["n_rows"] == 13 and rep["n_ok"] == 12 and (tmp_path / "l.png").is_file()
    r = CliRunner().invoke(app, ["-w", str(fed.root), "report", "batch", "bnope"])
    assert r.exit_code == 1 and "no batch 'bnope'" in r.output
    r = CliRunner().invoke(app, ["-w", str(fed.root), "trace-batch", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 1 and "no input file" in r.output
    r = CliRunner().invoke(app, ["-w", str(fed.root), "trace-batch", str(inp), "--contamination"])
    assert r.exit_code == 1 and "no record has a 'question' field" in r.output


def test_the_demo_batch_traces_held_out_passages_of_every_source(fed):
    from tracing.batch.demo import WORDS, demo_batch

    held = {f"{s}:{d['doc_id']}": d["text"] for s in NAMES
            for d in sources.load_documents(fed, s, split="validation").to_pylist() if len(d["text"].split()) >= 20}
    assert held, "the fixture has held-out documents"
    res, rep = demo_batch(fed, n=30, workers=1)
    assert res.complete and res.total == len(held) and rep.n_ok == len(held)
    rows = BatchDir(fed, res.batch_id).read("responses").to_pylist()
    assert {r["id"]: r["response"] for r in rows} == {k: " ".join(v.split()[:WORDS]) for k, v in held.items()}
    assert rep.overall["source"] == "any" and rep.longest["n"] == len(held)


def test_the_local_pool_gives_the_in_process_results(fed, tmp_path):
    import shutil

    inp = _write(tmp_path / "pool.jsonl", _corpus(fed, 30, 7) + [_json({"id": "e", "text": " "})])
    one = run_batch(fed, inp, NO_MODEL, workers=1, chunk_rows=8, stream=open(os.devnull, "w"))
    b = BatchDir(fed, one.batch_id)
    want = {t: pq.read_table(b.root / f"{t}.parquet") for t in ("responses", "spans", "documents", "experts")}
    assert want["spans"].num_rows > 0
    shutil.rmtree(b.root)  # the same batch again (the store keeps its traces), on a pool of 2 with tasks of 2 rows
    two = run_batch(fed, inp, NO_MODEL, workers=2, chunk_rows=8, stream=open(os.devnull, "w"))
    assert two.batch_id == one.batch_id and two.complete and two.run_rows == 31 and two.errors == 1
    assert len(b.unit_files("responses")) == 4  # committed in chunks of 8 rows, not per task
    for t, w in want.items():
        got = pq.read_table(b.root / f"{t}.parquet")
        drop = ["trace_ms"] if t == "responses" else []
        assert got.drop_columns(drop).equals(w.drop_columns(drop)), t
    got = queries.query(fed, "SELECT json_extract(settings, '$.batch.row')::INT FROM traces "
                             f"WHERE json_extract_string(settings, '$.batch.id') = '{one.batch_id}'", limit=None)
    assert sorted(r[0] for r in got.rows) == list(range(30))  # each traced row stored once


def test_a_spans_only_worker_never_imports_torch(fed):
    # a pool worker starts in a fraction of a second when it needs no model: torch stays out
    code = ("import sys, numpy as np; from tracing.batch.run import _init_worker, _work; from tracing.batch import BatchSpec; "
            f"_init_worker({str(fed.root)!r}, BatchSpec.parse(use_model=False).model_dump(mode='json'), 'bt', 1); "
            "out = _work({'row': np.array([0]), 'id': np.array(['a'], dtype=object), "
            "'text': np.array(['the nation and the president'], dtype=object)}); "
            "assert list(out['status']) == ['ok'], out; assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-800:]


def test_the_local_default_never_imports_ray():
    code = ("import sys, cli.main, tracing.batch, tracing.batch.run; "
            "assert 'ray' not in sys.modules, 'ray imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-500:]


@pytest.mark.slow
def test_ray_data_engine_gives_the_local_pools_results(fed, tmp_path):
    pytest.importorskip("ray")
    inp = _write(tmp_path / "ray.jsonl", _corpus(fed, 40, 5) + [_json({"id": "e", "text": " "})])
    local = run_batch(fed, inp, NO_MODEL, workers=2, chunk_rows=8, stream=open(os.devnull, "w"))
    b = BatchDir(fed, local.batch_id)
    want = {t: pq.read_table(b.root / f"{t}.parquet") for t in ("responses", "spans", "documents", "experts")}
    import shutil

    shutil.rmtree(b.root)  # the same batch again, on Ray
    ray = run_batch(fed, inp, NO_MODEL, workers=2, chunk_rows=8, engine="ray", stream=open(os.devnull, "w"))
    assert ray.batch_id == local.batch_id and ray.complete and ray.run_rows == 41
    for t, w in want.items():
        got = pq.read_table(b.root / f"{t}.parquet")
        drop = ["trace_ms"] if t == "responses" else []
        assert got.drop_columns(drop).equals(w.drop_columns(drop)), t


@pytest.mark.slow
def test_with_the_model_experts_and_the_owner_report_agree_with_single_traces(tmp_path):
    from conftest_model import build_served_federation

    names = ("public", "news")  # the public expert and one owner's: the smallest model with an owner
    ws = build_served_federation(tmp_path / "m", sources=names, n_docs=30)
    news, code = _docs(ws, "news"), _docs(ws, "public")
    texts = [" " + " ".join((news if i % 2 else code)[i].split()[2:18]) for i in range(6)]
    inp = _write(tmp_path / "m.jsonl", [_json({"id": f"m{i}", "text": t}) for i, t in enumerate(texts)])
    res = run_batch(ws, inp, BatchSpec(), workers=1, stream=open(os.devnull, "w"))
    rep = batch_report(ws, res.batch_id)
    tracer = Tracer.open(ws)
    singles = [tracer.trace(t, store=False) for t in texts]
    experts = BatchDir(ws, res.batch_id).read("experts").to_pylist()
    assert len(experts) == sum(len(s.experts) for t in singles for s in t.spans) > 0
    want: dict[str, dict] = {}
    for t in singles:
        for s in t.spans:
            for e in s.experts:
                w = want.setdefault(e.source, {"own": [0.0, 0.0], "elsewhere": [0.0, 0.0]})
                side = "own" if e.source in s.sources else "elsewhere"
                w[side][0] += e.routing_share
                w[side][1] += e.counterfactual or 0.0
    got = {o["source"]: o for o in rep.owners}
    assert set(got) == set(want) == set(names)
    for src, w in want.items():
        for side in ("own", "elsewhere"):
            assert got[src][f"routing_share_{side}"] == pytest.approx(w[side][0], rel=1e-6, abs=1e-9)
            assert (got[src][f"counterfactual_{side}"] or 0.0) == pytest.approx(w[side][1], rel=1e-5, abs=1e-6)
    assert got["news"]["owner"] == "news-owner"
    tops = BatchDir(ws, res.batch_id).read("responses").column("top_experts").to_pylist()
    assert all(tops[i] for i in range(6) if singles[i].spans)
