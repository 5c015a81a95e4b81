"""Document relevance: BM25 of each retrieved window against the query, with the source's own
statistics, normalised and bucketed.

The query is the prompt followed by the response; the unit is the word (`index.doc_freq.words`:
`\\w+` of the lowercased text). As in OLMoTrace the score is BM25 (Lucene variant, k1 1.5,
b 0.75), but its statistics come from the collection, not from the windows retrieved for one
response: a word's IDF is taken from its document frequency in the window's source, N is the
source's document count, avgdl its mean document length in words (each document counted up
to the window's size: a window holds at most `2 x context tokens` of its document, or a
snippet of a `snippets` source). So a window's rating depends on the query, the window and its
source only: not on how many other retrieved windows share the passage. (With the windows'
own IDF, a passage recurring in every retrieved window, a licence or a disclaimer, gave every
shared word an IDF of about zero, and its origin document rated low.)

    idf(w)   = ln(1 + (N - df(w) + 0.5) / (df(w) + 0.5))
    score    = sum over the query's words w of idf(w) * tf / (tf + k1 (1 - b + b dl/avgdl))
    bound    = sum over the query's words w of idf(w), a word no document of the source
               holds counting ln 2 (the IDF of a word in half the documents)
    norm     = score / bound  (in [0, 1): tf / (tf + x) < 1)      high >= HIGH > medium >= MEDIUM > low

`norm` is the share of the query's weight that the window holds. A word the source never
holds (another subject, the unindexed part of a response) weighs as an ordinary word, not
as the rarest: with the largest IDF such words outweighed a passage copied from the source
whenever the response also said other things (bench/relevance.py: origins of passages inside
other text rated low), and left out altogether, a response whose only words the source
holds are "the", "of", "and" would rate every window holding those high.

Which words a source is asked about (an owner node over `/v1/doc_freq`): the query's words
that are in the response (whose ids the node already has) or in the windows it returned. A
prompt word counts with its df in a window that holds it, and as a word the source lacks
(ln 2) in one that does not, locally and remotely alike: the prompt never reaches a node
except for words its own windows hold, and no window's rating depends on another window.

A source with no statistics (an index built before its document-frequency table, or a node
that does not serve `/v1/doc_freq`) has its windows rated as before: BM25 with the IDF of
the retrieved windows of such sources and the thresholds fitted for that (FALLBACK_HIGH,
FALLBACK_MEDIUM); the trace names those sources and why in `settings["relevance_fallback"]`.
The table is not built when an old index is opened (that would write into a served folder
outside a build); `flexolmo index build --source NAME --force` adds it.

HIGH and MEDIUM were measured, not guessed: `bench/relevance.py` traces inputs of known
origin on several corpora and tokenizers (passages copied from a training document, such
passages inside unindexed text, unindexed text only), fits the thresholds on half of the
inputs and reports the accuracy on the other half (docs/bench-trace.md).
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import bm25s
import numpy as np

from index.doc_freq import Stats, is_remote, source_stats, words

K1, B = 1.5, 0.75  # BM25's (bm25s' and Lucene's defaults)
ABSENT_IDF = math.log(2)  # the weight in the bound of a query word the source does not hold
# fitted by bench/relevance.py on two corpora x two tokenizers (docs/bench-trace.md)
HIGH, MEDIUM = 0.14, 0.08
# sources without statistics: the windows' own IDF, as fitted on the sample federation
FALLBACK_HIGH, FALLBACK_MEDIUM = 0.12, 0.08
FORMULA = (f"bm25 (source document frequencies) / sum(idf(query words); ln 2 for a word the source lacks); "
           f"high >= {HIGH}, medium >= {MEDIUM}")
# OLMoTrace's published formula, kept for comparison (bench/relevance.py "before")
OLMOTRACE_NORM_FACTOR, OLMOTRACE_HIGH, OLMOTRACE_MEDIUM = 0.18, 0.7, 0.5

__all__ = ["words", "score_window", "bm25", "normalise", "bucket", "olmotrace_bucket", "rate"]


def idf(df: int, n_docs: int) -> float:
    df = min(max(int(df), 0), n_docs)
    return math.log(1 + (n_docs - df + 0.5) / (df + 0.5))


def score_window(window_words: list[str], query: Counter, stats: Stats, cap_words: float | None = None,
                 known: set[str] | None = None) -> tuple[float, float]:
    """(BM25 score, bound) of one window with its source's statistics.

    :param query: the query's words with their counts
    :param cap_words: the most words a window of this source can hold (avgdl counts documents up to it)
    :param known: the query words that count with their df in every window (the response's);
        another (a prompt word) counts with its df only where this window holds it, else as
        a word the source lacks (module docstring). None: every query word counts with its df.
    """
    tf = Counter(window_words)
    dl, avgdl = len(window_words), stats.avg_words(cap_words)
    norm_len = K1 * (1 - B + B * dl / avgdl)
    score = bound = 0.0
    for w, q in query.items():
        f = tf.get(w, 0)
        df = stats.dfs.get(w, 0) if known is None or f or w in known else 0
        i = idf(df, stats.n_docs) if df else ABSENT_IDF  # no document of the source holds it
        bound += q * i
        if f:
            score += q * i * f / (f + norm_len)
    return score, bound


def bm25(documents: list[str], query: str) -> tuple[np.ndarray, float]:
    """BM25 of every document for the query with the documents' own IDF (bm25s, Lucene variant),
    and the query's bound: the sum of its words' IDFs. The fallback for sources without statistics."""
    if not documents:
        return np.zeros(0), 0.0
    corpus = [words(d) or ["\x00empty"] for d in documents]
    retriever = bm25s.BM25(method="lucene")
    retriever.index(corpus, show_progress=False)
    n = len(corpus)
    df: dict[str, int] = {}
    for doc in corpus:
        for w in set(doc):
            df[w] = df.get(w, 0) + 1
    qwords = words(query)
    bound = sum(math.log(1 + (n - df.get(w, 0) + 0.5) / (df.get(w, 0) + 0.5)) for w in qwords)
    q = [w for w in qwords if w in retriever.vocab_dict]
    if not q:
        return np.zeros(n), bound
    return np.asarray(retriever.get_scores(q), dtype=np.float64), bound


def normalise(score: float, bound: float) -> float:
    """The share of the query's BM25 bound the window reaches."""
    return float(score) / bound if bound > 0 else 0.0


def bucket(norm: float, high: float = HIGH, medium: float = MEDIUM) -> str:
    return "high" if norm >= high else "medium" if norm >= medium else "low"


def olmotrace_bucket(score: float, response_chars: int) -> str:
    """OLMoTrace's bucket: score / (0.18 * response characters), 0.7 high, 0.5 medium."""
    norm = float(score) / (OLMOTRACE_NORM_FACTOR * max(1, response_chars))
    return "high" if norm >= OLMOTRACE_HIGH else "medium" if norm >= OLMOTRACE_MEDIUM else "low"


def _window_cap(hit, stats: Stats, context_tokens: int, snippet_tokens: int) -> float:
    """The most words a window of this hit's kind can hold: full context both sides, or a snippet."""
    tokens = 2 * context_tokens if hit.context is not None else snippet_tokens
    return max(1.0, tokens * stats.words_per_token)


def rate(windows: list, prompt: str | None, response: str, indexes: dict, *, context_tokens: int = 250,
         snippet_tokens: int = 40) -> dict[str, str]:
    """Set relevance (BM25), relevance_norm and bucket of every (DocHit, window text) pair.

    :param indexes: source name -> its `SourceIndex` or `RemoteSource` (the Federation's
        `indexes`), asked for the document frequencies of the query's words
    :returns: the sources rated by the fallback (no statistics), and why
    """
    query = Counter(words((prompt or "") + " " + response))
    by_source: dict[str, list[tuple[object, list[str]]]] = {}
    for hit, text in windows:
        by_source.setdefault(hit.source, []).append((hit, words(text)))
    response_words = set(words(response))
    asks = {}
    for name, ws in by_source.items():
        seen = response_words.union(*(set(w) for _, w in ws))
        asks[name] = sorted(w for w in query if w in seen)

    def ask(name: str):
        ix = indexes.get(name)
        return (None, f"source {name!r} is not served") if ix is None else source_stats(ix, asks[name])

    remote = [n for n in by_source if is_remote(indexes.get(n))]
    got = {n: ask(n) for n in by_source if n not in remote}
    if remote:
        with ThreadPoolExecutor(max_workers=len(remote)) as pool:
            got.update(zip(remote, pool.map(ask, remote)))

    fallback: dict[str, str] = {}
    for name, ws in by_source.items():
        stats, why = got[name]
        if stats is None:
            fallback[name] = why
            continue
        for hit, ww in ws:
            score, bound = score_window(ww, query, stats, _window_cap(hit, stats, context_tokens, snippet_tokens),
                                        response_words)
            hit.relevance = round(score, 4)
            hit.relevance_norm = round(normalise(score, bound), 4)
            hit.bucket = bucket(hit.relevance_norm)
    old = [(hit, text) for hit, text in windows if hit.source in fallback]
    if old:
        scores, bound = bm25([text for _, text in old], (prompt or "") + " " + response)
        for (hit, _), score in zip(old, scores):
            hit.relevance = round(float(score), 4)
            hit.relevance_norm = round(normalise(score, bound), 4)
            hit.bucket = bucket(hit.relevance_norm, FALLBACK_HIGH, FALLBACK_MEDIUM)
    return fallback
