"""Benchmark: build the sample federation's indexes, compare with the bare suffix sort, query latency by size;
with --repeats, suffix sorts on prose and on text with long repeats, libdivsufsort vs rust_indexing.

    .venv/bin/python bench/index_build.py --workspace flexolmo-work [--scratch /tmp/fx-bench] [--with-100m] [--json F]
    .venv/bin/python bench/index_build.py --repeats [--chars 8e6] [--vocabs 8192,100000] [--scratch /tmp/fx-rep] [--json F]

--repeats (`repeats_bench`): a scratch workspace with two sources of the same number of tokens:
`prose` (the first --chars characters of the sample federation's news: State of the Union
addresses) and `repeats` (the package copyright files of /usr/share/doc and the licences of
/usr/share/common-licenses, where the same licence texts recur in hundreds of documents;
copied again if short). Two
tokenizers trained on `prose` with `tokenizer train`: 8,192 ids (u16 indexes), and the
largest it learns (about 30,000 ids) with its tokens moved to ids spread over 100,000 and
imported with `tokenizer import` (u32 indexes: a text can learn no more than that). Each source is built once to fill its token cache, then with each construction
(`IndexConfig.suffix_array`), each build in a fresh process: tokens/s of the suffix-array
stage and of the whole build (tokens cached), peak memory (the process's VmHWM, where
libdivsufsort runs; rust_indexing's children: ru_maxrss, an upper bound that includes the
parent's size at fork), and whether the two tables are byte for byte the same (where they
are not: which of them is out of suffix order at the ranks that differ).

The sample workspace (after `flexolmo data samples` and `flexolmo tokenizer train`) is
copied (sources, tokenizer, catalog) into the scratch folder, so the workspace itself is
not touched. Prints, per source and in total: tokens, seconds, tokens/s, peak memory
(this process and the rust_indexing children, each build in a fresh process), bytes per
token, and the ratio of the whole build's time to the bare rust_indexing steps run on the
same token files.

Then latency by index size on 450-token queries (validation text: held out, so partly
novel, like model output), on indexes of about 1M and 10M tokens (prefixes of the sample
token files) and, with --with-100m, ~100M (repeated copies, see `_synthetic_index`):
`count`; bare `engine.attribute` with OLMoTrace's production settings, in a child process
with a per-query time and memory budget (fewer queries from --large tokens on); and the
compiled span search of `index/search.py` (one source's matches, merged) on the same queries, checked against
attribute's spans wherever attribute finished. Load averages are printed per size.
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

from flexolmo.base import sources as src_lib# noqa: E402
from flexolmo.base import tokenizer as tok_lib# noqa: E402
from flexolmo.base.workspace import Workspace  # noqa: E402
from index import build, format as fmt, width as widths  # noqa: E402
from index.suffix_array import build_suffix_array  # noqa: E402
from index.width import U16  # noqa: E402


def _build_one(root: str, name: str) -> dict:
    r = build.build_source(Workspace(Path(root)), name, force=True)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {**r.to_dict(), "path": str(r.path), "peak_mb_python": own, "peak_mb_rust": kids}


def _bare_sa(folder: Path, scratch: Path, n_shards: int) -> float:
    """The suffix sort alone (the build's construction) on a copy of the same token files."""
    secs = 0.0
    for k in range(n_shards):
        d = scratch / f"bare-{folder.name}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        shutil.copyfile(fmt.shard_file(folder, "tokenized", k), fmt.shard_file(d, "tokenized", 0))
        secs += build_suffix_array(fmt.shard_file(d, "tokenized", 0), fmt.shard_file(d, "table", 0), d / "work", U16)
        shutil.rmtree(d, ignore_errors=True)
    return secs


MARK_EVERY = 128


def _synthetic_index(folders: list[Path], target: int, out: Path, marker: int) -> int:
    """An index of about `target` tokens made by repeating the sample token files."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base = np.concatenate([np.fromfile(fmt.shard_file(f, "tokenized", 0), dtype=np.uint16) for f in folders])
    if len(base) >= target:
        cut = int(np.flatnonzero(base[:target] == fmt.DOC_SEP)[-1]) if target < len(base) else len(base)
        ds = base[:cut] if cut > 0 else base
    else:
        # Copies after the first get an id outside the vocabulary (`marker`) every MARK_EVERY tokens, at a
        # different offset per copy, so no two copies share a run longer than MARK_EVERY tokens. With exact
        # copies every suffix has a twin with a common prefix of ~30M tokens, and rust_indexing's merge,
        # which compares suffixes byte by byte, did not finish in 13 minutes at 100M tokens.
        copies = []
        for c in range(int(np.ceil(target / len(base)))):
            x = base.copy()
            if c:
                pos = np.arange(c % MARK_EVERY, len(x), MARK_EVERY)
                pos = pos[x[pos] != fmt.DOC_SEP]
                x[pos] = marker
            copies.append(x)
        ds = np.concatenate(copies)
    ds.tofile(fmt.shard_file(out, "tokenized", 0))
    starts = np.flatnonzero(ds == fmt.DOC_SEP).astype(np.uint64) * 2
    starts.tofile(fmt.shard_file(out, "offset", 0))
    lines = [f'{{"doc_id":"synthetic-{i}"}}\n'.encode() for i in range(len(starts))]
    om = np.cumsum([0] + [len(x) for x in lines[:-1]]).astype(np.uint64)
    fmt.shard_file(out, "metadata", 0).write_bytes(b"".join(lines))
    om.tofile(fmt.shard_file(out, "metaoff", 0))
    counts = np.bincount(ds, minlength=65536)
    fmt.shard_file(out, "unigram", 0).write_text("".join(f"{i} {counts[i]}\n" for i in np.flatnonzero(counts)))
    build_suffix_array(fmt.shard_file(out, "tokenized", 0), fmt.shard_file(out, "table", 0), out / "work", U16)
    shutil.rmtree(out / "work", ignore_errors=True)
    return len(ds) - len(starts)


def _build_synthetic(folders: list[str], target: int, out: str, marker: int) -> dict:
    """`_synthetic_index` in a fresh process, with its peak memory (python / rust_indexing children)."""
    t0 = time.perf_counter()
    n = _synthetic_index([Path(f) for f in folders], target, Path(out), marker)
    secs = time.perf_counter() - t0
    return {"n_tokens": n, "build_s": secs,
            "build_peak_mb_python": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "build_peak_mb_rust": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _engine_worker(conn, folder: str, eos: int, bow: str, delim: list[int]) -> None:
    """Serve count / attribute on one index; times are taken here, around the engine call only."""
    from infini_gram.engine import InfiniGramEngine

    t0 = time.perf_counter()
    with fmt.loader_path(Path(folder)) as p:
        eng = InfiniGramEngine(index_dir=p, eos_token_id=eos, bow_ids_path=bow, precompute_unigram_logprobs=True)
    load_s = time.perf_counter() - t0
    eng.count(input_ids=[0])  # first call outside the timings
    conn.send(load_s)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        op, q = msg
        t = time.perf_counter()
        if op == "count":
            r = eng.count(input_ids=q)
            conn.send((time.perf_counter() - t, r["count"]))
        else:
            r = eng.attribute(input_ids=q, delim_ids=delim, min_len=1, max_cnt=1_000_000, enforce_bow=True)
            secs = time.perf_counter() - t
            conn.send((secs, [(s["l"], s["r"], s["count"], float(s["unigram_logprob_sum"])) for s in r["spans"]],
                       sum(len(s["docs"]) for s in r["spans"])))


def _proc_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _Engine:
    """infini-gram in a child process, so that a query can be given a time and memory budget.

    A query over budget kills the child (its own pid); the next query starts a new one.
    """

    def __init__(self, folder: Path, eos: int, bow: Path, delim: list[int], max_rss_gb: float):
        self.args = (str(folder), eos, str(bow), list(delim))
        self.max_rss_kb = int(max_rss_gb * 1024 * 1024)
        self.proc = None
        self.conn = None
        self.load_s: list[float] = []
        self.peak_rss_mb = 0.0
        self.restarts = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_worker, args=(child, *self.args), daemon=True)
        self.proc.start()
        child.close()
        self.load_s.append(self.conn.recv())

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # SIGKILL to the child started above, by its pid
            self.proc.join()
            self.proc, self.conn = None, None
            self.restarts += 1

    def call(self, op: str, q: list[int], budget_s: float):
        """(result, None) or (None, 'timeout' | 'memory')."""
        if self.proc is None:
            self._start()
        self.conn.send((op, q))
        t0 = time.perf_counter()
        while not self.conn.poll(0.1):
            rss = _proc_kb(self.proc.pid, "VmRSS")
            self.peak_rss_mb = max(self.peak_rss_mb, rss / 1024)
            if rss > self.max_rss_kb:
                self._kill()
                return None, "memory"
            if time.perf_counter() - t0 > budget_s:
                self.peak_rss_mb = max(self.peak_rss_mb, _proc_kb(self.proc.pid, "VmHWM") / 1024)
                self._kill()
                return None, "timeout"
        out = self.conn.recv()
        self.peak_rss_mb = max(self.peak_rss_mb, _proc_kb(self.proc.pid, "VmHWM") / 1024)
        return out, None

    def close(self) -> None:
        if self.proc is not None:
            self.conn.send(None)
            self.proc.join(10)
            if self.proc.is_alive():
                self._kill()
            self.proc = None


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def _load() -> str:
    """The load averages (1, 5, 15 min), as `uptime` prints them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _warm(folder: Path) -> None:
    """Read the token and suffix-array files once, so both searches start from the page cache."""
    for kind in ("tokenized", "table"):
        with open(fmt.shard_file(folder, kind, 0), "rb") as f:
            while f.read(1 << 24):
                pass


def _latency(folder: Path, queries: list[list[int]], n_attr: int, budget_s: float, max_rss_gb: float,
             eos: int, bow_file: Path, bow: np.ndarray, delim: list[int]) -> dict:
    from index.search import Shard, merge_matches, source_matches, unigram_logprobs

    def find_spans(shards, q, delim, bow, ulp):  # one source: its matches are the spans
        return merge_matches([source_matches("synthetic", shards, q, delim, bow)], q, ulp)

    _warm(folder)
    eng = _Engine(folder, eos, bow_file, delim, max_rss_gb)
    shard = Shard.open("synthetic", 0, fmt.shard_file(folder, "tokenized", 0), fmt.shard_file(folder, "table", 0))
    ulp = unigram_logprobs(fmt.read_unigram(fmt.shard_file(folder, "unigram", 0)))
    find_spans([shard], queries[0], delim, bow, ulp)  # compile (or load numba's cache) and warm
    c, a, f, fails, identical, compared, n_spans, n_ptrs = [], [], [], [], 0, 0, [], []
    found = []
    for q in queries:  # count and find_spans first: an attribute call just before slowed the next count 100x
        (secs, _), _ = eng.call("count", q, budget_s)
        c.append(secs)
        t = time.perf_counter()
        found.append(find_spans([shard], q, delim, bow, ulp))
        f.append(time.perf_counter() - t)
        n_spans.append(len(found[-1]))
    for i, (q, mine) in enumerate(zip(queries[:n_attr], found)):
        res, why = eng.call("attribute", q, budget_s)
        if res is None:
            fails.append(why)
            print(f"    query {i}: attribute stopped ({why}, budget {budget_s:.0f} s / {max_rss_gb:.0f} GB)", flush=True)
            continue
        secs, ref, ptrs = res
        a.append(secs)
        n_ptrs.append(ptrs)
        compared += 1
        same = ([(l, r, n) for l, r, n, _ in ref] == [(s.l, s.r, s.count) for s in mine]
                and np.allclose([x[3] for x in ref], [s.unigram_logprob_sum for s in mine]))
        identical += same
        print(f"    query {i}: attribute {secs:8.2f} s ({len(ref)} spans, {ptrs:,} doc pointers), "
              f"find_spans {1e3 * f[i]:7.1f} ms, identical {same}", flush=True)
    eng.close()
    return {"load_s": eng.load_s[0], "count_ms_p50": 1e3 * _pct(c, 50), "count_ms_p95": 1e3 * _pct(c, 95),
            "attribute_queries": min(n_attr, len(queries)), "attribute_finished": len(a), "attribute_stopped": fails,
            "attribute_budget_s": budget_s,
            "attribute_ms_p50": 1e3 * _pct(a, 50), "attribute_ms_max": 1e3 * max(a) if a else float("nan"),
            "attribute_doc_pointers_mean": statistics.mean(n_ptrs) if n_ptrs else float("nan"),
            "attribute_peak_rss_mb": eng.peak_rss_mb,
            "find_spans_queries": len(f), "find_spans_ms_p50": 1e3 * _pct(f, 50), "find_spans_ms_p95": 1e3 * _pct(f, 95),
            "find_spans_ms_max": 1e3 * max(f), "spans_mean": statistics.mean(n_spans),
            "spans_identical": identical, "spans_compared": compared}


def _totals(rows: list[dict]) -> dict:
    tot_tok = sum(r["n_tokens"] for r in rows)
    tot_s = sum(r["seconds"] for r in rows)
    tot_bare = sum(r["bare_sa_s"] for r in rows)
    tot_bytes = sum(r["bytes"] for r in rows)
    total = {"n_tokens": tot_tok, "seconds": tot_s, "tokens_per_second": tot_tok / tot_s, "bytes_per_token": tot_bytes / tot_tok,
             "peak_mb_python": max(r["peak_mb_python"] for r in rows), "peak_mb_rust": max(r["peak_mb_rust"] for r in rows),
             "bare_sa_s": tot_bare, "ratio": tot_s / tot_bare}
    warm = sum(r["warm_seconds"] for r in rows)
    total.update(warm_seconds=warm, warm_ratio=warm / tot_bare)
    print(f"{'TOTAL':12s} {tot_tok:>11,} tok {tot_s:7.2f}s {total['tokens_per_second']:>11,.0f} tok/s "
          f"peak py {total['peak_mb_python']:6.0f} MB rust {total['peak_mb_rust']:6.0f} MB {total['bytes_per_token']:5.2f} B/tok "
          f"bare SA {tot_bare:5.2f}s ratio {total['ratio']:.2f} | cached tokens: {warm:6.2f}s ratio {total['warm_ratio']:.2f}",
          flush=True)
    return total


def _repeat_records(tok, n_tokens: int) -> list[dict]:
    """Package copyright files and common licences, in name order (copied again if short), until
    they hold `n_tokens` ids under `tok`."""
    files = sorted(Path("/usr/share/doc").glob("*/copyright")) + sorted(Path("/usr/share/common-licenses").glob("*"))
    texts = [(f, f.read_text(encoding="utf-8", errors="replace")) for f in files if f.is_file()]
    texts = [(f, t) for f, t in texts if t.strip()]
    out, n, copy = [], 0, 0
    while n < n_tokens and texts:
        for i in range(0, len(texts), 256):
            batch = texts[i: i + 256]
            for (f, t), enc in zip(batch, tok.encode_batch([t for _, t in batch], add_special_tokens=False)):
                if n >= n_tokens:
                    return out
                out.append({"doc_id": f"{copy}/{f}", "title": f.parent.name, "text": t})
                n += len(enc.ids)
        copy += 1
    return out


def _spread_ids(ws: Workspace, out: Path, n_ids: int) -> Path:
    """The workspace's trained BPE with its tokens moved to ids spread over [0, n_ids) (a permutation;
    the rest unreachable fillers), saved as a plain Hugging Face folder: a u32 tokenizer with the
    same tokens, so u16 and u32 rows tokenize the text alike."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok_lib.load_raw_tokenizer(ws).to_str())
    vocab = spec["model"]["vocab"]
    new = {t: (i * 7919 + 255) % n_ids for t, i in vocab.items()}  # 7919 is prime: distinct ids
    spec["model"]["vocab"] = {**new, **{f"<unused{i}>": i for i in sorted(set(range(n_ids)) - set(new.values()))}}
    for a in spec["added_tokens"]:
        a["id"] = new[a["content"]]
    out.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                            eos_token=tok_lib.EOS_TOKEN).save_pretrained(str(out))
    return out


def _order_at(folder: Path, table: bytes, ranks: np.ndarray, width) -> int:
    """How many of the adjacent pairs (rank, rank + 1) of `table` are out of suffix order."""
    ds = fmt.shard_file(folder, "tokenized", 0).read_bytes()
    r = fmt.ptr_size(len(ds))
    bad = 0
    for i in ranks[:2000]:
        a, b = (int.from_bytes(table[j * r: (j + 1) * r], "little") for j in (i, i + 1))
        bad += ds[a:] > ds[b:]
    return bad


def _prose_records(chars: int) -> list[dict]:
    from flexolmo.base.samples import build_news

    out, n = [], 0
    for r in build_news():
        if n >= chars:
            break
        out.append(r)
        n += len(r["text"])
    return out


def _build_with(root: str, name: str, method: str) -> dict:
    cfg = build.IndexConfig(suffix_array=method, cpus=2)
    r = build.build_source(Workspace(Path(root)), name, force=True, config=cfg)
    # VmHWM, not ru_maxrss: Linux carries the parent's maximum across fork and exec into ru_maxrss
    own = next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines()
               if x.startswith("VmHWM")) / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {**r.to_dict(), "path": str(r.path), "peak_mb_python": own, "peak_mb_rust": kids}


def repeats_bench(scratch: Path, chars: int, vocabs: list[int]) -> list[dict]:
    """The --repeats section (module docstring); one row per (tokenizer, source, construction)."""
    from index.suffix_array import METHODS

    ctx = mp.get_context("spawn")
    prose = _prose_records(chars)
    recs = {"prose": prose, "repeats": []}
    rows = []
    for vocab in vocabs:
        ws = Workspace(scratch / f"ws-{vocab}").ensure()
        src_lib.add_records(ws, "prose", prose, owner="bench", domain="prose", licence="various", origin="bench",
                            replace=True)
        tok_lib.train_tokenizer(ws, vocab_size=min(vocab, tok_lib.U16_VOCAB), source="prose", force=True)
        if vocab > tok_lib.U16_VOCAB:
            tok_lib.import_tokenizer(ws, _spread_ids(ws, scratch / f"hf-{vocab}", vocab), force=True)
        info = tok_lib.tokenizer_info(ws)
        tok = tok_lib.load_raw_tokenizer(ws)
        n_prose = sum(len(e.ids) for e in tok.encode_batch([r["text"] for r in prose], add_special_tokens=False))
        src_lib.add_records(ws, "repeats", _repeat_records(tok, n_prose), owner="bench", domain="repeats",
                            licence="various", origin="bench", replace=True)
        for name in recs:
            with ctx.Pool(1, maxtasksperchild=1) as pool:  # fills the token cache (tokenize rate, cold)
                cold = pool.apply(_build_with, (str(ws.root), name, METHODS[0]))
            tables = {}
            for method in METHODS:
                with ctx.Pool(1, maxtasksperchild=1) as pool:
                    r = pool.apply(_build_with, (str(ws.root), name, method))
                folder = Path(r["path"])
                tables[method] = [fmt.shard_file(folder, "table", k, r["n_shards"]).read_bytes()
                                  for k in range(r["n_shards"])]
                row = {"vocab": info.vocab_size, "source": name, "method": method, "n_tokens": r["n_tokens"],
                       "n_shards": r["n_shards"], "sa_s": r["suffix_array_seconds"], "build_s": r["seconds"],
                       "sa_tok_s": r["n_tokens"] / r["suffix_array_seconds"], "build_tok_s": r["n_tokens"] / r["seconds"],
                       "cold_build_s": cold["seconds"], "tokenize_s": cold["tokenize_seconds"],
                       "peak_mb_python": r["peak_mb_python"], "peak_mb_rust": r["peak_mb_rust"], "load": _load()}
                rows.append(row)
                print(f"vocab {row['vocab']:>7,} {name:8s} {method:10s} {row['n_tokens']:>10,} tok: suffix array "
                      f"{row['sa_s']:7.2f}s {row['sa_tok_s']:>11,.0f} tok/s | build (tokens cached) {row['build_s']:7.2f}s "
                      f"{row['build_tok_s']:>10,.0f} tok/s | peak MB python {row['peak_mb_python']:,.0f} rust "
                      f"{row['peak_mb_rust']:,.0f} | load {row['load']}", flush=True)
            same = tables[METHODS[0]] == tables["rust"]
            note = ""
            if not same and r["n_shards"] == 1:  # where they differ, which table is in suffix order
                width = widths.for_vocab(info.vocab_size)
                ra = fmt.ptr_size(width.bytes * (r["n_tokens"] + r["n_docs"]))
                a, b = (np.frombuffer(tables[m][0], dtype=np.uint8).reshape(-1, ra) for m in METHODS)
                ranks = np.flatnonzero((a != b).any(axis=1))
                ranks = ranks[ranks + 1 < len(a)]
                note = (f"; {len(ranks):,} ranks differ; out of order at the first {min(len(ranks), 2000)} of them: "
                        + ", ".join(f"{m} {_order_at(folder, tables[m][0], ranks, width)}" for m in METHODS))
            for row in rows[-len(METHODS):]:
                row["tables_identical"] = same
                row["difference"] = note
            print(f"vocab {info.vocab_size:>7,} {name:8s} tables identical: {same}{note}", flush=True)
    by = {(r["vocab"], r["source"], r["method"]): r for r in rows}
    for vocab in sorted({r["vocab"] for r in rows}):
        for method in METHODS:
            p, q = by[(vocab, "prose", method)], by[(vocab, "repeats", method)]
            print(f"vocab {vocab:>7,} {method:10s} repeats / prose suffix-array rate {q['sa_tok_s'] / p['sa_tok_s']:.2f}, "
                  f"whole build {q['build_tok_s'] / p['build_tok_s']:.2f}", flush=True)
        for name in recs:
            d, r = by[(vocab, name, METHODS[0])], by[(vocab, name, "rust")]
            print(f"vocab {vocab:>7,} {name:8s} divsufsort / rust_indexing suffix-array speed {r['sa_s'] / d['sa_s']:.2f}x, "
                  f"whole build {r['build_s'] / d['build_s']:.2f}x", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default="flexolmo-work")
    ap.add_argument("--scratch", default="/tmp/flexolmo-bench-index")
    ap.add_argument("--sizes", default="1e6,1e7", help="index sizes (tokens) for the latency section")
    ap.add_argument("--with-100m", action="store_true", help="add the 100M-token index (about 10 min more)")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--large", type=float, default=5e7, help="from this size on, attribute runs on fewer queries")
    ap.add_argument("--large-queries", type=int, default=5, help="attribute queries at sizes >= --large")
    ap.add_argument("--attr-budget", type=float, default=90.0, help="seconds per attribute query before it is stopped")
    ap.add_argument("--attr-max-rss-gb", type=float, default=8.0, help="memory per attribute query before it is stopped")
    ap.add_argument("--reuse-build", action="store_true",
                    help="skip the build section and reuse the source indexes already in --scratch")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--repeats", action="store_true", help="only the prose vs repeats suffix-sort section")
    ap.add_argument("--chars", type=float, default=8e6, help="--repeats: characters per source")
    ap.add_argument("--vocabs", default="8192,100000", help="--repeats: tokenizer sizes (u16 up to 65,535, u32 beyond)")
    args = ap.parse_args()

    scratch = Path(args.scratch).resolve()
    if args.repeats:
        print(f"--repeats: {args.chars:,.0f} characters a source; load {_load()}", flush=True)
        rows = repeats_bench(scratch, int(args.chars), [int(v) for v in args.vocabs.split(",")])
        if args.json:
            Path(args.json).write_text(json.dumps({"repeats": rows}, indent=2))
        return
    if not args.reuse_build:
        src_ws = Workspace.resolve(args.workspace)
        shutil.rmtree(scratch, ignore_errors=True)
        ws = Workspace(scratch / "ws").ensure()
        for part in ("sources", "tokenizer"):  # without token caches: the first build is cold
            shutil.copytree(src_ws.root / part, ws.root / part, ignore=shutil.ignore_patterns("tokens-*"))
        shutil.copyfile(src_ws.catalog_path, ws.catalog_path)
    else:
        ws = Workspace(scratch / "ws")
    names = [s.name for s in src_lib.list_sources(ws)]
    print(f"sources: {', '.join(names)}; tokenizer vocab {tok_lib.tokenizer_info(ws).vocab_size}; load {_load()}")

    rows = []
    ctx = mp.get_context("spawn")
    for name in [] if args.reuse_build else names:
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            r = pool.apply(_build_one, (str(ws.root), name))
        r["bare_sa_s"] = _bare_sa(Path(r["path"]), scratch, r["n_shards"])
        r["ratio"] = r["seconds"] / r["bare_sa_s"] if r["bare_sa_s"] else float("nan")
        # a second (forced) build reads the token cache the first one wrote, as training does
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            warm = pool.apply(_build_one, (str(ws.root), name))
        r["warm_seconds"] = warm["seconds"]
        r["warm_tokenize_seconds"] = warm["tokenize_seconds"]
        r["warm_ratio"] = warm["seconds"] / r["bare_sa_s"] if r["bare_sa_s"] else float("nan")
        rows.append(r)
        print(f"{name:12s} {r['n_tokens']:>11,} tok {r['seconds']:7.2f}s {r['tokens_per_second']:>11,.0f} tok/s "
              f"peak py {r['peak_mb_python']:6.0f} MB rust {r['peak_mb_rust']:6.0f} MB "
              f"{r['bytes_per_token']:5.2f} B/tok  tokenize {r['tokenize_seconds']:5.2f}s SA {r['suffix_array_seconds']:5.2f}s "
              f"verify {r['verify_seconds']:4.2f}s bare SA {r['bare_sa_s']:5.2f}s ratio {r['ratio']:.2f} "
              f"| cached tokens: {r['warm_seconds']:6.2f}s ratio {r['warm_ratio']:.2f}", flush=True)
    if args.reuse_build:
        rows = [{"name": n, "path": str(build.index_dir(ws, n))} for n in names]
        total = None
    else:
        total = _totals(rows)

    # latency by index size
    tok = tok_lib.load_raw_tokenizer(ws)
    info = tok_lib.tokenizer_info(ws)
    delim = tok_lib.read_delimiter_ids(ws)  # the pipeline's: every token holding a newline, and '.'
    bow = np.asarray(tok_lib.read_bow_ids(ws))
    vtexts = [t for n in names for t in src_lib.iter_texts(ws, n, split="validation")]
    vids = [tok.encode(t, add_special_tokens=False).ids for t in vtexts]
    vids = [v for v in vids if len(v) >= 450]
    rng = np.random.default_rng(0)
    queries = []
    for i in range(args.queries):
        v = vids[int(rng.integers(len(vids)))]
        s = int(rng.integers(0, len(v) - 450 + 1))
        queries.append(v[s:s + 450])
    sizes = [int(float(x)) for x in args.sizes.split(",") if x]
    if args.with_100m and int(1e8) not in sizes:
        sizes.append(int(1e8))
    print(f"latency: {len(queries)} queries of 450 tokens, delimiters {delim}; attribute budget {args.attr_budget:.0f} s "
          f"and {args.attr_max_rss_gb:.0f} GB per query; at >= {args.large:.0e} tokens attribute runs on the first "
          f"{args.large_queries} queries only (find_spans and count on all)", flush=True)
    folders = [str(r["path"]) for r in rows]
    lat = []
    for size in sizes:
        out = scratch / f"size-{size}"
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            b = pool.apply(_build_synthetic, (folders, size, str(out), info.vocab_size))
        load_before = _load()
        n_attr = args.large_queries if size >= args.large else len(queries)
        print(f"index {b['n_tokens']:>12,} tokens: built in {b['build_s']:6.1f}s, peak RSS python "
              f"{b['build_peak_mb_python']:,.0f} MB, rust_indexing {b['build_peak_mb_rust']:,.0f} MB; load {load_before}",
              flush=True)
        res = _latency(out, queries, n_attr, args.attr_budget, args.attr_max_rss_gb, info.eos_id,
                       ws.tokenizer_dir / "bow_ids.txt", bow, delim)
        res.update({"target": size, **b, "load_before": load_before, "load_after": _load()})
        lat.append(res)
        print(f"index {b['n_tokens']:>12,} tokens (engine loaded in {res['load_s']:.2f}s): "
              f"count p50 {res['count_ms_p50']:.2f} ms; attribute p50 {res['attribute_ms_p50']:,.0f} ms max "
              f"{res['attribute_ms_max']:,.0f} ms ({res['attribute_finished']}/{res['attribute_queries']} queries "
              f"finished within {args.attr_budget:.0f} s, peak RSS {res['attribute_peak_rss_mb']:,.0f} MB); "
              f"find_spans p50 {res['find_spans_ms_p50']:.1f} ms p95 {res['find_spans_ms_p95']:.1f} ms "
              f"({res['find_spans_queries']} queries, {res['spans_mean']:.0f} spans); identical spans "
              f"{res['spans_identical']}/{res['spans_compared']}; load after {res['load_after']}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"sources": rows, "total": total, "latency": lat}, indent=2, default=str))


if __name__ == "__main__":
    main()
