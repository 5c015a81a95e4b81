"""infini-gram's on-disk index format (version 4, u16 ids), written by the project itself.

One shard k of an index folder is

    tokenized.k   for every document: the separator 0xFFFF, then its u16 ids (little-endian)
    offset.k      u64 byte offset in tokenized.k where each document (its separator) begins
    metadata.k    one JSON line per document ({"doc_id", "source", "title", "path", ...})
    metaoff.k     u64 byte offset in metadata.k where each line begins
    unigram.k     "<id> <count>" per line for every id that occurs, separator included
    table.k       suffix array: for each of the tok_cnt = size(tokenized.k) / 2 positions, its
                  byte offset in `ptr_size` little-endian bytes, sorted by the little-endian
                  bytes of the ids that follow; built by the package's `rust_indexing`

plus `bow_ids.txt` (one id per line) and `manifest.json` (counts, hashes, checksums).
`shard_file` is the one place these names are made; `index_dir`/`diff_dir` say where a
source's index and its takedown index live, and `source_lock` who may write them.

infini-gram's C++ loader classifies a folder's files by *substring of the whole path*
(`path.find("table")`), so a folder whose path contains e.g. `table` (a pytest tmp path
`test_table0`) would be misread. `loader_path` hands the engine a path without them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

import infini_gram

from flexolmo.base.errors import ConflictError, IntegrityError, NotFoundError
from flexolmo.base.workspace import Workspace, file_sha256

DOC_SEP = 0xFFFF  # infini-gram's document separator in u16 indexes
TOKEN_WIDTH = 2  # bytes per id (u16)
KINDS = ("tokenized", "table", "offset", "metadata", "metaoff", "unigram")
MANIFEST = "manifest.json"
BOW_FILE = "bow_ids.txt"
FORMAT = {"engine": "infini-gram", "version": 4, "token_dtype": "u16"}
# rust_indexing's make-part reads HACK bytes past its range so that suffixes crossing the
# boundary sort correctly; with several parts on a file shorter than that its output is wrong
# (measured: 1000 ids, 2 parts -> a table missing positions), so small files use one part.
HACK = 100_000
SINGLE_PART_BELOW = 4 * HACK  # bytes of tokenized.k


def rust_indexing() -> Path:
    """The `rust_indexing` binary shipped inside the infini-gram package."""
    path = Path(infini_gram.__file__).parent / "rust_indexing"
    if not path.exists() or not os.access(path, os.X_OK):
        raise NotFoundError(f"{path} is missing or not executable; reinstall with `pip install infini-gram==2.6.0`")
    return path


def ptr_size(ds_size: int) -> int:
    """Bytes per suffix-array entry, as rust_indexing chooses them (`--ratio`)."""
    return max(1, math.ceil(math.log2(max(ds_size, 2)) / 8))


def shard_file(folder: Path, kind: str, k: int) -> Path:
    """The file of one kind (`tokenized`, `table`, ...) of shard k: the only place its name is made."""
    if kind not in KINDS:
        raise ValueError(f"unknown index file kind {kind!r}; one of {', '.join(KINDS)}")
    return Path(folder) / f"{kind}.{k}"


# ---------------------------------------------------------------------------------------
# where indexes live, and who may write them


def index_dir(ws: Workspace, name: str) -> Path:
    """The served index of a source."""
    return ws.indexes_dir / name


def diff_dir(ws: Workspace, name: str) -> Path:
    """The takedown (diff) index of a source. Source names cannot hold '-', so no clash."""
    return ws.indexes_dir / f"{name}-removed"


def leftover_dirs(ws: Workspace, name: str) -> list[Path]:
    """Temporary folders of builds and takedowns of `name` (`.tmp-<name>-*`, `.old-<name>-*`)."""
    if not ws.indexes_dir.exists():
        return []
    return [p for pat in (f".tmp-{name}-*", f".old-{name}-*") for p in ws.indexes_dir.glob(pat) if p.is_dir()]


_held = threading.local()  # lock file path -> depth, per thread (a build calls rebuild_diff under its lock)


@contextlib.contextmanager
def source_lock(ws: Workspace, name: str) -> Iterator[None]:
    """Hold the exclusive write lock of a source's index folders (builds and takedowns).

    While it is held nobody else writes `indexes/<name>*`, so every `.tmp-<name>-*` folder
    found by the holder is a leftover of a killed process. Re-entrant within a thread;
    another process or thread gets a ConflictError at once rather than waiting.
    """
    ws.indexes_dir.mkdir(parents=True, exist_ok=True)
    path = str(ws.indexes_dir / f".lock-{name}")
    depth = getattr(_held, "locks", {})
    _held.locks = depth
    if depth.get(path):
        depth[path] += 1
        try:
            yield
        finally:
            depth[path] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError(f"another index build or takedown of {name!r} is running; "
                                "try again when it has finished") from None
        depth[path] = 1
        try:
            yield
        finally:
            depth.pop(path, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """Streams documents into the five project-written files of one shard."""

    def __init__(self, folder: Path, k: int, source: str):
        self.folder, self.k, self.source = Path(folder), k, source
        self._ds = open(shard_file(self.folder, "tokenized", k), "wb")
        self._od = open(shard_file(self.folder, "offset", k), "wb")
        self._mt = open(shard_file(self.folder, "metadata", k), "wb")
        self._om = open(shard_file(self.folder, "metaoff", k), "wb")
        self.ds_size = 0
        self.mt_size = 0
        self.n_docs = 0
        self.n_tokens = 0
        self.counts = np.zeros(65536, dtype=np.int64)

    def add_many(self, docs: list[tuple[np.ndarray, dict]]) -> None:
        """Append documents: (u16 ids, metadata dict) pairs. One write per file per call."""
        sep = np.array([DOC_SEP], dtype=np.uint16).tobytes()
        ds_parts, od, mt_parts, om = [], [], [], []
        for ids, meta in docs:
            od.append(self.ds_size)
            blob = sep + ids.tobytes()
            ds_parts.append(blob)
            self.ds_size += len(blob)
            line = (json.dumps(meta, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
            om.append(self.mt_size)
            mt_parts.append(line)
            self.mt_size += len(line)
            self.n_tokens += len(ids)
        if not docs:
            return
        self._ds.write(b"".join(ds_parts))
        self._od.write(np.asarray(od, dtype=np.uint64).tobytes())
        self._mt.write(b"".join(mt_parts))
        self._om.write(np.asarray(om, dtype=np.uint64).tobytes())
        self.n_docs += len(docs)
        allids = np.concatenate([d[0] for d in docs]) if docs else np.zeros(0, np.uint16)
        self.counts += np.bincount(allids, minlength=65536)
        self.counts[DOC_SEP] += len(docs)

    def close(self) -> None:
        for f in (self._ds, self._od, self._mt, self._om):
            f.close()
        # The same text format as infini-gram's own indexer: "<id> <count>", ascending ids.
        nz = np.flatnonzero(self.counts)
        with open(shard_file(self.folder, "unigram", self.k), "w") as f:
            f.write("".join(f"{i} {self.counts[i]}\n" for i in nz))


def build_suffix_array(tokenized: Path, table: Path, work_dir: Path, cpus: int = 2, mem_gib: int = 8) -> float:
    """Run rust_indexing make-part, merge and concat for one shard; return the seconds taken.

    :param work_dir: scratch space for the parts (removed afterwards).
    """
    binary = str(rust_indexing())
    ds_size = tokenized.stat().st_size
    ratio = ptr_size(ds_size)
    jobs = 1 if ds_size < SINGLE_PART_BELOW else max(1, cpus)
    threads = 1 if ds_size < SINGLE_PART_BELOW else max(1, cpus)
    # Parts must each fit in memory (rust sorts 8 bytes per byte of text in a part).
    batches = 1
    while batches * (mem_gib * 1024**3 // 8) < ds_size:
        batches *= 2
    total = batches * jobs
    part = ds_size // total
    part += part % TOKEN_WIDTH  # parts hold whole ids
    parts_dir, merged_dir = work_dir / "parts", work_dir / "merged"
    for d in (parts_dir, merged_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    common = ["--ratio", str(ratio), "--token-width", str(TOKEN_WIDTH)]
    t0 = time.perf_counter()
    for b in range(0, total, jobs):
        procs = []
        for i in range(b, min(b + jobs, total)):
            start, end = i * part, ds_size if i == total - 1 else min((i + 1) * part + HACK, ds_size)
            procs.append(_spawn([binary, "make-part", "--data-file", str(tokenized), "--parts-dir", str(parts_dir),
                                 "--start-byte", str(start), "--end-byte", str(end), *common]))
        for p in procs:
            _wait(p, "make-part")
    _wait(_spawn([binary, "merge", "--data-file", str(tokenized), "--parts-dir", str(parts_dir),
                  "--merged-dir", str(merged_dir), "--num-threads", str(threads), "--hacksize", str(HACK), *common]), "merge")
    shutil.rmtree(parts_dir, ignore_errors=True)
    _wait(_spawn([binary, "concat", "--data-file", str(tokenized), "--merged-dir", str(merged_dir),
                  "--merged-file", str(table), "--num-threads", str(threads), *common]), "concat")
    seconds = time.perf_counter() - t0
    shutil.rmtree(merged_dir, ignore_errors=True)
    expected = (ds_size // TOKEN_WIDTH) * ratio
    if not table.exists() or table.stat().st_size != expected:
        got = table.stat().st_size if table.exists() else 0
        raise IntegrityError(f"rust_indexing wrote {got} bytes of {table.name}, expected {expected}; the build was abandoned")
    return seconds


def _spawn(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(p: subprocess.Popen, step: str) -> None:
    _, err = p.communicate()
    if p.returncode != 0:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise IntegrityError(f"rust_indexing {step} failed (exit {p.returncode}): {' | '.join(tail)}")


def file_table(folder: Path) -> dict[str, dict]:
    """name -> {bytes, sha256} for every file of an index folder except the manifest."""
    out = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and p.name != MANIFEST:
            out[p.name] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    return out


def write_manifest(folder: Path, manifest: dict) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise IntegrityError(f"{path} is missing: the index folder is incomplete; rebuild it with `flexolmo index build --force`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{path} does not parse ({e.msg}); rebuild with `flexolmo index build --force`") from None


def check_files(folder: Path, manifest: dict, checksums: bool = False) -> list[str]:
    """Problems with the folder's files against its manifest: missing, truncated, altered."""
    problems = []
    for name, info in manifest["files"].items():
        p = Path(folder) / name
        if not p.exists():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != info["bytes"]:
            problems.append(f"{name} has {p.stat().st_size:,} bytes, expected {info['bytes']:,} (truncated or altered)")
        elif checksums and file_sha256(p) != info["sha256"]:
            problems.append(f"{name} fails its sha256 checksum (corrupted)")
    for p in Path(folder).iterdir():
        if p.name not in manifest["files"] and p.name != MANIFEST and any(k in p.name for k in KINDS):
            problems.append(f"{p.name} is not part of the index (stray file the loader would read)")
    return problems


