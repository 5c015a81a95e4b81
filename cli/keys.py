"""`flexolmo keys ...`: keys an owner issues to tracers (scope `index`) and to people (scope `owner`),
and the workspace's admin key (`keys admin`; `serve` and `demo` create it at their first run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flexolmo.base.workspace import Workspace
from index.keys import ADMIN, SCOPES, KeyStore, write_secret

from . import tables as T
from .common import console, ws

app = typer.Typer(help="Keys an owner issues: to tracers for its node, to people for owner actions.",
                  no_args_is_help=True)

KeysOpt = Annotated[Optional[str], typer.Option("--keys", help="The keys file (default: $FLEXOLMO_KEYS or "
                                                                "<workspace>/keys.json).")]


def register(app_: typer.Typer) -> None:
    app_.add_typer(app, name="keys")


@app.command("create")
def create(
    owner: Annotated[str, typer.Option(help="The owner issuing the key (as in its sources' `owner`).")],
    scope: Annotated[str, typer.Option(help=f"{' | '.join(SCOPES)}: a tracer asking this owner's node, a "
                                            "person acting as the owner, or an analyst reading every stored "
                                            "trace through the service.")] = "index",
    label: Annotated[str, typer.Option(help="Who the key is for (shown in `keys list`).")] = "",
    out: Annotated[Optional[str], typer.Option("--out", help="Also write the key to this file (mode 0600).")] = None,
    keys: KeysOpt = None,
) -> None:
    """Issue a key. It is printed once and stored only hashed: save it now."""
    store = KeyStore.for_workspace(ws(), keys)
    rec, key = store.create(owner, scope, label)
    if out:
        write_secret(Path(out), key)
    print(key)
    typer.echo(f"key {rec.key_id} for owner {rec.owner!r}, scope {rec.scope}: shown once, stored hashed in "
               f"{store.path}" + (f"; also written to {out}" if out else ""), err=True)


KEY_COLUMNS = [
    T.Col("key_id"),
    T.Col("owner", wrap=True),
    T.Col("scope"),
    T.Col("label", priority=2, wrap=True),
    T.Col("created_at", "created", priority=1),
    T.Col("revoked", show=lambda v: "yes" if v else ""),
]


@app.command("list")
def list_(
    owner: Annotated[Optional[str], typer.Option(help="Only this owner's keys.")] = None,
    as_json: T.JsonOpt = False,
    as_csv: T.CsvOpt = False,
    keys: KeysOpt = None,
) -> None:
    """List issued keys (ids, owners, scopes; never the keys)."""
    rows = [r.public() for r in KeyStore.for_workspace(ws(), keys).list(owner)]
    T.emit(console, rows, KEY_COLUMNS, title="keys", as_json=as_json, as_csv=as_csv)


@app.command("revoke")
def revoke(key_id: str, keys: KeysOpt = None) -> None:
    """Revoke a key: the next request that carries it gets 401."""
    rec = KeyStore.for_workspace(ws(), keys).revoke(key_id)
    console.print(f"revoked key {rec.key_id} of {rec.owner!r}")


@app.command("admin")
def admin(
    rotate: Annotated[bool, typer.Option("--rotate", help="Revoke the admin key and print a new one.")] = False,
    keys: KeysOpt = None,
) -> None:
    """The admin key (every source's owner routes, and key management): created once and shown once."""
    store = KeyStore.for_workspace(ws(), keys)
    if rotate:
        show_admin_key(store, *store.rotate_admin())
    elif not announce_admin_key(store):
        current = [r.key_id for r in store.list(ADMIN) if r.scope == ADMIN and not r.revoked]
        console.print(f"the admin key {', '.join(current) or '(revoked)'} was shown when it was created and is "
                      f"stored only hashed in {store.path}; `flexolmo keys admin --rotate` replaces it",
                      highlight=False)


def announce_admin_key(store: KeyStore | Workspace) -> bool:
    """Create the admin key if this keys file never held one, and print it: True when it was just created."""
    store = store if isinstance(store, KeyStore) else KeyStore.for_workspace(store)
    made = store.ensure_admin()
    if made is not None:
        show_admin_key(store, *made)
    return made is not None


def show_admin_key(store: KeyStore, rec, key: str) -> None:
    print(f"admin key {rec.key_id} (shown this once; stored only hashed in {store.path}):\n\n    {key}\n", flush=True)
    console.print("It acts on every source's owner routes (policy, takedowns, contribution) and manages keys: the "
                  "page asks for it, or for an owner's key, before an owner action. `flexolmo keys list` shows key "
                  "ids; `flexolmo keys admin --rotate` replaces a lost admin key; give each owner its own key with "
                  "`flexolmo keys create --owner OWNER --scope owner`.", highlight=False)
