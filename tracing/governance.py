"""Owner actions that reach every part of the system: the index, the model and stored traces.

A takedown removes a document from what traces return *and* from traces already stored; a
source switched to `counts` loses its document ids, titles and snippets in stored traces too.
The CLI and the API call these, not the lower-level functions, so nothing is forgotten.
"""

from __future__ import annotations

import datetime as dt

from flexolmo import sources as src_lib
from flexolmo.workspace import Workspace
from index import takedown as td
from index.models import Takedown

from . import store


def takedown(ws: Workspace, source: str, doc_id: str, reason: str, by: str | None = None) -> Takedown:
    """Take a document down: the diff index blocks its windows; stored traces lose its text."""
    t = td.takedown(ws, source, doc_id, reason, by=by)
    store.redact(ws, source, doc_id=doc_id)
    return t


def set_policy(ws: Workspace, name: str, *, active: bool | None = None, visibility: str | None = None,
               expires: str | dt.date | None = None, clear_expiry: bool = False, by: str | None = None) -> src_lib.Source:
    """Change a source's policy; moving to `counts` also strips its documents from stored traces."""
    src = src_lib.set_policy(ws, name, active=active, visibility=visibility, expires=expires,
                             clear_expiry=clear_expiry, by=by)
    if src.visibility == "counts":
        store.redact(ws, name)
    return src
