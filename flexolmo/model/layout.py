"""The fused-expert layout, in one place: where expert e lives inside a FlexOlmo model.

transformers stores every layer's experts fused, with the expert index first:

    layers[i].mlp.experts.gate_up_proj   (E, 2I, H)
    layers[i].mlp.experts.down_proj      (E, H, I)
    layers[i].mlp.gate.weight            (E, H)      router rows
    layers[i].mlp.gate.bias              (E,)        our FlexRouter's bias (flexolmo/model/moe.py)

Expert e's *slice* is row e of each, stacked over the L layers:

    gate_up_proj (L, 2I, H), down_proj (L, H, I), router (L, H), bias (L,)

That is also the expert package's tensor format (flexolmo/model/artifacts/expert_package.py).
Everything else (embeddings, attention, norms, lm_head) is shared. The public model is
expert 0 plus the shared weights (`public_view`), hashed by `shared_weights_hash`.
"""

from __future__ import annotations

import copy
import hashlib

import torch

from flexolmo.model.moe import as_module, build_model

SLICE_KEYS = ("gate_up_proj", "down_proj", "router", "bias")


def _fused(layer) -> dict[str, torch.nn.Parameter]:
    """One layer's fused tensors by slice key; dimension 0 is the expert index."""
    return {
        "gate_up_proj": layer.mlp.experts.gate_up_proj,
        "down_proj": layer.mlp.experts.down_proj,
        "router": layer.mlp.gate.weight,
        "bias": layer.mlp.gate.bias,
    }


def fused_params(model) -> list[torch.nn.Parameter]:
    """Every fused tensor of every layer (expert index first)."""
    return [t for layer in as_module(model).model.layers for t in _fused(layer).values()]


def router_params(model) -> list[torch.nn.Parameter]:
    """Every layer's router weight (E, H) and bias (E,)."""
    return [t for layer in as_module(model).model.layers for k, t in _fused(layer).items() if k in ("router", "bias")]


def is_fused(name: str) -> bool:
    """Is this state-dict entry a fused tensor (expert index first)?"""
    return name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight", "mlp.gate.bias"))


def is_expert_tensor(name: str) -> bool:
    """An expert FFN tensor (not the router)."""
    return name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))


def slice_shapes(config) -> dict[str, tuple[int, ...]]:
    """The shape of one expert's slice for a model config."""
    L, H, I = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    return {"gate_up_proj": (L, 2 * I, H), "down_proj": (L, H, I), "router": (L, H), "bias": (L,)}


def get_slice(model, e: int) -> dict[str, torch.Tensor]:
    """Expert e's slice, stacked over layers (detached copies, on the CPU)."""
    layers = as_module(model).model.layers
    return {k: torch.stack([_fused(l)[k].detach()[e] for l in layers]).contiguous().cpu() for k in SLICE_KEYS}


@torch.no_grad()
def set_slice(model, e: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write expert e's slice (the `get_slice` format) into a model."""
    for i, layer in enumerate(as_module(model).model.layers):
        for k, t in _fused(layer).items():
            t[e].copy_(tensors[k][i])


@torch.no_grad()
def with_experts(public, num_experts: int, top_k: int):
    """A model of `num_experts` experts built from a public (1-expert) model: shared weights
    and slice 0 are the public model's; every other slice starts as a copy of slice 0 with
    bias 0 (callers overwrite what they train or merge)."""
    public = as_module(public)
    cfg = copy.deepcopy(public.config)
    cfg.num_experts, cfg.num_experts_per_tok = num_experts, min(top_k, num_experts)
    model = build_model(cfg)
    src = public.state_dict()
    for name, t in model.state_dict().items():
        if name.endswith("mlp.gate.bias"):
            t.zero_()
        elif is_fused(name):
            t.copy_(src[name][0:1].expand_as(t))
        else:
            t.copy_(src[name])
    return model


def public_view(model) -> dict[str, torch.Tensor]:
    """The public model's weights inside any FlexOlmo model: everything shared, plus slice 0
    of the fused expert tensors and router weights (the router bias is not part of it)."""
    out = {}
    for name, t in as_module(model).state_dict().items():
        if name.endswith("mlp.gate.bias"):
            continue
        out[name] = t[0:1] if is_fused(name) else t
    return out


def shared_weights_hash(model) -> str:
    """sha256 over the public model's weights (names, shapes, dtypes, bytes), in name order.

    Every expert package names the public model it was trained against by this hash (its
    `public_model` input); merge refuses packages whose hash differs from the public model's."""
    h = hashlib.sha256()
    for name, t in sorted(public_view(model).items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
