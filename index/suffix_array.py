"""The suffix array of one shard (`table.N`), built within a memory budget.

    seconds = build_suffix_array(tokenized, table, work_dir, width, cpus=2, mem_gib=8)
    cap = max_shard_bytes(mem_gib)                             # the largest shard the budget allows

The table is infini-gram's: one pointer of `ptr_size` bytes (little-endian) per token
position, the byte offset of a suffix that starts at an id, in the order of the suffixes'
bytes (ids little-endian, so an id compares as its bytes read big-endian; a suffix that is
a prefix of another comes first). Two constructions write the same bytes:

- `divsufsort` (the default): libdivsufsort (the `pydivsufsort` package), a suffix sort
  whose time does not grow with the length of repeated substrings, over the shard's bytes.
  Suffixes that start inside an id are dropped while the table is written, so the order
  of those that are left is the order of whole-id suffixes. u16 shards are sorted as
  they are on disk; u32 shards on a relabelled copy (`_dense_bytes`): each id present is
  replaced by the rank of its byte-order key among the ids present, written big-endian in
  as few bytes as the ranks need (3 for a 100k-id vocabulary), so the order is the same
  and there are fewer bytes to sort. It holds the bytes sorted and one pointer (4 bytes;
  8 past 2 GiB) per byte: at most 5 (9) bytes per byte of the token file, which
  `max_shard_bytes` keeps under the budget. libdivsufsort's OpenMP threads: `cpus`.
- `rust` (the reference, `rust_indexing` inside the infini-gram package): make-part sorts
  slices of the token file (`cpus` processes at a time), merge merges them (holding the
  whole token file), concat joins the runs. Its merge compares suffixes byte by byte, so
  text with long repeats (licence headers, boilerplate) sorts tens of times slower than
  prose. u32 shards go through `_dense_copy` (a 4-byte relabelled copy), since make-part's
  SA-IS keeps a bucket pointer per possible 32-bit character (32 GiB for the separator).
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import infini_gram
import numpy as np

from flexolmo.base.errors import InputError, IntegrityError, NotFoundError

from .format import ptr_size, token_chunks
from .width import Width

# rust_indexing's make-part reads HACK bytes past its range so that suffixes crossing the
# boundary sort correctly; with several parts on a file shorter than that its output is wrong
# (measured: 1000 ids, 2 parts -> a table missing positions), so small files use one part.
HACK = 100_000
SINGLE_PART_BELOW = 4 * HACK  # bytes of tokenized.k
MERGE_SHARE = 0.75  # of the budget, for the token file merge holds; the rest: buffers, Python
SLACK = 1.25  # on make-part's estimate (the sort's own scratch)
GIB = 1024**3
METHODS = ("divsufsort", "rust")  # the default first
INT32_MAX = 2**31 - 1  # libdivsufsort's pointers are 4 bytes up to here, 8 past it
WRITE_ENTRIES = 1 << 22  # suffix-array entries per write of the table


def rust_indexing() -> Path:
    """The `rust_indexing` binary shipped inside the infini-gram package."""
    path = Path(infini_gram.__file__).parent / "rust_indexing"
    if not path.exists() or not os.access(path, os.X_OK):
        raise NotFoundError(f"{path} is missing or not executable; reinstall with `pip install infini-gram==2.6.0`")
    return path


def max_shard_bytes(mem_gib: float, method: str = METHODS[0]) -> int:
    """The largest token file (bytes) whose suffix sort fits the memory budget: rust_indexing's
    merge holds the token file; libdivsufsort the bytes it sorts and a pointer per byte."""
    budget = mem_gib * GIB * MERGE_SHARE
    if method == "rust":
        return int(budget)
    return int(max(min(budget / 5, INT32_MAX), budget / 9))


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"unknown suffix-array construction {method!r}: use one of {', '.join(METHODS)}")
    return method


@dataclass(frozen=True)
class Plan:
    jobs: int  # make-part processes at a time (and merge/concat threads)
    parts: int  # make-part slices in all (a multiple of jobs)
    part_bytes: int
    peak_bytes: int  # estimated: max(make-part jobs together, merge)


def plan_parts(ds_bytes: int, width: Width, cpus: int, mem_gib: float) -> Plan:
    """Split make-part so that `jobs` concurrent parts fit in `mem_gib`."""
    ratio = ptr_size(ds_bytes)
    per_byte = (2 + (16 + ratio) / width.bytes) * SLACK
    jobs = 1 if ds_bytes < SINGLE_PART_BELOW else max(1, cpus)
    budget = mem_gib * GIB
    batches = 1
    while batches < 1 << 20 and ds_bytes / (batches * jobs) * per_byte * jobs > budget:
        batches *= 2
    parts = batches * jobs
    part = ds_bytes // parts
    part -= part % width.bytes  # parts hold whole ids
    if parts > 1 and part <= HACK:
        raise IntegrityError(f"--mem-gib {mem_gib:g} is too small for a shard of {ds_bytes:,} bytes "
                             f"(make-part slices of {part:,} bytes); give more memory or more shards")
    return Plan(jobs, parts, part, int(max(part * per_byte * jobs, ds_bytes)))


def build_suffix_array(tokenized: Path, table: Path, work_dir: Path, width: Width, cpus: int = 2,
                       mem_gib: float = 8, method: str = METHODS[0]) -> float:
    """Write the suffix array of one shard's token file into `table`; return the seconds taken.

    :param work_dir: scratch space (rust_indexing's parts; removed afterwards).
    :param mem_gib: memory budget (see the module docstring).
    :param method: "divsufsort" (the default) or "rust" (rust_indexing): the same bytes.
    """
    check_method(method)
    ds_size = tokenized.stat().st_size
    t0 = time.perf_counter()
    if method == "rust":
        _rust_table(tokenized, table, work_dir, width, cpus, mem_gib)
    else:
        _divsufsort_table(tokenized, table, width, cpus)
    seconds = time.perf_counter() - t0
    expected = (ds_size // width.bytes) * ptr_size(ds_size)
    if not table.exists() or table.stat().st_size != expected:
        got = table.stat().st_size if table.exists() else 0
        raise IntegrityError(f"the {method} suffix sort wrote {got} bytes of {table.name}, expected {expected}; "
                             "the build was abandoned")
    return seconds


def _divsufsort_table(tokenized: Path, table: Path, width: Width, cpus: int) -> None:
    """libdivsufsort over the shard's bytes (u32: over `_dense_bytes`), whole-id suffixes kept."""
    from pydivsufsort import divsufsort

    _omp_threads(cpus)
    ds_size = tokenized.stat().st_size
    if width.bytes == 2:
        text, w = np.fromfile(tokenized, dtype=np.uint8), 2
    else:
        text, w = _dense_bytes(tokenized, width)
    sa = divsufsort(text) if len(text) else np.zeros(0, dtype=np.int32)
    del text
    ratio = ptr_size(ds_size)
    with open(table, "wb") as f:
        for a in range(0, len(sa), WRITE_ENTRIES):
            c = sa[a: a + WRITE_ENTRIES]
            if w > 1:
                c = c[c % w == 0] // w
            offsets = c.astype("<u8") * np.uint64(width.bytes)
            f.write(offsets.view(np.uint8).reshape(-1, 8)[:, :ratio].tobytes())


def _omp_threads(n: int) -> None:
    """Cap the OpenMP threads of the libgomp that pydivsufsort ships (if it ships one)."""
    import pydivsufsort

    for lib in (Path(pydivsufsort.__file__).parent.parent / "pydivsufsort.libs").glob("libgomp*.so*"):
        ctypes.CDLL(str(lib)).omp_set_num_threads(max(1, int(n)))


def _rank_lut(tokenized: Path, width: Width) -> tuple[np.ndarray, int]:
    """For a u32 token file: (lut, ranks) where lut[id] is the rank of the id's byte-order key
    among the ids present (the separator's at lut[-1]), and `ranks` how many there are.
    Chunked: flat memory."""
    sep = width.doc_sep
    seen = np.zeros(1, dtype=bool)  # slot per id seen so far; the separator is handled apart
    has_sep = False
    for _, chunk in token_chunks(tokenized, width):
        ids = chunk[chunk != sep]
        has_sep |= len(ids) < len(chunk)
        if len(ids):
            top = int(ids.max())
            if top >= len(seen):
                seen = np.concatenate([seen, np.zeros(top + 1 - len(seen), dtype=bool)])
            seen[ids] = True
    present = np.flatnonzero(seen).astype(np.uint32)
    if has_sep:
        present = np.append(present, np.uint32(sep))
    keys = present.byteswap()  # the little-endian bytes read big-endian
    rank = np.empty(len(present), dtype=np.uint32)
    rank[np.argsort(keys, kind="stable")] = np.arange(len(present), dtype=np.uint32)
    lut = np.zeros(len(seen) + 1, dtype=np.uint32)
    lut[present[: len(present) - has_sep]] = rank[: len(present) - has_sep]
    if has_sep:
        lut[-1] = rank[-1]
    return lut, len(present)


def _ranks(chunk: np.ndarray, lut: np.ndarray, sep: int) -> np.ndarray:
    return lut[np.where(chunk == sep, len(lut) - 1, chunk)]


def _dense_bytes(tokenized: Path, width: Width) -> tuple[np.ndarray, int]:
    """A u32 token file as the big-endian bytes of its ids' ranks (`_rank_lut`), in as few bytes
    an id as the ranks need; (bytes, bytes per id). Same suffix order as the file's."""
    lut, n_ranks = _rank_lut(tokenized, width)
    w = max(1, (max(n_ranks - 1, 1).bit_length() + 7) // 8)
    n = tokenized.stat().st_size // width.bytes
    text = np.empty(n * w, dtype=np.uint8)
    for start, chunk in token_chunks(tokenized, width):
        b = _ranks(chunk, lut, width.doc_sep).astype(">u4").view(np.uint8).reshape(-1, 4)[:, 4 - w:]
        text[start * w: (start + len(chunk)) * w] = b.reshape(-1)
    return text, w


def _rust_table(tokenized: Path, table: Path, work_dir: Path, width: Width, cpus: int, mem_gib: float) -> None:
    """rust_indexing make-part, merge and concat for one shard."""
    binary = str(rust_indexing())
    ds_size = tokenized.stat().st_size
    ratio = ptr_size(ds_size)
    plan = plan_parts(ds_size, width, cpus, mem_gib)
    parts_dir, merged_dir = work_dir / "parts", work_dir / "merged"
    for d in (parts_dir, merged_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    common = ["--ratio", str(ratio), "--token-width", str(width.bytes)]
    if width.bytes == 4:
        tokenized = _dense_copy(tokenized, width, work_dir / "dense")
    for b in range(0, plan.parts, plan.jobs):
        procs = []
        for i in range(b, min(b + plan.jobs, plan.parts)):
            start = i * plan.part_bytes
            end = ds_size if i == plan.parts - 1 else min((i + 1) * plan.part_bytes + HACK, ds_size)
            procs.append(_spawn([binary, "make-part", "--data-file", str(tokenized), "--parts-dir", str(parts_dir),
                                 "--start-byte", str(start), "--end-byte", str(end), *common]))
        for p in procs:
            _wait(p, "make-part")
    threads = str(plan.jobs)
    _wait(_spawn([binary, "merge", "--data-file", str(tokenized), "--parts-dir", str(parts_dir),
                  "--merged-dir", str(merged_dir), "--num-threads", threads, "--hacksize", str(HACK), *common]), "merge")
    shutil.rmtree(parts_dir, ignore_errors=True)
    _wait(_spawn([binary, "concat", "--data-file", str(tokenized), "--merged-dir", str(merged_dir),
                  "--merged-file", str(table), "--num-threads", threads, *common]), "concat")
    shutil.rmtree(merged_dir, ignore_errors=True)
    if width.bytes == 4:
        tokenized.unlink()


def _dense_copy(tokenized: Path, width: Width, out: Path) -> Path:
    """A copy of a u32 token file with every id replaced by its rank (`_rank_lut`), written so
    that its bytes read big-endian give the rank: same suffix order, small SA-IS buckets."""
    lut, _ = _rank_lut(tokenized, width)
    with open(out, "wb") as f:
        for _, chunk in token_chunks(tokenized, width):
            f.write(_ranks(chunk, lut, width.doc_sep).astype(">u4").tobytes())
    if out.stat().st_size != tokenized.stat().st_size:
        raise IntegrityError(f"the relabelled copy of {tokenized.name} has the wrong size; disk full?")
    return out


def _spawn(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(p: subprocess.Popen, step: str) -> None:
    _, err = p.communicate()
    if p.returncode != 0:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise IntegrityError(f"rust_indexing {step} failed (exit {p.returncode}): {' | '.join(tail)}")


def shards_for(ds_bytes: int, mem_gib: float, max_shard_tokens: int | None, width: Width,
               method: str = METHODS[0]) -> int:
    """How many shards a source of `ds_bytes` (separators included) needs: each under the memory
    budget's cap, and under `max_shard_tokens` when given."""
    cap = max_shard_bytes(mem_gib, method)
    if max_shard_tokens:
        cap = min(cap, max_shard_tokens * width.bytes)
    return max(1, math.ceil(ds_bytes / max(cap, width.bytes)))
