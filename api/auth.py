"""Who may act on the owner and admin routes: FastAPI dependencies over the request's key.

    def set_policy(name: SourceName, ..., key: OwnerKey)   # the source owner's key, or the admin key
    def create_key(..., key: AdminKey)                     # the admin key only

Refused from the first start without a valid `Authorization: Bearer <key>` (401, asked for
before anything is looked up), and with another owner's key or a tracer's key (403); the
rules are `index.keys.authorize`. The route gets the key's record: who acted is its owner.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from flexolmo.base import sources as src_lib
from index.keys import ADMIN, KeyRecord, authorize

from .clients import identify
from .deps import get_service


def owner_key(name: str, request: Request) -> KeyRecord:
    """Routes on a source: the key of the source's owner, or the admin key."""
    svc = get_service(request)
    rec, _ = identify(request.scope, svc.keys)
    if rec is None or rec.scope == ADMIN:  # 401 before the source is looked up; the admin key acts on any
        return authorize(rec, None)
    return authorize(rec, src_lib.get_source(svc.ws, name).owner)


def admin_key(request: Request) -> KeyRecord:
    """Key management: the admin key only."""
    return authorize(identify(request.scope, get_service(request).keys)[0], None)


OwnerKey = Annotated[KeyRecord, Depends(owner_key)]
AdminKey = Annotated[KeyRecord, Depends(admin_key)]
