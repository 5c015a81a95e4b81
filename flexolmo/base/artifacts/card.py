"""The card every artifact carries (`card.json`): what it is, what it was built from, and
whether it is current.

One hash scheme: an input is named (`tokenizer`, `source`, `config`, `public_model`,
`expert:<name>`, `settings`) and identified by a sha256 hex digest:

    tokenizer      sha256 of tokenizer.json                          (flexolmo.base.tokenizer.tokenizer_hash)
    source         a source's content hash                           (flexolmo.base.documents.content_hash)
    config         sha256 of the canonical JSON of the recipe        (`sha256_json`)
    public_model   sha256 of the public model's weights              (flexolmo.model.layout.shared_weights_hash)
    expert:<name>  sha256 of an expert package's expert.safetensors
    settings       sha256 of the canonical JSON of other settings    (`sha256_json`)

An artifact is current when its card's inputs equal the inputs computed now.

A card of the format before `inputs` is upgraded on read by the upgrade registered for its
class (flexolmo/base/migrate.py; the upgrades themselves live in each layer's `upgrades.py`),
which names the inputs it can recover; one it cannot recover is left out, so the artifact
loads but is not current. `flexolmo migrate` writes upgraded cards back. A card that cannot be
read at all raises `OutdatedError` saying how to rebuild the artifact.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flexolmo.base import migrate
from flexolmo.base.errors import NotFoundError, OutdatedError

FORMAT = 2  # 1: cards without `inputs` (upgraded on read: flexolmo/base/migrate.py)
CARD_FILE = "card.json"

Inputs = dict[str, str]  # input name -> sha256 hex


def sha256_json(obj) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def now() -> str:
    return dt.datetime.now().replace(microsecond=0).isoformat()


class Card(BaseModel):
    """Base of every artifact card. Subclasses set `KIND` and `REBUILD` (the command that
    rebuilds the artifact, shown when its card cannot be read); an older format's upgrade is
    registered with `flexolmo.base.migrate.card_upgrade`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    KIND: ClassVar[str] = ""
    REBUILD: ClassVar[str] = ""
    FILE: ClassVar[str] = CARD_FILE  # the index's card keeps infini-gram-era name manifest.json

    kind: str
    format: int = FORMAT
    inputs: Inputs
    created_at: str = Field(default_factory=now)
    upgraded_from: int | None = None  # the format this card was read from, when older
    previous_fields: dict | None = None  # the older card's fields this format holds differently

    # -- is it current? ---------------------------------------------------------------------

    def is_current(self, inputs: Inputs) -> bool:
        """Was this artifact built from exactly these inputs?"""
        return self.stale_reason(inputs) is None

    def stale_reason(self, inputs: Inputs) -> str | None:
        """None when current; else which inputs changed, in words."""
        changed = sorted(k for k in set(inputs) | set(self.inputs) if inputs.get(k) != self.inputs.get(k))
        if not changed:
            return None
        unknown = [k for k in changed if k not in self.inputs]
        what = ", ".join(f"{k} (not recorded by an older version)" if k in unknown else k for k in changed)
        return f"{what} changed since it was built"

    # -- read and write ------------------------------------------------------------------------

    @classmethod
    def read(cls, folder: Path) -> Self:
        """Read `folder/card.json` (`FILE`), upgrading a previous version's card.

        :raises NotFoundError: no card
        :raises OutdatedError: a card this version cannot read (says how to rebuild)
        """
        path = Path(folder) / cls.FILE
        if not path.exists():
            raise NotFoundError(f"no {cls.KIND} in {folder} ({cls.FILE} missing); build it with `{cls._rebuild(folder)}`")
        hint = f"rebuild it with `{cls._rebuild(folder)}`"
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise OutdatedError(f"{path} is damaged ({e.msg}); {hint}") from None
        if not isinstance(data, dict):
            raise OutdatedError(f"{path} is not a card; {hint}")
        if data.get("format", 1) > FORMAT:
            raise OutdatedError(f"{path} was written by a newer flexolmo (card format {data['format']}, this "
                                f"version reads up to {FORMAT}); upgrade flexolmo or {hint}")
        try:
            if migrate.is_old_card(data):
                data = migrate.upgrade_card_dict(cls, data, FORMAT)
            return cls.model_validate(data)
        except (LookupError, ValidationError, KeyError, TypeError, ValueError) as e:
            detail = e.errors()[0] if isinstance(e, ValidationError) else e
            raise OutdatedError(f"{path} was written by another version of flexolmo and cannot be read "
                                f"({_short(detail)}); {hint}") from None

    @classmethod
    def find(cls, folder: Path) -> Self | None:
        """The card in `folder`, or None when there is none (a card that cannot be read raises)."""
        return cls.read(folder) if (Path(folder) / cls.FILE).exists() else None

    @classmethod
    def status(cls, folder: Path, inputs: Inputs) -> str | None:
        """None when the artifact in `folder` is current for `inputs`; else why not."""
        try:
            card = cls.find(folder)
        except OutdatedError as e:
            return str(e)
        if card is None:
            return f"no {cls.KIND} yet"
        return card.stale_reason(inputs)

    def save(self, folder: Path) -> None:
        """Write `folder/card.json` (inside the artifact's temporary folder: see `atomic_dir`)."""
        (Path(folder) / self.FILE).write_text(self.model_dump_json(indent=2))

    def as_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def _rebuild(cls, folder: Path) -> str:
        return cls.REBUILD.format(name=Path(folder).name)


def _short(detail) -> str:
    if isinstance(detail, dict):  # a pydantic error
        loc = ".".join(str(x) for x in detail.get("loc", ()))
        return f"{loc}: {detail.get('msg')}" if loc else str(detail.get("msg"))
    return str(detail)
