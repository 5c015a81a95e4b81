"""Benchmark: build the sample federation's indexes, compare with bare rust_indexing, query latency by size.

    .venv/bin/python bench/index_build.py --workspace flexolmo-work [--scratch /tmp/fx-bench] [--sizes 1e6,1e7,1e8]

The sample workspace (after `flexolmo data samples` and `flexolmo tokenizer train`) is
copied (sources, tokenizer, catalog) into the scratch folder, so the workspace itself is
not touched. Prints, per source and in total: tokens, seconds, tokens/s, peak memory
(this process and the rust_indexing children, each build in a fresh process), bytes per
token, and the ratio of the whole build's time to the bare rust_indexing steps run on the
same token files. Then count and attribute latency of 450-token queries (validation text:
held out, so partly novel, like model output) on indexes of about 1M, 10M and 100M tokens,
made by repeating the sample token files.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexolmo import sources as src_lib  # noqa: E402
from flexolmo import tokenizer as tok_lib  # noqa: E402
from flexolmo.workspace import Workspace  # noqa: E402
from index import build, format as fmt  # noqa: E402


def _build_one(root: str, name: str) -> dict:
    r = build.build_source(Workspace(Path(root)), name, force=True)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {**r.to_dict(), "path": str(r.path), "peak_mb_python": own, "peak_mb_rust": kids}


def _bare_sa(folder: Path, scratch: Path, n_shards: int) -> float:
    """rust_indexing alone on a copy of the same token files."""
    secs = 0.0
    for k in range(n_shards):
        d = scratch / f"bare-{folder.name}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        shutil.copyfile(folder / f"tokenized.{k}", d / "tokenized.0")
        secs += fmt.build_suffix_array(d / "tokenized.0", d / "table.0", d / "work")
        shutil.rmtree(d, ignore_errors=True)
    return secs


def _synthetic_index(folders: list[Path], target: int, out: Path) -> int:
    """An index of about `target` tokens made by repeating the sample token files."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base = np.concatenate([np.fromfile(f / "tokenized.0", dtype=np.uint16) for f in folders])
    if len(base) >= target:
        cut = int(np.flatnonzero(base[:target] == fmt.DOC_SEP)[-1]) if target < len(base) else len(base)
        ds = base[:cut] if cut > 0 else base
    else:
        ds = np.tile(base, int(np.ceil(target / len(base))))
    ds.tofile(out / "tokenized.0")
    starts = np.flatnonzero(ds == fmt.DOC_SEP).astype(np.uint64) * 2
    starts.tofile(out / "offset.0")
    lines = [f'{{"doc_id":"synthetic-{i}"}}\n'.encode() for i in range(len(starts))]
    om = np.cumsum([0] + [len(x) for x in lines[:-1]]).astype(np.uint64)
    (out / "metadata.0").write_bytes(b"".join(lines))
    om.tofile(out / "metaoff.0")
    counts = np.bincount(ds, minlength=65536)
    (out / "unigram.0").write_text("".join(f"{i} {counts[i]}\n" for i in np.flatnonzero(counts)))
    fmt.build_suffix_array(out / "tokenized.0", out / "table.0", out / "work")
    shutil.rmtree(out / "work", ignore_errors=True)
    return len(ds) - len(starts)


