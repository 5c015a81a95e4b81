"""A batch's folder in the workspace, and how its results are committed.

    batches/<id>/batch.json              the spec, the input, who submitted it, row counts
    batches/<id>/progress.json           done / total, errors, rate, ETA, state (for pollers)
    batches/<id>/units/<unit>/<table>.parquet   one committed unit of results (a chunk of rows)
    batches/<id>/tmp/                    units being written (a crashed run's leftovers go at the next run)
    batches/<id>/<table>.parquet         the whole batch, one file per table, once every row is done
    batches/<id>/.lock                   held by the run working on the batch (flock)

A unit is written under tmp/ and renamed into units/ whole, so a unit is either there with
every one of its rows or not at all; the done-set is the union of the rows of the committed
units, so a run killed at any moment loses only the rows it had in flight, and the next run
traces exactly the rows missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from flexolmo.base.errors import ConflictError, InputError, NotFoundError
from flexolmo.base.workspace import Workspace

from .tables import SCHEMAS


def batches_dir(ws: Workspace) -> Path:
    return ws.root / "batches"


class BatchDir:
    """One batch's folder."""

    def __init__(self, ws: Workspace, batch_id: str):
        if not batch_id or not batch_id.isalnum():
            raise InputError(f"{batch_id!r} is not a batch id (letters and digits, e.g. b0123456789ab); "
                             "see `flexolmo report batch --help`")
        self.id = batch_id
        self.root = batches_dir(ws) / batch_id

    @classmethod
    def existing(cls, ws: Workspace, batch_id: str) -> "BatchDir":
        b = cls(ws, batch_id)
        if not (b.root / "batch.json").is_file():
            have = sorted(p.name for p in batches_dir(ws).glob("*") if (p / "batch.json").is_file())
            raise NotFoundError(f"no batch {batch_id!r} in {batches_dir(ws)}; batches: {', '.join(have) or 'none'} "
                                "(run `flexolmo trace-batch FILE` first)")
        return b

    # -- metadata ---------------------------------------------------------------------------

    def meta(self) -> dict:
        return json.loads((self.root / "batch.json").read_text())

    def write_meta(self, meta: dict) -> None:
        _write_json(self.root / "batch.json", meta)

    def progress(self) -> dict | None:
        try:
            return json.loads((self.root / "progress.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_progress(self, d: dict) -> None:
        _write_json(self.root / "progress.json", d)

    # -- units --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held by the run working on this batch: a second run of the same batch is refused."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConflictError(f"batch {self.id} is being run by another process; wait for it, or stop it "
                                    "(its committed rows are kept and a rerun resumes)") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def clean_tmp(self) -> None:
        """Remove the units a killed run left half-written (caller holds the lock)."""
        shutil.rmtree(self.root / "tmp", ignore_errors=True)

    def unit_files(self, table: str) -> list[Path]:
        return sorted((self.root / "units").glob(f"*/{table}.parquet"))

    def done_rows(self, table: str) -> set[int]:
        """The rows of the committed units of `table` (the batch's first table)."""
        done: set[int] = set()
        for f in self.unit_files(table):
            done.update(pq.read_table(f, columns=["row"]).column("row").to_pylist())
        return done

    def commit_unit(self, tables: dict[str, pa.Table]) -> Path:
        """Write a unit under tmp/, then rename it into units/ (atomic: all its rows or none)."""
        unit = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.root / "tmp" / unit
        tmp.mkdir(parents=True)
        for name, t in tables.items():
            with open(tmp / f"{name}.parquet", "wb") as fh:
                pq.write_table(t, fh)
                fh.flush()
                os.fsync(fh.fileno())
        (self.root / "units").mkdir(exist_ok=True)
        final = self.root / "units" / unit
        os.rename(tmp, final)
        return final

    def read(self, table: str) -> pa.Table:
        """Every committed row of `table` (the final file when written, else the units), by row."""
        whole = self.root / f"{table}.parquet"
        if whole.is_file():
            return pq.read_table(whole)
        files = self.unit_files(table)
        t = pa.concat_tables([pq.read_table(f) for f in files]) if files else SCHEMAS[table].empty_table()
        return t.sort_by([("row", "ascending")]) if t.num_rows else t

    def finalize(self, tables: tuple[str, ...]) -> list[Path]:
        """Write each table whole (sorted by row) as <table>.parquet, atomically."""
        out = []
        for name in tables:
            files = self.unit_files(name)
            t = pa.concat_tables([pq.read_table(f) for f in files]) if files else SCHEMAS[name].empty_table()
            t = t.sort_by([("row", "ascending")]) if t.num_rows else t
            tmp = self.root / f".{name}.parquet.tmp"
            pq.write_table(t, tmp)
            os.replace(tmp, self.root / f"{name}.parquet")
            out.append(self.root / f"{name}.parquet")
        return out


def _write_json(path: Path, d: dict) -> None:
    tmp = path.with_name(f".{path.name}-{uuid.uuid4().hex[:6]}")
    tmp.write_text(json.dumps(d, indent=1, default=str))
    os.replace(tmp, path)


def list_batches(ws: Workspace) -> list[dict]:
    """Every batch's metadata with its progress, newest first."""
    out = []
    for p in batches_dir(ws).glob("*/batch.json"):
        b = BatchDir(ws, p.parent.name)
        out.append({**b.meta(), "progress": b.progress()})
    return sorted(out, key=lambda m: m.get("created_at", ""), reverse=True)
