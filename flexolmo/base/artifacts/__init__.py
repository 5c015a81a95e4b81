"""Typed artifacts of the base layer, each with a pydantic card (the model's own artifacts are in
`flexolmo/model/artifacts/`, the index manifest in `index/manifest.py`).

    card.py            the base: one hash scheme, read/upgrade/save, is_current, stale_reason
    tokenizer.py       <workspace>/tokenizer/               TokenizerCard
    token_cache.py     sources/<name>/tokens-<split>-<tok>/  TokenCacheCard
    upgrades.py        the older cards' upgrades (flexolmo/base/migrate.py applies them on read)

Every card names what it was built from in `inputs` (input name -> sha256 hex), and
`card.is_current(inputs)` is the one answer to "is it current?" that the demo, training,
the tokenizer and the index builds ask.
"""

from . import upgrades  # noqa: F401  (registers the upgrades before any card is read)
