"""The model side (FlexOlmo), on top of `flexolmo.base`: the mixture-of-experts model and its
router (`moe`), generation with routing capture, the public model and expert training
(optionally with differential privacy), merging, router tuning and opt-out.

It never imports `index/`, `tracing/`, `api/` or `cli/`.
"""
