"""infini-gram's on-disk index format (version 4, u16 or u32 ids), written by the project itself.

One shard k of an index folder is

    tokenized.k   for every document: the separator (0xFFFF / 0xFFFFFFFF), then its ids,
                  little-endian, 2 or 4 bytes each (`index/width.py`: the tokenizer decides)
    offset.k      u64 byte offset in tokenized.k where each document (its separator) begins
    metadata.k    one JSON line per document ({"doc_id", "source", "title", "path", ...})
    metaoff.k     u64 byte offset in metadata.k where each line begins
    unigram.k     "<id> <count>" per line for every id that occurs, separator included
    table.k       suffix array: for each of the tok_cnt = size(tokenized.k) / width positions,
                  its byte offset in `ptr_size` little-endian bytes, sorted by the little-endian
                  bytes of the ids that follow, as the package's `rust_indexing` writes it;
                  built by libdivsufsort (index/suffix_array.py)

plus `bow_ids.txt` (one id per line) and `manifest.json` (the index's card: index/manifest.py).
`shard_file` is the one place these names are made (padded, `tokenized.07`, when an index has
more than 10 shards: the loader pairs files by sorting their names); `index_dir`/`diff_dir`
say where a source's index and its takedown index live, and `source_lock` who may write them.

infini-gram's C++ loader classifies a folder's files by *substring of the whole path*
(`path.find("table")`), so a folder whose path contains e.g. `table` (a pytest tmp path
`test_table0`) would be misread. `loader_path` hands the engine a path without them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from flexolmo.base.errors import ConflictError, IntegrityError, NotFoundError, OutdatedError
from flexolmo.base.workspace import Workspace, file_sha256

from .manifest import KINDS, MANIFEST, IndexManifest, shard_file  # noqa: F401  (shard_file: re-exported)
from .width import U16, Width

DOC_SEP = U16.doc_sep  # the separator of the (default) u16 indexes; `Width.doc_sep` in general
BOW_FILE = "bow_ids.txt"
READ_CHUNK = 1 << 24  # bytes per read when a whole token file is scanned (no memory map: flat RSS)
SPOT_ABOVE = 64 << 20  # files larger than this get sampled block digests (index/source.py's OPEN_HASH_MAX)
SPOT_BLOCKS, SPOT_BYTES = 16, 1 << 16


def ptr_size(ds_size: int) -> int:
    """Bytes per suffix-array entry, as rust_indexing chooses them (its `--ratio`) and the engine reads them."""
    return max(1, math.ceil(math.log2(max(ds_size, 2)) / 8))


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

    def __init__(self, folder: Path, k: int, source: str, width: Width = U16, vocab_size: int | None = None,
                 n_shards: int = 1):
        self.folder, self.k, self.source, self.width = Path(folder), k, source, width
        self.n_shards = n_shards
        self._ds = open(shard_file(self.folder, "tokenized", k, n_shards), "wb")
        self._od = open(shard_file(self.folder, "offset", k, n_shards), "wb")
        self._mt = open(shard_file(self.folder, "metadata", k, n_shards), "wb")
        self._om = open(shard_file(self.folder, "metaoff", k, n_shards), "wb")
        self.ds_size = 0
        self.mt_size = 0
        self.n_docs = 0
        self.n_tokens = 0
        self.counts = np.zeros(width.dense_size(vocab_size), dtype=np.int64)  # last slot: separators

    def add_many(self, docs: list[tuple[np.ndarray, dict]]) -> None:
        """Append documents: (ids, metadata dict) pairs."""
        if docs:
            ids = np.concatenate([np.asarray(d[0], dtype=self.width.dtype) for d in docs])
            self.add_batch(ids, np.array([len(d[0]) for d in docs], dtype=np.int64), [d[1] for d in docs])

    def add_batch(self, ids: np.ndarray, lengths: np.ndarray, metas: list[dict]) -> None:
        """Append len(lengths) documents whose ids lie one after another in `ids`. One write per file."""
        if not len(lengths):
            return
        w = self.width
        starts = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
        # each document's separator goes before its first id
        ds = np.insert(np.asarray(ids, dtype=w.dtype), starts, np.asarray(w.doc_sep, dtype=w.dtype))
        od = self.ds_size + (starts + np.arange(len(lengths))) * w.bytes
        lines = [(json.dumps(m, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8") for m in metas]
        sizes = np.fromiter((len(x) for x in lines), dtype=np.int64, count=len(lines))
        om = self.mt_size + np.concatenate([[0], np.cumsum(sizes[:-1])])
        self._ds.write(ds.astype(w.dtype.newbyteorder("<"), copy=False).tobytes())
        self._od.write(od.astype("<u8").tobytes())
        self._mt.write(b"".join(lines))
        self._om.write(om.astype("<u8").tobytes())
        self.ds_size += len(ds) * w.bytes
        self.mt_size += int(sizes.sum())
        self.n_docs += len(lengths)
        self.n_tokens += int(len(ids))
        counts = np.bincount(ids, minlength=len(self.counts))
        if len(counts) > len(self.counts):
            raise IntegrityError(f"{self.source}: an id {int(np.max(ids))} beyond the tokenizer's vocabulary "
                                 f"({len(self.counts) - 1} ids); was the token cache written by another tokenizer?")
        self.counts += counts
        self.counts[-1] += len(lengths)

    def close(self) -> None:
        for f in (self._ds, self._od, self._mt, self._om):
            f.close()
        # The same text format as infini-gram's own indexer: "<id> <count>", ascending ids.
        ids, counts = self.width.to_sparse(self.counts)
        with open(shard_file(self.folder, "unigram", self.k, self.n_shards), "w") as f:
            f.write("".join(f"{i} {c}\n" for i, c in zip(ids.tolist(), counts.tolist())))


def file_table(folder: Path) -> dict[str, dict]:
    """name -> {bytes, sha256, blocks} for every file of an index folder except the manifest
    (`blocks` only for files larger than SPOT_ABOVE)."""
    out = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and p.name != MANIFEST:
            size = p.stat().st_size
            out[p.name] = {"bytes": size, "sha256": file_sha256(p),
                           **({"blocks": block_digests(p)} if size > SPOT_ABOVE else {})}
    return out


def block_digests(path: Path) -> list[str]:
    """sha256 (first 16 hex digits) of SPOT_BLOCKS evenly spaced blocks of SPOT_BYTES: what an
    open checks of a file too large to hash whole each time (a few MB read at any size)."""
    size = Path(path).stat().st_size
    out = []
    with open(path, "rb") as f:
        for i in range(SPOT_BLOCKS):
            f.seek(max(0, (size - SPOT_BYTES) * i // max(1, SPOT_BLOCKS - 1)))
            out.append(hashlib.sha256(f.read(SPOT_BYTES)).hexdigest()[:16])
    return out


def read_manifest(folder: Path) -> IndexManifest:
    """The index's card; IntegrityError (the folder cannot be served) saying how to rebuild when
    it is missing or cannot be read."""
    try:
        return IndexManifest.read(folder)
    except NotFoundError:
        raise IntegrityError(f"{Path(folder) / MANIFEST} is missing: the index folder is incomplete; rebuild it "
                             f"with `{IndexManifest._rebuild(folder)}`") from None
    except OutdatedError as e:
        raise IntegrityError(str(e)) from None


def check_files(folder: Path, manifest: IndexManifest, checksums: bool = False) -> list[str]:
    """Problems with the folder's files against its manifest: missing, truncated, altered."""
    problems = []
    for name, info in manifest.files.items():
        p = Path(folder) / name
        if not p.exists():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != info.bytes:
            problems.append(f"{name} has {p.stat().st_size:,} bytes, expected {info.bytes:,} (truncated or altered)")
        elif checksums and file_sha256(p) != info.sha256:
            problems.append(f"{name} fails its sha256 checksum (corrupted)")
    for p in Path(folder).iterdir():
        if p.name not in manifest.files and p.name != MANIFEST and any(k in p.name for k in KINDS):
            problems.append(f"{p.name} is not part of the index (stray file the loader would read)")
    return problems


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


