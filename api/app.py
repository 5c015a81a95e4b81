"""The web service: the trace API, the owner and analyst endpoints, and the web page.

    flexolmo serve                                   # http://127.0.0.1:8000
    FLEXOLMO_HOME=work uvicorn --factory api.app:create_app

The Tracer (indexes memory-mapped, merged model loaded, policies read) is opened once when
the app starts and reopened when a policy or a takedown changes, through the API or from
the command line (checked before each trace), or when a licence expires at midnight. Library
errors (`FlexolmoError`) become HTTP errors with the error's status and message.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from flexolmo.errors import FlexolmoError
from flexolmo.workspace import Workspace
from tracing.trace import Tracer

from .deps import Service, Settings
from .routes import router

STATIC = Path(__file__).parent / "static"


def create_app(workspace: str | os.PathLike | Workspace | None = None,
               open_tracer: Callable[[Workspace], Tracer] = Tracer.open) -> FastAPI:
    """The FastAPI app over `workspace` (default: $FLEXOLMO_HOME, else ./flexolmo-work).

    :param open_tracer: how to open the Tracer (tests and experiments may pass settings)
    """
    service = Service(Settings.from_env(workspace), open_tracer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.open()
        yield
        service.close()

    app = FastAPI(title="flexolmo-trace", summary="Trace model outputs to training documents and experts.",
                  lifespan=lifespan)
    app.state.service = service
    app.include_router(router)

    @app.exception_handler(FlexolmoError)
    async def library_error(request: Request, e: FlexolmoError):
        return await http_exception_handler(request, HTTPException(status_code=e.http_status, detail=str(e)))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