def _latency(folder: Path, queries: list[list[int]], eos: int, bow: Path, delim: list[int]) -> dict:
    from infini_gram.engine import InfiniGramEngine

    with fmt.loader_path(folder) as p:
        t0 = time.perf_counter()
        eng = InfiniGramEngine(index_dir=p, eos_token_id=eos, bow_ids_path=str(bow), precompute_unigram_logprobs=True)
        load = time.perf_counter() - t0
    eng.count(input_ids=queries[0])  # warm the page cache a little
    c, a, spans = [], [], []
    for q in queries:
        t = time.perf_counter()
        eng.count(input_ids=q)
        c.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = eng.attribute(input_ids=q, delim_ids=delim, min_len=1, max_cnt=1_000_000, enforce_bow=True)
        a.append(time.perf_counter() - t)
        spans.append(len(r["spans"]))
    return {"load_s": load, "count_ms_median": 1e3 * statistics.median(c), "attribute_ms_median": 1e3 * statistics.median(a),
            "attribute_ms_max": 1e3 * max(a), "spans_mean": statistics.mean(spans)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default="flexolmo-work")
    ap.add_argument("--scratch", default="/tmp/flexolmo-bench-index")
    ap.add_argument("--sizes", default="1e6,1e7,1e8")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()

    src_ws = Workspace.resolve(args.workspace)
    scratch = Path(args.scratch).resolve()
    shutil.rmtree(scratch, ignore_errors=True)
    ws = Workspace(scratch / "ws").ensure()
    for part in ("sources", "tokenizer"):
        shutil.copytree(src_ws.root / part, ws.root / part)
    shutil.copyfile(src_ws.catalog_path, ws.catalog_path)
    names = [s.name for s in src_lib.list_sources(ws)]
    print(f"sources: {', '.join(names)}; tokenizer vocab {tok_lib.tokenizer_info(ws).vocab_size}")

    rows = []
    ctx = mp.get_context("spawn")
    for name in names:
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            r = pool.apply(_build_one, (str(ws.root), name))
        r["bare_sa_s"] = _bare_sa(Path(r["path"]), scratch, r["n_shards"])
        r["ratio"] = r["seconds"] / r["bare_sa_s"] if r["bare_sa_s"] else float("nan")
        rows.append(r)
        print(f"{name:12s} {r['n_tokens']:>11,} tok {r['seconds']:7.2f}s {r['tokens_per_second']:>11,.0f} tok/s "
              f"peak py {r['peak_mb_python']:6.0f} MB rust {r['peak_mb_rust']:6.0f} MB "
              f"{r['bytes_per_token']:5.2f} B/tok  tokenize {r['tokenize_seconds']:5.2f}s SA {r['suffix_array_seconds']:5.2f}s "
              f"verify {r['verify_seconds']:4.2f}s bare SA {r['bare_sa_s']:5.2f}s ratio {r['ratio']:.2f}", flush=True)
    tot_tok = sum(r["n_tokens"] for r in rows)
    tot_s = sum(r["seconds"] for r in rows)
    tot_bare = sum(r["bare_sa_s"] for r in rows)
    tot_bytes = sum(r["bytes"] for r in rows)
    total = {"n_tokens": tot_tok, "seconds": tot_s, "tokens_per_second": tot_tok / tot_s, "bytes_per_token": tot_bytes / tot_tok,
             "peak_mb_python": max(r["peak_mb_python"] for r in rows), "peak_mb_rust": max(r["peak_mb_rust"] for r in rows),
             "bare_sa_s": tot_bare, "ratio": tot_s / tot_bare}
    print(f"{'TOTAL':12s} {tot_tok:>11,} tok {tot_s:7.2f}s {total['tokens_per_second']:>11,.0f} tok/s "
          f"peak py {total['peak_mb_python']:6.0f} MB rust {total['peak_mb_rust']:6.0f} MB {total['bytes_per_token']:5.2f} B/tok "
          f"bare SA {tot_bare:5.2f}s ratio {total['ratio']:.2f}", flush=True)

    # latency by index size
    tok = tok_lib.load_raw_tokenizer(ws)
    info = tok_lib.tokenizer_info(ws)
    delim = [i for i in (tok.token_to_id("Ċ"), tok.token_to_id(".")) if i is not None]  # byte-level '\n' and '.'
    vtexts = [t for n in names for t in src_lib.iter_texts(ws, n, split="validation")]
    vids = [tok.encode(t, add_special_tokens=False).ids for t in vtexts]
    vids = [v for v in vids if len(v) >= 450]
    rng = np.random.default_rng(0)
    queries = []
    for i in range(args.queries):
        v = vids[int(rng.integers(len(vids)))]
        s = int(rng.integers(0, len(v) - 450 + 1))
        queries.append(v[s:s + 450])
    folders = [Path(r["path"]) for r in rows]
    lat = []
    for size in [int(float(x)) for x in args.sizes.split(",")]:
        out = scratch / f"size-{size}"
        t0 = time.perf_counter()
        n = _synthetic_index(folders, size, out)
        built_s = time.perf_counter() - t0
        res = _latency(out, queries, info.eos_id, ws.tokenizer_dir / "bow_ids.txt", delim)
        res.update({"target": size, "n_tokens": n, "build_s": built_s})
        lat.append(res)
        print(f"index {n:>12,} tokens (built in {built_s:6.1f}s, loaded in {res['load_s']:.2f}s): "
              f"count {res['count_ms_median']:.2f} ms, attribute {res['attribute_ms_median']:.1f} ms median "
              f"({res['attribute_ms_max']:.1f} max, {res['spans_mean']:.0f} spans) per 450-token query", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"sources": rows, "total": total, "latency": lat}, indent=2, default=str))


if __name__ == "__main__":
    main()
