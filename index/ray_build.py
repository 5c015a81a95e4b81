"""A source's shard suffix arrays as Ray tasks (`flexolmo index build --ray`).

    seconds = suffix_arrays_on_ray(tmp, shard_stats, width, config, progress)

The build itself is unchanged (index/build.py): the driver tokenizes the source and writes
every shard's files into the build's temporary folder; each shard's `table.N` is then one
Ray task, which sorts it (index/suffix_array.py, one thread a task) and checks it (size,
pointers inside the shard, sampled adjacent ranks in suffix order), so each shard is a
valid infini-gram index before the driver writes the manifest, verifies the whole folder
and renames it into place. The tasks read and write the folder by its path: on a cluster
it must be on storage every node sees. Ray is imported only here (the optional `ray`
extra); a plain build never loads it. A local Ray is started with `config.cpus` CPUs
unless one is running or `config.ray_address` names a cluster, and stopped afterwards.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from flexolmo.base.errors import InputError, IntegrityError

from . import format as fmt
from .suffix_array import build_suffix_array
from .width import Width, named

ORDER_RANKS = 256  # sampled adjacent ranks a task checks in its shard's table
SORT_BYTES_PER_BYTE = 5  # the sort's memory per byte of token file (index/suffix_array.py), for Ray's scheduler


def _ray():
    try:
        import ray
    except ModuleNotFoundError:
        raise InputError("--ray needs Ray: pip install 'flexolmo-trace[ray]' (or 'ray[data]')") from None
    return ray


def shard_task(tokenized: str, table: str, work: str, width: str, mem_gib: float, method: str) -> dict:
    """Sort one shard and check its table; what a Ray task runs (importable by the workers)."""
    w = named(width)
    seconds = build_suffix_array(Path(tokenized), Path(table), Path(work), w, cpus=1, mem_gib=mem_gib, method=method)
    shutil.rmtree(work, ignore_errors=True)
    return {"seconds": seconds, "problems": table_problems(Path(tokenized), Path(table), w, ORDER_RANKS)}


def table_problems(tokenized: Path, table: Path, width: Width, n_ranks: int) -> list[str]:
    """Pointers inside the token file, at id starts, and in suffix order at sampled adjacent ranks."""
    size = tokenized.stat().st_size
    n = size // width.bytes
    ratio = fmt.ptr_size(size)
    if table.stat().st_size != n * ratio:
        return [f"{table.name} holds {table.stat().st_size} bytes, expected {n * ratio}"]
    if n <= 1:
        return []
    ranks = np.random.default_rng(0).integers(0, n - 1, size=min(n_ranks, n - 1))
    a, b = fmt.read_table_ptrs(table, ratio, ranks), fmt.read_table_ptrs(table, ratio, ranks + 1)
    if np.any(a >= size) or np.any(b >= size) or np.any(a % width.bytes) or np.any(b % width.bytes):
        return [f"{table.name} holds pointers outside {tokenized.name} or inside an id"]
    x, y = fmt.read_at(tokenized, a, 64), fmt.read_at(tokenized, b, 64)
    bad = sum(1 for p, q in zip(x, y) if p > q)
    return [f"{table.name} is out of order at {bad} of {len(ranks)} sampled ranks"] if bad else []


def suffix_arrays_on_ray(tmp: Path, shard_stats: list[dict], width: Width, config,
                         progress: Callable[[str, float, float], None]) -> float:
    """Build every shard's table in `tmp` as a Ray task; the tasks' seconds summed.

    :param config: the build's `IndexConfig` (cpus, mem_gib, suffix_array, ray_address).
    :param progress: called with (step, done, total) as shards finish.
    """
    ray = _ray()
    started = False
    if not ray.is_initialized():
        # the workers import this project: hand them the driver's import path
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}}
        if config.ray_address:
            ray.init(address=config.ray_address, runtime_env=env, log_to_driver=False)
        else:
            ray.init(num_cpus=config.cpus, include_dashboard=False, log_to_driver=False, runtime_env=env,
                     configure_logging=False)
        started = True
    try:
        task = ray.remote(shard_task)
        n = len(shard_stats)
        refs = {}
        for st in shard_stats:
            k = st["shard"]
            ds_bytes = st["ds_tokens"] * width.bytes
            refs[task.options(num_cpus=1, memory=max(ds_bytes * SORT_BYTES_PER_BYTE, 1 << 20)).remote(
                str(fmt.shard_file(tmp, "tokenized", k, n)), str(fmt.shard_file(tmp, "table", k, n)),
                str(tmp / f".work-{k}"), width.name, config.mem_gib, config.suffix_array)] = k
        seconds, problems, done = 0.0, [], 0
        progress("suffix arrays (ray)", 0, n)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            out = ray.get(ready[0])
            seconds += out["seconds"]
            problems += [f"shard {refs[ready[0]]}: {p}" for p in out["problems"]]
            done += 1
            progress("suffix arrays (ray)", done, n)
        if problems:
            raise IntegrityError("a shard built on Ray failed its check: " + "; ".join(problems[:5]))
        return seconds
    finally:
        if started:
            ray.shutdown()
