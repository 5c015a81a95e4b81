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

`load_model` returns a `LoadedModel`: the torch module, the experts' names and which of
them are switched off and why (merge.load_merged fills that in). A stock `from_pretrained` therefore runs the same model *without* the router bias (and
with every expert on): routing can differ where a bias is far below 0.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import FlexOlmoForCausalLM
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoTopKRouter

from flexolmo.base.errors import InputError, IntegrityError, NotFoundError

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
    return sum(p.numel() for p in as_module(model).parameters())


# ---------------------------------------------------------------------------------------
# a loaded model: the torch module, its experts' names, which are off and why


@dataclass
class LoadedModel:
    """A FlexOlmo model as loaded from a folder: the torch module plus what the project knows
    about it (flexolmo functions take a `LoadedModel` or a bare module alike)."""

    module: FlexOlmoForCausalLM  # or any causal LM (flexolmo/model/loading.py): then `experts` is empty
    experts: list[str]  # source name of each expert index; index 0 is the public model; [] for a dense model
    off: dict[str, str] = field(default_factory=dict)  # switched-off source -> why
    folder: Path | None = None

    @property
    def config(self):
        return self.module.config

    @property
    def active(self) -> list[bool]:
        return active_experts(self.module) if self.is_moe else []

    @property
    def is_moe(self) -> bool:
        """A FlexOlmo model (routing share, counterfactuals, opt-out), not a dense one."""
        return bool(self.experts)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def eval(self) -> "LoadedModel":
        self.module.eval()
        return self


def as_module(model) -> FlexOlmoForCausalLM:
    """The torch module of a `LoadedModel` (or the module itself)."""
    return model.module if isinstance(model, LoadedModel) else model


def routers(model) -> list[FlexRouter]:
    return [layer.mlp.gate for layer in as_module(model).model.layers]


def has_routers(model) -> bool:
    """Is this a FlexOlmo model with this project's routers (a dense causal LM is not)?"""
    return isinstance(as_module(model), FlexOlmoForCausalLM)


def expert_names(model) -> list[str]:
    """Source name of each expert index (index 0 is the public model)."""
    if isinstance(model, LoadedModel):
        return list(model.experts)
    return ["public"] + [f"expert{i}" for i in range(1, model.config.num_experts)]


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


Check = Callable[[], None]  # a cancellation checkpoint: returns, or raises to stop a model pass


def no_check() -> None:
    """The checkpoint of a pass nothing can stop."""


def decoder_layers(model) -> list[nn.Module]:
    """The model's decoder layers (any transformers causal LM: the modules named *DecoderLayer)."""
    return [m for m in as_module(model).modules() if type(m).__name__.endswith("DecoderLayer")]


@contextlib.contextmanager
def layer_checkpoints(model, check: Check | None) -> Iterator[None]:
    """Within: `check()` runs before every decoder layer's forward (the model's own forward when
    it has none), so that a deadline or a cancel stops a transformers forward pass, or a whole
    `generate`, within one layer's time. None: nothing is hooked."""
    if check is None or check is no_check:
        yield
        return
    handles = [m.register_forward_pre_hook(lambda *_: check()) for m in decoder_layers(model) or [as_module(model)]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def experts_implementation(model, name: str | None) -> Iterator[None]:
    """Within: transformers runs the fused experts with its `name` implementation ("eager",
    "grouped_mm", ...; None or a model without fused experts: unchanged). The same weights and
    routing; only how the expert matmuls are grouped, so results agree to float rounding."""
    module = as_module(model)
    if name is None or not isinstance(module, FlexOlmoForCausalLM) or not hasattr(module, "set_experts_implementation"):
        yield
        return
    before = module.config._experts_implementation
    module.set_experts_implementation(name)
    try:
        yield
    finally:
        module.set_experts_implementation(before)


# ---------------------------------------------------------------------------------------
# save and load


def save_model(model, folder: Path, experts: list[str] | None = None, extra: dict | None = None) -> None:
    """Write an HF checkpoint (without the router bias) plus the bias and experts sidecars."""
    folder = Path(folder)
    names = experts or expert_names(model)
    module = as_module(model)
    state = {k: v for k, v in module.state_dict().items() if not k.endswith("mlp.gate.bias")}
    module.save_pretrained(folder, state_dict=state)
    bias = torch.stack([r.bias.detach().cpu() for r in routers(module)])  # (L, E)
    save_file({"bias": bias.contiguous()}, str(folder / BIAS_FILE))
    meta = {
        "experts": [{"index": i, "source": n} for i, n in enumerate(names)],
        "top_k": module.config.num_experts_per_tok,
        "bias_file": BIAS_FILE,
        "note": "router_bias.safetensors is applied by flexolmo.model.moe.load_model; a stock "
        "AutoModelForCausalLM.from_pretrained runs without it",
    }
    (folder / EXPERTS_FILE).write_text(json.dumps({**meta, **(extra or {})}, indent=2))


def load_model(folder: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               experts: Sequence[str] | None = None) -> LoadedModel:
    """Load a FlexOlmo model folder: one written by `save_model` (HF checkpoint + router bias +
    expert names), or a stock `flex_olmo` checkpoint without those sidecars (bias 0).

    :param experts: expert names in index order; overrides experts.json (default for a stock
        checkpoint: public, expert1, ...)
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise NotFoundError(f"no model in {folder}: train or merge one first (`flexolmo train public`, `flexolmo merge`)")
    module = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)  # no float32 copy first
    if not isinstance(module, FlexOlmoForCausalLM):
        raise InputError(f"{folder} holds a {type(module).__name__}, not a FlexOlmo model; "
                         "open it with flexolmo.model.loading.open_model (spans and documents only)")
    install_routers(module)
    if (folder / BIAS_FILE).exists():
        bias = load_file(str(folder / BIAS_FILE))["bias"]
        if tuple(bias.shape) != (module.config.num_hidden_layers, module.config.num_experts):
            raise IntegrityError(f"{folder / BIAS_FILE}: shape {tuple(bias.shape)} does not fit the model; re-merge it")
        with torch.no_grad():
            for r, b in zip(routers(module), bias):
                r.bias.copy_(b)
    names = expert_names(module)
    if experts is not None:
        names = list(experts)
        where = "--experts"
    elif (folder / EXPERTS_FILE).exists():
        names = [e["source"] for e in json.loads((folder / EXPERTS_FILE).read_text())["experts"]]
        where = str(folder / EXPERTS_FILE)
    else:
        where = "the default names"
    if len(names) != module.config.num_experts:
        raise IntegrityError(f"{where} names {len(names)} experts, the model has {module.config.num_experts}; "
                             "give one name per expert, in expert order")
    module.to(device=device, dtype=dtype).eval()
    return LoadedModel(module=module, experts=names, folder=folder)
