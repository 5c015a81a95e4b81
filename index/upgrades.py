"""Upgrades of the index layer's older manifests (registered with flexolmo/base/migrate.py).

The manifests before cards (format 1) recorded every input by key (`tokenizer_hash`,
`content_hash`, `n_shards`, `token_dtype`), so an upgraded index stays current and is served.
`IndexManifest.read` applies this on every read; `flexolmo migrate` writes the upgraded
manifests back (the `cards: index` step).
"""

from __future__ import annotations

from flexolmo.base import migrate
from flexolmo.base.workspace import Workspace

from . import width as widths
from .manifest import IndexManifest, inputs_for


@migrate.card_upgrade(IndexManifest)
def index_manifest(old: dict) -> dict:
    kind = "takedown_index" if old.get("kind") == "takedown diff" else "index"
    keep = ("build_id", "source", "split", "n_docs", "n_tokens", "n_shards", "shards", "eos_id", "built_at",
            "files", "main_build_id", "doc_ids", "engine", "version", "token_dtype")
    return {**{k: old[k] for k in keep if k in old}, "kind": kind,
            "inputs": inputs_for(old["tokenizer_hash"], old["content_hash"], shards=old["n_shards"],
                                 width=widths.named(old.get("token_dtype", "u16")))}


def _cards(ws: Workspace, apply: bool) -> list[str]:
    return migrate.run_cards(ws, apply, [(IndexManifest, f) for f in migrate.subfolders(ws.indexes_dir)])


migrate.register(migrate.Step("cards: index", _cards, "index and takedown-index manifests without `inputs`"))
