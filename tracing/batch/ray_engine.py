"""The Ray engine: the batch's rows through Ray Data, `BatchTracer` as stateful actors.

    ray_outputs(ws, spec, batch_id, rows, workers=4, chunk_rows=32, address=None)

Read (the rows still to do, as an Arrow table), `map_batches` with the `BatchTracer` class
(one actor per worker, `workers` of them: each opens the federation and the model once),
then the results stream back to the driver, which writes them (the provenance store and
the batch's units, tracing/batch/run.py) exactly as the local engine does. The actors read
the workspace at its path: on a cluster it must be on shared storage, or its sources
served by owner nodes (the /v1 protocol) that every node can reach.

`ray` is an optional extra (`pip install 'flexolmo-trace[ray]'`); only this module imports it.
With no address, a local Ray is started with `workers` CPUs and stopped when the run ends.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterator

import pyarrow as pa

from flexolmo.base.errors import InputError
from flexolmo.base.workspace import Workspace

from .spec import BatchSpec
from .tracer import BatchTracer


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ModuleNotFoundError:
        raise InputError("--ray needs Ray Data: pip install 'flexolmo-trace[ray]' (or 'ray[data]')") from None
    return ray


def ray_outputs(ws: Workspace, spec: BatchSpec, bid: str, rows: pa.Table, *, workers: int, chunk_rows: int,
                address: str | None = None) -> Iterator[dict]:
    """The tracer's output batches for `rows`, computed by `workers` Ray actors."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        # the actors import this project: hand them the driver's import path
        path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        env = {"env_vars": {"PYTHONPATH": path}}
        if address is None:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, runtime_env=env,
                     configure_logging=False)
        else:
            ray.init(address=address, runtime_env=env, log_to_driver=False)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the batch's own progress is shown by the driver
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        blocks = [rows.slice(i, chunk_rows) for i in range(0, rows.num_rows, chunk_rows)]  # a block per chunk
        # compute=ActorPoolStrategy(size=N) is map_batches' `concurrency=N` as Ray 2.51+ spells it
        ds = ray.data.from_arrow(blocks).map_batches(
            BatchTracer, fn_constructor_kwargs={"workspace": str(ws.root), "spec": spec.model_dump(mode="json"),
                                                "batch_id": bid},
            batch_size=chunk_rows, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    finally:
        if started:
            ray.shutdown()
