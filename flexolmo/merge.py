"""Merging expert packages into one FlexOlmo model, and loading it with experts on or off.

    flexolmo merge --experts news,code,math --top-k 2          # -> <workspace>/models/merged
    flexolmo generate "Once upon" --exclude news

Merged model: expert 0 and router row 0 from the public model, expert k and router row k
from the k-th package, everything else (embeddings, attention, norms, lm_head) from the
public model, which every package must have been trained against (its `public_hash`).
The folder is an ordinary HF checkpoint (`AutoModelForCausalLM.from_pretrained` loads it)
plus `router_bias.safetensors` and `experts.json` (see flexolmo/model.py): a stock load
runs without the owners' router biases; `load_merged` applies them.

Opt-out needs no retraining: `load_merged(..., exclude=[...])` gives switched-off experts a
router logit of -inf, so they are never selected and the remaining experts' weights are
the softmax over the switched-on ones only. Sources the catalog marks inactive or expired
are switched off automatically.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import ConflictError, InputError, IntegrityError, NotFoundError
from .model import build_model, expert_names, is_expert_tensor, load_model, num_parameters, save_model, set_active, shared_weights_hash
from .train import PACKAGE_FILE, public_model_dir
from .workspace import Workspace, atomic_dir, file_sha256


@dataclass
class ExpertPackage:
    source: str
    folder: Path
    card: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)


@dataclass
class MergeResult:
    out_dir: Path
    experts: list[str]  # index -> source; index 0 is the public model
    top_k: int
    public_hash: str
    n_params: int
    card: dict


def read_package(folder: Path) -> ExpertPackage:
    """Read and verify an expert package: card present, every listed file's sha256 matches."""
    folder = Path(folder)
    card_path = folder / "card.json"
    if not card_path.exists():
        raise NotFoundError(f"no expert package in {folder} (card.json missing); run `flexolmo train expert --source {folder.name}`")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{card_path} is corrupted ({e.msg}); ask the owner to resend the package") from None
    files = card.get("files") or {}
    if PACKAGE_FILE not in files:
        raise IntegrityError(f"{card_path} lists no {PACKAGE_FILE}; the package is incomplete, ask the owner to resend it")
    for name, want in files.items():
        path = folder / name
        if not path.exists():
            raise IntegrityError(f"{path} is missing from the package of {card.get('source', folder.name)!r}")
        got = file_sha256(path)
        if got != want:
            raise IntegrityError(
                f"{path} is corrupted: sha256 {got[:12]}... differs from the card's {want[:12]}...; "
                "ask the owner to resend the package"
            )
    try:
        tensors = load_file(str(folder / PACKAGE_FILE))
    except SafetensorError as e:
        raise IntegrityError(f"{folder / PACKAGE_FILE} cannot be read ({e}); ask the owner to resend the package") from None
    return ExpertPackage(source=card["source"], folder=folder, card=card, tensors=tensors)


def _check_fits(pkg: ExpertPackage, public, public_hash: str) -> None:
    if pkg.card.get("public_hash") != public_hash:
        raise ConflictError(
            f"expert {pkg.source!r} was trained against a different public model "
            f"(its public_hash {str(pkg.card.get('public_hash'))[:12]}..., this workspace's {public_hash[:12]}...); "
            f"retrain it with `flexolmo train expert --source {pkg.source}` against the current public model"
        )
    c = public.config
    want = {
        "gate_up_proj": (c.num_hidden_layers, 2 * c.intermediate_size, c.hidden_size),
        "down_proj": (c.num_hidden_layers, c.hidden_size, c.intermediate_size),
        "router": (c.num_hidden_layers, c.hidden_size),
        "bias": (c.num_hidden_layers,),
    }
    for k, shape in want.items():
        if k not in pkg.tensors or tuple(pkg.tensors[k].shape) != shape:
            got = tuple(pkg.tensors[k].shape) if k in pkg.tensors else "missing"
            raise IntegrityError(f"{pkg.folder / PACKAGE_FILE}: tensor {k!r} is {got}, expected {shape}; the package does not fit this public model")


