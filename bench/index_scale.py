"""Benchmark: streaming u32 index builds of growing sources: peak memory, tokens/s, span-search latency.

    .venv/bin/python bench/index_scale.py --scratch /tmp/fx-scale --sizes 30,100,300 --mem-gib 0.5 \
        --json docs/results/index-scale.json --plot docs/index-scale.png
    .venv/bin/python bench/index_scale.py --replot docs/results/index-scale.json --plot docs/index-scale.png

One workspace in --scratch holds the synthetic corpus's tokenizer (bench/synthetic_corpus.py: a
byte-level BPE of 111,059 ids, so every index is u32), imported with `flexolmo tokenizer import`,
and one source per size (`s30`, `s100`, `s300`: the first documents of one Zipfian corpus,
about --sizes million tokens each), registered streamed (`sources.add_document_batches`).
Each source is then built from scratch, tokenizing included, by the command a user runs,

    python -m cli.main -w SCRATCH/ws index build --source sN --mem-gib M --cpus 2

in a child process whose whole process tree (Python and the rust_indexing children) is
sampled every 0.1 s from /proc: the peak of the summed VmRSS, and of the summed RssAnon
(anonymous memory: what the kernel cannot drop; VmRSS also counts file pages mapped in).
Then `Federation.find_spans` (the compiled search, OLMoTrace's settings: delimiters,
word starts) on 20 queries of 450 tokens, the same at every size: pieces of indexed
documents (long spans) between fresh text from the same distribution; p50 and p95 after a
warm-up query. Prints a table and the load average around each step; writes JSON (and a
PNG with --plot). The scratch folder is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from synthetic_corpus import document, document_batches, tokenizer_folder, words_and_cdf  # noqa: E402

from flexolmo.base import sources as src_lib, tokenizer as tok_lib  # noqa: E402
from flexolmo.base.workspace import Workspace  # noqa: E402
from index import catalog, format as fmt  # noqa: E402
from index.engine import Federation  # noqa: E402

TOKENS_PER_DOC = 1120  # measured on the corpus: 1,000 words a document on average, 1.1 tokens a word
QUERIES, QUERY_TOKENS = 20, 450


def _tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        x = todo.pop()
        out.append(x)
        todo += children.get(x, [])
    return out


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run cmd; sample its process tree's memory every 0.1 s. Peaks in MB, seconds, load averages."""
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_rss = peak_anon = peak_py = peak_rust = 0
    while p.poll() is None:
        tree = _tree(p.pid)
        st = {x: _status_kb(x) for x in tree}
        peak_rss = max(peak_rss, sum(s.get("VmRSS", 0) for s in st.values()))
        peak_anon = max(peak_anon, sum(s.get("RssAnon", 0) for s in st.values()))
        peak_py = max(peak_py, st.get(p.pid, {}).get("VmRSS", 0))
        peak_rust = max([peak_rust] + [s.get("VmRSS", 0) for x, s in st.items() if x != p.pid])
        time.sleep(0.1)
    out = p.stdout.read()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}")
    return {"seconds": time.perf_counter() - t0, "peak_tree_rss_mb": peak_rss / 1024, "peak_tree_anon_mb": peak_anon / 1024,
            "peak_python_rss_mb": peak_py / 1024, "peak_rust_rss_mb": peak_rust / 1024,
            "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()],
            "output": out.strip().splitlines()[-1]}


def queries(ws: Workspace, n_docs: int, seed: int = 7) -> list[list[int]]:
    """QUERIES x QUERY_TOKENS ids: pieces of indexed (train) documents of the smallest source
    between fresh text of the same distribution."""
    tok = tok_lib.load_raw_tokenizer(ws)
    words, cdf = words_and_cdf()
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < QUERIES:
        ids: list[int] = []
        while len(ids) < QUERY_TOKENS:
            i = int(rng.integers(n_docs))
            if src_lib.split_of(f"d{i:09d}") != "train":
                continue
            d = tok.encode(document(i, 0, words, cdf)).ids
            a = int(rng.integers(0, max(1, len(d) - 130)))
            ids += d[a: a + int(rng.integers(20, 120))]
            ids += tok.encode(" " + document(10**9 + len(out) * 100 + len(ids), 0, words, cdf)[:400]).ids[:60]
        out.append(ids[:QUERY_TOKENS])
    return out


def latency(ws: Workspace, name: str, qs: list[list[int]]) -> dict:
    fed = Federation.open(ws, [name])
    bow, delim = np.asarray(tok_lib.read_bow_ids(ws)), tok_lib.read_delimiter_ids(ws)
    t0 = time.perf_counter()
    fed.find_spans(qs[0], delim, bow)  # compile (or load numba's cache), first pages
    first = time.perf_counter() - t0
    times, spans, longest = [], [], []
    for q in qs:
        t = time.perf_counter()
        s = fed.find_spans(q, delim, bow)
        times.append((time.perf_counter() - t) * 1000)
        spans.append(len(s))
        longest.append(max((x.length for x in s), default=0))
    times.sort()
    return {"find_spans_ms_p50": statistics.median(times), "find_spans_ms_p95": times[int(0.95 * (len(times) - 1))],
            "first_call_s": first, "spans_per_query": statistics.mean(spans), "longest_span_mean": statistics.mean(longest),
            "load": [round(x, 2) for x in os.getloadavg()]}


