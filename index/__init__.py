"""Per-source suffix-array indexes (infini-gram format) and the catalog's index tables."""

from . import upgrades  # noqa: F401  (registers the older manifests' upgrade before any is read)
