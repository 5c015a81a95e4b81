"""The web service: the trace API, the owner and analyst endpoints, and the web page.

    flexolmo serve                                   # http://127.0.0.1:8000
    flexolmo serve --workers 2                       # two processes over the same indexes
    FLEXOLMO_HOME=work uvicorn --factory api.app:create_app

The Tracer (indexes memory-mapped, merged model loaded, policies read) is opened once when
the app starts, on its own thread (api/worker.py), and reopened when a policy or a takedown
changes, through the API or from the command line (checked before each trace), or when a
licence expires at midnight. Library errors (`FlexolmoError`) become HTTP errors with the
error's status and message; budgets, caps and per-client limits come from the environment
(api/deps.py). Owner and admin routes need a key from the first start (api/auth.py); every
request is counted against its client's limits and every refusal is logged (api/clients.py).
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from flexolmo.base.errors import FlexolmoError
from flexolmo.base.workspace import Workspace
from tracing.trace import Tracer

from .batch import router as batch_router
from .clients import ClientGate, log
from .deps import Service, Settings
from .limits import BodyLimit, validation_error
from .routes import router
from .stream import router as stream_router

STATIC = Path(__file__).parent / "static"


def create_app(workspace: str | os.PathLike | Workspace | None = None,
               open_tracer: Callable[[Workspace], Tracer] = Tracer.open,
               settings: Settings | None = None) -> FastAPI:
    """The FastAPI app over `workspace` (default: $FLEXOLMO_HOME, else ./flexolmo-work).

    :param open_tracer: how to open the Tracer (tests and experiments may pass settings)
    :param settings: budgets and caps (default: from the environment)
    """
    service = Service(settings or Settings.from_env(workspace), open_tracer)
    if not log.handlers:  # refusals and warnings on stderr, as uvicorn writes its own
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:  %(message)s"))
        log.addHandler(handler)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threads = os.environ.get("FLEXOLMO_TORCH_THREADS")  # set by `serve --workers N`: cores / N each
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        _finish_pending(service.ws)
        if not service.keys.has_access_keys():
            log.warning("owner routes refuse every request: %s holds no owner or admin key; run `flexolmo keys "
                        "admin` (the admin key, shown once) or `flexolmo keys create --owner OWNER --scope owner`",
                        service.keys.path)
        service.open()
        yield
        service.close()

    app = FastAPI(title="flexolmo-trace", summary="Trace model outputs to training documents and experts.",
                  lifespan=lifespan)
    app.state.service = service
    app.include_router(router)
    app.include_router(batch_router)
    app.include_router(stream_router)  # POST /api/trace/stream: spans first, experts after
    app.add_middleware(BodyLimit, max_bytes=service.settings.max_body_bytes)
    app.add_middleware(ClientGate, service=service)  # outermost: limits before the body is read
    app.add_exception_handler(RequestValidationError, validation_error)

    @app.exception_handler(FlexolmoError)
    async def library_error(request: Request, e: FlexolmoError):
        headers = {"WWW-Authenticate": "Bearer"} if e.http_status == 401 else {}
        retry = getattr(e, "retry_after", 5 if e.http_status == 503 else None)
        if retry is not None:
            headers["Retry-After"] = str(retry)
        return await http_exception_handler(request, HTTPException(status_code=e.http_status, detail=str(e),
                                                                   headers=headers or None))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _finish_pending(ws: Workspace) -> None:
    """Owner changes a crash left half-applied are finished before the first request."""
    from tracing.provenance import store

    if (ws.traces_path.parent / "manifest.json").exists() or ws.traces_path.exists():
        try:
            store.sync(ws)
        except FlexolmoError:  # busy: the first writer or reader finishes them
            pass