def measure(ws: Workspace, name: str, n_docs: int, a: argparse.Namespace, env: dict, qs: list[list[int]]) -> dict:
    """Register source `name` (the corpus's first n_docs documents), build it with the CLI in a
    measured child process, then time find_spans on it."""
    t0 = time.perf_counter()
    src_lib.add_document_batches(ws, name, document_batches(n_docs), owner="bench", domain="synthetic",
                                 licence="CC0", origin="bench/synthetic_corpus.py")
    register_s = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "cli.main", "-w", str(ws.root), "index", "build", "--source", name,
           "--mem-gib", f"{a.mem_gib:g}", "--cpus", str(a.cpus)]
    print(f"{name}: {n_docs:,} documents registered in {register_s:.0f}s; building ...", flush=True)
    built = run_measured(cmd, env)
    rec = catalog.get_index(ws, name)
    m = fmt.read_manifest(fmt.index_dir(ws, name))
    cache = sum(p.stat().st_size for p in ws.source_dir(name).glob("tokens-train-*/*.npy"))
    return {"source": name, "n_docs": rec.n_docs, "n_tokens": rec.n_tokens, "token_dtype": m.token_dtype,
            "n_shards": rec.n_shards, "index_bytes": rec.bytes, "bytes_per_token": rec.bytes / rec.n_tokens,
            "token_cache_bytes": cache, "register_s": register_s, "build_s": built["seconds"],
            "tokenize_s": rec.tokenize_seconds, "suffix_array_s": rec.suffix_array_seconds,
            "tokens_per_s": rec.n_tokens / built["seconds"],
            "tokenize_tokens_per_s": rec.n_tokens / max(rec.tokenize_seconds, 1e-9),
            "suffix_array_tokens_per_s": rec.n_tokens / max(rec.suffix_array_seconds, 1e-9),
            **{k: v for k, v in built.items() if k != "seconds"}, **latency(ws, name, qs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scratch", default="/tmp/fx-scale")
    ap.add_argument("--sizes", default="30,100,300", help="millions of tokens per source")
    ap.add_argument("--mem-gib", type=float, default=1.0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--replot", default=None, metavar="JSON", help="only draw --plot from a JSON this script wrote")
    a = ap.parse_args()
    if a.replot:
        plot(json.loads(Path(a.replot).read_text()), Path(a.plot))
        return
    scratch = Path(a.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    ws = Workspace(scratch / "ws").ensure()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tok_lib.import_tokenizer(ws, tokenizer_folder(scratch / "hf-tokenizer"))
    sizes = [int(x) for x in a.sizes.split(",")]
    qs = queries(ws, sizes[0] * 1_000_000 // TOKENS_PER_DOC)  # the same queries at every size
    rows: list[dict] = []
    out = {"command": " ".join(sys.argv), "mem_gib": a.mem_gib, "cpus": a.cpus, "rows": rows}
    try:
        for m in sizes:
            rows.append(measure(ws, f"s{m}", m * 1_000_000 // TOKENS_PER_DOC, a, env, qs))
            print(json.dumps(rows[-1]), flush=True)
            if a.json:  # after every size, so a run cut short keeps what it measured
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.json).write_text(json.dumps(out, indent=2))
    finally:
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n| tokens | shards | build s | tokens/s | tokenize tok/s | suffix array tok/s | peak tree RSS MB "
          "| peak anon MB | python / rust MB | bytes/token | find_spans p50 / p95 ms | load |")
    print("|" + "---:|" * 12)
    for r in rows:
        print(f"| {r['n_tokens']:,} | {r['n_shards']} | {r['build_s']:.0f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokenize_tokens_per_s']:,.0f} | {r['suffix_array_tokens_per_s']:,.0f} | {r['peak_tree_rss_mb']:,.0f} | "
              f"{r['peak_tree_anon_mb']:,.0f} | {r['peak_python_rss_mb']:,.0f} / {r['peak_rust_rss_mb']:,.0f} | "
              f"{r['bytes_per_token']:.2f} | {r['find_spans_ms_p50']:.1f} / {r['find_spans_ms_p95']:.1f} | "
              f"{r['load_before'][0]:.1f}-{r['load_after'][0]:.1f} |")
    if a.plot:
        plot(out, Path(a.plot))


def plot(out: dict, path: Path) -> None:
    """Two panels: the build's peak memory, and find_spans latency, against the source's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    n = [r["n_tokens"] / 1e6 for r in rows]
    ticks = dict(xscale="log", xticks=n, xticklabels=[f"{x:.0f}M" for x in n])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    a1.plot(n, [r["peak_tree_rss_mb"] for r in rows], "o-", label="peak RSS, whole build (Python + rust_indexing)")
    a1.plot(n, [r["peak_tree_anon_mb"] for r in rows], "s-", label="of which anonymous")
    a1.axhline(out["mem_gib"] * 1024, color="gray", ls="--", lw=1,
               label=f"--mem-gib {out['mem_gib']:g} (rust_indexing's budget)")
    a1.set(xlabel="indexed tokens (u32 ids)", ylabel="MB", title="build memory", ylim=(0, 1.35 * max(
        r["peak_tree_rss_mb"] for r in rows)), **ticks)
    a1.minorticks_off()
    a1.legend(fontsize=7, loc="lower right")
    a2.plot(n, [r["find_spans_ms_p50"] for r in rows], "o-", label="find_spans p50")
    a2.plot(n, [r["find_spans_ms_p95"] for r in rows], "s--", label="find_spans p95")
    for r, x in zip(rows, n):
        for ax, y, dy in ((a1, r["peak_tree_rss_mb"], 8), (a2, r["find_spans_ms_p50"], -14)):
            ax.annotate(f"{r['n_shards']} shard{'s' if r['n_shards'] > 1 else ''}", (x, y), textcoords="offset points",
                        xytext=(4, dy), fontsize=8)
    a2.set(xlabel="indexed tokens (u32 ids)", ylabel="ms per 450-token query", title="span search latency",
           ylim=(0, 1.25 * max(r["find_spans_ms_p95"] for r in rows)), **ticks)
    a2.minorticks_off()
    a2.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
