"""`flexolmo serve`: the web page and the trace API (api/), served by uvicorn.

    flexolmo serve                       # http://127.0.0.1:8000, loopback only
    flexolmo -w work serve --port 8080
    flexolmo serve --workers 2           # N processes over the same memory-mapped indexes
    flexolmo serve --model ~/models/FlexOlmo-7x7B-1T --experts experts.json --device cuda --dtype bfloat16
    flexolmo serve --client-rps 0        # no per-client request rate (e.g. a loopback benchmark)

Each worker process opens its own tracer (the indexes are memory-mapped, so their pages are
shared) and runs one trace at a time; the provenance store takes commits from all of them
(append-only parts under a writer lock held for milliseconds). Budgets, caps and per-client
limits come from the environment (FLEXOLMO_TRACE_BUDGET_S, FLEXOLMO_CLIENT_RPS, ... see
api/deps.py); the --client-* options set the last.

Owner routes need a key from the first start: the first `serve` of a workspace creates the
admin key and prints it once. Another address than loopback is refused until keys exist, so
that the service never faces the network before someone holds a key to it.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated, Optional

import typer

from flexolmo.base.errors import InputError
from index.keys import KeyStore
from tracing.provenance.access import SCOPE_LINE

from .common import EnvDeviceOpt, EnvDtypeOpt, ExpertsOpt, ModelOpt, console, ws
from .keys import announce_admin_key


WORKER_HEALTHCHECK_S = 120  # seconds a worker may take to answer uvicorn's health ping (see serve)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: Annotated[str, typer.Option(help="Address to bind; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (each traces one request at a time); "
                                              "up to the number of cores is useful.")] = 1,
    model: ModelOpt = None,
    experts: ExpertsOpt = None,
    device: EnvDeviceOpt = None,
    dtype: EnvDtypeOpt = None,
    client_rps: Annotated[Optional[float], typer.Option(help="Requests per second per client (its key, else its "
                                                             "address) and worker; 0: no limit "
                                                             "(default: $FLEXOLMO_CLIENT_RPS, else 20).")] = None,
    client_burst: Annotated[Optional[int], typer.Option(help="Requests a client may send at once before the rate "
                                                             "applies (default: $FLEXOLMO_CLIENT_BURST, else 40).")] = None,
    client_passes: Annotated[Optional[int], typer.Option(help="Traces, generations and searches per client running "
                                                              "at once; 0: no limit "
                                                              "(default: $FLEXOLMO_CLIENT_PASSES, else 2).")] = None,
    queue_factor: Annotated[Optional[float], typer.Option(help="Admit a trace, generation or search only if it can be "
                                                               "answered within this many times its time on an idle "
                                                               "service (else 503 with Retry-After at once); 0: within "
                                                               "its budget (default: $FLEXOLMO_QUEUE_FACTOR, else 2.5).")] = None,
    model_nice: Annotated[Optional[int], typer.Option(help="Run model passes this much nicer (0-19) than span "
                                                           "searches, storage and HTTP, so that they keep their "
                                                           "latency while the model saturates the cores; 0: the same "
                                                           "priority (default: $FLEXOLMO_MODEL_NICE, else 10).")] = None,
) -> None:
    """Serve the web page and the trace API over the workspace."""
    import uvicorn

    from api.app import create_app
    from api.deps import Settings

    if not 1 <= workers <= 64:
        raise InputError(f"--workers must be between 1 and 64, got {workers}")
    root = ws()
    # every worker process (and the app of a single one) reads the model from the environment;
    # an option not given leaves the environment's value
    for key, value in (("FLEXOLMO_MODEL", model), ("FLEXOLMO_EXPERTS", experts), ("FLEXOLMO_DEVICE", device),
                       ("FLEXOLMO_DTYPE", dtype)):
        if value is not None:
            os.environ[key] = str(value)
    for name, value, least in (("rps", client_rps, 0), ("burst", client_burst, 1), ("passes", client_passes, 0)):
        if value is not None:  # the environment carries them to every worker process
            if not value >= least:
                raise InputError(f"--client-{name} must be {least} or more{' (0: no limit)' if least == 0 else ''}, "
                                 f"got {value}")
            os.environ[f"FLEXOLMO_CLIENT_{name.upper()}"] = str(value)
    if queue_factor is not None:
        os.environ["FLEXOLMO_QUEUE_FACTOR"] = str(queue_factor)
    if model_nice is not None:
        os.environ["FLEXOLMO_MODEL_NICE"] = str(model_nice)
    Settings.from_env(root)  # every setting checked here, not in each worker
    keys = KeyStore.for_workspace(root)
    if not is_loopback(host) and not keys.has_access_keys():
        raise InputError(f"refusing to serve on {host}: {keys.path} holds no owner or admin key yet, so the first "
                         "admin key would be made while the service already faces the network. Run `flexolmo keys "
                         "admin` (creates the admin key and shows it once; keep it), or give owners keys with "
                         "`flexolmo keys create --owner OWNER --scope owner`, then serve again")
    if not announce_admin_key(keys):
        console.print("owner routes need a key: the source owner's or the admin key (`flexolmo keys list` shows "
                      "ids; `flexolmo keys admin --rotate` replaces a lost admin key)", highlight=False)
    console.print(SCOPE_LINE, highlight=False)
    console.print(f"serving {root.root} on http://{host}:{port} with {workers} worker process"
                  f"{'es' if workers > 1 else ''}", highlight=False)
    if workers == 1:
        uvicorn.run(create_app(root), host=host, port=port)
        return
    os.environ["FLEXOLMO_HOME"] = str(root.root)  # the workers build their app from the environment
    os.environ.setdefault("FLEXOLMO_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    # uvicorn kills a worker that does not answer its health ping within the timeout (5 s by
    # default), from the moment it is spawned: a spawned worker first re-imports this command
    # (seconds of imports, up to 30 s on a loaded 2-core machine), so the timeout must cover that.
    uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers,
                timeout_worker_healthcheck=WORKER_HEALTHCHECK_S)


def is_loopback(host: str) -> bool:
    """Whether `host` serves this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any address
