"""Keys: to tracers (scope `index`, for an owner's node), to people acting as an owner
(scope `owner`, for that owner's sources), to analysts reading every stored trace (scope
`analyst`) and the workspace's admin key (scope `admin`).

    flexolmo keys create --owner "Lab A" --scope index     # prints the key once
    flexolmo keys admin                                     # the admin key: created once, shown once
    store = KeyStore.for_workspace(ws)                      # <workspace>/keys.json
    rec = store.verify("flx_3f2a9c1e_...")                  # KeyRecord, or None

A key is `flx_<key_id>_<secret>`: `key_id` (8 hex) finds the record, the whole key is
checked against its sha256 (keys are 256-bit random, so a plain hash is enough; no
password hashing needed). Only the hash is stored, in a JSON file written atomically
(temporary file, fsync, rename) under an exclusive lock, mode 0600. A node re-reads the
file when it changes, so a new or revoked key takes effect on the next request.

The service's owner routes (api/auth.py) take an owner key for that owner's sources, or
the admin key for every source and for key management; without one they refuse (401),
from the first start on. The admin key is created the first time `flexolmo serve`,
`flexolmo demo` or `flexolmo keys admin` runs on a workspace (`KeyStore.ensure_admin`), and
replaced with `flexolmo keys admin --rotate`.

The file lives in the workspace by default; `--keys FILE` (or $FLEXOLMO_KEYS) puts it
elsewhere, e.g. to serve a workspace that must stay read-only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from flexolmo.base.catalog import check_text
from flexolmo.base.errors import FlexolmoError, InputError, IntegrityError, NotFoundError
from flexolmo.base.workspace import Workspace

ENV_VAR = "FLEXOLMO_KEYS"
FILE = "keys.json"
ANALYST = "analyst"  # reads every stored trace through the service (tracing/provenance/access.py)
SCOPES = ("index", "owner", ANALYST)  # index: a tracer asking an owner node; owner: a person acting as the owner
ADMIN = "admin"  # the scope (and owner name) of the workspace's admin key: every source, and key management
KEY_RE = re.compile(r"^flx_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class KeyRecord:
    """One issued key, as stored (never the key itself)."""

    key_id: str
    owner: str
    scope: str
    sha256: str
    created_at: str
    revoked: bool = False
    label: str = ""

    def public(self) -> dict:
        """What may be shown: everything but the hash."""
        d = asdict(self)
        del d["sha256"]
        return d


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise InputError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    return scope


class KeyStore:
    """The keys file of one workspace (or of `--keys FILE`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._cache: tuple[tuple, dict[str, KeyRecord]] | None = None
        self._mu = threading.Lock()

    @classmethod
    def for_workspace(cls, ws: Workspace, path: str | os.PathLike | None = None) -> "KeyStore":
        """`path`, else $FLEXOLMO_KEYS, else `<workspace>/keys.json`."""
        return cls(path or os.environ.get(ENV_VAR) or ws.root / FILE)

    # -- reading ---------------------------------------------------------------------------

    def _stamp(self) -> tuple:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return ()
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> dict[str, KeyRecord]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {r["key_id"]: KeyRecord(**r) for r in data["keys"]}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise IntegrityError(f"the keys file {self.path} is damaged ({e}); restore it or issue new keys") from None

    def records(self) -> dict[str, KeyRecord]:
        """Every key record, re-read only when the file changed."""
        with self._mu:
            stamp = self._stamp()
            if self._cache is None or self._cache[0] != stamp:
                self._cache = (stamp, self._read())
            return self._cache[1]

    def verify(self, key: str | None) -> KeyRecord | None:
        """The record of a valid, unrevoked key; None otherwise (never says which part was wrong)."""
        m = KEY_RE.match(key or "")
        if not m:
            return None
        rec = self.records().get(m.group(1))
        if rec is None or rec.revoked or not hmac.compare_digest(rec.sha256, _digest(key)):
            return None
        return rec

    def list(self, owner: str | None = None) -> list[KeyRecord]:
        return sorted((r for r in self.records().values() if owner is None or r.owner == owner),
                      key=lambda r: (r.created_at, r.key_id))

    # -- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, KeyRecord]]:
        """Read-modify-write under an exclusive lock; the file is replaced atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{self.path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            recs = self._read()
            yield recs
            write_secret(self.path, json.dumps({"format": 1, "keys": [asdict(r) for r in recs.values()]}, indent=1))

    def create(self, owner: str, scope: str = "index", label: str = "") -> tuple[KeyRecord, str]:
        """Issue a key: returns its record and the key itself, which is stored only hashed."""
        owner = check_text(owner, "owner", 200)
        check_scope(scope)
        label = check_text(label, "label", 200) if label else ""
        with self._locked() as recs:
            return _issue(recs, owner, scope, label)

    def ensure_admin(self) -> tuple[KeyRecord, str] | None:
        """Create the admin key if this file never held one; the record and key only when just created.

        "Never held": a revoked admin key counts, so the key is created once, on the first start;
        `rotate_admin` replaces it."""
        if any(r.scope == ADMIN for r in self.records().values()):
            return None
        with self._locked() as recs:
            if any(r.scope == ADMIN for r in recs.values()):  # another process was first
                return None
            return _issue(recs, ADMIN, ADMIN, "created at the first start")

    def rotate_admin(self) -> tuple[KeyRecord, str]:
        """Revoke every admin key and issue a new one (e.g. when the old one was lost)."""
        with self._locked() as recs:
            for r in list(recs.values()):
                if r.scope == ADMIN and not r.revoked:
                    recs[r.key_id] = KeyRecord(**{**asdict(r), "revoked": True})
            return _issue(recs, ADMIN, ADMIN, "rotated")

    def has_access_keys(self) -> bool:
        """Whether any unrevoked key may act on the service's owner routes (scope owner or admin)."""
        return any(r.scope in ("owner", ADMIN) and not r.revoked for r in self.records().values())

    def revoke(self, key_id: str) -> KeyRecord:
        with self._locked() as recs:
            if key_id not in recs:
                raise NotFoundError(f"no key {key_id!r} in {self.path}; see `flexolmo keys list`")
            recs[key_id] = KeyRecord(**{**asdict(recs[key_id]), "revoked": True})
            return recs[key_id]


def _issue(recs: dict[str, KeyRecord], owner: str, scope: str, label: str) -> tuple[KeyRecord, str]:
    """Add a new key to `recs` (held under the file's lock); the record and the key itself."""
    key_id = secrets.token_hex(4)
    while key_id in recs:
        key_id = secrets.token_hex(4)
    key = f"flx_{key_id}_{secrets.token_urlsafe(32)}"
    rec = KeyRecord(key_id=key_id, owner=owner, scope=scope, sha256=_digest(key),
                    created_at=dt.datetime.now().replace(microsecond=0).isoformat(), label=label)
    recs[key_id] = rec
    return rec, key


def read_key_file(path: str | os.PathLike) -> str:
    """A key from a file (one line, as `keys create` printed it), checked for its form."""
    p = Path(path)
    try:
        key = p.read_text().strip()
    except FileNotFoundError:
        raise InputError(f"{p}: no such key file; save the key the owner gave you in a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read the key file ({e})") from None
    if not KEY_RE.match(key):
        raise InputError(f"{p} does not hold a flexolmo key (expected one line 'flx_<8 hex>_<43 characters>')")
    return key


def write_secret(path: str | os.PathLike, text: str) -> None:
    """Write a key file atomically, readable by its user only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- the service's owner and admin routes ----------------------------------------------------


class KeyRequired(FlexolmoError):
    """No valid key (401)."""

    http_status = 401


class KeyForbidden(FlexolmoError):
    """A valid key that may not do this (403)."""

    http_status = 403


def bearer(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, or None."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def authorize(rec: KeyRecord | None, owner: str | None) -> KeyRecord:
    """The key acting on an owner route: `owner`'s key of scope owner, or the admin key.

    :param rec: the request's verified key (`KeyStore.verify`), None when it carried none or an invalid one
    :param owner: the owner of the source acted on; None for admin-only routes (key management)
    :raises KeyRequired: no valid key (401)
    :raises KeyForbidden: another owner's key, a tracer's key of scope `index`, or an owner key on an admin route (403)
    """
    if rec is None:
        raise KeyRequired("this action needs a key (Authorization: Bearer <key>): the source owner's key "
                          "(`flexolmo keys create --owner OWNER --scope owner`) or the admin key that "
                          "`flexolmo serve` printed at its first start (`flexolmo keys admin --rotate` replaces it)")
    if rec.scope == ADMIN:
        return rec
    if owner is None:
        raise KeyForbidden("only the admin key may do this (`flexolmo keys list` shows its id)")
    if rec.scope != "owner" or rec.owner != owner:
        raise KeyForbidden(f"this key {'belongs to another owner' if rec.scope == 'owner' else f'has scope {rec.scope!r}'}; "
                           f"only a key of scope 'owner' issued by {owner!r}, or the admin key, may do this")
    return rec
