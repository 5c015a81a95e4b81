"""Owner actions that reach every part of the system: the index, the model and stored traces.

A takedown removes a document from what traces return *and* from traces already stored; a
source switched to `counts` loses its document ids, titles and snippets in stored traces too.
The CLI and the API call these, not the lower-level functions, so nothing is forgotten.

Each action is two steps: the catalog records the change (the intent, committed first),
then the store is brought in line (`store.sync`). Should the second step not happen (a
crash, a kill, a writer lock held too long), the change is *pending*: every later trace,
query, export or `flexolmo traces repair` finishes it before it reads or writes, and
repeating the action finishes it too (a retried takedown is not refused half-done).
"""

from __future__ import annotations

from flexolmo.base import sources as src_lib
from flexolmo.base.errors import ConflictError
from flexolmo.base.workspace import Workspace
from index import catalog as index_catalog
from index import takedown as td
from index.results import Takedown

from . import store

REASON_MAX = 500  # characters of a takedown's reason


def takedown(ws: Workspace, source: str, doc_id: str, reason: str, by: str | None = None) -> Takedown:
    """Take a document down: the diff index blocks its windows; stored traces lose its text.

    A document already recorded as taken down is refused (409) once its redaction is done;
    while the redaction is pending, the call completes it and returns the recorded takedown.
    """
    by = src_lib.check_by(by)
    reason = src_lib.check_text(reason, "reason", REASON_MAX)
    done = next((t for t in index_catalog.list_takedowns(ws, source) if t.doc_id == doc_id), None)
    if done is not None:
        was_pending = not _satisfied(ws, ("takedown", source, doc_id))
        store.sync(ws)
        if was_pending:
            return done  # the half-applied takedown is now whole
        raise ConflictError(f"document {doc_id!r} of {source!r} is already taken down, and no stored trace "
                            "holds its text; see `flexolmo index takedowns`")
    t = td.takedown(ws, source, doc_id, reason, by=by)
    store.sync(ws)
    return t


def set_policy(ws: Workspace, name: str, *, by: str | None = None, key_id: str | None = None,
               comment: str | None = None, **change) -> src_lib.Source:
    """Change a source's policy; moving to `counts` also strips its documents from stored traces.

    :param change: the policy fields to set (active, visibility, expires, max_verbatim); None
        sets "none" (`max_verbatim=None` lifts the limit, `expires=None` the expiry date), a
        field left out is kept (`flexolmo.base.source_schema.PolicyChange`)
    Repeating a change that is recorded but not yet applied to the store applies it. `by`,
    `key_id` and `comment` go to the policy log (`flexolmo.base.sources.set_policy`)."""
    src = src_lib.set_policy(ws, name, by=by, key_id=key_id, comment=comment, **change)
    if src.visibility == "counts":
        store.sync(ws)
    return src


def repair(ws: Workspace) -> dict:
    """Finish every pending owner change in the store (and remove crashed writers' leftovers)."""
    return store.repair(ws)


def _satisfied(ws: Workspace, key: tuple) -> bool:
    """Has the store recorded `key` as applied? (False when there is no store yet: nothing to do.)"""
    from .parts import Manifest, root

    m = Manifest.read(root(ws))
    return m is None or list(key) in m.applied
