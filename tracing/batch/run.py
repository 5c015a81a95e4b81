"""Run a batch: read the rows, trace those not done yet, commit each chunk, resumably.

    res = run_batch(ws, Path("answers.jsonl"), BatchSpec(), workers=2)
    res = run_batch(ws, Path("answers.jsonl"), BatchSpec(), engine="ray", workers=2)   # Ray Data

Engines. `local` (the default): with one worker, a `BatchTracer` in this process; with N, a
pool of N worker processes (forked from a fork server that imported the tracer once; each opens
the federation once, memory-mapped indexes sharing the page cache, and loads the model once;
torch gets cores / N threads each). The pool's tasks are a quarter of a chunk, regrouped into
whole chunks for the commits, which the driver makes while the workers go on.
`ray`: the same `BatchTracer` as Ray Data actors (tracing/batch/ray_engine.py). Whatever the
engine, the rows come back here and are committed the same way, so the results are the same.

Commit, per chunk of rows (tracing/batch/layout.py): first the traces into the provenance
store (one part: all or none), then the chunk's result tables as a unit (temp folder, then
rename). A trace's id comes from the batch id and its row (tracer.py): a row whose traces
reached the store before a kill, but whose unit did not, is traced again on the next run and
not stored twice. So a kill -9 at any moment loses only the rows in flight and duplicates none.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flexolmo.base.errors import ConflictError, InputError, NotFoundError
from flexolmo.base.workspace import Workspace

from .inputs import read_rows
from .layout import BatchDir
from .progress import Progress
from .spec import BatchSpec, batch_id
from .tables import tables_of, trace_from_dict
from .tracer import BatchTracer

# Rows per committed chunk (a kill loses at most the chunks in flight). Each chunk is one commit
# to the provenance store, which reads the catalog's redactions first (tens of ms, more on busy
# cores): spans-only rows take a few ms each, so they go in larger chunks than rows with a model.
CHUNK_ROWS = 32
CHUNK_ROWS_NO_MODEL = 256
# A pool's task is a fraction of a chunk: the workers stay busy while the driver commits, and the
# last chunk's rows are shared between the workers instead of left to one.
TASKS_PER_CHUNK = 4


def chunk_rows_for(spec: BatchSpec) -> int:
    """The default chunk size of a batch: larger where a row costs milliseconds (no model)."""
    return CHUNK_ROWS if spec.use_model and spec.mode != "contamination" else CHUNK_ROWS_NO_MODEL


@dataclass
class BatchResult:
    """What a run did."""

    batch_id: str
    folder: Path
    total: int  # rows in the input
    done: int  # rows with a result (traced or reported bad), this run and earlier ones
    errors: int  # bad rows among them
    run_rows: int  # rows this run committed
    resumed_from: int  # rows already done when this run started
    seconds: float
    engine: str
    workers: int
    files: list[Path] = field(default_factory=list)  # the batch's Parquet files, once complete

    @property
    def complete(self) -> bool:
        return self.done == self.total

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in ("batch_id", "total", "done", "errors", "run_rows", "resumed_from",
                                                 "seconds", "engine", "workers", "complete")},
                "folder": str(self.folder), "files": [str(f) for f in self.files]}


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_batch(ws: Workspace, input_path: Path, spec: BatchSpec | None = None, *, workers: int | None = None,
              engine: str = "local", ray_address: str | None = None, chunk_rows: int | None = None,
              submitted_by: str = "operator", stream: TextIO | None = None, bar: bool | None = None,
              every_s: float = 5.0) -> BatchResult:
    """Trace every row of `input_path` not done yet; commit as it goes; finish the batch's Parquet.

    :param workers: worker processes (local) or actors (ray); default: the cores
    :param chunk_rows: rows per committed chunk (default: `chunk_rows_for(spec)`)
    :param engine: "local" or "ray" (`ray_address`: a cluster's address; None: a local one)
    :param submitted_by: who submitted the batch (the operator, or an API key's id): it owns it
    :param stream: where progress goes (default stderr): a bar on a terminal, else a line every `every_s`
    """
    import time

    spec = spec or BatchSpec()
    workers = workers or default_workers()
    chunk_rows = chunk_rows or chunk_rows_for(spec)
    if workers < 1 or chunk_rows < 1:
        raise InputError("--workers and the chunk size must be at least 1")
    if engine not in ("local", "ray"):
        raise InputError(f"engine is local or ray, not {engine!r}")
    t0 = time.monotonic()
    rows = read_rows(Path(input_path), spec)
    bid = batch_id(rows.digest, spec)
    b = BatchDir(ws, bid)
    with b.lock():
        _first_meta(b, input_path, rows, spec, submitted_by)
        b.clean_tmp()
        first = spec.tables[0]
        done_before = b.done_rows(first)
        errors_before = _errors(b, first)
        pending = rows.table.filter(pc.invert(pc.is_in(rows.table.column("row"), pa.array(sorted(done_before),
                                                                                            pa.int64()))))
        prog = Progress(rows.n, len(done_before), errors_before, label=f"batch {bid}", stream=stream, bar=bar,
                        every_s=every_s, on_state=b.write_progress)
        run_rows, status = 0, "failed"
        try:
            if pending.num_rows:
                stored = _stored_ids(ws, bid) if spec.mode != "contamination" else set()
                chunks = _chunks(pending, chunk_rows)
                if engine == "ray":
                    from .ray_engine import ray_outputs

                    outs = ray_outputs(ws, spec, bid, pending, workers=workers, chunk_rows=chunk_rows,
                                       address=ray_address)
                elif workers == 1:
                    outs = _local_outputs(ws, spec, bid, chunks, workers)
                else:  # smaller tasks keep both workers busy to the end; the commits stay chunk-sized
                    tasks = _chunks(pending, max(1, -(-chunk_rows // TASKS_PER_CHUNK)))
                    outs = _regroup(_local_outputs(ws, spec, bid, tasks, workers), chunk_rows)
                for out in outs:
                    n, bad = _commit(ws, b, spec, out, stored, submitted_by)
                    run_rows += n
                    prog.advance(n, bad)
            status = "done" if prog.done == rows.n else "incomplete"
        finally:
            prog.close(status)
        files = b.finalize(spec.tables) if prog.done == rows.n else []
    return BatchResult(batch_id=bid, folder=b.root, total=rows.n, done=prog.done, errors=prog.errors,
                       run_rows=run_rows, resumed_from=len(done_before), seconds=round(time.monotonic() - t0, 2),
                       engine=engine, workers=workers, files=files)


def _first_meta(b: BatchDir, input_path: Path, rows, spec: BatchSpec, submitted_by: str) -> None:
    """batch.json, written by the batch's first run (or submission) only."""
    if not (b.root / "batch.json").is_file():
        b.root.mkdir(parents=True, exist_ok=True)
        b.write_meta({"id": b.id, "created_at": dt.datetime.now().replace(microsecond=0).isoformat(),
                      "input": str(Path(input_path).resolve()), "input_sha256": rows.digest, "n_rows": rows.n,
                      "mode": spec.mode, "spec": spec.model_dump(mode="json"), "submitted_by": submitted_by})


def _errors(b: BatchDir, table: str) -> int:
    import pyarrow.parquet as pq

    return sum(pc.sum(pc.equal(pq.read_table(f, columns=["status"]).column("status"), "error")).as_py() or 0
               for f in b.unit_files(table))


def _stored_ids(ws: Workspace, bid: str) -> set[str]:
    """The trace ids of this batch already in the provenance store (a killed run's last chunk)."""
    from ..provenance import store

    try:
        with store.reader(ws) as con:
            got = con.execute("SELECT trace_id FROM traces WHERE json_extract_string(settings, '$.batch.id') = ?",
                              [bid]).fetchall()
    except NotFoundError:
        return set()
    return {r[0] for r in got}


def _chunks(t: pa.Table, n: int) -> Iterator[dict[str, np.ndarray]]:
    """The rows as batches of numpy columns, the format `BatchTracer` takes (and Ray Data gives)."""
    for i in range(0, t.num_rows, n):
        d = t.slice(i, n).to_pydict()
        yield {k: np.array(v, dtype=np.int64 if k == "row" else object) for k, v in d.items()}


def _regroup(outs: Iterable[dict], n: int) -> Iterator[dict]:
    """The tracer's output batches joined into batches of at least `n` rows (the last: the rest)."""
    held: list[dict] = []
    rows = 0
    for out in outs:
        held.append(out)
        rows += len(out["row"])
        if rows >= n:
            yield _concat(held)
            held, rows = [], 0
    if held:
        yield _concat(held)


def _concat(outs: list[dict]) -> dict:
    if len(outs) == 1:
        return outs[0]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def _commit(ws: Workspace, b: BatchDir, spec: BatchSpec, out: dict, stored: set[str], owner: str) -> tuple[int, int]:
    """Store a chunk's traces (those not stored yet), then commit its tables as a unit. (rows, bad rows)"""
    from ..provenance import store

    traces = {}
    if spec.mode != "contamination":
        built = out.get("trace")  # rebuilt by a local worker already
        for i, status in enumerate(out["status"]):
            if status == "ok":
                traces[int(out["row"][i])] = (built[i] if built is not None else
                                              trace_from_dict(json.loads(out["result"][i])))
        new = [t for t in traces.values() if t.trace_id not in stored]
        store.save_traces(ws, new, owner=None if owner == "operator" else owner)  # redacts them as it stores them
        stored.update(t.trace_id for t in new)
        again = [t for t in traces.values() if t.trace_id not in {x.trace_id for x in new}]
        if again:
            keys = store.demands(ws)
            for t in again:
                store.redact_trace(t, keys)
    b.commit_unit(tables_of(spec.mode, out, traces))
    return len(out["row"]), int(sum(1 for s in out["status"] if s != "ok"))


# -- the local engine -------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(workspace: str, spec: dict, bid: str, threads: int) -> None:
    if spec.get("use_model") and spec.get("mode") != "contamination":  # a worker without the model needs no torch
        import torch

        from flexolmo.base.hflog import quiet_transformers

        quiet_transformers()
        torch.set_num_threads(threads)
    try:
        _WORKER["tracer"] = BatchTracer(workspace, spec, bid, with_traces=True)
    except Exception as e:  # raised again by the first task, so the run stops with the reason
        _WORKER["error"] = e


def _work(batch: dict) -> dict:
    if "error" in _WORKER:
        raise _WORKER["error"]
    return _WORKER["tracer"](batch)


def _pool_context(use_model: bool):
    """Where the pool's workers come from: forked from a fork server (a clean process started once
    per driver, which imports this module, the tracer's and the search's compiled typed lists once:
    warm.py), so a worker starts without importing and compiling everything again; spawned where
    there is no fork server (not POSIX)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # torch and the model classes too where the first pool needs the model (a pool without one
    # forks small workers); the fork server, once started, keeps what it has
    model = ["flexolmo.model.loading", "flexolmo.model.merge", "tracing.experts"] if use_model else []
    ctx.set_forkserver_preload([__name__, f"{__package__}.warm", *model])
    return ctx


def _local_outputs(ws: Workspace, spec: BatchSpec, bid: str, chunks: Iterable[dict], workers: int) -> Iterator[dict]:
    """Each chunk traced: in this process with one worker, else by a pool of worker processes."""
    sd = spec.model_dump(mode="json")
    if workers == 1:
        bt = BatchTracer(str(ws.root), sd, bid)
        for c in chunks:
            yield bt(c)
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, default_workers() // workers)
    ctx = _pool_context(spec.use_model and spec.mode != "contamination")
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                             initializer=_init_worker, initargs=(str(ws.root), sd, bid, threads))
    todo, running = deque(chunks), set()
    finished_all = False
    try:
        while todo or running:
            # a task queued behind each one in flight, and a chunk's worth more: the workers go on
            # while the driver commits (this generator waits meanwhile)
            while todo and len(running) < 2 * workers + TASKS_PER_CHUNK:
                running.add(ex.submit(_work, todo.popleft()))
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                yield f.result()
        finished_all = True
    finally:
        # every result is in: the workers exit on their own (seconds of tear-down nobody waits for)
        ex.shutdown(wait=not finished_all, cancel_futures=True)



# -- running in the background (the API) -------------------------------------------------------


def save_upload(ws: Workspace, data: bytes, fmt: str) -> Path:
    """Keep an uploaded input in the workspace (batches/uploads/<sha256>.<fmt>), written atomically."""
    import hashlib

    from .layout import batches_dir

    if fmt not in ("jsonl", "parquet"):
        raise InputError(f"an uploaded batch is jsonl or parquet, not {fmt!r}")
    folder = batches_dir(ws) / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:24]}.{fmt}"
    if not path.exists():
        tmp = folder / f".{path.name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def start_batch(ws: Workspace, input_path: Path, spec: BatchSpec, *, submitted_by: str,
                workers: int | None = None) -> str:
    """Start `run_batch` on a background thread; returns the batch id at once (its progress is
    `BatchDir.progress()`: state running, done, incomplete or failed with the error)."""
    import threading

    rows = read_rows(Path(input_path), spec)  # bad input is refused now, before anything starts
    bid = batch_id(rows.digest, spec)
    b = BatchDir(ws, bid)
    if (b.root / "batch.json").is_file() and b.meta().get("submitted_by") != submitted_by:
        raise ConflictError(f"batch {bid} (the same input and options) was submitted by someone else; "
                            "change an option or the input to run your own")
    _first_meta(b, input_path, rows, spec, submitted_by)
    if b.progress() is None:
        b.write_progress({"state": "queued", "done": 0, "total": rows.n, "errors": 0})

    def run() -> None:
        try:
            run_batch(ws, Path(input_path), spec, workers=workers, submitted_by=submitted_by, bar=False, every_s=60)
        except Exception as e:  # the poller reads why
            b.write_progress({**(b.progress() or {}), "state": "failed", "error": str(e)[:500]})

    threading.Thread(target=run, name=f"batch-{bid}", daemon=True).start()
    return bid
