"""Who owns a stored trace and who may read it: the `Caller` every read and write of the store is made for.

    who = Caller.for_request(ws, key_record, token)   # the API: a request's key and/or capability token
    store.save_trace(ws, trace, owner=owner_of(who))   # what a request stores belongs to its caller
    queries.query(ws, sql, caller=who)                  # SQL over the caller's views only
    listing.list_provenance(ws, f, caller=who); queries.trace_rows(ws, trace_id, caller=who)
    OPERATOR                                            # the workspace's CLI: reads everything

Owners. Every trace stored on behalf of a request has an owner (the `owner` column of the
`traces` table): `key:<key_id>` when the request carried a key, else `token:<sha256 of the
token>` for a client without a key, which gets an unguessable capability token
(`flxt_` + 256 random bits, header `X-Flexolmo-Token`) with its first stored trace and sends
it back to read its traces (the page keeps it in the tab's sessionStorage; a client may
keep sending the same token for all its traces). The store keeps only the token's hash, so
nobody who reads the store can act as its holder. A trace stored by the operator (`flexolmo
trace` on the workspace) or before traces had owners has none: analyst and admin keys
(and the operator) read it, nobody else.

Reading (one rule for every read route and the SQL route, by the key's scope):
    no key, or scope `index`   its own traces (owner: its key, or the token it sends)
    scope `owner`              its own, plus the span_sources and span_documents rows of its
                               sources in every trace; never another's traces, spans or experts
                               rows (the response and what was found in it)
    scope `analyst` or `admin` every trace
A caller reads through `store.reader(ws, caller=...)`: for one who reads everything, views
over the Parquet parts; for anyone else, in-memory tables holding only the rows it may read,
in a DuckDB that then has every file access, Python replacement scan and setting change
switched off, so no statement (joins, subqueries, CTEs, `information_schema`, `duckdb_*`,
`read_parquet`, `glob`, ATTACH) reaches a row outside them. A trace a caller may not read is
"not found" (404), never "forbidden": its existence is not told.

Anything else stored for a request (e.g. batches of traces) follows the same rule: record
`owner_of(caller)` with it and show it only where `caller.can_read(owner)`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field

from flexolmo.base.errors import InputError
from flexolmo.base.workspace import Workspace
from index.keys import ADMIN, ANALYST, KeyRecord

TOKEN_HEADER = "X-Flexolmo-Token"
TOKEN_RE = re.compile(r"^flxt_[A-Za-z0-9_-]{43}$")
READS_ALL = (ANALYST, ADMIN)  # key scopes that read every stored trace
SCOPE_LINE = ("stored traces: a client reads its own (made with its key, or with the token returned as "
              f"{TOKEN_HEADER}); scope owner also its sources' span rows; scope analyst or admin every trace "
              "(key scopes: index, owner, analyst, admin)")


def new_token() -> str:
    """A fresh capability token: 256 random bits."""
    return "flxt_" + secrets.token_urlsafe(32)


def token_owner(token: str) -> str:
    """The owner recorded for traces made with `token` (its hash; the token is never stored).

    :raises InputError: not a token of this service's form
    """
    if not TOKEN_RE.match(token or ""):
        raise InputError(f"the {TOKEN_HEADER} header is not a trace token (flxt_ and 43 characters, as a stored "
                         "trace's answer returns it); send the one you were given, or none to get a new one")
    return "token:" + hashlib.sha256(token.encode("ascii")).hexdigest()


def key_owner(rec: KeyRecord) -> str:
    """The owner recorded for traces made with the key `rec`."""
    return f"key:{rec.key_id}"


@dataclass(frozen=True)
class Caller:
    """Who reads or writes the store, and what it may read.

    :param owner: the owner recorded on what it stores (None: the operator, no owner)
    :param token: a client without a key: its capability token, to hand back with what it stored
    :param owners: the owners whose traces are its own
    :param reads_all: reads every trace (analyst and admin keys, the operator)
    :param sources: sources whose span_sources/span_documents rows it reads in every trace (an owner key's)
    """

    owner: str | None = None
    token: str | None = None
    owners: frozenset[str] = field(default_factory=frozenset)
    reads_all: bool = False
    sources: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def for_request(cls, ws: Workspace, rec: KeyRecord | None, token: str | None) -> "Caller":
        """The caller of a request carrying the verified key `rec` (or None) and the token header `token`.

        Without a key, a caller that sent no token gets a new one (returned only with a stored trace).
        With both, what it stores is its key's, and it reads what either made.
        """
        owners = {token_owner(token)} if token else set()
        if rec is None:
            token = token or new_token()
            return cls(owner=token_owner(token), token=token, owners=frozenset(owners | {token_owner(token)}))
        mine: frozenset[str] = frozenset()
        if rec.scope == "owner":
            from flexolmo.base.sources import list_sources

            mine = frozenset(s.name for s in list_sources(ws) if s.owner == rec.owner)
        return cls(owner=key_owner(rec), owners=frozenset(owners | {key_owner(rec)}),
                   reads_all=rec.scope in READS_ALL, sources=mine)

    def can_read(self, owner: str | None) -> bool:
        """Whether this caller reads a whole record (trace, batch) whose owner is `owner`."""
        return self.reads_all or (owner is not None and owner in self.owners)


OPERATOR = Caller(reads_all=True)  # the workspace's own CLI: unrestricted, stores without an owner


def owner_of(caller: Caller) -> str | None:
    """The owner to record on what `caller` stores (None for the operator)."""
    return caller.owner
