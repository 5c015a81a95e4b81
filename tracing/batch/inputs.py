"""A batch's input: JSONL or Parquet rows, each with its reason when it cannot be traced.

    rows = read_rows(Path("answers.jsonl"), spec)   # rows.table: row, id, text, prompt, error

Columns: `text` (the response; with mode generate, `prompt` instead), optional `prompt` and
`id`; with mode contamination, the spec's question and answer fields. A row is numbered by
its position among the input's records (0-based; a JSONL file's blank lines are not records).
A bad row (not UTF-8, not a JSON object, no text, empty, over the size limit, NUL bytes, a
repeated id) keeps its place with `error` set and is reported, never traced; it never stops
the batch. A file where *no* row has the column asked for is refused whole: that is a wrong
flag or a wrong file, not a bad row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flexolmo.base.errors import InputError, NotFoundError

from .spec import BatchSpec

ROWS_SCHEMA = pa.schema([("row", pa.int64()), ("id", pa.string()), ("text", pa.string()), ("prompt", pa.string()),
                         ("error", pa.string())])  # error "": a good row


@dataclass
class Rows:
    table: pa.Table  # ROWS_SCHEMA, one row per input record
    digest: str  # sha256 of the input file's bytes

    @property
    def n(self) -> int:
        return self.table.num_rows


def row_problem(text: object, max_chars: int, what: str = "text") -> str:
    """Why `text` cannot be traced ('' when it can): one rule for the reader and the tracer."""
    if text is None:
        return f"no {what}"
    if not isinstance(text, str):
        return f"{what} is a {type(text).__name__}, not a string"
    if not text.strip():
        return f"empty {what}"
    if len(text) > max_chars:
        return f"{what} is over the size limit ({len(text):,} characters > {max_chars:,})"
    if "\x00" in text:
        return f"{what} holds NUL bytes (binary, not text)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{what} is not valid UTF-8 text (character {e.start})"
    return ""


def read_rows(path: Path, spec: BatchSpec) -> Rows:
    """Every record of a JSONL or Parquet file as a row to trace (or a bad row with its reason)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no input file {path}; give a JSONL or Parquet file with a `text` column")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if path.suffix.lower() in (".parquet", ".pq"):
        records = _parquet_records(path)
    elif path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        records = _jsonl_records(data)
    else:
        raise InputError(f"{path.name}: give a .jsonl or .parquet file (one record per response)")
    main, second = _fields(spec)
    if records and not any(isinstance(r, dict) and main in r for r in records):
        seen = sorted({k for r in records if isinstance(r, dict) for k in r})
        raise InputError(f"{path.name}: no record has a {main!r} field (fields: {', '.join(seen) or 'none'}); "
                         + ("name the benchmark's fields with --question-field/--answer-field"
                            if spec.mode == "contamination" else f"give each response as {main!r}"))
    cols: dict[str, list] = {n: [] for n in ROWS_SCHEMA.names}
    first_of: dict[str, int] = {}
    for i, rec in enumerate(records):
        text = prompt = None
        rid = str(i)
        if isinstance(rec, str):  # the record's own reason
            err = rec
        else:
            rid = str(rec["id"]) if rec.get("id") is not None else str(i)
            text, err = _text(rec, main, second, spec)
            if spec.mode != "contamination":
                prompt = rec.get("prompt") if spec.mode == "trace" else None
                if prompt is not None and not err:
                    why = row_problem(prompt, spec.max_chars, "prompt")
                    err = why if why != "empty prompt" else ""
                    prompt = prompt if not why else None
            if not err and rid in first_of:
                err = f"repeats the id {rid!r} of row {first_of[rid]}; give every row its own id"
            first_of.setdefault(rid, i)
        for k, v in (("row", i), ("id", rid), ("text", None if err else text), ("prompt", None if err else prompt),
                     ("error", err)):
            cols[k].append(v)
    return Rows(pa.table(cols, schema=ROWS_SCHEMA), digest)


def _fields(spec: BatchSpec) -> tuple[str, str | None]:
    if spec.mode == "contamination":
        return spec.question_field, spec.answer_field
    return ("prompt" if spec.mode == "generate" else "text"), None


def _text(rec: dict, main: str, second: str | None, spec: BatchSpec) -> tuple[str | None, str]:
    """The text a row traces (a benchmark item: question, then answer) and why it cannot be ('' if it can)."""
    what = "prompt" if spec.mode == "generate" else main
    text = rec.get(main)
    err = row_problem(text, spec.max_chars, what)
    if err or second is None or rec.get(second) is None:
        return (None if err else text), err
    ans = rec[second]
    why = row_problem(ans, spec.max_chars, second)
    if why:
        return None, why
    text = f"{text} {ans}"
    return text, row_problem(text, spec.max_chars, f"{main} and {second}")


def _jsonl_records(data: bytes) -> list:
    """Each non-blank line as a dict, or as a string saying why it is not one."""
    out: list = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append(f"line {n} is not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x})")
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            out.append(f"line {n} is not JSON ({e.msg} at character {e.pos})")
            continue
        out.append(rec if isinstance(rec, dict) else f"line {n} is a JSON {type(rec).__name__}, not an object")
    return out


def _parquet_records(path: Path) -> list:
    """Each Parquet row as a dict; text columns are decoded value by value, so one value that is
    not UTF-8 makes that row bad, not the file."""
    try:
        t = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path.name} is not a readable Parquet file ({str(e)[:200]})") from None
    cols = {}
    for name in t.column_names:
        col = t.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type) \
                or pa.types.is_large_binary(col.type):
            raw = col.cast(pa.large_binary()).to_pylist()
            cols[name] = [_decoded(v, name) for v in raw]
        else:
            cols[name] = col.to_pylist()
    out: list = []
    for i in range(t.num_rows):
        rec = {k: v[i] for k, v in cols.items()}
        bad = [v for v in rec.values() if isinstance(v, _NotUtf8)]
        out.append(str(bad[0]) if bad else rec)
    return out


class _NotUtf8(str):
    """A Parquet value that does not decode: its text is the reason."""


def _decoded(v: bytes | None, column: str):
    if v is None:
        return None
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError as e:
        return _NotUtf8(f"{column} is not UTF-8 text (byte {e.start} is 0x{v[e.start]:02x})")
