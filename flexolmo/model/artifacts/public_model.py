"""The public model artifact: `models/public/` (an HF checkpoint written by
`flexolmo.model.moe.save_model`, plus card.json).

Inputs: `tokenizer`, `source` (the public source's content) and `config` (the profile's model
shape and public training config, `Profile.recipe("public")`). Its identity, which every
expert package names as its `public_model` input, is `weights`: the hash of its weights
(`flexolmo.model.layout.shared_weights_hash`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from flexolmo.model.config import Profile
from flexolmo.base.errors import InputError, IntegrityError, NotFoundError
from flexolmo.model.layout import shared_weights_hash
from flexolmo.model.moe import LoadedModel, load_model, save_model
from flexolmo.base.sources import get_source
from flexolmo.base.tokenizer import tokenizer_hash
from flexolmo.base.workspace import Workspace, atomic_dir
from flexolmo.base.artifacts.card import Card, Inputs, sha256_json


class PublicModelCard(Card):
    KIND = "public model"
    REBUILD = "flexolmo train public"

    kind: Literal["public_model"] = "public_model"
    source: str
    profile: str
    config: dict  # the whole profile (Profile.to_dict)
    weights: str  # shared_weights_hash of the model
    n_params: int
    steps: int
    tokens: int
    final_loss: float
    losses: list[tuple[int, float]]
    seconds: float
    tokens_per_s: float
    throughput: str
    resumed_from: int | None = None
    world_size: int = 1
    router_init: str

    def stale_reason(self, inputs: Inputs) -> str | None:
        """As `Card.stale_reason`, with the `config` input derived from the recorded profile
        (`config`) by today's `Profile.recipe("public")`: a setting added later with its
        default, or one only owner training reads, does not make a public model stale."""
        recorded = {**self.inputs, "config": sha256_json(Profile.from_dict(self.config).recipe("public"))}
        return Card.stale_reason(self.model_copy(update={"inputs": recorded}), inputs)

def folder(ws: Workspace) -> Path:
    return ws.models_dir / "public"


def inputs(ws: Workspace, profile: Profile, source: str = "public") -> Inputs:
    """What a public model trained now with this profile would be built from."""
    return {"tokenizer": tokenizer_hash(ws), "source": get_source(ws, source).content_hash,
            "config": sha256_json(profile.recipe("public"))}


def status(ws: Workspace, profile: Profile, source: str = "public") -> str | None:
    """None when the public model is current for this profile; else why not."""
    return PublicModelCard.status(folder(ws), inputs(ws, profile, source))


def read(ws: Workspace) -> PublicModelCard:
    return PublicModelCard.read(folder(ws))


def load(ws: Workspace) -> tuple[LoadedModel, PublicModelCard]:
    """The public model and its card; refuses a model of another tokenizer or with > 1 expert."""
    path = folder(ws)
    if not (path / "config.json").exists():
        raise NotFoundError(f"no public model in {path}; run `flexolmo train public` first")
    card = read(ws)
    if card.inputs.get("tokenizer") != tokenizer_hash(ws):
        raise InputError(f"the public model in {path} was trained with another tokenizer; retrain it with "
                         "`flexolmo train public`")
    model = load_model(path)
    if model.config.num_experts != 1:
        raise InputError(f"{path} holds {model.config.num_experts} experts, not a public model; retrain it")
    return model, card


def write(ws: Workspace, model, card: PublicModelCard, source: str) -> None:
    """Write atomically: temp folder, verify (reads back with the same weights hash), rename."""
    with atomic_dir(folder(ws)) as tmp:
        save_model(model, tmp, experts=[source], extra={"public_model": card.weights})
        card.save(tmp)
        if shared_weights_hash(load_model(tmp)) != card.weights:
            raise IntegrityError(f"the public model written to {tmp} does not read back identically; disk problem?")


# ---------------------------------------------------------------------------------------
# the public model shipped with the repository

SHIPPED = Path(__file__).resolve().parents[3] / "assets" / "public-model"  # the repository's assets/
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "router_bias.safetensors", "experts.json",
               "card.json")


def install_shipped(ws: Workspace, profile: Profile, source: str = "public", shipped: Path = SHIPPED) -> str | None:
    """Put the shipped public model into the workspace when it was trained from exactly this
    workspace's inputs (tokenizer, public source, profile recipe); verified by its weights
    hash. Returns None when installed, else why not (the caller then trains one)."""
    if not (shipped / "card.json").exists():
        return f"no shipped public model in {shipped}"
    card = PublicModelCard.read(shipped)
    why = card.stale_reason(inputs(ws, profile, source))
    if why is not None:
        return f"the shipped public model does not fit this workspace: {why}"
    with atomic_dir(folder(ws)) as tmp:
        for name in MODEL_FILES:
            if (shipped / name).exists():
                shutil.copyfile(shipped / name, tmp / name)
        if shared_weights_hash(load_model(tmp)) != card.weights:
            raise IntegrityError(f"the shipped public model in {shipped} does not match its card's weights hash; "
                                 "restore it from git (`git checkout -- assets/public-model`) or train one")
    return None


def export(ws: Workspace, out: Path, command: str) -> Path:
    """Copy the workspace's public model to `out` for shipping, with its loss curve (PNG)
    and a README that names the exact command, the data and the hashes."""
    card = read(ws)
    src = folder(ws)
    with atomic_dir(Path(out)) as tmp:
        for name in MODEL_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, tmp / name)
        _loss_plot(card, tmp / "loss.png")
        (tmp / "README.md").write_text(_readme(card, command))
    return Path(out)


def _loss_plot(card: PublicModelCard, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*card.losses)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(steps, losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"public model, {card.profile} profile: {card.tokens:,} tokens, {card.n_params / 1e6:.1f}M parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _readme(card: PublicModelCard, command: str) -> str:
    return "\n".join([
        "# The shipped public model",
        "",
        "The FlexOlmo public model (expert 0 of every merged model), trained once with the project's own",
        "command and shipped so that `make demo` trains only the owners' experts. `make demo` installs it",
        "only when its recorded inputs equal the workspace's (same tokenizer, same public source, same",
        "profile recipe) and its weights hash checks out; otherwise it trains a public model itself.",
        "",
        f"- command: `{command}`",
        f"- profile: `{card.profile}`; {card.n_params:,} parameters; {card.steps} steps, {card.tokens:,} tokens;"
        f" final training loss {card.final_loss:.3f}",
        f"- trained in {card.seconds:,.0f} s ({card.throughput}) on 2 shared CPU cores; created {card.created_at}",
        "- inputs: " + ", ".join(f"{k} `{v[:16]}`" for k, v in card.inputs.items()),
        f"- weights hash (shared_weights_hash): `{card.weights}`",
        f"- {card.router_init}",
        "",
        "![loss curve](loss.png)",
        "",
    ])
