"""The expert package: the only thing that leaves an owner. `experts/<source>/`:

    expert.safetensors   the expert's slice (flexolmo/model/layout.py), stacked over layers:
                         gate_up_proj (L, 2I, H), down_proj (L, H, I), router (L, H), bias (L,)
    card.json            ExpertPackageCard, with the sha256 of expert.safetensors

Inputs: `tokenizer`, `public_model` (the weights hash of the public model it was trained
against: merge refuses a package whose hash differs), `source` (the owner's content) and
`config` (model shape, expert training config and DP settings). Written and read here only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flexolmo.model.config import Profile
from flexolmo.base.errors import ConflictError, IntegrityError, NotFoundError
from flexolmo.model.layout import get_slice, slice_shapes
from flexolmo.base.sources import get_source
from flexolmo.base.tokenizer import tokenizer_hash
from flexolmo.base.workspace import Workspace, atomic_dir, file_sha256
from flexolmo.base.artifacts.card import Card, Inputs, sha256_json

PACKAGE_FILE = "expert.safetensors"


class ExpertPackageCard(Card):
    KIND = "expert package"
    REBUILD = "flexolmo train expert --source {name}"

    kind: Literal["expert_package"] = "expert_package"
    source: str
    owner: str
    domain: str
    profile: str
    config: dict  # the whole profile (Profile.to_dict)
    n_params: int
    n_trainable: int
    steps: int
    tokens: int
    final_loss: float
    losses: list[tuple[int, float]]
    router_z_loss: float | None = None  # the last step's z-loss (None: not recorded)
    seconds: float
    tokens_per_s: float
    throughput: str
    resumed_from: int | None = None
    world_size: int = 1
    router_init: str
    router_bias_init: float | None = 0.0  # None: calibrated per layer (flexolmo/model/bias.py)
    router_bias: dict = {}  # the calibration, the bias at the end, and the routing check on public and own text
    privacy: dict
    files: dict[str, str] = {}  # file name -> sha256
    created_by: str = "unknown"

    @property
    def public_model(self) -> str | None:
        return self.inputs.get("public_model")

def _dp_settings(privacy: dict) -> dict:
    return {k: privacy[k] for k in ("noise_multiplier", "max_grad_norm", "delta")}


def config_hash(profile: Profile, dp: dict | None) -> str:
    return sha256_json({**profile.recipe("expert"), "dp": dp})


def folder(ws: Workspace, source: str, packages_dir: Path | None = None) -> Path:
    return (Path(packages_dir) if packages_dir else ws.experts_dir) / source


def inputs(ws: Workspace, profile: Profile, source: str, public_model: str, dp: dict | None) -> Inputs:
    """What a package trained now would be built from (`public_model`: the weights hash)."""
    return {"tokenizer": tokenizer_hash(ws), "public_model": public_model,
            "source": get_source(ws, source).content_hash, "config": config_hash(profile, dp)}


def status(ws: Workspace, profile: Profile, source: str, public_model: str | None, dp: dict | None = None,
           packages_dir: Path | None = None) -> str | None:
    """None when `source`'s package (in `packages_dir`, default the workspace's) is current; else why not."""
    if public_model is None:
        return "no public model yet"
    return ExpertPackageCard.status(folder(ws, source, packages_dir), inputs(ws, profile, source, public_model, dp))


@dataclass
class ExpertPackage:
    source: str
    folder: Path
    card: ExpertPackageCard
    tensors: dict[str, torch.Tensor] = field(repr=False)  # the slice (layout.get_slice format)

    def classifier(self):
        """The owner's domain classifier (flexolmo/model/proxy.py), verified with the package; None if absent."""
        from flexolmo.model.proxy import CLASSIFIER_FILE, DomainClassifier

        return DomainClassifier.load(self.folder / CLASSIFIER_FILE) if CLASSIFIER_FILE in self.card.files else None


def write(folder_: Path, model, card: ExpertPackageCard, expert: int = 1, classifier=None) -> ExpertPackageCard:
    """Write expert `expert`'s slice of `model`, the owner's domain classifier (flexolmo/model/proxy.py,
    if given) and the card atomically (verify: read back)."""
    from flexolmo.model.proxy import CLASSIFIER_FILE

    with atomic_dir(folder_) as tmp:
        save_file(get_slice(model, expert), str(tmp / PACKAGE_FILE),
                  metadata={"source": card.source, "public_model": card.public_model or ""})
        files = {PACKAGE_FILE: file_sha256(tmp / PACKAGE_FILE)}
        if classifier is not None:
            classifier.save(tmp / CLASSIFIER_FILE)
            files[CLASSIFIER_FILE] = file_sha256(tmp / CLASSIFIER_FILE)
        card = card.model_copy(update={"files": files})
        card.save(tmp)
        read(tmp)
    return card


def read(folder_: Path) -> ExpertPackage:
    """Read and verify a package: card present and readable, every listed file's sha256 matches."""
    folder_ = Path(folder_)
    if not (folder_ / "card.json").exists():
        raise NotFoundError(f"no expert package in {folder_} (card.json missing); "
                            f"run `flexolmo train expert --source {folder_.name}`")
    card = ExpertPackageCard.read(folder_)
    if PACKAGE_FILE not in card.files:
        raise IntegrityError(f"{folder_ / 'card.json'} lists no {PACKAGE_FILE}; the package is incomplete, ask the owner to resend it")
    for name, want in card.files.items():
        path = folder_ / name
        if not path.exists():
            raise IntegrityError(f"{path} is missing from the package of {card.source!r}")
        got = file_sha256(path)
        if got != want:
            raise IntegrityError(f"{path} is corrupted: sha256 {got[:12]}... differs from the card's {want[:12]}...; "
                                 "ask the owner to resend the package")
    try:
        tensors = load_file(str(folder_ / PACKAGE_FILE))
    except SafetensorError as e:
        raise IntegrityError(f"{folder_ / PACKAGE_FILE} cannot be read ({e}); ask the owner to resend the package") from None
    return ExpertPackage(source=card.source, folder=folder_, card=card, tensors=tensors)


def check_fits(pkg: ExpertPackage, public, public_hash: str) -> None:
    """Refuse a package trained against another public model, or whose tensors do not fit."""
    if pkg.card.public_model != public_hash:
        raise ConflictError(
            f"expert {pkg.source!r} was trained against a different public model "
            f"(its public_model {str(pkg.card.public_model)[:12]}..., this workspace's {public_hash[:12]}...); "
            f"retrain it with `flexolmo train expert --source {pkg.source}` against the current public model"
        )
    for k, shape in slice_shapes(public.config).items():
        if k not in pkg.tensors or tuple(pkg.tensors[k].shape) != shape:
            got = tuple(pkg.tensors[k].shape) if k in pkg.tensors else "missing"
            raise IntegrityError(f"{pkg.folder / PACKAGE_FILE}: tensor {k!r} is {got}, expected {shape}; "
                                 "the package does not fit this public model")
