"""Request and response bodies of the API.

Trace shapes are not repeated here: the routes answer with the dataclasses of
`tracing/results.py` (FastAPI validates and documents dataclasses as it does pydantic
models). Options are not repeated either: a request's `options` is the library's `TraceOptions`
(tracing/options.py) and its `generation` a `GenerationOptions` (flexolmo/model/generate.py),
the models `flexolmo trace` and `flexolmo generate` build from their flags. This file holds what
only the API needs: request bodies and a few envelopes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field

from flexolmo.base.source_schema import PolicyChange, source_model
from flexolmo.model.generate import GenerationOptions
from index.query import DOCS_PER_SOURCE, MAX_DOCS
from tracing.options import TraceOptions

# Hard limits of the schema; the service's budgets set lower caps (api/deps.py Settings).
TEXT_MAX = 200_000


def _unicode(value: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which is not text: refuse it clearly."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (U+{ord(value[e.start]):04X} at character {e.start}), "
                         "which is not valid Unicode; send UTF-8 text") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]


class TraceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt or misplaced option is refused, not ignored

    text: Text = Field(description="The response to trace.", max_length=TEXT_MAX)
    prompt: Text | None = Field(None, description="The prompt it answered (used for relevance).", max_length=TEXT_MAX)
    options: TraceOptions | None = Field(None, description="The trace's options, as `flexolmo trace` takes them "
                                                           "(tracing/options.py); the fields set override the service's.")
    store: bool = Field(True, description="Keep the trace in the provenance store, readable by its maker; false keeps nothing.")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(min_length=1, max_length=TEXT_MAX)
    generation: GenerationOptions | None = Field(None, description="Length, sampling and seed, as `flexolmo generate` "
                                                                   "and `flexolmo trace --generate` take them.")
    options: TraceOptions | None = Field(None, description="The trace's options (experts off, counterfactuals, ...); "
                                                           "the fields set override the service's.")
    store: bool = Field(True, description="Keep the trace in the provenance store, readable by its maker; false keeps nothing.")


class SearchRequest(BaseModel):
    """A phrase or `a OR b AND c` query (or the CNF as lists), as `flexolmo search` takes it."""

    query: Text | None = Field(None, max_length=2000, description="A phrase, or `a OR b AND c` (AND of ORs).")
    cnf: list[list[Text]] | None = Field(None, description="The same as lists: [[\"a\", \"b\"], [\"c\"]].")
    source: str | None = Field(None, max_length=40, description="Search this source only.")
    n_docs: int = Field(DOCS_PER_SOURCE, ge=0, le=MAX_DOCS, description="Documents per source (0: counts only).")
    seed: int = Field(0, ge=0, le=2**32 - 1)


class NextTokensRequest(BaseModel):
    phrase: Text = Field(min_length=1, max_length=2000, description="The phrase to continue.")
    source: str | None = Field(None, max_length=40)
    top: int = Field(20, ge=1, le=200)


class QueryRequest(BaseModel):
    sql: Text = Field(description="One read-only SQL statement over traces, spans, span_sources, span_documents, "
                                  "span_experts.", max_length=20_000)
    limit: int = Field(1000, ge=1, le=10_000)


class QueryResponse(BaseModel):
    columns: list[str]
    rows: list[list[Any]]


class StoredTrace(BaseModel):
    """A stored trace: its rows in each provenance table."""

    trace_id: str
    tables: dict[str, QueryResponse]


SourceOut = source_model("SourceOut", doc="One source of the catalog with its policy (`flexolmo.base.sources.Source`; "
                                         "fields and types: `flexolmo.base.source_schema`).")


class PolicyUpdate(PolicyChange):
    """Fields to change; omitted fields stay as they are, null sets "none" (no expiry date,
    no verbatim limit)."""

    comment: Text | None = Field(None, validation_alias=AliasChoices("comment", "by"), max_length=100,
                                 description="A note logged with the change (one printable line, at most 100 "
                                             "characters; `by` is accepted too). Who made the change is the key's "
                                             "owner, recorded in the policy log.")


class TakedownRequest(BaseModel):
    """Who takes the document down is the key's owner (a `by` field is ignored)."""

    doc_id: Text = Field(min_length=1, max_length=1000)
    reason: Text = Field(min_length=1, max_length=500)


class KeyOut(BaseModel):
    """An issued key as `flexolmo keys list` shows it: never the key, never its hash."""

    key_id: str
    owner: str
    scope: str
    created_at: str
    revoked: bool
    label: str


class KeyCreate(BaseModel):
    owner: Text = Field(min_length=1, max_length=200, description="The owner the key acts for (as in its sources' `owner`).")
    scope: Literal["owner", "index", "analyst"] = Field("owner", description="owner: a person acting as the owner; "
                                                                  "index: a tracer asking the owner's node; "
                                                                  "analyst: reads every stored trace.")
    label: Text = Field("", max_length=200, description="Who the key is for (shown in the list).")


class KeyIssued(KeyOut):
    key: str = Field(description="The key itself: shown this once, stored only hashed.")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    workspace: str
    tracer_open: bool
    error: str | None
    sources_searched: list[str]
    sources_skipped: dict[str, str]
    model: str | None
    queued: int = 0  # traces, generations and searches admitted and not finished in this process
    lanes: dict[str, dict[str, int]] = {}  # per tracer lane (index, model): stages running and waiting
    estimates: dict[str, dict[str, float]] = {}  # per stage kind: runs timed, seconds per 1,000 units (api/admission.py)
    admission: dict[str, float] = {}  # requests admitted, refused, answered, answered late (after their due), the worst lateness
    pid: int = 0  # this worker process (`serve --workers N` runs N)
    limits: dict[str, Any] = {}  # budgets (seconds) and input caps