def merge(
    ws: Workspace,
    experts: Iterable[str],
    out: Path | None = None,
    top_k: int | None = None,
    *,
    packages_dir: Path | None = None,
) -> MergeResult:
    """Merge the public model and one expert package per source into one checkpoint.

    :param experts: source names; packages are read from `<workspace>/experts/<name>/`
        (or `packages_dir/<name>/`)
    :param out: output folder (default `<workspace>/models/merged`)
    :param top_k: experts per token (default: the packages' profile setting)
    """
    names = [e.strip() for e in experts if e and e.strip()]
    if not names:
        raise InputError("give at least one expert to merge, e.g. --experts news,code")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"expert(s) listed twice: {', '.join(dupes)}")
    public_dir = public_model_dir(ws)
    public = load_model(public_dir)
    public_hash = shared_weights_hash(public)
    base = Path(packages_dir) if packages_dir else ws.experts_dir
    pkgs = [read_package(base / n) for n in names]
    for pkg in pkgs:
        _check_fits(pkg, public, public_hash)
    public_source = expert_names(public)[0]
    if public_source in names:
        raise InputError(f"{public_source!r} is the public model (expert 0); it is always in the merge")

    E = 1 + len(pkgs)
    k = top_k or pkgs[0].card.get("config", {}).get("model", {}).get("top_k", 2)
    if not 1 <= k <= E:
        raise InputError(f"--top-k {k} is out of range: use 1..{E} for {E} experts")
    cfg = copy.deepcopy(public.config)
    cfg.num_experts, cfg.num_experts_per_tok = E, k
    model = build_model(cfg)
    src = public.state_dict()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("mlp.gate.bias"):
                layer = _layer(name)
                t[0] = 0.0
                for j, pkg in enumerate(pkgs, start=1):
                    t[j] = pkg.tensors["bias"][layer]
            elif is_expert_tensor(name) or name.endswith("mlp.gate.weight"):
                layer = _layer(name)
                key = "router" if name.endswith("gate.weight") else name.rsplit(".", 1)[1]
                t[0].copy_(src[name][0])
                for j, pkg in enumerate(pkgs, start=1):
                    t[j].copy_(pkg.tensors[key][layer])
            else:
                t.copy_(src[name])
    assert shared_weights_hash(model) == public_hash  # expert 0 + shared weights are the public model's

    sources = [public_source] + names
    out = Path(out) if out else ws.models_dir / "merged"
    card = {
        "kind": "merged",
        "experts": [{"index": 0, "source": public_source, "from": str(public_dir)}]
        + [
            {
                "index": j,
                "source": pkg.source,
                "owner": pkg.card.get("owner"),
                "steps": pkg.card.get("steps"),
                "tokens": pkg.card.get("tokens"),
                "privacy": pkg.card.get("privacy"),
                "package_sha256": pkg.card["files"][PACKAGE_FILE],
            }
            for j, pkg in enumerate(pkgs, start=1)
        ],
        "top_k": k,
        "public_hash": public_hash,
        "n_params": num_parameters(model),
        "router_bias": "router_bias.safetensors, applied by flexolmo.merge.load_merged (stock from_pretrained ignores it)",
        "created_at": dt.datetime.now().replace(microsecond=0).isoformat(),
    }
    write_merged(model, out, sources, public_hash, card)
    return MergeResult(out_dir=out, experts=sources, top_k=k, public_hash=public_hash, n_params=card["n_params"], card=card)


def write_merged(model, out: Path, names: list[str], public_hash: str, card: dict) -> None:
    """Save a merged model with its card atomically, after checking that it reads back whole."""
    with atomic_dir(out) as tmp:
        save_model(model, tmp, experts=names, extra={"public_hash": public_hash})
        (tmp / "card.json").write_text(json.dumps(card, indent=2))
        check = load_model(tmp)  # verify before the rename
        if shared_weights_hash(check) != public_hash or expert_names(check) != names:
            raise IntegrityError(f"the merged checkpoint written to {tmp} does not read back identically; disk problem?")


def _layer(name: str) -> int:
    # model.layers.<i>.mlp....
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


def load_merged(
    ws_or_path: Workspace | Path | str,
    *,
    exclude: Iterable[str] = (),
    include: Iterable[str] | None = None,
    respect_catalog: bool = True,
    ws: Workspace | None = None,
    today: dt.date | None = None,
):
    """Load a merged model with some experts switched off (no retraining).

    :param ws_or_path: a workspace (loads `models/merged`) or a model folder
    :param exclude: source names (or indices) to switch off
    :param include: if given, only these sources (plus the public model) stay on
    :param respect_catalog: switch off sources the catalog marks inactive or expired
    :param ws: the workspace whose catalog to consult when `ws_or_path` is a folder
    :returns: the model; `model.flexolmo_experts` names the experts, `model.flexolmo_off`
        maps each switched-off source to the reason
    """
    if isinstance(ws_or_path, Workspace):
        ws, folder = ws_or_path, ws_or_path.models_dir / "merged"
    else:
        folder = Path(ws_or_path)
    if not (folder / "config.json").exists():
        raise NotFoundError(f"no merged model in {folder}; run `flexolmo merge --experts ...` first")
    model = load_model(folder)
    names = expert_names(model)
    off: dict[str, str] = {}
    if include is not None:
        keep = set(_indices(model, include)) | {0}
        off.update({names[i]: "not included" for i in range(len(names)) if i not in keep})
    for i in _indices(model, exclude):
        off[names[i]] = "excluded"
    if respect_catalog and ws is not None:
        from .sources import list_sources

        for s in list_sources(ws):
            if s.name in names and not s.available(today):
                off.setdefault(s.name, "inactive in the catalog" if not s.active else f"licence expired {s.expires}")
    on = [n not in off for n in names]
    if not any(on):
        raise InputError(f"every expert would be switched off ({'; '.join(f'{k}: {v}' for k, v in off.items())}); keep at least one")
    set_active(model, on)
    model.flexolmo_off = off
    return model


def _indices(model, names: Iterable[str | int]) -> list[int]:
    from .model import resolve_experts

    return resolve_experts(model, [n.strip() if isinstance(n, str) else n for n in names if str(n).strip()])


def load_expert_model(ws: Workspace, source: str, *, packages_dir: Path | None = None):
    """Owner `source`'s own 2-expert model [public | expert], rebuilt from the public model
    and the verified package (e.g. to evaluate an expert alone)."""
    from .train import expert_from_public

    public = load_model(public_model_dir(ws))
    public_hash = shared_weights_hash(public)
    pkg = read_package((Path(packages_dir) if packages_dir else ws.experts_dir) / source)
    _check_fits(pkg, public, public_hash)
    top_k = pkg.card.get("config", {}).get("model", {}).get("top_k", 2)
    model = expert_from_public(public, top_k=top_k)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.experts.gate_up_proj[1].copy_(pkg.tensors["gate_up_proj"][i])
            layer.mlp.experts.down_proj[1].copy_(pkg.tensors["down_proj"][i])
            layer.mlp.gate.weight[1].copy_(pkg.tensors["router"][i])
            layer.mlp.gate.bias[1] = pkg.tensors["bias"][i]
    model.flexolmo_experts = [expert_names(public)[0], source]
    model.eval()
    return model
