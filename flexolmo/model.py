"""The FlexOlmo model as this project uses it: transformers' `FlexOlmoForCausalLM` with a
router that adds a per-expert bias and can switch experts off.

Stock transformers' router (`FlexOlmoTopKRouter`) has no bias. Ours (`FlexRouter`, a
subclass, so transformers' output recorders still see it) computes

    logits = h @ W.T + bias + off        (N, E); off[e] = -inf for a switched-off expert
    probs  = softmax(logits)             over all experts, as stock
    top-k  of probs, k = min(top_k, number of switched-on experts)

and returns `(logits, topk_weights, topk_indices)` like the stock router, so a forward hook
on `layers[i].mlp.gate` sees the final decisions.

On disk a model folder is an ordinary Hugging Face checkpoint (`save_pretrained`, loadable
with `AutoModelForCausalLM.from_pretrained`) plus two sidecar files that only this project's
loader (`load_model`) applies:

    router_bias.safetensors   `bias` (num_layers, num_experts), every entry <= 0
    experts.json              expert index -> source name, top_k, public-model hash

A stock `from_pretrained` therefore runs the same model *without* the router bias (and
with every expert on): routing can differ where a bias is far below 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import FlexOlmoForCausalLM
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoTopKRouter

from .errors import InputError, IntegrityError, NotFoundError

BIAS_FILE = "router_bias.safetensors"
EXPERTS_FILE = "experts.json"


class FlexRouter(FlexOlmoTopKRouter):
    """Top-k router with a per-expert bias (<= 0, trained by owners) and an on/off mask."""

    def __init__(self, config):
        super().__init__(config)
        self.bias = nn.Parameter(torch.zeros(self.num_experts))
        # 0 for a switched-on expert, -inf for a switched-off one; not a parameter, not saved
        self.register_buffer("off", torch.zeros(self.num_experts), persistent=False)
        self.n_on = self.num_experts

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight) + self.bias + self.off  # (N, E)
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(probs, min(self.top_k, self.n_on), dim=-1)  # (N, k)
        if self.norm_topk_prob:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        return logits, top_value.to(logits.dtype), top_index

    def set_on(self, on: list[bool]) -> None:
        assert len(on) == self.num_experts and any(on)
        self.off.copy_(torch.tensor([0.0 if x else float("-inf") for x in on]))
        self.n_on = sum(bool(x) for x in on)


def routers(model) -> list[FlexRouter]:
    return [layer.mlp.gate for layer in model.model.layers]


def install_routers(model: FlexOlmoForCausalLM) -> FlexOlmoForCausalLM:
    """Replace each stock router by a `FlexRouter` that shares its weight (bias starts at 0)."""
    for layer in model.model.layers:
        old = layer.mlp.gate
        if isinstance(old, FlexRouter):
            continue
        new = FlexRouter(model.config)
        new.weight = old.weight
        new.to(device=old.weight.device)
        layer.mlp.gate = new
    return model


def build_model(hf_config, seed: int | None = None) -> FlexOlmoForCausalLM:
    """A freshly initialised model with `FlexRouter`s."""
    if seed is not None:
        torch.manual_seed(seed)
    model = FlexOlmoForCausalLM(hf_config)
    return install_routers(model)


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# expert names and switching experts on/off


def expert_names(model) -> list[str]:
    """Source name of each expert index (index 0 is the public model)."""
    names = getattr(model, "flexolmo_experts", None)
    return list(names) if names else ["public"] + [f"expert{i}" for i in range(1, model.config.num_experts)]


def active_experts(model) -> list[bool]:
    return [bool(x == 0) for x in routers(model)[0].off.tolist()]


def set_active(model, on: list[bool]) -> None:
    """Switch experts on/off in every layer (no retraining: their router logit becomes -inf)."""
    if not any(on):
        raise InputError("every expert is switched off; keep at least one (e.g. the public model)")
    for r in routers(model):
        r.set_on(on)


def resolve_experts(model, names: Iterable[str | int]) -> list[int]:
    """Expert indices for source names (or indices); unknown names are refused."""
    known = expert_names(model)
    out = []
    for n in names:
        if isinstance(n, int) or (isinstance(n, str) and n.isdigit()):
            i = int(n)
            if not 0 <= i < len(known):
                raise InputError(f"expert index {i} out of range 0..{len(known) - 1}")
            out.append(i)
        elif n in known:
            out.append(known.index(n))
        else:
            raise InputError(f"no expert for source {n!r} in this model (experts: {', '.join(known)})")
    return out


@contextlib.contextmanager
def experts_off(model, indices: Iterable[int]) -> Iterator[None]:
    """Temporarily switch off the given expert indices (on top of those already off)."""
    before = active_experts(model)
    now = list(before)
    for i in indices:
        now[i] = False
    set_active(model, now)
    try:
        yield
    finally:
        set_active(model, before)


# ---------------------------------------------------------------------------------------
# the shared weights and their hash


def is_expert_tensor(name: str) -> bool:
    return name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj")


def is_router_tensor(name: str) -> bool:
    return name.endswith("mlp.gate.weight") or name.endswith("mlp.gate.bias")


def public_view(model) -> dict[str, torch.Tensor]:
    """The public model's weights inside any FlexOlmo model: everything shared, plus slice /
    row 0 of the fused expert tensors and routers (the router bias is not part of it)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("mlp.gate.bias"):
            continue
        out[name] = t[0:1] if (is_expert_tensor(name) or name.endswith("mlp.gate.weight")) else t
    return out