def read_unigram(path: Path, width: Width = U16, vocab_size: int | None = None) -> np.ndarray:
    """The dense unigram counts of a `unigram.k` file (`Width.dense_size` slots; the last: separators)."""
    raw = np.loadtxt(path, dtype=np.uint64, ndmin=2)
    if not raw.size:
        return np.zeros(width.dense_size(vocab_size), dtype=np.int64)
    return width.from_sparse(raw[:, 0].astype(np.int64), raw[:, 1].astype(np.int64), vocab_size)


def read_table_ptrs(table: Path, width: int, ranks: np.ndarray) -> np.ndarray:
    """Byte pointers stored at the given suffix-array ranks."""
    return np.array([int.from_bytes(b, "little") for b in read_at(table, np.asarray(ranks) * width, width)],
                    dtype=np.uint64)


def read_at(path: Path, offsets, size: int) -> list[bytes]:
    """`size` bytes at each of `offsets` (fewer at the end of the file), read with pread.

    Sampled reads go through here rather than a memory map: the page cache holds recently
    written files in large folios, and a touch of a mapping maps the whole folio into the
    process (measured: 512 random 64-byte reads of a 385 MB token file added 204 MB to RSS),
    so a few hundred samples would count a good part of the file in the reader's memory.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        return [os.pread(fd, size, int(o)) for o in offsets]
    finally:
        os.close(fd)


def read_tokens(path: Path, width: Width, start: int = 0, count: int = -1) -> np.ndarray:
    """`count` ids of a token file from id `start` (-1: to the end), read (not memory-mapped)."""
    with open(path, "rb") as f:
        f.seek(start * width.bytes)
        return np.fromfile(f, dtype=width.dtype.newbyteorder("<"), count=count).astype(width.dtype, copy=False)


def token_chunks(path: Path, width: Width, overlap: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(first id's position, ids) of a token file in chunks of READ_CHUNK bytes, each reaching
    `overlap` ids into the next (so n-grams up to overlap + 1 long are whole in one chunk)."""
    n = Path(path).stat().st_size // width.bytes
    step = max(1, READ_CHUNK // width.bytes)
    for start in range(0, n, step):
        yield start, read_tokens(path, width, start, min(step + overlap, n - start))
