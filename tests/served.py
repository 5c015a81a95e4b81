"""A FastAPI app served by uvicorn in a thread on a free loopback port, for the tests that need a
real server (the browser tests, streaming, disconnects).

    with serving(create_app(ws)) as url:
        requests.get(url + "/api/health")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

import uvicorn

LOOPBACK = "127.0.0.1"


class LiveServer:
    """uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Serve `app` until the block ends; yields its URL."""
    live = LiveServer(app)
    try:
        yield live.url
    finally:
        live.stop()