def shared_weights_hash(model) -> str:
    """sha256 over the public model's weights (names, shapes, dtypes, bytes), in name order.

    Every expert package records the hash of the public model it was trained against; merge
    refuses packages whose hash differs from the public model's."""
    h = hashlib.sha256()
    for name, t in sorted(public_view(model).items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# save and load


def save_model(model, folder: Path, experts: list[str] | None = None, extra: dict | None = None) -> None:
    """Write an HF checkpoint (without the router bias) plus the bias and experts sidecars."""
    folder = Path(folder)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("mlp.gate.bias")}
    model.save_pretrained(folder, state_dict=state)
    bias = torch.stack([r.bias.detach().cpu() for r in routers(model)])  # (L, E)
    save_file({"bias": bias.contiguous()}, str(folder / BIAS_FILE))
    meta = {
        "experts": [{"index": i, "source": n} for i, n in enumerate(experts or expert_names(model))],
        "top_k": model.config.num_experts_per_tok,
        "bias_file": BIAS_FILE,
        "note": "router_bias.safetensors is applied by flexolmo.model.load_model; a stock "
        "AutoModelForCausalLM.from_pretrained runs without it",
    }
    (folder / EXPERTS_FILE).write_text(json.dumps({**meta, **(extra or {})}, indent=2))


def load_model(folder: Path) -> FlexOlmoForCausalLM:
    """Load a model folder written by `save_model` (HF checkpoint + bias + expert names)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise NotFoundError(f"no model in {folder}: train or merge one first (`flexolmo train public`, `flexolmo merge`)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    install_routers(model)
    if (folder / BIAS_FILE).exists():
        bias = load_file(str(folder / BIAS_FILE))["bias"]
        if tuple(bias.shape) != (model.config.num_hidden_layers, model.config.num_experts):
            raise IntegrityError(f"{folder / BIAS_FILE}: shape {tuple(bias.shape)} does not fit the model; re-merge it")
        with torch.no_grad():
            for r, b in zip(routers(model), bias):
                r.bias.copy_(b)
    if (folder / EXPERTS_FILE).exists():
        meta = json.loads((folder / EXPERTS_FILE).read_text())
        model.flexolmo_experts = [e["source"] for e in meta["experts"]]
    model.eval()
    return model
