"""The comparison rows that are models of their own: the model soup and the dense model.

    soup = soup_model(ws, ["news", "code"])            # [public | mean of the owners' experts]
    dense = dense_model(ws, profile, owners, out)      # public model trained further on all data

Model soup (the paper's baseline): the owners' 2-expert models [public | own] share every
weight but their expert slice (FFN, router row, bias), so averaging the models' weights is
[public | mean of the owners' slices].

Dense: the public model (1 expert) trained further, every weight, on all sources' training
data together (windows drawn in proportion to each source's size), for as many tokens as
the owners' experts were trained on in all: the same training compute on the same data,
without the separation into experts. Kept in `<out>/` with a card naming its inputs; a
current one is reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flexolmo.model.artifacts import expert_package, public_model
from flexolmo.base.artifacts.card import sha256_json
from flexolmo.model.callbacks import standard_callbacks
from flexolmo.model.config import Profile
from flexolmo.model.layout import set_slice, shared_weights_hash, with_experts
from flexolmo.model.moe import LoadedModel, load_model, save_model
from flexolmo.base.sources import get_source
from flexolmo.model.stream import token_stream
from flexolmo.model.trainer import Trainer
from flexolmo.base.workspace import Workspace, atomic_dir


def soup_model(ws: Workspace, owners: list[str], packages_dir: Path | None = None) -> LoadedModel:
    """[public | mean of the owners' expert slices]: the average of the owners' 2-expert models."""
    public, _ = public_model.load(ws)
    h = shared_weights_hash(public)
    pkgs = [expert_package.read(expert_package.folder(ws, s, packages_dir)) for s in owners]
    for pkg in pkgs:
        expert_package.check_fits(pkg, public, h)
    mean = {k: torch.stack([p.tensors[k].float() for p in pkgs]).mean(0) for k in pkgs[0].tensors}
    model = with_experts(public, 2, top_k=2)
    set_slice(model, 1, mean)
    return LoadedModel(module=model.eval(), experts=[public.experts[0], "soup"])


def dense_inputs(ws: Workspace, profile: Profile, sources: list[str], steps: int, public_hash: str) -> dict:
    return {"public_model": public_hash, "steps": steps, "train": sha256_json(profile.recipe("expert")),
            "sources": {s: get_source(ws, s).content_hash for s in sources}}


def dense_model(ws: Workspace, profile: Profile, sources: list[str], steps: int, out: Path,
                progress: bool = True) -> tuple[LoadedModel, dict]:
    """The public model trained further on all `sources` for `steps` steps of the expert
    recipe's batch shape and schedule (reused when `<out>/card.json` has the same inputs)."""
    public, _ = public_model.load(ws)
    inputs = dense_inputs(ws, profile, sources, steps, shared_weights_hash(public))
    card_path = out / "card.json"
    if card_path.exists() and json.loads(card_path.read_text()).get("inputs") == inputs:
        return load_model(out), json.loads(card_path.read_text())
    cfg = profile.expert
    cfg = type(cfg)(**{**cfg.__dict__, "steps": steps, "weight_decay": 0.1})
    stream = torch.cat([token_stream(ws, s) for s in sources])
    module = public.module
    for n, p in module.named_parameters():
        p.requires_grad_("mlp.gate." not in n)  # one expert: the router has nothing to learn
    params = [p for p in module.parameters() if p.requires_grad]
    callbacks, ckpt = standard_callbacks(ws, "eval-dense", {"kind": "dense", "inputs": inputs}, progress, None)
    module.train()
    fit = Trainer(module, params, cfg, stream, callbacks=callbacks).fit()
    module.eval()
    card = {"kind": "dense", "inputs": inputs, "what": "public model trained further on all sources, every weight",
            "tokens": fit.tokens, "steps": fit.steps, "final_loss": fit.final_loss, "losses": fit.losses,
            "seconds": fit.seconds, "tokens_per_s": fit.tokens_per_s}
    with atomic_dir(out) as tmp:
        save_model(module, tmp, experts=["dense"])
        (tmp / "card.json").write_text(json.dumps(card, indent=2))
        load_model(tmp)
    ckpt.clear()
    return LoadedModel(module=module, experts=["dense"]), card
