"""Proxy data for router tuning, as in the FlexOlmo paper (section 3.3.3): public documents
that resemble each owner's domain, picked by a small classifier the owner trains at home.

    clf = DomainClassifier.train(own_docs, public_docs, vocab_size)   # on the owner's machine
    clf.save(package_folder / CLASSIFIER_FILE)                          # ships with the expert
    pick = pick_proxy(clf, public_docs, n=64)                           # at the router tuner

The classifier is multinomial naive Bayes over token ids: two smoothed unigram
distributions, the owner's training documents and public training documents. A document's
score is the mean over its tokens of log p_own(t) - log p_public(t), so long and short
documents compare fairly (a logistic regression on bags of tokens, tried first, separated
the domains perfectly by document length and format and then picked odd public documents).
What leaves the owner is one log-ratio per token id: a contrast of token frequencies between
its data and public data, no text. The router tuner applies each owner's classifier to the
public pool and takes the highest-scoring public documents as that domain's proxy set, so no
owner's text is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flexolmo.base.errors import InputError, IntegrityError

CLASSIFIER_FILE = "domain_classifier.safetensors"


def _counts(docs: Sequence[np.ndarray], vocab_size: int) -> np.ndarray:
    total = np.zeros(vocab_size, dtype=np.float64)
    for d in docs:
        ids = np.asarray(d, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise InputError(f"token ids must be in [0, {vocab_size}); got {int(ids.min())}..{int(ids.max())}")
        total += np.bincount(ids, minlength=vocab_size)
    return total


@dataclass
class DomainClassifier:
    log_ratio: torch.Tensor  # (V,) log p_own(t) - log p_public(t), add-alpha smoothed
    accuracy: float  # held-out accuracy at training time (own vs public, threshold 0)

    @classmethod
    def train(cls, own: Sequence[np.ndarray], public: Sequence[np.ndarray], vocab_size: int, *,
              alpha: float = 1.0, seed: int = 0) -> "DomainClassifier":
        """Fit on the owner's documents vs public documents; 10% of each held out for accuracy."""
        if len(own) < 2 or len(public) < 2:
            raise InputError("the domain classifier needs at least 2 own and 2 public documents")
        rng = np.random.default_rng(seed)
        held = {k: set(rng.permutation(len(d))[: max(1, len(d) // 10)].tolist()) for k, d in (("own", own), ("pub", public))}
        fit_own = [d for i, d in enumerate(own) if i not in held["own"]]
        fit_pub = [d for i, d in enumerate(public) if i not in held["pub"]]
        c_own, c_pub = _counts(fit_own, vocab_size) + alpha, _counts(fit_pub, vocab_size) + alpha
        clf = cls(torch.from_numpy(np.log(c_own / c_own.sum()) - np.log(c_pub / c_pub.sum())).float(), 0.0)
        s_own = clf.scores([own[i] for i in sorted(held["own"])])
        s_pub = clf.scores([public[i] for i in sorted(held["pub"])])
        clf.accuracy = float(((s_own > 0).float().mean() + (s_pub <= 0).float().mean()) / 2)
        return clf

    @classmethod
    def train_dp(cls, own_windows: torch.Tensor, public: Sequence[np.ndarray], vocab_size: int, *, sigma: float,
                 g: torch.Generator, clip: float | None = None, alpha: float = 1.0) -> tuple["DomainClassifier", float]:
        """Fit from noisy clipped counts of the owner's windows (N, T) vs public documents;
        returns the classifier and the clip C_c used."""
        if len(own_windows) < 1 or len(public) < 2:
            raise InputError("the domain classifier needs at least 1 own window and 2 public documents")
        clip = float(clip if clip is not None else own_windows.size(1) ** 0.5)
        total = torch.zeros(vocab_size, dtype=torch.float64)
        for b in range(0, len(own_windows), 256):
            w = own_windows[b : b + 256].long()
            if w.numel() and (w.min() < 0 or w.max() >= vocab_size):
                raise InputError(f"token ids must be in [0, {vocab_size})")
            c = torch.zeros(len(w), vocab_size, dtype=torch.float64).scatter_add_(1, w, torch.ones_like(w, dtype=torch.float64))
            total += (c * (clip / c.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None]).sum(0)
        noise = torch.randn(vocab_size, generator=g, dtype=torch.float64) * (sigma * clip)
        c_own = (total + noise).clamp_min(0).numpy() + alpha
        c_pub = _counts(public, vocab_size) + alpha
        lr = torch.from_numpy(np.log(c_own / c_own.sum()) - np.log(c_pub / c_pub.sum())).float()
        return cls(lr, float("nan")), clip

    def scores(self, docs: Sequence[np.ndarray]) -> torch.Tensor:
        """Mean per-token log-likelihood ratio (own vs public) of each document."""
        lr = self.log_ratio.numpy()
        return torch.tensor([float(lr[np.asarray(d, dtype=np.int64)].mean()) if len(d) else 0.0 for d in docs])

    def save(self, path: Path) -> None:
        save_file({"log_ratio": self.log_ratio.contiguous(), "accuracy": torch.tensor([self.accuracy])}, str(path))

    @classmethod
    def load(cls, path: Path) -> "DomainClassifier":
        try:
            t = load_file(str(path))
            return cls(log_ratio=t["log_ratio"], accuracy=float(t["accuracy"][0]))
        except Exception as e:  # safetensors raises several kinds; a missing key is a KeyError
            raise IntegrityError(f"{path} cannot be read as a domain classifier ({e}); ask the owner to resend it") from None


def pick_proxy(clf: DomainClassifier, public: Sequence[np.ndarray], n: int, exclude: set[int] = frozenset()) -> list[int]:
    """Indices of the `n` public documents the classifier finds most like its domain."""
    if n < 1:
        raise InputError(f"the proxy set needs at least 1 document per domain, got {n}")
    s = clf.scores(public)
    if exclude:
        s[list(exclude)] = float("-inf")
    return s.topk(min(n, len(public) - len(exclude))).indices.tolist()
