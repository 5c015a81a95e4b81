"""Request and response bodies of the API.

Trace shapes are not repeated here: the routes answer with the dataclasses of
`tracing/models.py` (FastAPI validates and documents dataclasses as it does pydantic
models). This file holds what only the API needs: request bodies and a few envelopes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, Field


class TraceRequest(BaseModel):
    text: str = Field(description="The response to trace.", max_length=100_000)
    prompt: str | None = Field(None, description="The prompt it answered (used for relevance).", max_length=100_000)


class GenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=100_000)
    max_new_tokens: int = Field(60, ge=1, le=1024)


class QueryRequest(BaseModel):
    sql: str = Field(description="Read-only SQL over traces, spans, span_sources, span_documents, span_experts.")
    limit: int = Field(1000, ge=1, le=100_000)


class QueryResponse(BaseModel):
    columns: list[str]
    rows: list[list[Any]]


class StoredTrace(BaseModel):
    """A stored trace: its rows in each provenance table."""

    trace_id: str
    tables: dict[str, QueryResponse]


class SourceOut(BaseModel):
    """One source of the catalog with its policy (`flexolmo.sources.Source`)."""

    name: str
    owner: str
    domain: str
    licence: str
    visibility: str
    active: bool
    available: bool  # active and not expired: searched and routed
    expires: dt.date | None
    n_docs_train: int
    n_docs_valid: int
    n_synthetic: int
    updated_at: dt.datetime
    updated_by: str


class PolicyUpdate(BaseModel):
    """Fields to change; omitted fields stay as they are."""

    active: bool | None = None
    visibility: Literal["full", "snippets", "counts"] | None = None
    expires: str | None = Field(None, description="YYYY-MM-DD, or 'never' to clear the expiry date.")
    by: str | None = Field(None, description="Who made the change (logged).")


class TakedownRequest(BaseModel):
    doc_id: str = Field(min_length=1)
    reason: str = Field(min_length=1)
    by: str | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    workspace: str
    tracer_open: bool
    error: str | None
    sources_searched: list[str]
    sources_skipped: dict[str, str]
    model: str | None
