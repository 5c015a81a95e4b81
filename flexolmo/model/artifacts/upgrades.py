"""Upgrades of the model layer's older cards (registered with flexolmo/base/migrate.py).

The cards before `inputs` (format 1) named their inputs by key (`tokenizer_sha256`,
`public_hash`, `shared_weights_sha256`) and were trained with `PREVIOUS_RECIPE` (the router
recipe before the calibrated bias). `Card.read` applies these on every read; `flexolmo migrate`
writes the upgraded cards back (the `cards: model` step).
"""

from __future__ import annotations

import json

from flexolmo.base import migrate
from flexolmo.base.artifacts.card import sha256_json
from flexolmo.base.workspace import Workspace
from flexolmo.model.artifacts.expert_package import ExpertPackageCard, _dp_settings, config_hash
from flexolmo.model.artifacts.merged_model import MergedModelCard, inputs_for
from flexolmo.model.artifacts.public_model import PublicModelCard
from flexolmo.model.config import PREVIOUS_RECIPE, Profile


def _with_previous_recipe(config: dict) -> dict:
    """The profile as it was really trained: the older card left the router recipe out."""
    return {**config, "public": {**PREVIOUS_RECIPE, **config["public"]},
            "expert": {**PREVIOUS_RECIPE, **config["expert"]}}


@migrate.card_upgrade(PublicModelCard)
def public_model_card(old: dict) -> dict:
    """The source's content was not recorded, and the recipe was the previous one: loads, not current."""
    config = _with_previous_recipe(old["config"])
    recipe = Profile.from_dict(config).recipe("public")
    keep = ("source", "profile", "n_params", "steps", "tokens", "final_loss", "losses", "seconds",
            "tokens_per_s", "throughput", "resumed_from", "world_size", "router_init", "created_at")
    return {"kind": "public_model", **{k: old[k] for k in keep if k in old}, "config": config,
            "inputs": {"tokenizer": old["tokenizer_sha256"], "config": sha256_json(recipe)},
            "weights": old["shared_weights_sha256"]}


@migrate.card_upgrade(ExpertPackageCard)
def expert_package_card(old: dict) -> dict:
    """Trained with the previous recipe, the source's content not recorded: it loads and merges,
    but is not current."""
    config = old["config"]
    profile = Profile.from_dict(_with_previous_recipe(config))
    dp = old.get("privacy", {})
    keep = ("source", "owner", "domain", "profile", "config", "n_params", "n_trainable", "steps", "tokens",
            "final_loss", "losses", "seconds", "tokens_per_s", "throughput", "resumed_from", "world_size",
            "router_init", "privacy", "files", "created_at", "created_by")
    return {"kind": "expert_package", **{k: old[k] for k in keep if k in old},
            "inputs": {"tokenizer": old["tokenizer_sha256"], "public_model": old["public_hash"],
                       "config": config_hash(profile, _dp_settings(dp) if dp.get("dp") else None)}}


@migrate.card_upgrade(MergedModelCard)
def merged_model_card(old: dict) -> dict:
    """Every input is recoverable from the older card: an upgraded merged model stays current."""
    experts = old["experts"]
    packages = {e["source"]: e["package_sha256"] for e in experts[1:]}
    keep = ("experts", "top_k", "n_params", "router_bias", "router_tuning", "created_at")
    return {"kind": "merged_model", **{k: old[k] for k in keep if k in old}, "public_model": old["public_hash"],
            "inputs": inputs_for(old["public_hash"], packages, old["top_k"])}


def _merged_folders(ws: Workspace) -> list:
    """Folders of models/ holding a merged model's card (`merge --out` may name others than merged/)."""
    out = []
    for f in migrate.subfolders(ws.models_dir):
        if f.name == "public" or not (f / MergedModelCard.FILE).is_file():
            continue
        try:
            kind = json.loads((f / MergedModelCard.FILE).read_text()).get("kind")
        except (json.JSONDecodeError, AttributeError):
            kind = None
        if kind in ("merged", "merged_model", None):
            out.append(f)
    return out


def _cards(ws: Workspace, apply: bool) -> list[str]:
    cards = [(PublicModelCard, ws.models_dir / "public")]
    cards += [(ExpertPackageCard, f) for f in migrate.subfolders(ws.experts_dir)]
    cards += [(MergedModelCard, f) for f in _merged_folders(ws)]
    return migrate.run_cards(ws, apply, cards)


migrate.register(migrate.Step("cards: model", _cards, "public model, expert package and merged model cards "
                                                      "without `inputs`"))
