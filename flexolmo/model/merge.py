"""Merging expert packages into one FlexOlmo model, and loading it with experts on or off.

    flexolmo merge --experts news,code,math --top-k 2          # -> <workspace>/models/merged
    flexolmo generate "Once upon" --exclude news

Merged model: expert 0 and router row 0 from the public model, expert k and router row k
from the k-th package, everything else (embeddings, attention, norms, lm_head) from the
public model, which every package must have been trained against (its `public_model`
input; flexolmo/model/artifacts/expert_package.py reads and verifies packages).
The folder is an ordinary HF checkpoint (`AutoModelForCausalLM.from_pretrained` loads it)
plus `router_bias.safetensors` and `experts.json` (see flexolmo/model/moe.py): a stock load
runs without the owners' router biases; `load_merged` applies them.

Opt-out needs no retraining: `load_merged(..., exclude=[...])` gives switched-off experts a
router logit of -inf, so they are never selected and the remaining experts' weights are
the softmax over the switched-on ones only. Sources the catalog marks inactive or expired
are switched off automatically.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from flexolmo.model.artifacts import expert_package, merged_model, public_model
from flexolmo.model.artifacts.expert_package import PACKAGE_FILE, check_fits
from flexolmo.model.artifacts.merged_model import MergedModelCard
from flexolmo.base.errors import InputError, NotFoundError
from flexolmo.model.layout import set_slice, shared_weights_hash, with_experts
from flexolmo.model.moe import LoadedModel, load_model, num_parameters, resolve_experts, set_active
from flexolmo.base.workspace import Workspace


@dataclass
class MergeResult:
    out_dir: Path
    experts: list[str]  # index -> source; index 0 is the public model
    top_k: int
    public_hash: str
    n_params: int
    card: MergedModelCard


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
    :param top_k: experts per token (default: the packages' profile setting, 4 in every
        profile, clamped to the number of experts)
    """
    names = [e.strip() for e in experts if e and e.strip()]
    if not names:
        raise InputError("give at least one expert to merge, e.g. --experts news,code")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"expert(s) listed twice: {', '.join(dupes)}")
    public, _ = public_model.load(ws)
    public_hash = shared_weights_hash(public)
    pkgs = [expert_package.read(expert_package.folder(ws, n, packages_dir)) for n in names]
    for pkg in pkgs:
        check_fits(pkg, public, public_hash)
    public_source = public.experts[0]
    if public_source in names:
        raise InputError(f"{public_source!r} is the public model (expert 0); it is always in the merge")

    E = 1 + len(pkgs)
    k = top_k or min(pkgs[0].card.config.get("model", {}).get("top_k", 4), E)
    if not 1 <= k <= E:
        raise InputError(f"--top-k {k} is out of range: use 1..{E} for {E} experts")
    model = with_experts(public, E, top_k=k)  # expert 0 and the shared weights: the public model's
    for j, pkg in enumerate(pkgs, start=1):
        set_slice(model, j, pkg.tensors)
    assert shared_weights_hash(model) == public_hash

    sources = [public_source] + names
    out = Path(out) if out else merged_model.folder(ws)
    card = MergedModelCard(
        inputs=merged_model.inputs_for(public_hash, {p.source: p.card.files[PACKAGE_FILE] for p in pkgs}, k),
        experts=[{"index": 0, "source": public_source, "from": str(public_model.folder(ws))}]
        + [{"index": j, "source": pkg.source, "owner": pkg.card.owner, "steps": pkg.card.steps,
            "tokens": pkg.card.tokens, "privacy": pkg.card.privacy, "package_sha256": pkg.card.files[PACKAGE_FILE],
            "row_scale_per_layer": pkg.card.router_bias.get("row_scale_per_layer")}
           for j, pkg in enumerate(pkgs, start=1)],
        top_k=k, public_model=public_hash, n_params=num_parameters(model),
    )
    merged_model.write(model, out, sources, card)
    return MergeResult(out_dir=out, experts=sources, top_k=k, public_hash=public_hash, n_params=card.n_params, card=card)


def load_merged(
    ws_or_path: Workspace | Path | str,
    *,
    exclude: Iterable[str] = (),
    include: Iterable[str] | None = None,
    respect_catalog: bool = True,
    ws: Workspace | None = None,
    today: dt.date | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    experts: Sequence[str] | None = None,
):
    """Load a merged model with some experts switched off (no retraining).

    :param ws_or_path: a workspace (loads `models/merged`) or a FlexOlmo model folder (the
        project's, or a stock flex_olmo checkpoint)
    :param experts: expert names in index order, for a folder without experts.json
    :param exclude: source names (or indices) to switch off
    :param include: if given, only these sources (plus the public model) stay on
    :param respect_catalog: switch off sources the catalog marks inactive or expired
    :param ws: the workspace whose catalog to consult when `ws_or_path` is a folder
    :returns: a `LoadedModel`: `.experts` names the experts, `.off` maps each switched-off
        source to the reason
    """
    if isinstance(ws_or_path, Workspace):
        ws, folder = ws_or_path, merged_model.folder(ws_or_path)
    else:
        folder = Path(ws_or_path)
    if not (folder / "config.json").exists():
        raise NotFoundError(f"no merged model in {folder}; run `flexolmo merge --experts ...` first")
    model = load_model(folder, device=device, dtype=dtype, experts=experts)
    names = model.experts
    off: dict[str, str] = {}
    if include is not None:
        keep = set(_indices(model, include)) | {0}
        off.update({names[i]: "not included" for i in range(len(names)) if i not in keep})
    for i in _indices(model, exclude):
        off[names[i]] = "excluded"
    if respect_catalog and ws is not None:
        from flexolmo.base.sources import list_sources

        for s in list_sources(ws):
            if s.name in names and not s.available(today):
                off.setdefault(s.name, "inactive in the catalog" if not s.active else f"licence expired {s.expires}")
    on = [n not in off for n in names]
    if not any(on):
        raise InputError(f"every expert would be switched off ({'; '.join(f'{k}: {v}' for k, v in off.items())}); keep at least one")
    set_active(model, on)
    model.off = off
    return model


def _indices(model, names: Iterable[str | int]) -> list[int]:
    return resolve_experts(model, [n.strip() if isinstance(n, str) else n for n in names if str(n).strip()])


def load_expert_model(ws: Workspace, source: str, *, packages_dir: Path | None = None) -> LoadedModel:
    """Owner `source`'s own 2-expert model [public | expert], rebuilt from the public model
    and the verified package (e.g. to evaluate an expert alone)."""
    public, _ = public_model.load(ws)
    pkg = expert_package.read(expert_package.folder(ws, source, packages_dir))
    check_fits(pkg, public, shared_weights_hash(public))
    model = with_experts(public, 2, top_k=pkg.card.config.get("model", {}).get("top_k", 4))
    set_slice(model, 1, pkg.tensors)
    return LoadedModel(module=model.eval(), experts=[public.experts[0], source])
