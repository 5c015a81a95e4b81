"""What every route shares: settings from the environment, and the one open Tracer.

The Tracer holds memory-mapped indexes, the merged model and the source policies, so it
is opened once (in the app's lifespan) and reopened only when a policy or a takedown
changes what it may search, route or show. One lock serialises the library calls: the
Tracer is not thread-safe, and DuckDB refuses a read-only and a read-write connection to
the same file at once within one process.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Annotated, Callable, TypeVar

from fastapi import Depends, HTTPException, Request

from flexolmo.errors import FlexolmoError
from flexolmo.workspace import Workspace
from tracing.trace import Tracer

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """Service settings; `from_env` reads them as `flexolmo` does (the workspace: $FLEXOLMO_HOME)."""

    workspace: Workspace

    @classmethod
    def from_env(cls, workspace: str | os.PathLike | Workspace | None = None) -> "Settings":
        return cls(workspace=workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace))


class Service:
    """The workspace and its open Tracer, shared by every request."""

    def __init__(self, settings: Settings, open_tracer: Callable[[Workspace], Tracer] = Tracer.open):
        self.settings = settings
        self.ws = settings.workspace
        self._open_tracer = open_tracer
        self.tracer: Tracer | None = None
        self.error: str | None = None  # why the tracer could not be opened
        self.lock = threading.RLock()

    def open(self) -> None:
        """(Re)open the Tracer: indexes, model and policies as the catalog says now."""
        with self.lock:
            self.tracer, self.error = None, None
            try:
                self.tracer = self._open_tracer(self.ws)
            except FlexolmoError as e:  # served anyway: /api/health and the sources still answer
                self.error = str(e)

    def close(self) -> None:
        with self.lock:
            if self.tracer is not None:
                self.tracer.fed.close()
            self.tracer = None

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Call a library function under the lock."""
        with self.lock:
            return fn(*args, **kwargs)

    def run_and_reopen(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Call a library function that changes policy or takedowns, then reopen the Tracer."""
        with self.lock:
            out = fn(*args, **kwargs)
            self.open()
            return out

    def traced(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Call `fn(tracer, ...)` under the lock; 503 when no tracer could be opened."""
        with self.lock:
            if self.tracer is not None and self.tracer.stale():  # changed from the CLI, or expired
                self.open()
            if self.tracer is None:
                raise HTTPException(503, detail=f"the tracer is not open: {self.error or 'not started'}")
            return fn(self.tracer, *args, **kwargs)


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
