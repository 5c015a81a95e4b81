"""Sources: named bodies of documents, each owned by one data owner.

A source is registered from a folder or file of JSONL or Parquet with a `text` column
(`add_source`) or built from records (`add_records`, used by the sample federation).
Its documents are stored as `sources/<name>/documents.parquet` with the columns

    doc_id    stable id: the input's `doc_id` or `id` column, else `<file>:<line or row>`
    text      the document
    title     the input's `title` column, else null
    split     'train' or 'validation' (about 2%, by a hash of doc_id: deterministic)
    metadata  every other input column, as a JSON object

and one row in the catalog's `sources` table. Registration validates everything before
it writes anything: a bad input leaves the catalog and the workspace as they were.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from flexolmo.base import catalog
from flexolmo.base.catalog import BY_MAX, check_by, check_text  # noqa: F401  (validated caller text, re-exported)
from flexolmo.base.errors import ConflictError, InputError, IntegrityError, NotFoundError
from flexolmo.base.records import read_records  # noqa: F401  (re-exported: sources.read_records)
from flexolmo.base.workspace import Workspace, atomic_dir, current_user

VISIBILITIES = ("full", "snippets", "counts")
VALIDATION_PER_MILLE = 20  # about 2% of documents are held out for evaluation
DOCUMENTS_FILE = "documents.parquet"

# A source name becomes a folder name under indexes/, and infini-gram's loader classifies
# index files by substring, so names must not contain the index file kinds.
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
RESERVED_SUBSTRINGS = ("tokenized", "table", "offset", "metadata", "metaoff", "unigram")

DOC_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("title", pa.string()),
        ("split", pa.string()),
        ("metadata", pa.string()),
    ]
)


INSERT_COLUMNS = ("(name, owner, domain, licence, visibility, active, expires, origin, content_hash, n_docs_train, "
                  "n_docs_valid, n_chars_train, n_chars_valid, n_synthetic, created_at, updated_at, updated_by)")


@dataclass(frozen=True)
class Source:
    """One row of the source registry."""

    name: str
    owner: str
    domain: str
    licence: str
    visibility: str
    active: bool
    expires: dt.date | None
    origin: str
    content_hash: str
    n_docs_train: int
    n_docs_valid: int
    n_chars_train: int
    n_chars_valid: int
    n_synthetic: int
    created_at: dt.datetime
    updated_at: dt.datetime
    updated_by: str
    max_verbatim: int | None = None  # the verbatim guard's limit (tracing/guard.py); None: none

    def available(self, today: dt.date | None = None) -> bool:
        """Active and not past its expiry date: may route and return documents."""
        today = today or dt.date.today()
        return self.active and (self.expires is None or self.expires >= today)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("expires", "created_at", "updated_at"):
            d[k] = d[k].isoformat() if d[k] is not None else None
        d["available"] = self.available()
        return d


# ---------------------------------------------------------------------------------------
# checks at the boundary


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise InputError(
            f"source name {name!r} is not a safe identifier: use 1-40 characters, lowercase "
            "letters, digits and '_', starting with a letter (e.g. 'news' or 'lab_notes')"
        )
    bad = [s for s in RESERVED_SUBSTRINGS if s in name]
    if bad:
        raise InputError(
            f"source name {name!r} contains {bad[0]!r}, which the index loader reserves for "
            "its file kinds; choose another name"
        )
    return name


def check_visibility(visibility: str) -> str:
    if visibility not in VISIBILITIES:
        raise InputError(f"visibility {visibility!r} is not one of {', '.join(VISIBILITIES)}")
    return visibility


def check_max_verbatim(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"--max-verbatim must be a whole number of tokens >= 1, got {n!r}")
    return n


def parse_date(value: str | dt.date | None, what: str = "expiry date") -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    if value.strip().lower() in ("", "none", "never"):
        return None
    try:
        return dt.date.fromisoformat(value.strip())
    except ValueError:
        raise InputError(f"{what} {value!r} does not parse: write it as YYYY-MM-DD (or 'never')") from None


def split_of(doc_id: str) -> str:
    """Deterministic train/validation split: about 2% validation, by a hash of doc_id."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")
    return "validation" if h % 1000 < VALIDATION_PER_MILLE else "train"


# ---------------------------------------------------------------------------------------
# registry


