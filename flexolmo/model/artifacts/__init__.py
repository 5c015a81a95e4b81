"""The model side's artifacts, each a module with a pydantic card (`flexolmo.base.artifacts.card.Card`).

    public_model.py    models/public/       PublicModelCard
    expert_package.py  experts/<source>/    ExpertPackageCard (+ the package format)
    merged_model.py    models/merged/       MergedModelCard
    upgrades.py        the older cards' upgrades (flexolmo/base/migrate.py applies them on read)
"""

from . import upgrades  # noqa: F401  (registers the upgrades before any card is read)
