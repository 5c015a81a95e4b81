"""Training data: one long token stream per source, and random windows from it.

    stream = token_stream(ws, "news")              # documents of the train split, eos after each
    x, y = get_batch(stream, cfg, step, rank)      # (B, T) inputs and next-token targets
"""

from __future__ import annotations

import numpy as np
import torch

from .config import TrainConfig
from .errors import InputError
from .tokenizer import tokenizer_info
from .tokens import source_tokens
from .workspace import Workspace


def token_stream(ws: Workspace, source: str, split: str = "train") -> torch.Tensor:
    """All documents of a split as one 1-D id stream, each document followed by eos.

    The ids come from the source's token cache (`flexolmo.tokens`), shared with indexing.
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


def get_batch(stream: torch.Tensor, cfg: TrainConfig, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for (step, rank): deterministic, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 7919 + step)
    starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
    w = torch.stack([stream[s : s + cfg.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
    return w[:, :-1], w[:, 1:]