def _documents_table(records: list[dict]) -> pa.Table:
    seen: dict[str, str] = {}
    for r in records:
        if r["doc_id"] in seen:
            raise InputError(
                f"{r.get('_where', r['doc_id'])}: doc_id {r['doc_id']!r} repeats "
                f"({seen[r['doc_id']]}); doc_ids must be unique within a source"
            )
        seen[r["doc_id"]] = r.get("_where", r["doc_id"])
        if "\x00" in r["text"]:
            raise InputError(f"{r.get('_where', r['doc_id'])}: the text holds a NUL character; remove it")
    records = sorted(records, key=lambda r: r["doc_id"])
    return pa.table(
        {
            "doc_id": [r["doc_id"] for r in records],
            "text": [r["text"] for r in records],
            "title": [r.get("title") for r in records],
            "split": [split_of(r["doc_id"]) for r in records],
            "metadata": [json.dumps(r.get("metadata") or {}, default=str, ensure_ascii=False) for r in records],
        },
        schema=DOC_SCHEMA,
    )


def content_hash(table: pa.Table) -> str:
    h = hashlib.sha256()
    for doc_id, text in zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()):
        h.update(doc_id.encode("utf-8") + b"\x00" + text.encode("utf-8") + b"\x01")
    return h.hexdigest()


def _stats(table: pa.Table) -> dict:
    split = table.column("split").to_pylist()
    lengths = [len(t) for t in table.column("text").to_pylist()]
    out = {"n_docs_train": 0, "n_docs_valid": 0, "n_chars_train": 0, "n_chars_valid": 0}
    for s, n in zip(split, lengths):
        key = "train" if s == "train" else "valid"
        out[f"n_docs_{key}"] += 1
        out[f"n_chars_{key}"] += n
    return out


def add_records(
    ws: Workspace,
    name: str,
    records: list[dict],
    *,
    owner: str,
    domain: str,
    licence: str,
    origin: str,
    visibility: str = "full",
    active: bool = True,
    expires: str | dt.date | None = None,
    replace: bool = False,
    by: str | None = None,
) -> Source:
    """Register `records` (dicts with doc_id, text, optional title and metadata) as a source.

    :param replace: rebuild an existing source of that name (used by `data samples`);
        otherwise an existing name is refused.
    """
    check_name(name)
    check_visibility(visibility)
    expires = parse_date(expires)
    if not records:
        raise InputError(f"source {name!r} has no documents; give at least one document with text")
    for field, value in (("owner", owner), ("domain", domain), ("licence", licence)):
        if not value or not value.strip():
            raise InputError(f"--{field} is required and may not be empty")
    with catalog.connect(ws, read_only=True) as con:
        exists = con.execute("SELECT 1 FROM sources WHERE name = ?", [name]).fetchone()
    if exists and not replace:
        raise ConflictError(f"source {name!r} already exists; choose another name")
    table = _documents_table(records)
    stats = _stats(table)
    n_synth = sum(1 for r in records if (r.get("metadata") or {}).get("synthetic"))
    now = dt.datetime.now().replace(microsecond=0)
    by = by or current_user()
    final = ws.source_dir(name)
    with catalog.connect(ws) as con:
        con.execute("BEGIN")
        try:
            with atomic_dir(final) as tmp:
                pq.write_table(table, tmp / DOCUMENTS_FILE, compression="zstd")
                if pq.read_metadata(tmp / DOCUMENTS_FILE).num_rows != table.num_rows:
                    raise IntegrityError(f"{tmp / DOCUMENTS_FILE} did not read back whole; nothing was registered")
                con.execute("DELETE FROM sources WHERE name = ?", [name])
                con.execute(
                    f"INSERT INTO sources {INSERT_COLUMNS} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [name, owner, domain, licence, visibility, active, expires, origin, content_hash(table),
                     stats["n_docs_train"], stats["n_docs_valid"], stats["n_chars_train"], stats["n_chars_valid"],
                     n_synth, now, now, by],
                )
            # the documents are in place: only now does the catalog row become visible
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return get_source(ws, name)


def insert_remote_row(con, name: str, *, owner: str, domain: str, licence: str, origin: str, content_hash: str,
                      n_docs: int, visibility: str = "full", by: str | None = None) -> None:
    """The `sources` row of a source whose documents stay with their owner (`index/remote.py`
    registers it, with its node, in the caller's transaction `con`): no documents here."""
    check_name(name)
    check_visibility(visibility)
    for field, value in (("owner", owner), ("domain", domain), ("licence", licence)):
        if not value or not value.strip():
            raise InputError(f"--{field} is required and may not be empty")
    if con.execute("SELECT 1 FROM sources WHERE name = ?", [name]).fetchone():
        raise ConflictError(f"source {name!r} already exists; choose another name")
    now = dt.datetime.now().replace(microsecond=0)
    con.execute(f"INSERT INTO sources {INSERT_COLUMNS} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [name, owner, domain, licence, visibility, True, None, origin, content_hash, int(n_docs), 0, 0, 0, 0,
                 now, now, check_by(by)])


