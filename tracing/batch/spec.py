"""What defines a batch: its mode, trace options, model and limits; and the batch id.

A batch's id is a hash of its input file's bytes and of this spec: running the same command
on the same file again finds the same batch and resumes it; changing an option that changes
results (or the file) starts another batch. How the work runs (engine, workers, chunk size)
is not part of the spec: a batch started on the local pool may be finished on Ray.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, Optional, Tuple

from pydantic import Field

from flexolmo.base.options import Options
from flexolmo.model.specs import GenerationOptions

from ..options import TraceOptions

MAX_CHARS = 200_000  # a row's text (response, prompt or benchmark item) longer than this is a bad row


class BatchSpec(Options):
    """Everything about a batch that decides its results."""

    WHAT = "batch options"

    mode: Literal["trace", "generate", "contamination"] = Field(
        "trace", description="trace the `text` column; generate a response to the `prompt` column and trace it; "
                             "or find benchmark items' longest verbatim match per source (no model).")
    options: TraceOptions = Field(default_factory=TraceOptions, description="The trace options, as `flexolmo trace`.")
    generation: GenerationOptions = Field(default_factory=GenerationOptions, description="With mode generate.")
    use_model: bool = Field(True, description="False: spans and documents only (no routing, no counterfactuals).")
    model_path: Optional[str] = Field(None, description="A model folder (None: the workspace's merged model, if built).")
    experts: Optional[Tuple[str, ...]] = Field(None, description="A FlexOlmo model's expert names in order.")
    device: str = "cpu"
    dtype: str = "float32"
    max_chars: int = Field(MAX_CHARS, ge=1, le=10_000_000, description="Longer rows are reported as bad rows.")
    question_field: str = Field("question", min_length=1, max_length=200,
                                description="Contamination: the item's question column.")
    answer_field: Optional[str] = Field("answer", min_length=1, max_length=200,
                                        description="Contamination: the item's answer column (None: none).")
    min_match: int = Field(8, ge=1, le=10_000, description="Contamination: items whose longest match in some "
                                                          "source has at least this many tokens are flagged.")

    def model_spec(self):
        """The `ModelSpec` the tracer opens (None: no model)."""
        from flexolmo.model.loading import ModelSpec

        if not self.use_model or self.mode == "contamination":
            return None
        return ModelSpec(path=Path(self.model_path) if self.model_path else None, experts=self.experts,
                         device=self.device, dtype=self.dtype)

    @property
    def tables(self) -> tuple[str, ...]:
        """The result tables of this mode; the first has one row per input row."""
        from .tables import CONTAMINATION_TABLES, TRACE_TABLES

        return CONTAMINATION_TABLES if self.mode == "contamination" else TRACE_TABLES


def batch_id(input_digest: str, spec: BatchSpec) -> str:
    """'b' + 12 hex digits of sha256(the input's bytes' digest, the spec)."""
    h = hashlib.sha256(input_digest.encode() + b"\0" + spec.model_dump_json().encode())
    return "b" + h.hexdigest()[:12]
