"""Training data: one long token stream per source, and random windows from it.

    stream = token_stream(ws, "news")              # documents of the train split, eos after each
    x, y = get_batch(stream, cfg, step, rank)      # (B, T) inputs and next-token targets
    mix = Mixture(stream, public, share=0.25)      # a quarter of every batch from public text
    x, y = get_batch(mix, cfg, step, rank)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flexolmo.model.config import TrainConfig
from flexolmo.base.errors import InputError
from flexolmo.base.tokenizer import tokenizer_info
from flexolmo.base.tokens import source_tokens
from flexolmo.base.workspace import Workspace


def token_stream(ws: Workspace, source: str, split: str = "train") -> torch.Tensor:
    """All documents of a split as one 1-D id stream, each document followed by eos.

    The ids come from the source's token cache (`flexolmo.base.tokens`), shared with indexing.
    """
    toks = source_tokens(ws, source, split)
    if toks.n_docs == 0:
        raise InputError(f"source {source!r} has no {split} documents to train on")
    eos = tokenizer_info(ws).eos_id
    stream = np.insert(np.asarray(toks.ids, dtype=np.int64), toks.offsets[1:], eos)  # eos after each document
    return torch.from_numpy(stream)


def check_stream(stream: torch.Tensor, cfg: TrainConfig, source: str) -> None:
    """Refuse a stream too short for one training window."""
    if len(stream) < cfg.seq_len + 2:
        raise InputError(
            f"source {source!r} has only {len(stream)} training tokens; it needs more than seq_len={cfg.seq_len} "
            "(add documents or use a smaller profile)"
        )


@dataclass(frozen=True)
class Mixture:
    """Two streams in every batch: `round(share x batch_size)` windows from `other` (at least
    one when share > 0), the rest from `main`. An owner's expert trains on its own text with
    a share of public text (data every owner has), so its expert and router row also learn
    where the public expert is better (config `TrainConfig.public_mix`)."""

    main: torch.Tensor
    other: torch.Tensor
    share: float

    def __post_init__(self) -> None:
        if not 0 < self.share < 1:
            raise InputError(f"the public share of a batch must be in (0, 1), got {self.share}")

    def counts(self, batch_size: int) -> tuple[int, int]:
        """(windows from `main`, windows from `other`) in a batch of `batch_size`."""
        n_other = min(batch_size - 1, max(1, round(self.share * batch_size)))
        return batch_size - n_other, n_other


def _windows(stream: torch.Tensor, n: int, seq_len: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (n,), generator=g)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])  # (n, T+1)


def get_batch(stream: torch.Tensor | Mixture, cfg: TrainConfig, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for (step, rank): deterministic, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 7919 + step)
    if isinstance(stream, Mixture):
        n_main, n_other = stream.counts(cfg.batch_size)
        w = torch.cat([_windows(stream.main, n_main, cfg.seq_len, g), _windows(stream.other, n_other, cfg.seq_len, g)])
    else:
        w = _windows(stream, cfg.batch_size, cfg.seq_len, g)
    return w[:, :-1], w[:, 1:]
