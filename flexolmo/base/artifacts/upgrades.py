"""Upgrades of the base layer's older cards (registered with flexolmo/base/migrate.py).

The cards before `inputs` (format 1) named their inputs by key: the tokenizer's `sha256` and
`source_content_hash`, the token cache's `tokenizer_sha256`. `Card.read` applies these on
every read; `flexolmo migrate` writes the upgraded cards back (the `cards: base` step).
"""

from __future__ import annotations

from flexolmo.base import migrate
from flexolmo.base.artifacts.token_cache import TokenCacheCard
from flexolmo.base.artifacts.tokenizer import TOKENIZER_FILE, TokenizerCard, inputs_for
from flexolmo.base.workspace import Workspace


@migrate.card_upgrade(TokenizerCard)
def tokenizer_card(old: dict) -> dict:
    """Every input was recorded (the public source's content and the vocabulary size): current."""
    content = old.get("source_content_hash")
    return {
        "kind": "tokenizer", "algorithm": old["kind"],
        "inputs": inputs_for(content, {"vocab_size": old["vocab_size"]}) if content else {},
        **{k: old[k] for k in ("vocab_size", "eos_token", "eos_id", "pad_token", "pad_id", "n_texts", "seconds")},
        **{k: old[k] for k in ("bow_rule",) if k in old},
        "trained_on": old["trained_on"], "n_bow_ids": old["n_bow_ids"],
        "files": {TOKENIZER_FILE: old["sha256"]},
    }


@migrate.card_upgrade(TokenCacheCard)
def token_cache_card(old: dict) -> dict:
    """The tokenizer was recorded, the source's content was not: the cache reads, but is not
    current (the next build or training run remakes it)."""
    return {"kind": "token_cache", "inputs": {"tokenizer": old["tokenizer_sha256"]},
            **{k: old[k] for k in ("source", "split", "n_docs", "n_tokens")}}


def _cards(ws: Workspace, apply: bool) -> list[str]:
    cards = [(TokenizerCard, ws.tokenizer_dir)]
    for src in migrate.subfolders(ws.sources_dir):
        cards += [(TokenCacheCard, f) for f in migrate.subfolders(src, "tokens-*")]
    return migrate.run_cards(ws, apply, cards)


migrate.register(migrate.Step("cards: base", _cards, "tokenizer and token-cache cards without `inputs`"))
