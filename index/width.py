"""The token width of an index, u16 or u32, and what follows from it.

    w = width.for_vocab(tokenizer_info(ws).vocab_size)   # U16 up to 65,535 ids, else U32
    w = width.named(manifest.token_dtype)                # an index already built
    w.bytes, w.dtype, w.doc_sep                          # 2, uint16, 0xFFFF  |  4, uint32, 0xFFFFFFFF

infini-gram stores every id little-endian in `w.bytes` bytes and separates documents with
the all-ones value; `rust_indexing --token-width` and the engine's `token_dtype` take the
same width. Unigram counts are kept in memory as a dense array with one slot per id plus a
last slot for the separator (`dense_size`): 65,536 slots for u16 (so slot 0xFFFF is the
separator, as before), vocabulary + 1 for u32. On disk (`unigram.N`) and on the wire they
are sparse, with the separator under its real id (`to_sparse` / `from_sparse`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flexolmo.base.errors import IntegrityError
from flexolmo.base.tokenizer import ids_dtype


@dataclass(frozen=True)
class Width:
    name: str  # infini-gram's token_dtype: "u16" | "u32"
    bytes: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.bytes == 2 else np.uint32)

    @property
    def doc_sep(self) -> int:
        """The document separator: all ones (0xFFFF, 0xFFFFFFFF)."""
        return (1 << (8 * self.bytes)) - 1

    def max_id(self, vocab_size: int | None) -> int:
        """The largest query id this index takes: 65,534 for u16 (as always), the vocabulary's last for u32."""
        if self.bytes == 2 or vocab_size is None:
            return self.doc_sep - 1
        return int(vocab_size) - 1

    def dense_size(self, vocab_size: int | None) -> int:
        """Slots of an in-memory unigram array: ids 0..max_id, then the separator's slot."""
        return self.max_id(vocab_size) + 2

    def to_sparse(self, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, counts) of the non-zero slots; the last slot under the separator's id."""
        nz = np.flatnonzero(dense)
        ids = nz.astype(np.int64)
        ids[nz == len(dense) - 1] = self.doc_sep
        return ids, np.asarray(dense)[nz].astype(np.int64)

    def from_sparse(self, ids, counts, vocab_size: int | None) -> np.ndarray:
        """The dense array of sparse (ids, counts); IntegrityError for an id outside the vocabulary."""
        size = self.dense_size(vocab_size)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        if len(ids) != len(counts):
            raise IntegrityError("unigram ids and counts differ in length")
        slots = np.where(ids == self.doc_sep, size - 1, ids)
        if slots.size and (slots.min() < 0 or slots.max() >= size or np.any((slots == size - 1) & (ids != self.doc_sep))):
            raise IntegrityError(f"unigram ids outside [0, {size - 2}] and the separator {self.doc_sep}")
        out = np.zeros(size, dtype=np.int64)
        np.add.at(out, slots, counts)
        return out


U16 = Width("u16", 2)
U32 = Width("u32", 4)


def for_vocab(vocab_size: int) -> Width:
    """u16 up to 65,535 ids (0xFFFF stays the separator), u32 beyond."""
    return U16 if ids_dtype(vocab_size) == np.uint16 else U32


def named(name: str) -> Width:
    if name not in ("u16", "u32"):
        raise IntegrityError(f"token_dtype {name!r} is not one this project reads (u16, u32); rebuild the index")
    return U16 if name == "u16" else U32
