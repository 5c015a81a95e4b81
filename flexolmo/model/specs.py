"""The model layer's defaults and options that need no torch: the default device and dtype,
`GenerationOptions`.

    gen = GenerationOptions(max_new_tokens=60)   # used by flexolmo.model.generate

They live apart from the modules that use them so that a process that only reads them (a
batch's spec, `ModelSpec`, a spans-only tracer) does not import torch.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from flexolmo.base.options import Options

DEVICE = "cpu"  # the default device
DTYPE = "float32"  # the default dtype


MAX_NEW_TOKENS = 4096  # the schema's limit everywhere; a service caps lower by its time budget (api/deps.py)


class GenerationOptions(Options):
    """How a response is generated: one set of names, defaults and limits for `flexolmo generate`,
    `flexolmo trace --generate` and `POST /api/generate`."""

    WHAT = "generation options"

    max_new_tokens: int = Field(60, ge=1, le=MAX_NEW_TOKENS, description="Tokens to generate.")
    do_sample: bool = Field(False, description="Sample (with temperature, top_p, top_k and seed); else greedy.")
    temperature: float = Field(0.8, gt=0, le=10, description="Sampling temperature (when sampling).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass (when sampling).")
    top_k: Optional[int] = Field(None, ge=1, le=100_000, description="Sample among the k most likely tokens only "
                                                                      "(None: transformers' default, 50).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the sampled generation (greedy ignores it).")
