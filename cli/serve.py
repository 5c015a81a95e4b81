"""`flexolmo serve`: the web page and the trace API (api/), served by uvicorn.

    flexolmo serve                       # http://127.0.0.1:8000, loopback only
    flexolmo -w work serve --port 8080
"""

from __future__ import annotations

from typing import Annotated

import typer

from .common import console, ws


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: Annotated[str, typer.Option(help="Address to bind; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Serve the web page and the trace API over the workspace."""
    import uvicorn

    from api.app import create_app

    app = create_app(ws())
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] binding {host}: the API has no authentication, and owner "
                      "endpoints can switch sources off and take documents down")
    console.print(f"serving {app.state.service.ws.root} on http://{host}:{port}")
    uvicorn.run(app, host=host, port=port)
