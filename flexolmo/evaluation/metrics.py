"""What the evaluation measures: held-out perplexity and bits per byte per domain, routing
statistics, and the BTM ensemble's mixture of per-model log-probabilities.

Every domain is read from its source's *validation* split (about 2% of documents, chosen
by a hash of the doc_id, never trained on and never indexed). A domain's text becomes one
id stream (each document followed by the end-of-text token) cut into non-overlapping
windows of `seq_len + 1` tokens; every token after the first of a window is predicted from
the tokens before it in the window. Where the split holds more windows than the budget, the
windows measured are spread evenly over the whole stream: documents are stored in doc_id order,
so the first windows alone would measure one corner of a source (the first files of the code,
the first origin of the mixed public source).

    val = validation_set(ws, ["public", "news"], seq_len=256, max_tokens=16_384)
    lp = window_logprobs(model, val.windows["news"])           # (n, seq_len)
    score(lp, val.target_bytes["news"])                        # ppl, bits per byte

Bits per byte divide the summed negative log-likelihood (in bits) by the UTF-8 bytes of the
predicted tokens, so models with other tokenizers could be compared; perplexity is per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from flexolmo.base.errors import InputError
from flexolmo.model.device import model_device
from flexolmo.model.moe import as_module


@dataclass(frozen=True)
class ValidationSet:
    windows: dict[str, torch.Tensor]  # domain -> (n, seq_len + 1) long ids
    target_bytes: dict[str, int]  # domain -> UTF-8 bytes of the predicted tokens (columns 1..)
    seq_len: int

    @property
    def domains(self) -> list[str]:
        return list(self.windows)


@dataclass(frozen=True)
class Score:
    nll: float  # mean negative log-likelihood per token, nats
    ppl: float
    bpb: float  # bits per UTF-8 byte
    tokens: int


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes of every token id of a byte-level BPE (special tokens count 0): each
    character of a byte-level piece stands for exactly one byte."""
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    out = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for piece, i in vocab.items():
        out[i] = len(piece)
    out[list(tokenizer.get_added_tokens_decoder())] = 0
    return out


