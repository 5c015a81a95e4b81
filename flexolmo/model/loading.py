"""Any model folder, for generation and tracing: the project's own FlexOlmo models, a stock
`flex_olmo` checkpoint (such as the released FlexOlmo-7x7B-1T, without this project's sidecar
files), or any Hugging Face causal LM.

    spec = ModelSpec.parse("~/models/FlexOlmo-7x7B-1T", experts="public,math,news,code,academic,creative,reddit",
                           device="cuda", dtype="bfloat16")
    model, own_tok = open_model(ws, spec, index_tokenizer=tok)
    # a LoadedModel (experts [] for a dense model), and the model's own tokenizer when it is not the index's

What each kind gives a trace:

    FlexOlmo (model_type flex_olmo)   spans and documents, routing share, counterfactuals, opt-out
    any other causal LM               spans and documents only: expert linkage does not apply

Expert names, in expert order, come from `experts` (a comma list, or a JSON file holding a list
or this project's experts.json), else the model's experts.json sidecar, else `public`,
`expert1`, ... (FlexOlmo's expert 0 is the public model). Nothing is ever downloaded: a folder
must hold the weights and config (and, to use its own tokenizer, its tokenizer files).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from flexolmo.base.errors import InputError, NotFoundError

from .specs import DEVICE, DTYPE

if TYPE_CHECKING:  # torch and the model classes are imported where a model is loaded, not to name one
    import torch

    from .moe import LoadedModel

FLEXOLMO = "flex_olmo"


@dataclass(frozen=True)
class ModelSpec:
    """Which model to open and where: `path` None is the workspace's merged model (if built)."""

    path: Path | None = None
    experts: tuple[str, ...] | None = None  # expert names in index order (FlexOlmo models only)
    device: str = DEVICE
    dtype: str = DTYPE

    @classmethod
    def parse(cls, path: str | Path | None = None, experts: str | None = None, device: str | None = None,
              dtype: str | None = None) -> "ModelSpec":
        """From command-line or environment strings; bad values raise InputError now, not at load."""
        from .device import resolve_device, resolve_dtype

        resolve_device(device or DEVICE)
        resolve_dtype(dtype or DTYPE)
        folder = Path(path).expanduser() if path else None
        if folder is not None and not (folder / "config.json").is_file():
            raise NotFoundError(f"--model {path}: no config.json there; give a Hugging Face model folder "
                                "(saved with save_pretrained, or downloaded beforehand: nothing is fetched from a hub)")
        names = read_expert_names(experts) if experts else None
        return cls(path=folder, experts=names, device=device or DEVICE, dtype=dtype or DTYPE)


def read_expert_names(value: str) -> tuple[str, ...]:
    """'public,math,news' or the path of a JSON file: a list of names, {"experts": [names]}, or
    this project's experts.json ({"experts": [{"index": i, "source": name}, ...]})."""
    p = Path(value).expanduser()
    if value.endswith(".json") or p.is_file():
        if not p.is_file():
            raise NotFoundError(f"--experts {value}: no such file")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"--experts {value}: not JSON ({e.msg} at line {e.lineno})") from None
        items = data.get("experts") if isinstance(data, dict) else data
        if not isinstance(items, list) or not items:
            raise InputError(f"--experts {value}: expected a list of expert names, or {{\"experts\": [...]}}")
        names = [it["source"] if isinstance(it, dict) and "source" in it else it for it in
                 sorted(items, key=lambda it: it.get("index", 0) if isinstance(it, dict) else 0)]
    else:
        names = [x.strip() for x in value.split(",")]
    if any(not isinstance(n, str) or not n for n in names):
        raise InputError(f"--experts: every expert needs a non-empty name (got {names})")
    if len(set(names)) != len(names):
        raise InputError(f"--experts names an expert twice: {', '.join(names)}")
    return tuple(names)


def model_type(folder: Path) -> str:
    """The `model_type` of a Hugging Face folder's config.json."""
    try:
        return str(json.loads((Path(folder) / "config.json").read_text()).get("model_type", ""))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{folder}/config.json does not read as a model config ({e})") from None


def load_dense(folder: Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Any causal LM transformers knows, as a LoadedModel without experts."""
    from transformers import AutoModelForCausalLM

    from .moe import LoadedModel

    try:
        module = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{folder} does not load as a Hugging Face causal LM ({str(e)[:300]})") from None
    module.to(device).eval()
    return LoadedModel(module=module, experts=[], folder=folder)


def load_folder_tokenizer(folder: Path):
    """The tokenizer saved beside a model (tokenizer.json or a slow tokenizer's files), or None."""
    from transformers import AutoTokenizer

    if not any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{folder}: its tokenizer files do not load ({str(e)[:300]})") from None
    if not getattr(tok, "is_fast", False):
        raise InputError(f"{folder}: its tokenizer has no fast (Rust) version, which tracing needs for character "
                         "offsets; save it with tokenizer.json")
    return tok


def same_tokenizer(a, b) -> bool:
    """Do two fast tokenizers produce the same ids for every text (the same serialized model)?"""
    if a is b:
        return True
    try:
        return a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    except AttributeError:
        return False


def open_model(ws, spec: ModelSpec, *, exclude: Sequence[str] = (), include: Sequence[str] | None = None,
                         today: dt.date | None = None, index_tokenizer=None):
    """The model a tracer or `flexolmo generate` uses, under the workspace's policies.

    `spec.path` None: the workspace's merged model (None when none is built). A FlexOlmo
    folder is loaded with `exclude`/`include` and the catalog's inactive or expired sources
    switched off (`merge.load_merged`); a dense one refuses them.

    :param index_tokenizer: the workspace tokenizer; the model's own tokenizer is returned only
        when it differs from it (then spans are searched on index ids and mapped to the model's
        tokens by character offsets)
    :returns: (model or None, the model's own tokenizer or None when it shares the index's)
    """
    from .merge import load_merged

    folder = spec.path if spec.path is not None else ws.models_dir / "merged"
    if spec.path is None and not (folder / "config.json").exists():
        return None, None
    from .device import resolve_device, resolve_dtype

    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    if model_type(folder) == FLEXOLMO:
        model = load_merged(folder, ws=ws, exclude=exclude, include=include, today=today, device=device, dtype=dtype,
                            experts=spec.experts)
    else:
        if exclude or include is not None:
            raise InputError(f"--exclude/--include switch experts off, but {folder} is a dense model without experts")
        if spec.experts:
            raise InputError(f"--experts names experts, but {folder} is a dense model without experts")
        model = load_dense(folder, device, dtype)
    own = load_folder_tokenizer(folder)
    if own is not None and index_tokenizer is not None and same_tokenizer(own, index_tokenizer):
        own = None
    if own is None and index_tokenizer is not None and len(index_tokenizer) > model.config.vocab_size:
        raise InputError(f"{folder} has no tokenizer of its own and the workspace tokenizer ({len(index_tokenizer)} ids) "
                         f"does not fit its vocabulary ({model.config.vocab_size}); save the model's tokenizer beside it")
    return model, own