def add_source(ws: Workspace, name: str, path: str | Path, **kwargs) -> Source:
    """Register a user's folder or file of JSONL/Parquet documents as source `name`."""
    check_name(name)
    with catalog.connect(ws, read_only=True) as con:
        if con.execute("SELECT 1 FROM sources WHERE name = ?", [name]).fetchone():
            raise ConflictError(f"source {name!r} already exists; choose another name")
    records = read_records(path)
    return add_records(ws, name, records, origin=str(Path(path).resolve()), **kwargs)


def _row_to_source(row: tuple, cols: list[str]) -> Source:
    return Source(**dict(zip(cols, row)))


def list_sources(ws: Workspace) -> list[Source]:
    with catalog.connect(ws, read_only=True) as con:
        cur = con.execute("SELECT * FROM sources ORDER BY name")
        cols = [d[0] for d in cur.description]
        return [_row_to_source(r, cols) for r in cur.fetchall()]


def get_source(ws: Workspace, name: str) -> Source:
    with catalog.connect(ws, read_only=True) as con:
        cur = con.execute("SELECT * FROM sources WHERE name = ?", [name])
        cols = [d[0] for d in cur.description]
        row = cur.fetchone()
    if row is None:
        known = ", ".join(s.name for s in list_sources(ws)) or "none yet"
        raise NotFoundError(f"unknown source {name!r} (known: {known}); add it with `flexolmo sources add`")
    return _row_to_source(row, cols)


def load_documents(ws: Workspace, name: str, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """The stored documents of a source, optionally one split, in doc_id order."""
    get_source(ws, name)
    path = ws.source_dir(name) / DOCUMENTS_FILE
    if not path.exists():
        raise NotFoundError(f"{path} is missing: re-register source {name!r}")
    filters = [("split", "=", split)] if split else None
    return pq.read_table(path, columns=columns, filters=filters)


def set_policy(
    ws: Workspace,
    name: str,
    *,
    active: bool | None = None,
    visibility: str | None = None,
    expires: str | dt.date | None = None,
    clear_expiry: bool = False,
    max_verbatim: int | None = None,
    clear_max_verbatim: bool = False,
    by: str | None = None,
    key_id: str | None = None,
    comment: str | None = None,
) -> Source:
    """Change a source's policy (on/off, visibility, expiry, the verbatim guard's limit),
    logging who and when.

    :param by: who (default: the OS user); the service passes its key's owner
    :param key_id: the key the change was made with (the service), logged beside `by`
    :param comment: a note logged with the change (one printable line)
    """
    by = check_by(by)
    comment = None if comment is None else check_text(comment, "comment", BY_MAX)
    if max_verbatim is not None:
        check_max_verbatim(max_verbatim)
    src = get_source(ws, name)
    changes: dict[str, object] = {}
    if clear_max_verbatim:
        if src.max_verbatim is not None:
            changes["max_verbatim"] = None
    elif max_verbatim is not None and max_verbatim != src.max_verbatim:
        changes["max_verbatim"] = int(max_verbatim)
    if active is not None and active != src.active:
        changes["active"] = active
    if visibility is not None:
        check_visibility(visibility)
        if visibility != src.visibility:
            changes["visibility"] = visibility
    if clear_expiry:
        if src.expires is not None:
            changes["expires"] = None
    elif expires is not None:
        new = parse_date(expires)
        if new != src.expires:
            changes["expires"] = new
    if not changes:
        return src
    now = dt.datetime.now().replace(microsecond=0)
    with catalog.connect(ws) as con:
        con.execute("BEGIN")
        for field, new in changes.items():
            old = getattr(src, field)
            con.execute(f"UPDATE sources SET {field} = ?, updated_at = ?, updated_by = ? WHERE name = ?", [new, now, by, name])
            con.execute(
                "INSERT INTO policy_log (source, changed_at, changed_by, field, old_value, new_value, key_id, comment) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [name, now, by, field, None if old is None else str(old), None if new is None else str(new), key_id,
                 comment],
            )
        con.execute("COMMIT")
    return get_source(ws, name)


def policy_log(ws: Workspace, name: str | None = None) -> list[dict]:
    with catalog.connect(ws, read_only=True) as con:
        q = "SELECT * FROM policy_log" + (" WHERE source = ?" if name else "") + " ORDER BY changed_at"
        cur = con.execute(q, [name] if name else [])
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]


def available_sources(ws: Workspace, today: dt.date | None = None) -> list[Source]:
    """Sources that may route and return documents today (active and not expired)."""
    return [s for s in list_sources(ws) if s.available(today)]


def iter_texts(ws: Workspace, name: str, split: str | None = "train") -> Iterable[str]:
    yield from load_documents(ws, name, split=split, columns=["text"]).column("text").to_pylist()
