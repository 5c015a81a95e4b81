"""Typed artifacts: one module per kind, each with a pydantic card.

    tokenizer.py       <workspace>/tokenizer/               TokenizerCard
    token_cache.py     sources/<name>/tokens-<split>-<tok>/  TokenCacheCard
    public_model.py    models/public/                        PublicModelCard
    expert_package.py  experts/<source>/                     ExpertPackageCard (+ the package format)
    merged_model.py    models/merged/                        MergedModelCard
    card.py            the base: one hash scheme, read/upgrade/save, is_current

Every card names what it was built from in `inputs` (input name -> sha256 hex), and
`card.is_current(inputs)` is the one answer to "is it current?" that the demo, training and
the tokenizer ask. The indexes have their own manifest in index/ (index/format.py).
"""
