"""Sources: named bodies of documents, each owned by one data owner.

A source is registered from a folder or file of JSONL or Parquet with a `text` column
(`add_source`) or built from records (`add_records`, used by the sample federation).
Its documents are stored as `sources/<name>/documents.parquet` (the layout and its writer:
flexolmo/base/documents.py; `add_document_batches` registers a source streamed in batches)
and one row in the catalog's `sources` table. Registration validates everything before
it writes anything: a bad input leaves the catalog and the workspace as they were.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flexolmo.base import catalog, source_schema
from flexolmo.base.catalog import BY_MAX, check_by, check_text  # noqa: F401  (validated caller text, re-exported)
from flexolmo.base.errors import ConflictError, InputError, NotFoundError
from flexolmo.base.documents import DOCUMENTS_FILE, ROW_GROUP_ROWS, documents_table, write_documents
from flexolmo.base.documents import split_of  # noqa: F401  (re-exported: sources.split_of)
from flexolmo.base.records import read_records  # noqa: F401  (re-exported: sources.read_records)
from flexolmo.base.workspace import Workspace, current_user, replace_dir

VISIBILITIES = source_schema.VISIBILITIES
REMOTE_ORIGIN = "remote:"  # origin of a source held by its owner's node (index/remote.py)

# A source name becomes a folder name under indexes/, and infini-gram's loader classifies
# index files by substring, so names must not contain the index file kinds.
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
RESERVED_SUBSTRINGS = ("tokenized", "table", "offset", "metadata", "metaoff", "unigram")



@dataclass(frozen=True)
class Source:
    """One row of the source registry (its columns: `source_schema.SOURCE_COLUMNS`, checked by a test)."""

    name: str
    owner: str
    domain: str
    licence: str
    visibility: source_schema.Visibility
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

    @property
    def is_remote(self) -> bool:
        """Held by its owner's node (`sources add --remote`): no documents and no index here."""
        return self.origin.startswith(REMOTE_ORIGIN)

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


def parse_date(value: str | dt.date | None, what: str = "expiry date") -> dt.date | None:
    """A date given as YYYY-MM-DD (None: no date)."""
    if value is None or isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(value.strip())
    except ValueError:
        raise InputError(f"{what} {value!r} does not parse: write it as YYYY-MM-DD") from None


