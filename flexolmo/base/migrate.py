"""Old formats in one place: how what an older flexolmo wrote is brought to this version's format.

    flexolmo migrate             # upgrade a workspace in place; say what changed
    flexolmo migrate --check     # say what would change, change nothing

Two kinds of upgrade register here, each defined beside the format it upgrades:

    card upgrades    a card class -> a function (older card's dict -> this format's fields).
                     `Card.read` applies it in memory on every read, so readers open an older
                     card without code of their own; `migrate` writes the upgraded card back.
                         flexolmo/base/artifacts/upgrades.py     tokenizer, token cache
                         flexolmo/model/artifacts/upgrades.py    public model, expert package, merged model
                         index/upgrades.py                       index and takedown-index manifests
    workspace steps  a name -> (pending, apply) over a workspace: what is old, and the upgrade.
                         flexolmo/base/catalog.py                columns added to the catalog since (also
                                                                 on every open of the catalog)
                         the three modules above                  card files rewritten
                         tracing/provenance/upgrades.py          the single-file DuckDB provenance store
                                                                 imported into Parquet parts (also on the
                                                                 store's first open)

Every change is atomic on its own (a card is written beside and renamed over the old one, the
catalog's columns are added in one transaction, the store is imported as one committed part)
and every step is idempotent, so an interrupted `migrate` is finished by running it again and a
second run changes nothing. Upgrades lose nothing: an upgraded card keeps the older card's
fields that its format holds differently in `previous_fields`.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flexolmo.base.errors import ConflictError, FlexolmoError
from flexolmo.base.workspace import Workspace

CardUpgrade = Callable[[dict], dict]

_CARD_UPGRADES: dict[type, CardUpgrade] = {}
_STEPS: dict[str, "Step"] = {}


# -- card upgrades ---------------------------------------------------------------------------


def card_upgrade(card_cls: type) -> Callable[[CardUpgrade], CardUpgrade]:
    """Register the function that turns an older card of `card_cls` (a dict without `inputs`)
    into this format's fields (those it can recover; an input it cannot is left out, so the
    artifact loads but is not current)."""

    def deco(fn: CardUpgrade) -> CardUpgrade:
        _CARD_UPGRADES[card_cls] = fn
        return fn

    return deco


def card_upgrader(card_cls: type) -> CardUpgrade | None:
    """The registered upgrade of `card_cls` (or of its nearest base class), if any."""
    return next((_CARD_UPGRADES[c] for c in card_cls.__mro__ if c in _CARD_UPGRADES), None)


def is_old_card(data: dict) -> bool:
    """A card of the format before `inputs` (every card since names its inputs)."""
    return "inputs" not in data


def upgrade_card_dict(card_cls: type, old: dict, fmt: int) -> dict:
    """This format's fields of an older card: the registered upgrade's, the format it came
    from, and the older fields the new ones do not carry unchanged (nothing is lost).

    :raises KeyError, ValueError, TypeError: the card lacks what its upgrade needs
    :raises LookupError: no upgrade is registered for the class
    """
    fn = card_upgrader(card_cls)
    if fn is None:
        raise LookupError(f"no upgrade of a {getattr(card_cls, 'KIND', card_cls.__name__)} card without `inputs`")
    new = fn(old)
    kept = {k: v for k, v in old.items() if k not in new or new[k] != v}
    return {**new, "format": fmt, "upgraded_from": old.get("format", 1), "previous_fields": kept or None}


def rewrite_card(ws: Workspace, card_cls, folder: Path, apply: bool) -> str | None:
    """Write the upgraded card of `folder` over its older one (`apply`), or only say it would.

    Returns what changed, in words, or None when the card is current or absent. A card that
    cannot be upgraded raises the reader's OutdatedError (it says how to rebuild)."""
    path = Path(folder) / card_cls.FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError:
        raw = {}  # the reader says it is damaged
    if isinstance(raw, dict) and not is_old_card(raw):
        return None
    card = card_cls.read(folder)
    what = f"{_rel(ws, path)}: {card_cls.KIND} card format {card.upgraded_from} -> {card.format}"
    if apply:
        write_atomic(path, card.model_dump_json(indent=2))
    return what


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, flushed, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _rel(ws: Workspace, path: Path) -> str:
    try:
        return str(Path(path).relative_to(ws.root))
    except ValueError:
        return str(path)


# -- workspace steps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One upgrade of a workspace: `run(ws, apply)` returns what it changed (or, with
    apply=False, would change), one line each."""

    name: str
    run: Callable[[Workspace, bool], list[str]]
    doc: str = ""


def register(step: Step) -> Step:
    _STEPS[step.name] = step
    return step


def steps() -> list[Step]:
    return list(_STEPS.values())


@dataclass
class Report:
    """What `migrate` changed (or would change), per step, and what it could not upgrade."""

    applied: bool
    changes: dict[str, list[str]] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return sum(len(v) for v in self.changes.values())

    def to_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "changed": self.changed, "changes": self.changes, "problems": self.problems}


def run(ws: Workspace, apply: bool = True) -> Report:
    """Run every registered step over `ws` (those of the packages imported: `flexolmo migrate`
    imports them all). A step that fails is reported and the others still run."""
    report = Report(applied=apply)
    for step in steps():
        try:
            report.changes[step.name] = step.run(ws, apply)
        except Incomplete as e:
            report.changes[step.name], report.problems[step.name] = e.done, e.problems
        except FlexolmoError as e:
            report.changes[step.name], report.problems[step.name] = [], [str(e)]
    return report


class Incomplete(ConflictError):
    """A step upgraded some things and could not upgrade others (each problem says what to do)."""

    def __init__(self, done: list[str], problems: list[str]):
        super().__init__("; ".join(problems))
        self.done, self.problems = done, problems


def run_cards(ws: Workspace, apply: bool, cards: list[tuple[type, Path]]) -> list[str]:
    """A step's body for card files: rewrite each (class, folder) whose card is older."""
    out, problems = [], []
    for cls, folder in cards:
        try:
            what = rewrite_card(ws, cls, folder, apply)
        except FlexolmoError as e:
            problems.append(str(e))
            continue
        if what:
            out.append(what)
    if problems:
        raise Incomplete(out, problems)
    return out


def subfolders(parent: Path, pattern: str = "*") -> list[Path]:
    """Folders under `parent` matching `pattern`, skipping writers' temporary `.tmp-*` folders."""
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.glob(pattern) if p.is_dir() and not p.name.startswith("."))
