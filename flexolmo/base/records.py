"""Reading a user's documents: a JSONL or Parquet file, or a folder of them, into records.

    records = read_records("my-corpus/")    # [{"doc_id", "text", "title", "metadata"}, ...]

Every problem is an `InputError` naming the file and line (or row) and what to do; nothing
is written here, so a bad input loses nothing (flexolmo/base/sources.py registers the records).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from flexolmo.base.errors import InputError

def _input_files(path: Path) -> list[Path]:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; give the path to a JSONL or Parquet file or a folder of them")
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
        if not files:
            raise InputError(f"{path}: the folder holds no .jsonl, .json or .parquet files")
    for f in files:
        if _kind(f) is None:
            raise InputError(f"{f}: unknown file type; use .jsonl (one JSON object per line) or .parquet")
    return files


def _kind(p: Path) -> str | None:
    name = p.name.lower()
    if name.endswith((".jsonl", ".json", ".ndjson", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def _read_jsonl(f: Path, label: str) -> Iterator[tuple[str, dict]]:
    import gzip

    opener = gzip.open if f.name.endswith(".gz") else open
    with opener(f, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{f}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object with a 'text' field, got {type(rec).__name__}")
            yield where, f"{label}:{lineno}", rec


def _read_parquet(f: Path, label: str) -> Iterator[tuple[str, dict]]:
    try:
        table = pq.read_table(f)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise InputError(f"{f}: cannot read as Parquet ({e})") from None
    if "text" not in table.column_names:
        raise InputError(f"{f}: no 'text' column (columns: {', '.join(table.column_names)}); rename the text column to 'text'")
    for row, rec in enumerate(table.to_pylist()):
        yield f"{f}: row {row}", f"{label}:{row}", rec


def read_records(path: str | Path) -> list[dict]:
    """Read and validate a user's documents; raise `InputError` naming file and line."""
    path = Path(path)
    files = _input_files(path)
    records: list[dict] = []
    for f in files:
        label = str(f.relative_to(path)) if path.is_dir() else f.name
        reader = _read_jsonl if _kind(f) == "jsonl" else _read_parquet
        for where, default_id, rec in reader(f, label):
            if "text" not in rec:
                raise InputError(f"{where}: no 'text' field (fields: {', '.join(rec) or 'none'}); every document needs one")
            text = rec.pop("text")
            if not isinstance(text, str):
                raise InputError(f"{where}: 'text' is {type(text).__name__}, not a string")
            if not text.strip():
                raise InputError(f"{where}: empty document; remove it or give it text")
            doc_id = rec.pop("doc_id", None)
            if doc_id is None:
                doc_id = rec.pop("id", None)
            doc_id = default_id if doc_id is None else str(doc_id)
            title = rec.pop("title", None)
            records.append(
                {
                    "doc_id": doc_id,
                    "text": text,
                    "title": None if title is None else str(title),
                    "metadata": rec,
                    "_where": where,
                }
            )
    return records


