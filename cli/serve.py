"""`flexolmo serve`: the web page and the trace API (api/), served by uvicorn.

    flexolmo serve                       # http://127.0.0.1:8000, loopback only
    flexolmo -w work serve --port 8080
    flexolmo serve --workers 2           # N processes over the same memory-mapped indexes
    flexolmo serve --model ~/models/FlexOlmo-7x7B-1T --experts experts.json --device cuda --dtype bfloat16

Each worker process opens its own tracer (the indexes are memory-mapped, so their pages are
shared) and runs one trace at a time; the provenance store takes commits from all of them
(append-only parts under a writer lock held for milliseconds). Budgets and caps come from
the environment (FLEXOLMO_TRACE_BUDGET_S, ... see api/deps.py).
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from flexolmo.base.errors import InputError

from .common import DeviceOpt, DtypeOpt, ExpertsOpt, ModelOpt, console, model_spec, ws


WORKER_START_S = 120


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: Annotated[str, typer.Option(help="Address to bind; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (each traces one request at a time); "
                                              "up to the number of cores is useful.")] = 1,
    model: ModelOpt = None,
    experts: ExpertsOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Serve the web page and the trace API over the workspace."""
    import uvicorn

    from api.app import create_app

    if not 1 <= workers <= 64:
        raise InputError(f"--workers must be between 1 and 64, got {workers}")
    root = ws()
    model_spec(model, experts, device, dtype)  # bad values are refused before the server starts
    # every worker process (and the app of a single one) reads the model from the environment
    for key, value in (("FLEXOLMO_MODEL", model), ("FLEXOLMO_EXPERTS", experts), ("FLEXOLMO_DEVICE", device),
                       ("FLEXOLMO_DTYPE", dtype)):
        if value is not None:
            os.environ[key] = str(value)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] binding {host}: the API has no authentication, and owner "
                      "endpoints can switch sources off and take documents down", highlight=False)
    console.print(f"serving {root.root} on http://{host}:{port} with {workers} worker process"
                  f"{'es' if workers > 1 else ''}", highlight=False)
    if workers == 1:
        uvicorn.run(create_app(root), host=host, port=port)
        return
    os.environ["FLEXOLMO_HOME"] = str(root.root)  # the workers build their app from the environment
    os.environ.setdefault("FLEXOLMO_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    # a worker answers uvicorn's health pings only once it has imported the project (torch, the
    # tracer: seconds, more on a loaded machine); with uvicorn's 5 s it was killed and restarted for ever
    uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers,
                timeout_worker_healthcheck=WORKER_START_S)
