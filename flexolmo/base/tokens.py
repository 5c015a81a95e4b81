"""Each source tokenized once per tokenizer: the ids that training and indexing both read.

    toks = source_tokens(ws, "news", split="train")
    toks.doc(i)            # uint16 ids of document i (stored doc_id order), no separator

The cache is a folder `sources/<name>/tokens-<split>-<tokenizer sha256[:16]>/` holding
`ids.npy` (uint16, every document's ids concatenated) and `offsets.npy` (int64, n_docs + 1)
and a `TokenCacheCard` (flexolmo/base/artifacts/token_cache.py) naming its inputs (tokenizer and
source content); a cache that is not current is rebuilt. Written atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from flexolmo.base.artifacts import token_cache as artifact
from flexolmo.base.sources import get_source, load_documents
from flexolmo.base.tokenizer import load_raw_tokenizer, tokenizer_hash
from flexolmo.base.workspace import Workspace

BATCH_DOCS = 256
BATCH_CHARS = 4_000_000  # bounds memory: an Encoding costs far more than its ids


@dataclass(frozen=True)
class SourceTokens:
    ids: np.ndarray  # uint16, all documents concatenated
    offsets: np.ndarray  # int64, document i is ids[offsets[i]:offsets[i + 1]]
    cached: bool  # read from the cache (True) or tokenized now (False)
    seconds: float

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]: self.offsets[i + 1]]


def source_tokens(ws: Workspace, name: str, split: str = "train",
                  progress: Callable[[int, int], None] | None = None) -> SourceTokens:
    """The ids of every document of one split, tokenized once and cached.

    :param progress: called with (characters done, characters in all) while tokenizing
    """
    t0 = time.perf_counter()
    tok_sha = tokenizer_hash(ws)
    folder = artifact.folder(ws, name, split, tok_sha)
    inputs = artifact.inputs_for(tok_sha, get_source(ws, name).content_hash)
    if artifact.is_current(folder, inputs):
        return SourceTokens(*artifact.read(folder), True, time.perf_counter() - t0)
    texts = load_documents(ws, name, split=split, columns=["text"]).column("text").to_pylist()
    tok = load_raw_tokenizer(ws)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    sizes = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    total, done = int(sizes.sum()), 0
    parts, lengths = [], []
    b = 0
    while b < len(texts):
        e, chars = b, 0
        while e < len(texts) and e - b < BATCH_DOCS and (chars < BATCH_CHARS or e == b):
            chars += int(sizes[e])
            e += 1
        for enc in encode(texts[b:e], add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=np.uint16))
            lengths.append(len(enc.ids))
        done += chars
        if progress:
            progress(done, total)
        b = e
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    card = artifact.TokenCacheCard(inputs=inputs, source=name, split=split, n_docs=len(texts), n_tokens=int(len(ids)))
    try:
        artifact.write(folder, ids, offsets, card)
    except OSError:
        if not artifact.is_current(folder, inputs):  # else another process (a DDP rank) wrote the same cache
            raise
    return SourceTokens(ids, offsets, False, time.perf_counter() - t0)