# ---------------------------------------------------------------------------------------
# reading


@contextlib.contextmanager
def loader_path(folder: Path) -> Iterator[str]:
    """A path to `folder` that the C++ loader's substring classification cannot misread.

    The engine memory-maps the files while it is constructed, so the path only needs to
    live that long. Linux: /proc/self/fd/<n> of an open directory; else a symlink in a
    clean temporary folder.
    """
    folder = Path(folder).resolve()
    if not any(k in str(folder) for k in KINDS):
        yield str(folder)
        return
    if Path("/proc/self/fd").is_dir():
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    tmp = Path(tempfile.mkdtemp(prefix="flexolmo-ig-", dir="/tmp" if Path("/tmp").is_dir() else None))
    try:
        link = tmp / "ix"
        link.symlink_to(folder, target_is_directory=True)
        yield str(link)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_unigram(path: Path) -> np.ndarray:
    """The 65536 unigram counts of a `unigram.k` file."""
    counts = np.zeros(65536, dtype=np.int64)
    raw = np.loadtxt(path, dtype=np.int64, ndmin=2)
    if raw.size:
        counts[raw[:, 0]] = raw[:, 1]
    return counts


def read_table_ptrs(table: Path, width: int, ranks: np.ndarray) -> np.ndarray:
    """Byte pointers stored at the given suffix-array ranks."""
    mm = np.memmap(table, dtype=np.uint8, mode="r")
    rows = mm.reshape(-1, width)[ranks].astype(np.uint64)
    return rows @ (np.uint64(256) ** np.arange(width, dtype=np.uint64))
