"""The token cache artifact: `sources/<name>/tokens-<split>-<tokenizer sha256[:16]>/`
(ids.npy, offsets.npy, card.json). flexolmo/base/tokens.py fills it.

Inputs: `tokenizer` and `source` (the source's content hash). The folder name carries the
tokenizer's hash and the folder lives inside the source's, which re-registering replaces
whole, so a stale cache is rarely even found; the card answers for the rest.

Both arrays are written as they are produced (`write_stream`: ids are appended batch by
batch behind a fixed-size .npy header filled in at the end), so a cache of billions of ids
never sits in memory; readers memory-map `ids.npy` (uint16, or uint32 for a vocabulary over
65,535 ids) or read a range of documents from it (`read_range`).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from flexolmo.base.errors import IntegrityError
from flexolmo.base.workspace import Workspace, atomic_dir
from flexolmo.base.artifacts.card import Card, Inputs

IDS_FILE = "ids.npy"
OFFSETS_FILE = "offsets.npy"


class TokenCacheCard(Card):
    KIND = "token cache"
    REBUILD = "flexolmo index build (or any training run: the cache is rebuilt on demand)"

    kind: Literal["token_cache"] = "token_cache"
    source: str
    split: str
    n_docs: int
    n_tokens: int

def folder(ws: Workspace, source: str, split: str, tokenizer_sha256: str) -> Path:
    return ws.source_dir(source) / f"tokens-{split}-{tokenizer_sha256[:16]}"


def inputs_for(tokenizer_sha256: str, source_content_hash: str) -> Inputs:
    return {"tokenizer": tokenizer_sha256, "source": source_content_hash}


def is_current(path: Path, inputs: Inputs) -> bool:
    """A cache with its arrays and a card built from `inputs`."""
    if not (path / OFFSETS_FILE).exists():
        return False
    card = TokenCacheCard.find(path)
    return card is not None and card.is_current(inputs)


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids memory-mapped, offsets memory-mapped)."""
    return np.load(path / IDS_FILE, mmap_mode="r"), np.load(path / OFFSETS_FILE, mmap_mode="r")


def read_range(path: Path, ids: np.memmap, start: int, stop: int) -> np.ndarray:
    """ids[start:stop] read from the file (not through the memory map, which would keep the
    pages it touched resident in the reader: a whole-cache scan then costs the cache's size)."""
    with open(path / IDS_FILE, "rb") as f:
        f.seek(ids.offset + start * ids.dtype.itemsize)
        return np.fromfile(f, dtype=ids.dtype, count=stop - start)


HEADER = 128  # bytes of a streamed .npy header: magic, version, length, dict padded with spaces


class _Appender:
    """A 1-D .npy file written by appending, its header (shape) written on `close`."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self._f = open(path, "wb")
        self._f.write(b"\0" * HEADER)

    def append(self, a: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(a, dtype=self.dtype).tobytes())
        self.n += len(a)

    def close(self) -> None:
        d = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.n,)}
        text = repr(d).encode("latin1")
        head = b"\x93NUMPY\x01\x00" + (HEADER - 10).to_bytes(2, "little")
        body = text + b" " * (HEADER - len(head) - len(text) - 1) + b"\n"
        assert len(head) + len(body) == HEADER and ast.literal_eval(text.decode()) == d
        self._f.seek(0)
        self._f.write(head + body)
        self._f.close()


def write_stream(path: Path, dtype, docs: Iterable[list[np.ndarray]], card: dict) -> TokenCacheCard:
    """Write a cache atomically from batches of documents' ids: temp folder, verify (the arrays read
    back and agree with the card), rename.

    :param docs: batches, each a list of one id array per document
    :param card: the card's fields except n_docs and n_tokens
    """
    with atomic_dir(path) as tmp:
        ids, offsets = _Appender(tmp / IDS_FILE, dtype), _Appender(tmp / OFFSETS_FILE, np.int64)
        offsets.append(np.zeros(1, np.int64))
        try:
            for batch in docs:
                lengths = np.fromiter((len(d) for d in batch), dtype=np.int64, count=len(batch))
                offsets.append(ids.n + np.cumsum(lengths))
                for d in batch:
                    ids.append(d)
        finally:
            ids.close()
            offsets.close()
        full = TokenCacheCard(**card, n_docs=offsets.n - 1, n_tokens=ids.n)
        full.save(tmp)
        back_ids, back_off = read(tmp)
        if len(back_off) != full.n_docs + 1 or int(back_off[-1]) != len(back_ids) or len(back_ids) != full.n_tokens:
            raise IntegrityError(f"the token cache written to {tmp} does not read back whole; disk problem?")
    return full
