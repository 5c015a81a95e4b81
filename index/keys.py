"""Keys an owner issues: to tracers (scope `index`, for its node) and to people (scope `owner`).

    flexolmo keys create --owner "Lab A" --scope index     # prints the key once
    store = KeyStore.for_workspace(ws)                      # <workspace>/keys.json
    rec = store.verify("flx_3f2a9c1e_...")                  # KeyRecord, or None

A key is `flx_<key_id>_<secret>`: `key_id` (8 hex) finds the record, the whole key is
checked against its sha256 (keys are 256-bit random, so a plain hash is enough; no
password hashing needed). Only the hash is stored, in a JSON file written atomically
(temporary file, fsync, rename) under an exclusive lock, mode 0600. A node re-reads the
file when it changes, so a new or revoked key takes effect on the next request.

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
SCOPES = ("index", "owner")  # index: a tracer asking an owner node; owner: a person acting as the owner
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
            key_id = secrets.token_hex(4)
            while key_id in recs:
                key_id = secrets.token_hex(4)
            key = f"flx_{key_id}_{secrets.token_urlsafe(32)}"
            rec = KeyRecord(key_id=key_id, owner=owner, scope=scope, sha256=_digest(key),
                            created_at=dt.datetime.now().replace(microsecond=0).isoformat(), label=label)
            recs[key_id] = rec
        return rec, key

    def revoke(self, key_id: str) -> KeyRecord:
        with self._locked() as recs:
            if key_id not in recs:
                raise NotFoundError(f"no key {key_id!r} in {self.path}; see `flexolmo keys list`")
            recs[key_id] = KeyRecord(**{**asdict(recs[key_id]), "revoked": True})
            return recs[key_id]


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


# -- people acting as an owner (the API's owner routes) ---------------------------------------

REQUIRE_ENV = "FLEXOLMO_REQUIRE_OWNER_KEYS"  # "1": owner routes need a key even before any is issued


class KeyRequired(FlexolmoError):
    """No valid key (401)."""

    http_status = 401


class KeyForbidden(FlexolmoError):
    """A valid key that may not do this (403)."""

    http_status = 403


def check_owner_key(store: KeyStore, authorization: str | None, owner: str) -> KeyRecord | None:
    """The key acting for `owner` on an owner route, from an `Authorization: Bearer` header.

    Owner routes are open (None) while the keys file holds no key of scope `owner` and
    $FLEXOLMO_REQUIRE_OWNER_KEYS is not 1 (a fresh workspace on loopback, as before keys);
    once an owner key is issued, every owner route needs that source owner's key.

    :raises KeyRequired: no key or an invalid one (401)
    :raises KeyForbidden: another owner's key, or a tracer's key of scope `index` (403)
    """
    required = os.environ.get(REQUIRE_ENV) == "1" or any(r.scope == "owner" for r in store.records().values())
    key = authorization[7:].strip() if authorization and authorization[:7].lower() == "bearer " else None
    if key is None and not required:
        return None
    rec = store.verify(key)
    if rec is None:
        raise KeyRequired("this owner action needs the owner's key (Authorization: Bearer <key>); the owner "
                          "issues one with `flexolmo keys create --owner OWNER --scope owner`")
    if rec.scope != "owner" or rec.owner != owner:
        raise KeyForbidden(f"this key {'is a tracer key' if rec.scope != 'owner' else 'belongs to another owner'}; "
                           f"only a key of scope 'owner' issued by {owner!r} may do this")
    return rec
