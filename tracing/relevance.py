"""Document relevance: BM25 of the retrieved windows against the query, normalised and bucketed.

The corpus is the set of document windows retrieved for one response; the query is the
prompt followed by the response. As in OLMoTrace the score is BM25 (Lucene variant); the
normalisation and the buckets are calibrated for this federation (issue 14):

    norm = score / sum over the query's words w of idf(w)          (query coverage, in [0, 1))
    high >= HIGH > medium >= MEDIUM > low

In the Lucene variant a query word adds idf(w) * tf / (tf + k1 (1 - b + b dl/avgdl)) to a
window's score, so its score can never reach sum idf(w): `norm` is the part of the query's
BM25 weight the window holds (words absent from every window count with the largest idf).
It does not depend on how many windows were retrieved or on the response's length in
characters, which OLMoTrace's `score / (0.18 * response characters)` does: there, with a few
dozen short windows (small IDFs), every document rated low (issue 14: 113 of 113).

HIGH and MEDIUM were measured, not guessed: `bench/relevance.py` traces held-out inputs of
known origin on the 8-source workspace (passages copied from a training document, such
passages inside unindexed text, and unindexed text only), fits the thresholds on half of
the inputs and reports the accuracy on the other half (docs/bench-trace.md).
"""

from __future__ import annotations

import math
import re

import bm25s
import numpy as np

# calibrated by bench/relevance.py on the 8-source workspace (docs/bench-trace.md)
HIGH, MEDIUM = 0.12, 0.08
FORMULA = f"bm25 / sum(idf(query words)); high >= {HIGH}, medium >= {MEDIUM}"
# OLMoTrace's published formula, kept for comparison (bench/relevance.py "before")
OLMOTRACE_NORM_FACTOR, OLMOTRACE_HIGH, OLMOTRACE_MEDIUM = 0.18, 0.7, 0.5
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25(documents: list[str], query: str) -> tuple[np.ndarray, float]:
    """BM25 score of every document for the query (Lucene variant: IDF stays positive in small
    corpora), and the query's bound: the sum of its words' IDFs, which no score reaches."""
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


def bucket(norm: float) -> str:
    return "high" if norm >= HIGH else "medium" if norm >= MEDIUM else "low"


def olmotrace_bucket(score: float, response_chars: int) -> str:
    """OLMoTrace's bucket: score / (0.18 * response characters), 0.7 high, 0.5 medium."""
    norm = float(score) / (OLMOTRACE_NORM_FACTOR * max(1, response_chars))
    return "high" if norm >= OLMOTRACE_HIGH else "medium" if norm >= OLMOTRACE_MEDIUM else "low"


def rate(windows: list, query: str, response_chars: int) -> None:
    """Set relevance (BM25), relevance_norm and bucket of every (DocHit, window text) pair."""
    scores, bound = bm25([text for _, text in windows], query)
    for (hit, _), score in zip(windows, scores):
        hit.relevance = round(float(score), 4)
        hit.relevance_norm = round(normalise(score, bound), 4)
        hit.bucket = bucket(hit.relevance_norm)
