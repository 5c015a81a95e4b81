"""The options of a trace, defined once: the Tracer, the CLI and the API all take a `TraceOptions`.

    from tracing.options import TraceOptions
    opts = TraceOptions.parse(counterfactual=False, max_docs=5)   # bad values raise InputError
    tracer = Tracer.open(ws, options=opts)                       # the defaults of its calls
    tracer.trace(text, options=TraceOptions(max_docs=2))         # per call: set fields win

The span and document fields are OLMoTrace's published production settings (docs/architecture.md,
Tracing): change them only to experiment. The document window (`max_docs`, `context_tokens`,
`snippet_tokens`) is `index.options.DocumentWindow`'s, with its defaults and limits, which are
also the owner-node protocol's. `exclude`/`include` switch experts off: in the options given to
`Tracer.open` they apply when the model loads, in a call's options to that call on top.
A generation's own options (length, sampling, its seed) are `GenerationOptions`
(flexolmo/model/generate.py), shared by `flexolmo generate`, `trace --generate` and
`/api/generate`.

A value is immutable (`flexolmo.base.options.Options`): a call never changes the tracer's
settings; `service.merged(request)` takes the fields a request set over the service's.
"""

from __future__ import annotations

from typing import Annotated, Optional, Tuple

from pydantic import Field, field_validator, model_validator

from index.options import DocumentWindow

_NAME = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class TraceOptions(DocumentWindow):
    """Everything a caller may set about one trace, with OLMoTrace's values as defaults."""

    WHAT = "trace options"

    # -- spans (OLMoTrace: engine.attribute + the K lowest-unigram-probability spans)
    min_len: int = Field(1, ge=1, le=1000, description="Shortest span kept, in tokens.")
    max_cnt: int = Field(1_000_000, ge=1, description="Spans more frequent than this (over all sources) are dropped.")
    enforce_bow: bool = Field(True, description="Spans start and end at word boundaries.")
    span_density: float = Field(0.05, gt=0, le=1, description="Keep K = ceil(span_density * response tokens) spans.")
    # -- documents: max_docs, context_tokens and snippet_tokens from DocumentWindow, and
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the document sample.")
    # -- experts
    link_experts: bool = Field(True, description="Link each span to the experts (routing share, and the counterfactual "
                                                 "drops if asked); false: spans and documents only, no model pass.")
    counterfactual: bool = Field(True, description="Compute each expert's counterfactual drop (one batched pass).")
    exclude: Tuple[_NAME, ...] = Field((), description="Experts (source names) switched off, e.g. 'news,forum'.")
    include: Optional[Tuple[_NAME, ...]] = Field(None, description="Only these experts (plus public) stay on, e.g. 'news'.")

    @field_validator("exclude", "include", mode="before")
    @classmethod
    def _names(cls, v):
        """'news,forum' or ['news', 'forum']: a tuple of distinct, non-empty names."""
        if v is None:
            return v
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        v = tuple(v)
        if len(set(v)) != len(v):
            raise ValueError(f"names a source twice: {', '.join(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.include is not None and set(self.exclude) & set(self.include):
            both = ", ".join(sorted(set(self.exclude) & set(self.include)))
            raise ValueError(f"{both} is both excluded and included; name each source in one of them")
        return self