def _insert(con, row: dict) -> None:
    """Insert a `sources` row (columns left out take their default: NULL or the schema's)."""
    cols = [c.name for c in source_schema.SOURCE_COLUMNS if c.name in row]
    assert set(cols) == set(row), set(row) - set(cols)
    con.execute(f"INSERT INTO sources ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [row[c] for c in cols])


# ---------------------------------------------------------------------------------------
# registry


def add_records(ws: Workspace, name: str, records: list[dict], **kwargs) -> Source:
    """Register `records` (dicts with doc_id, text, optional title and metadata) as a source:
    sorted and checked (unique doc_ids, no NUL), then written by `add_document_batches`, whose
    keyword arguments (owner, domain, licence, origin, visibility, active, expires, replace, by)
    it takes. `replace` rebuilds an existing source of that name (used by `data samples`);
    otherwise an existing name is refused."""
    if not records:
        check_name(name)
        raise InputError(f"source {name!r} has no documents; give at least one document with text")
    table = documents_table(records)
    n_synth = sum(1 for r in records if (r.get("metadata") or {}).get("synthetic"))
    batches = (table.slice(i, ROW_GROUP_ROWS) for i in range(0, table.num_rows, ROW_GROUP_ROWS))
    return add_document_batches(ws, name, batches, n_synthetic=n_synth, **kwargs)


def add_document_batches(
    ws: Workspace,
    name: str,
    batches: Iterable[pa.Table],
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
    n_synthetic: int = 0,
) -> Source:
    """Register a source given as batches of rows in the stored layout (`DOC_SCHEMA`, doc_ids
    strictly increasing across batches): each batch is written as it comes (one Parquet row
    group), the content hash and counts are summed on the way, so a source larger than memory
    can be registered. `add_records` sorts and checks its records, then comes here.
    """
    check_name(name)
    check_visibility(visibility)
    expires = parse_date(expires)
    for field, value in (("owner", owner), ("domain", domain), ("licence", licence)):
        if not value or not value.strip():
            raise InputError(f"--{field} is required and may not be empty")
    with catalog.connect(ws, read_only=True) as con:
        exists = con.execute("SELECT 1 FROM sources WHERE name = ?", [name]).fetchone()
    if exists and not replace:
        raise ConflictError(f"source {name!r} already exists; choose another name")
    final = ws.source_dir(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        digest, stats = write_documents(tmp / DOCUMENTS_FILE, batches)
        if stats["n_docs_train"] + stats["n_docs_valid"] == 0:
            raise InputError(f"source {name!r} has no documents; give at least one document with text")
        now = dt.datetime.now().replace(microsecond=0)
        by = by or current_user()
        # the (possibly long) write is done: the catalog is held only for the swap
        with catalog.connect(ws) as con:
            con.execute("BEGIN")
            try:
                con.execute("DELETE FROM sources WHERE name = ?", [name])
                _insert(con, dict(name=name, owner=owner, domain=domain, licence=licence, visibility=visibility,
                                  active=active, expires=expires, origin=origin, content_hash=digest, **stats,
                                  n_synthetic=n_synthetic, created_at=now, updated_at=now, updated_by=by))
                # the documents are in place before the catalog row becomes visible
                replace_dir(tmp, final)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
    _insert(con, dict(name=name, owner=owner, domain=domain, licence=licence, visibility=visibility, active=True,
                      expires=None, origin=origin, content_hash=content_hash, n_docs_train=int(n_docs), n_docs_valid=0,
                      n_chars_train=0, n_chars_valid=0, n_synthetic=0, created_at=now, updated_at=now,
                      updated_by=check_by(by)))


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


def _documents_path(ws: Workspace, name: str) -> Path:
    src = get_source(ws, name)
    if src.is_remote:
        raise ConflictError(f"source {name!r} is held by its owner's node ({src.origin[len(REMOTE_ORIGIN):]}): "
                            "its documents are not in this workspace, only reached through traces")
    path = ws.source_dir(name) / DOCUMENTS_FILE
    if not path.exists():
        raise NotFoundError(f"{path} is missing: re-register source {name!r}")
    return path


def load_documents(ws: Workspace, name: str, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """The stored documents of a source, optionally one split, in doc_id order (all in memory:
    for a large source use `iter_document_batches`)."""
    path = _documents_path(ws, name)
    filters = [("split", "=", split)] if split else None
    return pq.read_table(path, columns=columns, filters=filters)


def iter_document_batches(ws: Workspace, name: str, split: str | None, columns: list[str],
                          batch_rows: int = 1024) -> Iterator[pa.Table]:
    """The stored documents in doc_id order, `batch_rows` rows at a time (fewer after the split
    filter): the file is streamed, never read whole."""
    path = _documents_path(ws, name)
    f = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    cols = list(dict.fromkeys(columns + (["split"] if split else [])))
    for rb in f.iter_batches(batch_size=batch_rows, columns=cols):
        t = pa.Table.from_batches([rb])
        if split:
            t = t.filter(pc.equal(t.column("split"), split))
        if t.num_rows:
            yield t.select(columns)


def set_policy(ws: Workspace, name: str, *, by: str | None = None, key_id: str | None = None,
               comment: str | None = None, **change) -> Source:
    """Change a source's policy, logging who and when. Owners' changes go through
    `tracing.provenance.governance.set_policy`, which also brings stored traces in line.

    :param change: the policy fields to set (`source_schema.POLICY_FIELDS`): active, visibility,
        expires, max_verbatim; None sets "none" (`expires=None`: no expiry date,
        `max_verbatim=None`: no limit), a field left out is kept
    :param by: who (default: the OS user); the service passes its key's owner
    :param key_id: the key the change was made with (the service), logged beside `by`
    :param comment: a note logged with the change (one printable line)
    """
    wanted = source_schema.policy_change(**change).changes()
    by = check_by(by)
    comment = None if comment is None else check_text(comment, "comment", BY_MAX)
    src = get_source(ws, name)
    changes = {k: v for k, v in wanted.items() if v != getattr(src, k)}
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
    for batch in iter_document_batches(ws, name, split, ["text"]):
        yield from batch.column("text").to_pylist()
