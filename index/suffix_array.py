"""The suffix array of one shard (`table.N`), built by infini-gram's `rust_indexing`, within a
memory budget.

    plan = plan_parts(ds_bytes, width, cpus=2, mem_gib=8)     # how make-part is split
    seconds = build_suffix_array(tokenized, table, work_dir, width, cpus=2, mem_gib=8)
    cap = max_shard_bytes(mem_gib)                             # the largest shard the budget allows

rust_indexing builds in three steps: `make-part` sorts slices of the token file (each in its
own process, `cpus` at a time), `merge` merges the sorted parts into `cpus` runs, `concat`
joins them. Measured and read from its source (pkg/src/main.rs of infini-gram 2.6):

- make-part holds its slice twice (bytes, then ids), the sorted positions as u64 twice and
  the output: about 2 + 16 / width + ratio / width bytes per byte of its slice;
- merge holds the *whole* token file in memory (every part's text at once), plus 1 MiB
  read buffers;
- concat streams.

So memory is bounded by splitting make-part into enough parts, and by keeping a shard's
token file under the budget (`max_shard_bytes`): the build shards a source by size.

u32 shards: make-part's SA-IS keeps one bucket pointer (u64) per possible value from 0 to the
largest "character" in its slice, a character being the id's little-endian bytes read
big-endian. Any id whose low byte is high (id 255: 0xFF000000), and the separator
0xFFFFFFFF, ask for up to 2^32 pointers: 32 GiB, which a machine without that much memory
(or overcommit) refuses ("memory allocation of 34359738368 bytes failed"). The suffix array
is therefore built on a relabelled copy of the token file (`_dense_copy`): each id present
is replaced by the rank of its character among those present, written so that the bytes
compare in the same order. Byte order is preserved token by token, so the suffix array of
the copy is the suffix array of the file (byte offsets are the same), and the buckets
number the distinct ids, not 2^32.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import infini_gram
import numpy as np

from flexolmo.base.errors import IntegrityError, NotFoundError

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


def rust_indexing() -> Path:
    """The `rust_indexing` binary shipped inside the infini-gram package."""
    path = Path(infini_gram.__file__).parent / "rust_indexing"
    if not path.exists() or not os.access(path, os.X_OK):
        raise NotFoundError(f"{path} is missing or not executable; reinstall with `pip install infini-gram==2.6.0`")
    return path


def max_shard_bytes(mem_gib: float) -> int:
    """The largest token file (bytes) whose merge fits the memory budget."""
    return int(mem_gib * GIB * MERGE_SHARE)


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
                       mem_gib: float = 8) -> float:
    """Run rust_indexing make-part, merge and concat for one shard; return the seconds taken.

    :param work_dir: scratch space for the parts (removed afterwards).
    :param mem_gib: memory budget of the children together (see the module docstring).
    """
    binary = str(rust_indexing())
    ds_size = tokenized.stat().st_size
    ratio = ptr_size(ds_size)
    plan = plan_parts(ds_size, width, cpus, mem_gib)
    parts_dir, merged_dir = work_dir / "parts", work_dir / "merged"
    for d in (parts_dir, merged_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    common = ["--ratio", str(ratio), "--token-width", str(width.bytes)]
    t0 = time.perf_counter()
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
    seconds = time.perf_counter() - t0
    shutil.rmtree(merged_dir, ignore_errors=True)
    if width.bytes == 4:
        tokenized.unlink()
    expected = (ds_size // width.bytes) * ratio
    if not table.exists() or table.stat().st_size != expected:
        got = table.stat().st_size if table.exists() else 0
        raise IntegrityError(f"rust_indexing wrote {got} bytes of {table.name}, expected {expected}; the build was abandoned")
    return seconds


def _dense_copy(tokenized: Path, width: Width, out: Path) -> Path:
    """A copy of a u32 token file with every id replaced by the rank of its byte-order key among
    the ids present (module docstring): same suffix order, small SA-IS buckets. Chunked: flat memory."""
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
    keys = present.byteswap()  # what make-part compares: the little-endian bytes read big-endian
    rank = np.empty(len(present), dtype=np.uint32)
    rank[np.argsort(keys, kind="stable")] = np.arange(len(present), dtype=np.uint32)
    lut = np.zeros(len(seen) + 1, dtype="<u4")  # id -> its rank written so its bytes read big-endian give it
    lut[present[: len(present) - has_sep]] = rank[: len(present) - has_sep].byteswap()
    if has_sep:
        lut[-1] = rank[-1].byteswap()
    with open(out, "wb") as f:
        for _, chunk in token_chunks(tokenized, width):
            f.write(lut[np.where(chunk == sep, len(lut) - 1, chunk)].tobytes())
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


def shards_for(ds_bytes: int, mem_gib: float, max_shard_tokens: int | None, width: Width) -> int:
    """How many shards a source of `ds_bytes` (separators included) needs: each under the memory
    budget's cap, and under `max_shard_tokens` when given."""
    cap = max_shard_bytes(mem_gib)
    if max_shard_tokens:
        cap = min(cap, max_shard_tokens * width.bytes)
    return max(1, math.ceil(ds_bytes / max(cap, width.bytes)))
