"""The verbatim guard: generation never emits more than N consecutive tokens found verbatim
in a guarded source (`flexolmo sources set S --max-verbatim N`).

    guard = VerbatimGuard.open(ws)                    # every source with a limit; None if none
    r = generate(model, tok, prompt, guard=guard)     # r.guard: where it acted

For each guarded source and each sequence, an `index.search.IncrementalMatch` keeps the
longest run of generated tokens, ending at the last one, that occurs in the source: one
suffix-array range per shard, narrowed by one token per step (no re-search, except for the
longest shorter suffix when a run breaks). Before each token is sampled, wherever a run has
reached N, the tokens that would extend it (read off its suffix-array range) are vetoed:
their logits become -inf, so the sampler takes the next candidate (greedy: the next most
likely token; sampling: the same distribution as resampling until a token passes). The
guard runs before temperature, top-k and top-p, so the candidate set is re-formed without
the vetoed tokens. Only generated tokens count: a run may not reach into the prompt.

Fail closed: a guarded source whose index is not built here (or is held by a remote owner
node) refuses generation rather than letting it run unguarded, and so does a model with a
tokenizer of its own (`--model`): the guard matches the index tokenizer's ids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessor

from flexolmo.base.errors import ConflictError, NotFoundError
from flexolmo.base.workspace import Workspace


@dataclass
class GuardEvent:
    """One place the guard acted: the choice of generated token `position` was restricted."""

    row: int  # sequence in the batch
    position: int  # index of the generated token (0 = the first generated token)
    source: str
    limit: int  # the source's max_verbatim: the run before this token was this long
    vetoed: list[int]  # token ids that would have extended the run past the limit
    vetoed_mass: float  # their probability under the model (before the guard)
    top_vetoed: bool  # the model's most likely token was among them

    def to_dict(self) -> dict:
        return asdict(self)


class GuardedSource:
    """A source's search shards and its limit (opened once, shared by generations)."""

    def __init__(self, name: str, shards, limit: int):
        self.name, self.shards, self.limit = name, shards, limit


def open_shards(ws: Workspace, name: str):
    """The search shards of source `name`'s local index (`index.search.Shards`)."""
    from index.source import open_search

    try:
        return open_search(ws, name)
    except NotFoundError as e:
        raise ConflictError(str(e)) from None


def guarded_sources(ws: Workspace) -> list[GuardedSource]:
    """Every source with a `max_verbatim` limit, its local index opened for the guard."""
    from flexolmo.base import sources as src_lib
    from index.source import open_search

    out = []
    for s in src_lib.list_sources(ws):
        if s.max_verbatim is None:
            continue
        try:
            shards = open_search(ws, s.name)
        except (NotFoundError, ConflictError) as e:
            why = "no index here" if isinstance(e, NotFoundError) else f"its index is not usable ({e})"
            raise ConflictError(f"source {s.name!r} has --max-verbatim {s.max_verbatim} but {why}, so the "
                                f"guard cannot check it; run `flexolmo index build --source {s.name}` (or remove the "
                                f"limit with `flexolmo sources set {s.name} --max-verbatim none`)") from None
        out.append(GuardedSource(s.name, shards, s.max_verbatim))
    return out


class VerbatimGuard(LogitsProcessor):
    """A transformers logits processor; one instance per `generate` call (it keeps state)."""

    def __init__(self, sources: list[GuardedSource]):
        self.sources = sources
        self.events: list[GuardEvent] = []
        self._prompt_len: int | None = None
        self._matches: list[list] = []  # [row][source] IncrementalMatch
        self._pushed: list[int] = []

    @classmethod
    def open(cls, ws: Workspace) -> "VerbatimGuard | None":
        """The guard for the workspace's limits; None when no source sets one."""
        srcs = guarded_sources(ws)
        return cls(srcs) if srcs else None

    def require_index_tokenizer(self, model_tokenizer) -> None:
        """Refuse a model with a tokenizer of its own (`model_tokenizer` not None): the guard matches
        runs of the *index* tokenizer's ids as they are generated, which such a model never emits,
        so its generation cannot be guarded (tracing its text afterwards is not refused)."""
        if model_tokenizer is not None:
            raise ConflictError("sources " + ", ".join(g.name for g in self.sources) + " set --max-verbatim, which "
                                "the verbatim guard enforces on the index tokenizer's ids; this model has a tokenizer "
                                "of its own, so its generation cannot be guarded and is refused (trace pasted text "
                                "with `flexolmo trace --text` instead, or lift the limits)")

    def fresh(self) -> "VerbatimGuard":
        """A new guard over the same opened sources (for another generation)."""
        return VerbatimGuard(self.sources)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from index.search import IncrementalMatch

        B, T = input_ids.shape
        if self._prompt_len is None:
            self._prompt_len = T
            self._matches = [[IncrementalMatch(s.shards) for s in self.sources] for _ in range(B)]
            self._pushed = [0] * B
        probs = None
        for b in range(B):
            new = input_ids[b, self._prompt_len + self._pushed[b]:].tolist()
            for tok in new:
                for m in self._matches[b]:
                    m.push(int(tok))
            self._pushed[b] += len(new)
            for src, m in zip(self.sources, self._matches[b]):
                if m.length < src.limit:
                    continue
                veto = sorted(t for t in m.next_tokens(src.limit) if t < scores.size(1))
                if not veto:
                    continue
                if probs is None:
                    probs = torch.softmax(scores.float(), dim=-1)
                self.events.append(GuardEvent(b, self._pushed[b], src.name, src.limit, veto,
                                              round(float(probs[b, veto].sum()), 6), int(scores[b].argmax()) in veto))
                scores[b, veto] = float("-inf")
        return scores

    def record(self, row: int = 0) -> list[dict]:
        """The events of one sequence, as stored in generation results and traces."""
        return [e.to_dict() for e in self.events if e.row == row]


def longest_run(sources_or_shards, ids: list[int]) -> int:
    """The longest run of consecutive `ids` found verbatim in the shards (one pass, incremental)."""
    from index.search import IncrementalMatch

    m = IncrementalMatch(sources_or_shards)
    best = 0
    for t in ids:
        best = max(best, m.push(int(t)))
    return best
