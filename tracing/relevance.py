"""Document relevance as OLMoTrace rates it: BM25 of the retrieved windows against the query.

The corpus is the set of document windows retrieved for one response; the query is the
prompt followed by the response. Scores are normalised by the response length and bucketed:

    norm = score / (0.18 * response characters);  high >= 0.7 > medium >= 0.5 > low
"""

from __future__ import annotations

import re

import bm25s
import numpy as np

NORM_FACTOR = 0.18
HIGH, MEDIUM = 0.7, 0.5
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25_scores(documents: list[str], query: str) -> np.ndarray:
    """BM25 score of every document for the query (Lucene variant: IDF stays positive in small corpora)."""
    if not documents:
        return np.zeros(0)
    corpus = [words(d) or ["\x00empty"] for d in documents]
    retriever = bm25s.BM25(method="lucene")
    retriever.index(corpus, show_progress=False)
    q = [w for w in words(query) if w in retriever.vocab_dict]
    if not q:
        return np.zeros(len(documents))
    return np.asarray(retriever.get_scores(q), dtype=np.float64)


def bucket(norm: float) -> str:
    return "high" if norm >= HIGH else "medium" if norm >= MEDIUM else "low"


def normalise(score: float, response_chars: int) -> float:
    return float(score) / (NORM_FACTOR * max(1, response_chars))
