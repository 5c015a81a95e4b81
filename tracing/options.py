"""The options of a trace, defined once: the Tracer, the CLI and the API all take a `TraceOptions`.

    from tracing.options import TraceOptions
    opts = TraceOptions(counterfactual=False, max_docs=5)      # bad values raise InputError
    tracer = Tracer.open(ws, options=opts)
    tracer.generate_and_trace("The river", max_new_tokens=40)  # per-call overrides, validated too

The span and document fields are OLMoTrace's published production settings (DESIGN.md,
Tracing): change them only to experiment. The generation fields apply to
`Tracer.generate_and_trace`; `exclude`/`include` are read when the tracer loads the model.

It is a pydantic *dataclass*: validated on construction (and by `dataclasses.replace`, which
re-runs the constructor), usable as a FastAPI body or field, and `dataclasses.asdict` gives
the plain dict a stored trace keeps.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Optional, Tuple

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from flexolmo.base.errors import InputError

_NAME = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


@dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=False))
class TraceOptions:
    """Everything a caller may set about one trace, with OLMoTrace's values as defaults."""

    # -- spans (OLMoTrace: engine.attribute + the K lowest-unigram-probability spans)
    min_len: int = Field(1, ge=1, le=1000, description="Shortest span kept, in tokens.")
    max_cnt: int = Field(1_000_000, ge=1, description="Spans more frequent than this (over all sources) are dropped.")
    enforce_bow: bool = Field(True, description="Spans start and end at word boundaries.")
    span_density: float = Field(0.05, gt=0, le=1, description="Keep K = ceil(span_density * response tokens) spans.")
    # -- documents
    max_docs: int = Field(10, ge=0, le=100, description="Documents per span, sampled with `seed` when more.")
    context_tokens: int = Field(250, ge=0, le=2000, description="Context a side of the match in the long view.")
    snippet_tokens: int = Field(40, ge=1, le=500, description="Tokens of the short snippet around the match.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the document sample.")
    # -- experts
    counterfactual: bool = Field(True, description="Compute each expert's counterfactual drop (one batched pass).")
    exclude: Tuple[_NAME, ...] = Field((), description="Experts (source names) switched off for these traces.")
    include: Optional[Tuple[_NAME, ...]] = Field(None, description="Only these experts (plus public) stay on.")
    # -- generation (Tracer.generate_and_trace)
    max_new_tokens: int = Field(60, ge=1, le=4096, description="Tokens to generate.")
    do_sample: bool = Field(False, description="Sample (with temperature, top_p, generation_seed); else greedy.")
    temperature: float = Field(0.8, gt=0, le=10, description="Sampling temperature (with do_sample).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass (with do_sample).")
    generation_seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the sampled generation.")

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

    @classmethod
    def parse(cls, **values) -> "TraceOptions":
        """Build from keyword values; a bad value raises InputError naming the option and the rule."""
        try:
            return cls(**values)
        except ValidationError as e:
            raise InputError(explain(e)) from None

    def replace(self, **changes) -> "TraceOptions":
        """A copy with `changes` applied (None values ignored), validated: bad values raise InputError."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return self.parse(**{**dataclasses.asdict(self), **changes})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def explain(e: ValidationError) -> str:
    """One readable line per problem: 'max_docs: Input should be less than or equal to 100 (got 500)'."""
    lines = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "options"
        got = f" (got {err['input']!r})" if "input" in err and err["type"] not in ("value_error",) else ""
        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}{got}")
    return "invalid trace options: " + "; ".join(lines)
