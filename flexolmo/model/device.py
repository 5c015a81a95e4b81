"""Where a model runs and in which precision: one rule for the CLI, the API and the library.

    device = resolve_device("auto")        # cuda when a GPU is visible, else cpu
    dtype = resolve_dtype("bfloat16")

CPU and float32 are the defaults everywhere (`DEVICE`, `DTYPE`: every command, the API and the
library functions take theirs from here). bfloat16 is for GPUs (it runs on a CPU too, which
the tests use, but no faster than float32 there); float16 is not offered: the router softmax and
the counterfactual log-probability drops need bfloat16's range. Log-probabilities are always
computed in float32 from the model's logits, whatever the model's dtype.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from flexolmo.base.errors import InputError

from .specs import DEVICE, DTYPE  # noqa: F401 (the defaults, defined where torch is not needed)

DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["float32", "bfloat16"]
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str | torch.device | None = DEVICE) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' or 'auto' (cuda when available) as a `torch.device`.

    :raises InputError: an unknown name, or cuda asked for on a machine without a GPU
    """
    if isinstance(name, torch.device):
        return name
    name = (name or DEVICE).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA GPU is visible to torch on this machine "
                             "(use --device cpu, or --device auto to pick the GPU only when there is one)")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
        return dev
    raise InputError(f"--device {name!r} is not a device; use one of {', '.join(DEVICES)} (or cuda:N)")


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """'float32' or 'bfloat16' as a torch dtype; None: the default (`DTYPE`)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise InputError(f"dtype {name} is not supported; use one of {', '.join(DTYPES)}")
        return name
    key = (name or DTYPE).strip().lower()
    if key not in DTYPES:
        raise InputError(f"--dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def model_device(module: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (inputs must be put there); the CPU for a module without any."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward pass's precision: bfloat16 autocast on `device` (weights stay float32, the
    master copy the optimizer updates), or nothing for float32 (bit for bit as without it)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