def stream_windows(ids: np.ndarray, seq_len: int, max_tokens: int, spread: bool = True) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len + 1) of an id stream, at most `max_tokens` predicted
    tokens in all. The stream is cut into consecutive windows (neighbours share their boundary
    token); when there are more than the budget allows, `spread` keeps windows evenly spaced
    over the whole stream, first and last included, and otherwise the first ones."""
    if seq_len < 1:
        raise InputError(f"seq_len must be at least 1, got {seq_len}")
    total = max(0, (len(ids) - 1) // seq_len)
    n = min(total, max(1, max_tokens // seq_len))
    if n == 0:
        return torch.zeros((0, seq_len + 1), dtype=torch.long)
    starts = np.linspace(0, total - 1, n).round().astype(np.int64) if spread else np.arange(n)
    t = torch.as_tensor(np.asarray(ids[: total * seq_len + 1], dtype=np.int64))
    return torch.stack([t[i * seq_len: (i + 1) * seq_len + 1] for i in starts.tolist()])


def validation_set(ws, sources: list[str], seq_len: int, max_tokens: int, max_bytes: int | None = None) -> ValidationSet:
    """Validation windows of every source (its validation split only): at most `max_tokens`
    predicted tokens spread over the split, or with `max_bytes`, the tokens of the first
    `max_bytes` bytes of text instead (the same text whatever the tokenizer: compare bits per
    byte across tokenizers this way; a token count covers more text where tokens are longer)."""
    from flexolmo.base.tokenizer import load_raw_tokenizer, tokenizer_info
    from flexolmo.base.tokens import source_tokens

    eos = tokenizer_info(ws).eos_id
    nbytes = token_byte_lengths(load_raw_tokenizer(ws))
    windows, target_bytes = {}, {}
    for s in sources:
        toks = source_tokens(ws, s, "validation")
        if toks.n_docs == 0:
            raise InputError(f"source {s!r} has no validation documents; it cannot be evaluated")
        stream = np.insert(np.asarray(toks.ids, dtype=np.int64), toks.offsets[1:], eos)
        budget = max_tokens
        if max_bytes is not None:  # predicted tokens whose text ends within the first max_bytes bytes
            budget = int(np.searchsorted(np.cumsum(nbytes[stream[1:]]), max_bytes, side="right"))
            if budget < seq_len:
                raise InputError(f"{max_bytes} bytes of {s!r} hold {budget} tokens, less than one window of {seq_len}: "
                                 "give a larger --bytes-per-domain")
        w = stream_windows(stream, seq_len, budget, spread=max_bytes is None)  # bytes: the text's start
        if len(w) == 0:
            raise InputError(f"source {s!r} has only {len(stream)} validation tokens, fewer than seq_len={seq_len}")
        windows[s] = w
        target_bytes[s] = int(nbytes[w[:, 1:].numpy()].sum())
    return ValidationSet(windows, target_bytes, seq_len)


@torch.no_grad()
def window_logprobs(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """log p(w[t] | w[:t]) for t = 1..T of every window: (n, T) float64 on the CPU (the passes
    run on the model's device; log-probs in float32 from the logits, whatever the autocast)."""
    model.eval()
    device = model_device(as_module(model))
    out = []
    for b in range(0, len(windows), batch_size):
        w = windows[b: b + batch_size].to(device)
        logits = model(input_ids=w[:, :-1], use_cache=False).logits.float()
        lp = torch.log_softmax(logits, dim=-1).gather(2, w[:, 1:, None])[..., 0]
        out.append(lp.double().cpu())
    return torch.cat(out) if out else torch.zeros((0, windows.shape[1] - 1), dtype=torch.float64)


def score(logprobs: torch.Tensor, target_bytes: int) -> Score:
    """Perplexity and bits per byte of a (n, T) log-prob table."""
    n = logprobs.numel()
    if n == 0:
        raise InputError("no tokens to score")
    total = -float(logprobs.sum())
    return Score(nll=total / n, ppl=math.exp(total / n), bpb=total / math.log(2) / max(1, target_bytes), tokens=n)


def btm_mixture(logprobs: list[torch.Tensor], top_k: int = 2) -> torch.Tensor:
    """BTM's ensemble (Li et al. 2022): at each position the members' next-token
    probabilities are mixed with weights from the domain posterior given the window's
    prefix, p(member | x_<t) ∝ p(x_<t | member) (uniform prior), keeping the top_k members.

    :param logprobs: one (n, T) table per member, as from `window_logprobs`
    :returns: the ensemble's (n, T) log-probabilities
    """
    if not logprobs:
        raise InputError("BTM needs at least one member")
    lp = torch.stack(logprobs)  # (M, n, T)
    M = lp.shape[0]
    k = max(1, min(top_k, M))
    prefix = torch.cumsum(lp, dim=2) - lp  # log p(x_<t) per member: (M, n, T), 0 at t = 0
    top = prefix.topk(k, dim=0)
    w = torch.log_softmax(top.values, dim=0)  # (k, n, T) log weights among the top_k
    chosen = lp.gather(0, top.indices)
    return torch.logsumexp(w + chosen, dim=0)


@torch.no_grad()
def routing_stats(model, windows: torch.Tensor, batch_size: int = 8) -> tuple[np.ndarray, float]:
    """(share of top-k selections per expert over all layers and tokens, fraction of
    (token, layer) router decisions with expert 0, the public expert, among the top-k)."""
    from flexolmo.model.generate import RoutingCapture

    model.eval()
    device = model_device(as_module(model))
    E = model.config.num_experts
    counts = np.zeros(E, dtype=np.int64)
    with_public, decisions = 0, 0
    for b in range(0, len(windows), batch_size):
        with RoutingCapture(model) as cap:
            model(input_ids=windows[b: b + batch_size, :-1].to(device), use_cache=False)
        idx = cap.stacked()[0].cpu()  # (N, L, k)
        counts += np.bincount(idx.reshape(-1).numpy(), minlength=E)
        with_public += int((idx == 0).any(dim=-1).sum())
        decisions += idx.shape[0] * idx.shape[1]
    total = counts.sum() or 1
    return counts / total, with_public / max(1, decisions)
