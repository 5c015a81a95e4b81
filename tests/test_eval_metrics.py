"""The evaluation's measures against hand computations on a few tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flexolmo.base.errors import InputError
from flexolmo.evaluation.metrics import btm_mixture, score, stream_windows, window_logprobs


class Bigram(torch.nn.Module):
    """A model whose next-token distribution is a fixed table row of the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # (V, V) probabilities
        self.config = type("C", (), {"num_experts": 1})()

    def forward(self, input_ids, use_cache=False):
        return type("O", (), {"logits": torch.log(self.table[input_ids])})()


def test_window_logprobs_and_perplexity_by_hand():
    table = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    windows = torch.tensor([[0, 1, 1, 2], [2, 0, 0, 1]])
    lp = window_logprobs(Bigram(table), windows, batch_size=1)
    want = torch.log(torch.tensor([[0.25, 0.8, 0.1], [1 / 3, 0.5, 0.25]], dtype=torch.float64))
    assert torch.allclose(lp, want, atol=1e-6)
    s = score(lp, target_bytes=12)
    nll = -float(want.sum()) / 6
    assert s.tokens == 6
    assert s.nll == pytest.approx(nll)
    assert s.ppl == pytest.approx(math.exp(nll))
    assert s.bpb == pytest.approx(nll * 6 / math.log(2) / 12)


def test_stream_windows_cover_the_stream_without_overlap():
    ids = np.arange(11)
    w = stream_windows(ids, seq_len=3, max_tokens=100)
    assert w.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert stream_windows(ids, seq_len=3, max_tokens=6).tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]  # spread out
    assert stream_windows(ids, seq_len=3, max_tokens=6, spread=False).tolist() == [[0, 1, 2, 3], [3, 4, 5, 6]]
    long = stream_windows(np.arange(1001), seq_len=10, max_tokens=50)
    assert long[:, 0].tolist() == [0, 250, 500, 740, 990]  # evenly over the stream, last window included
    with pytest.raises(InputError):
        stream_windows(ids, seq_len=0, max_tokens=10)


def test_btm_weights_follow_the_prefix_likelihood():
    a = torch.log(torch.tensor([[0.9, 0.9, 0.9]], dtype=torch.float64))
    b = torch.log(torch.tensor([[0.1, 0.1, 0.5]], dtype=torch.float64))
    mix = btm_mixture([a, b], top_k=2).exp()
    # t=0: uniform prior; t=1: weights ∝ (0.9, 0.1); t=2: ∝ (0.81, 0.01)
    assert mix[0, 0].item() == pytest.approx(0.5 * 0.9 + 0.5 * 0.1)
    assert mix[0, 1].item() == pytest.approx(0.9 * 0.9 + 0.1 * 0.1)
    assert mix[0, 2].item() == pytest.approx((0.81 * 0.9 + 0.01 * 0.5) / 0.82)
    # top-1 keeps only the member with the likelier prefix
    top1 = btm_mixture([a, b], top_k=1).exp()
    assert top1[0, 2].item() == pytest.approx(0.9)
