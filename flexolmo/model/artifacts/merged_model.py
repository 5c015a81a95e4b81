"""The merged model artifact: `models/merged/` (an HF checkpoint written by
`flexolmo.model.moe.save_model`, plus card.json); router tuning rewrites it with a
`router_tuning` section.

Inputs: `public_model` (weights hash), `expert:<source>` (sha256 of each package's
expert.safetensors, in expert order) and `settings` (top_k and the expert order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from flexolmo.base.errors import IntegrityError
from flexolmo.model.layout import shared_weights_hash
from flexolmo.model.moe import load_model, save_model
from flexolmo.base.workspace import Workspace, atomic_dir
from flexolmo.base.artifacts.card import Card, Inputs, sha256_json
from flexolmo.model.artifacts.expert_package import PACKAGE_FILE, ExpertPackageCard
from flexolmo.model.artifacts.expert_package import folder as package_folder


class MergedModelCard(Card):
    KIND = "merged model"
    REBUILD = "flexolmo merge --experts ..."

    kind: Literal["merged_model"] = "merged_model"
    experts: list[dict]  # index, source, owner, steps, tokens, privacy, package_sha256
    top_k: int
    public_model: str  # weights hash of expert 0 and the shared weights
    n_params: int
    router_bias: str = ("router_bias.safetensors, applied by flexolmo.model.merge.load_merged "
                        "(stock from_pretrained ignores it)")
    router_tuning: dict | None = None

    @property
    def names(self) -> list[str]:
        return [e["source"] for e in self.experts]

def folder(ws: Workspace) -> Path:
    return ws.models_dir / "merged"


def inputs_for(public_model: str, packages: dict[str, str], top_k: int) -> Inputs:
    """:param packages: source -> sha256 of its expert.safetensors, in expert order"""
    return {"public_model": public_model, **{f"expert:{s}": h for s, h in packages.items()},
            "settings": sha256_json({"top_k": top_k, "order": list(packages)})}


def status(ws: Workspace, public_model: str | None, sources: list[str], top_k: int) -> str | None:
    """None when `models/merged` merges exactly these packages (as they are now) at top_k."""
    if public_model is None:
        return "no public model yet"
    packages = {}
    for s in sources:
        card = ExpertPackageCard.find(package_folder(ws, s))
        if card is None or PACKAGE_FILE not in card.files:
            return f"no expert package for {s!r}"
        packages[s] = card.files[PACKAGE_FILE]
    return MergedModelCard.status(folder(ws), inputs_for(public_model, packages, top_k))


def write(model, out: Path, names: list[str], card: MergedModelCard) -> None:
    """Save a merged model with its card atomically, after checking that it reads back whole."""
    with atomic_dir(out) as tmp:
        save_model(model, tmp, experts=names, extra={"public_model": card.public_model})
        card.save(tmp)
        check = load_model(tmp)  # verify before the rename
        if shared_weights_hash(check) != card.public_model or check.experts != names:
            raise IntegrityError(f"the merged checkpoint written to {tmp} does not read back identically; disk problem?")
