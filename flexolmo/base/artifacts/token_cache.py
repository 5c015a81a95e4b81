"""The token cache artifact: `sources/<name>/tokens-<split>-<tokenizer sha256[:16]>/`
(ids.npy, offsets.npy, card.json). flexolmo/base/tokens.py fills it.

Inputs: `tokenizer` and `source` (the source's content hash). The folder name carries the
tokenizer's hash and the folder lives inside the source's, which re-registering replaces
whole, so a stale cache is rarely even found; the card answers for the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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

    @classmethod
    def upgrade(cls, old: dict) -> dict:
        # the previous card recorded the tokenizer but not the source's content: not current
        return {"kind": "token_cache", "format": 1, "inputs": {"tokenizer": old["tokenizer_sha256"]},
                **{k: old[k] for k in ("source", "split", "n_docs", "n_tokens")}}


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
    """(ids memory-mapped, offsets)."""
    return np.load(path / IDS_FILE, mmap_mode="r"), np.load(path / OFFSETS_FILE)


def write(path: Path, ids: np.ndarray, offsets: np.ndarray, card: TokenCacheCard) -> None:
    """Write atomically: temp folder, verify (the arrays read back and agree), rename."""
    with atomic_dir(path) as tmp:
        np.save(tmp / IDS_FILE, ids)
        np.save(tmp / OFFSETS_FILE, offsets)
        card.save(tmp)
        back_ids, back_off = np.load(tmp / IDS_FILE, mmap_mode="r"), np.load(tmp / OFFSETS_FILE)
        if len(back_off) != card.n_docs + 1 or int(back_off[-1]) != len(back_ids) or len(back_ids) != card.n_tokens:
            raise IntegrityError(f"the token cache written to {tmp} does not read back whole; disk problem?")
