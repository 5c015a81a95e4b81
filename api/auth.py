"""Who may act on the owner and admin routes, and who reads stored traces: FastAPI dependencies
over the request's key (and capability token).

    def set_policy(name: SourceName, ..., key: OwnerKey)   # the source owner's key, or the admin key
    def create_key(..., key: AdminKey)                     # the admin key only
    def traces(..., who: CallerDep)                        # reads and stores as this caller

`CallerDep` is the request's `tracing.provenance.access.Caller`: its key (a key that is not valid
is 401, never read as no key), else the capability token of header X-Flexolmo-Token, else a
new token (handed back with the trace it stores). The rules of who reads what are access.py's.

Refused from the first start without a valid `Authorization: Bearer <key>` (401, asked for
before anything is looked up), and with another owner's key or a tracer's key (403); the
rules are `index.keys.authorize`. The route gets the key's record: who acted is its owner.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from flexolmo.base import sources as src_lib
from index.keys import ADMIN, KeyRecord, KeyRequired, authorize, bearer
from tracing.provenance.access import TOKEN_HEADER, Caller

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


def caller(request: Request) -> Caller:
    """Stored traces: who asks (its key, its token, or a new token)."""
    svc = get_service(request)
    rec, _ = identify(request.scope, svc.keys)
    if rec is None and bearer(request.headers.get("authorization")):
        raise KeyRequired("this request's key is not valid (mistyped, or revoked); send a valid key, or none "
                          "to read the traces made with this client's token")
    return Caller.for_request(svc.ws, rec, request.headers.get(TOKEN_HEADER))


OwnerKey = Annotated[KeyRecord, Depends(owner_key)]
AdminKey = Annotated[KeyRecord, Depends(admin_key)]
CallerDep = Annotated[Caller, Depends(caller)]
