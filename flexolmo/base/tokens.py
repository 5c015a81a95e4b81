"""Each source tokenized once per tokenizer: the ids that training and indexing both read.

    toks = source_tokens(ws, "news", split="train")
    toks.doc(i)            # ids of document i (stored doc_id order), no separator
    toks.read(a, b)        # ids of documents a..b-1, one array, read from the file

The cache is a folder `sources/<name>/tokens-<split>-<tokenizer sha256[:16]>/` holding
`ids.npy` (every document's ids concatenated: uint16, or uint32 for a tokenizer of more than
65,535 ids) and `offsets.npy` (int64, n_docs + 1), both memory-mapped when read, and a
`TokenCacheCard` (flexolmo/base/artifacts/token_cache.py) naming its inputs (tokenizer and
source content); a cache that is not current is rebuilt. Tokenizing streams: documents are
read from the source's Parquet file in batches and their ids appended to the cache as they
come, so neither the text nor the ids of a whole source are ever in memory. Written atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from flexolmo.base.artifacts import token_cache as artifact
from flexolmo.base.sources import get_source, iter_document_batches
from flexolmo.base.tokenizer import ids_dtype, load_raw_tokenizer, tokenizer_hash, tokenizer_info
from flexolmo.base.workspace import Workspace

BATCH_DOCS = 256
BATCH_CHARS = 4_000_000  # bounds memory: an Encoding costs far more than its ids


@dataclass(frozen=True)
class SourceTokens:
    ids: np.ndarray  # memory-mapped, all documents concatenated
    offsets: np.ndarray  # int64, document i is ids[offsets[i]:offsets[i + 1]]
    cached: bool  # read from the cache (True) or tokenized now (False)
    seconds: float
    folder: Path | None = None

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]: self.offsets[i + 1]]

    def read(self, a: int, b: int) -> np.ndarray:
        """The ids of documents a..b-1, read from the file (a scan of the cache keeps no pages resident)."""
        lo, hi = int(self.offsets[a]), int(self.offsets[b])
        if self.folder is None:
            return np.asarray(self.ids[lo:hi])
        return artifact.read_range(self.folder, self.ids, lo, hi)


def source_tokens(ws: Workspace, name: str, split: str = "train",
                  progress: Callable[[int, int], None] | None = None) -> SourceTokens:
    """The ids of every document of one split, tokenized once and cached.

    :param progress: called with (characters done, characters in all) while tokenizing
    """
    t0 = time.perf_counter()
    tok_sha = tokenizer_hash(ws)
    folder = artifact.folder(ws, name, split, tok_sha)
    src = get_source(ws, name)
    inputs = artifact.inputs_for(tok_sha, src.content_hash)
    if artifact.is_current(folder, inputs):
        return SourceTokens(*artifact.read(folder), True, time.perf_counter() - t0, folder)
    total = src.n_chars_train if split == "train" else src.n_chars_valid if split == "validation" else \
        src.n_chars_train + src.n_chars_valid
    card = dict(inputs=inputs, source=name, split=split)
    try:
        artifact.write_stream(folder, ids_dtype(tokenizer_info(ws).vocab_size),
                              _encoded(ws, name, split, total, progress), card)
    except OSError:
        if not artifact.is_current(folder, inputs):  # else another process (a DDP rank) wrote the same cache
            raise
    return SourceTokens(*artifact.read(folder), False, time.perf_counter() - t0, folder)


def _encoded(ws: Workspace, name: str, split: str, total: int,
             progress: Callable[[int, int], None] | None) -> Iterator[list[np.ndarray]]:
    """Batches of documents' ids, in stored order, tokenized as the source is read."""
    tok = load_raw_tokenizer(ws)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    dtype = ids_dtype(tokenizer_info(ws).vocab_size)
    done = 0
    for batch in iter_document_batches(ws, name, split, ["text"], BATCH_DOCS):
        texts = batch.column("text").to_pylist()
        b = 0
        while b < len(texts):  # at most BATCH_CHARS per encode call (a document longer: alone)
            e, chars = b, 0
            while e < len(texts) and (chars < BATCH_CHARS or e == b):
                chars += len(texts[e])
                e += 1
            yield [np.asarray(enc.ids, dtype=dtype) for enc in encode(texts[b:e], add_special_tokens=False)]
            done += chars
            if progress:
                progress(done, total)
            b = e
