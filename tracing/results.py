"""The shapes of a trace, defined once: the CLI, the API and the provenance store all use them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class DocHit:
    """One training document that contains a span (or a count, where policy hides text)."""

    source: str
    doc_id: str | None  # None when the source's visibility is `counts`
    title: str | None
    shard: int
    doc_ix: int  # document number within the shard
    token_offset: int  # where the span starts in the document, in tokens
    blocked: bool  # taken down: no text ever leaves the service
    snippet: str | None  # about 40 tokens around the match (None: blocked or `counts`)
    snippet_span: tuple[int, int] | None  # character range of the match inside `snippet`
    context: str | None  # up to 250 tokens a side (None unless visibility is `full`)
    context_span: tuple[int, int] | None
    relevance: float = 0.0  # BM25 score against prompt + response
    relevance_norm: float = 0.0  # relevance / the query's BM25 bound (tracing/relevance.py)
    bucket: str = "low"  # high | medium | low
    repeats: int = 1  # hits of this span with this same text under other doc_ids, this one included
    repeat_of: int | None = None  # position of the first hit with the same text (None: this is the first)


@dataclass
class ExpertLink:
    """How one expert of the merged model relates to a span."""

    expert: int
    source: str  # the source whose owner trained this expert ('public' for expert 0)
    routing_share: float  # share of router weight over the span's tokens, layers and top-k slots
    # drop in the span's log-probability with this expert off; 0 for an expert already off;
    # None when not computed: counterfactuals off, the last expert on (it cannot be switched
    # off), or an expert the router gave no weight on any kept span (skipped, tracing/experts.py)
    counterfactual: float | None
    active: bool  # False when the expert was switched off for this trace


@dataclass
class Span:
    """A maximal span of the response found verbatim in some source's training data."""

    index: int
    start: int  # token positions in the response, [start, end)
    end: int
    char_start: int
    char_end: int
    text: str
    count: int  # occurrences over every searched source
    count_by_source: dict[str, int]
    unigram_logprob_sum: float
    group: int  # index of the top-level group of overlapping spans this span belongs to
    documents: list[DocHit] = field(default_factory=list)
    experts: list[ExpertLink] = field(default_factory=list)
    top_expert: int | None = None  # by the signal `top_expert_by` names
    top_expert_by: str | None = None  # "counterfactual" (argmax of the drop, when computed) | "routing"
    top_by_routing: int | None = None  # argmax of the routing share
    top_by_counterfactual: int | None = None  # argmax of the drop over switched-on experts (None: not computed)
    agreement: bool | None = None  # top expert's source is among the sources containing the span

    @property
    def sources(self) -> list[str]:
        return [s for s, n in self.count_by_source.items() if n > 0]


@dataclass
class SpanGroup:
    """A top-level span: the union of kept spans that overlap, with the spans nested in it."""

    index: int
    start: int
    end: int
    char_start: int
    char_end: int
    text: str
    spans: list[int]  # indices into Trace.spans


@dataclass
class Trace:
    """Everything found about one response."""

    trace_id: str
    created_at: str
    prompt: str | None
    response: str
    n_tokens: int
    generated: bool  # the response came from the model (routing captured) or was pasted
    model: str | None
    sources_searched: list[str]
    sources_skipped: dict[str, str]  # name -> why (inactive, expired, no index)
    experts_off: list[str]
    spans: list[Span]
    groups: list[SpanGroup]
    timings_ms: dict[str, float]
    settings: dict

    def to_dict(self) -> dict:
        d = asdict(self)
        for s, span in zip(d["spans"], self.spans):
            s["sources"] = span.sources
        return d
