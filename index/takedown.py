"""Takedowns: documents an owner withdraws, kept in a per-source diff index.

    flexolmo index takedown --source news --doc-id 'speeches/1790.txt' --reason "owner request"
    flexolmo index takedowns

The diff index `indexes/<name>-removed/` holds the removed documents with exactly the ids
of the main index (copied from it, so they match token for token, at its width), which is
what `InfiniGramEngineDiff` compares windows against to mark them `blocked`. Its card
(`kind: takedown_index`) carries the main index's inputs: it is as current as its index.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import duckdb
import numpy as np

from flexolmo.base import sources as src_lib
from flexolmo.base import tokenizer as tok_lib
from flexolmo.base.errors import ConflictError, InputError, IntegrityError, NotFoundError
from flexolmo.base.workspace import Workspace, current_user, replace_dir

from . import catalog, format as fmt
from .format import diff_dir
from .manifest import IndexManifest
from .results import Takedown
from .suffix_array import build_suffix_array
from .verify import verify_folder


def takedown(ws: Workspace, source: str, doc_id: str, reason: str, by: str | None = None) -> Takedown:
    """Record a takedown and rebuild the source's diff index so the document comes back blocked.

    :param doc_id: a document of the source (either split; only train documents are indexed).
    """
    if src_lib.get_source(ws, source).is_remote:
        raise ConflictError(f"source {source!r} is held by its owner's node: its owner takes documents down there "
                            "(`flexolmo index takedown` in the owner's workspace), and its node blocks them")
    if not reason or not reason.strip():
        raise InputError("--reason is required: say why the document is taken down")
    table = src_lib.load_documents(ws, source, columns=["doc_id"])
    if doc_id not in set(table.column("doc_id").to_pylist()):
        raise NotFoundError(f"source {source!r} has no document with doc_id {doc_id!r}; "
                            "see the doc_ids with `flexolmo sources show` or in the trace")
    existing = {t.doc_id for t in catalog.list_takedowns(ws, source)}
    if doc_id in existing:
        raise ConflictError(f"document {doc_id!r} of {source!r} is already taken down")
    by = by or current_user()
    now = catalog.now()
    with fmt.source_lock(ws, source):  # not while a build (or another takedown) writes the folders
        _record_takedown(ws, source, doc_id, reason.strip(), by, now, existing | {doc_id})
    return Takedown(source, doc_id, reason.strip(), by, now)


def _record_takedown(ws: Workspace, source: str, doc_id: str, reason: str, by: str, now, doc_ids: set[str]) -> None:
    tmp = _build_diff_tmp(ws, source, doc_ids)
    final = diff_dir(ws, source)
    with catalog.connect(ws) as con:
        con.execute("BEGIN")
        try:
            con.execute("INSERT INTO takedowns VALUES (?, ?, ?, ?, ?)", [source, doc_id, reason, by, now])
            if tmp is not None:
                replace_dir(tmp, final)
        except (duckdb.Error, OSError):
            con.execute("ROLLBACK")
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        con.execute("COMMIT")


def list_takedowns(ws: Workspace, source: str | None = None) -> list[Takedown]:
    if source:
        src_lib.get_source(ws, source)
    return catalog.list_takedowns(ws, source)


def rebuild_diff(ws: Workspace, source: str) -> Path | None:
    """Rebuild the diff index from the catalog's takedowns (after a main-index rebuild)."""
    with fmt.source_lock(ws, source):
        doc_ids = {t.doc_id for t in catalog.list_takedowns(ws, source)}
        final = diff_dir(ws, source)
        tmp = _build_diff_tmp(ws, source, doc_ids)
        if tmp is None:
            if final.exists() and not doc_ids:
                shutil.rmtree(final, ignore_errors=True)
            return None
        replace_dir(tmp, final)
        return final


def _build_diff_tmp(ws: Workspace, source: str, doc_ids: set[str]) -> Path | None:
    """Write the diff index for `doc_ids` into a temporary folder; None when nothing is indexed.

    Documents of the validation split (or of an unbuilt index) are recorded but have no
    tokens to block.
    """
    main = fmt.index_dir(ws, source)
    if not doc_ids or not main.exists():
        return None
    m = fmt.read_manifest(main)
    why = m.serve_problem(tok_lib.tokenizer_hash(ws))
    if why:
        raise ConflictError(f"cannot take documents down from the index of {source!r}: {why} first")
    w = m.width
    found = []  # (shard, doc_ix, metadata line)
    for st in m.shards:
        k = st.shard
        with open(m.shard_file(main, "metadata", k), "rb") as f:
            for ix, line in enumerate(f):
                if json.loads(line)["doc_id"] in doc_ids:
                    found.append((k, ix, line))
    if not found:
        return None
    tmp = ws.indexes_dir / f".tmp-{source}-removed-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        writer = fmt.ShardWriter(tmp, 0, source, w, m.vocab_size)
        items = []
        for k, ix, line in found:
            od = np.memmap(m.shard_file(main, "offset", k), dtype=np.uint64, mode="r")
            tokenized = m.shard_file(main, "tokenized", k)
            start = int(od[ix]) // w.bytes + 1  # skip the separator
            end = int(od[ix + 1]) // w.bytes if ix + 1 < len(od) else tokenized.stat().st_size // w.bytes
            items.append((fmt.read_tokens(tokenized, w, start, end - start), json.loads(line)))
        writer.add_many(items)
        writer.close()
        build_suffix_array(fmt.shard_file(tmp, "tokenized", 0), fmt.shard_file(tmp, "table", 0), tmp / ".work", w, cpus=1)
        shutil.rmtree(tmp / ".work", ignore_errors=True)
        shutil.copyfile(main / fmt.BOW_FILE, tmp / fmt.BOW_FILE)
        manifest = IndexManifest(
            kind="takedown_index", inputs=m.inputs_with(), token_dtype=m.token_dtype, vocab_size=m.vocab_size,
            build_id=uuid.uuid4().hex[:12], source=source, main_build_id=m.build_id,
            doc_ids=sorted(json.loads(x[2])["doc_id"] for x in found), n_docs=writer.n_docs, n_tokens=writer.n_tokens,
            n_shards=1, eos_id=m.eos_id, built_at=catalog.now().isoformat(),
            shards=[{"shard": 0, "n_docs": writer.n_docs, "n_tokens": writer.n_tokens,
                     "ds_tokens": writer.ds_size // w.bytes, "ptr_size": fmt.ptr_size(writer.ds_size)}],
            files=fmt.file_table(tmp))
        manifest.save(tmp)
        problems = verify_folder(tmp, manifest, n_ngrams=8, checksums=False)
        if problems:
            raise IntegrityError(f"the takedown index of {source!r} failed verification: {'; '.join(problems[:3])}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp
