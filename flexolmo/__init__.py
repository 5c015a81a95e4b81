"""flexolmo: the model side of flexolmo-trace and the base beneath everything.

    flexolmo/base/        workspace, errors, catalog, sources, tokenizer, token cache, cards
    flexolmo/model/       FlexOlmo: model, generation, training, merging, privacy, router tuning
    flexolmo/evaluation/  the paper's comparison, on top of flexolmo/model/

`index/` and `tracing/` build on this package; it never imports them.
"""
