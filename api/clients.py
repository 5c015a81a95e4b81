"""Per-client limits and the refusal log, at the door of every request.

A client is its key (`key:<key_id>`, when the request carries a valid one of any scope) or
else its address (`addr:<host>`): made-up keys do not buy a fresh budget. Each client gets

- a request rate on /api: a token bucket of `client_burst` requests refilled at `client_rps`
  a second; over it, 429 with `Retry-After` (the seconds until a request is allowed again);
- `client_passes` requests at once on the tracer's lanes (traces, generations, searches:
  api/worker.py); one more is 429 at once, never queued behind the others' work.

Limits hold per worker process (`serve --workers N` gives each its own) and 0 turns one off
(api/deps.py `Settings`). Behind a proxy every client has the proxy's address: give clients
keys, or limit at the proxy.

Every refused request (401, 403, 413, 422, 429) is logged (logger `flexolmo.api`, WARNING)
with its method, path, client and the reason the service answered; for a 422 from input
validation, where and what kind only. Never the body.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from typing import Any, Iterator

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flexolmo.base.errors import FlexolmoError
from index.keys import KeyRecord, KeyStore, bearer

log = logging.getLogger("flexolmo.api")

REFUSED = {401, 403, 413, 422, 429}  # logged, with route, client and reason
MAX_CLIENTS = 10_000  # buckets kept before idle ones (full again) are forgotten
PASS_RETRY_S = 2  # Retry-After when a client already has its model passes running


class TooManyRequests(FlexolmoError):
    """A client over its limits (429); `retry_after` seconds until it may retry."""

    http_status = 429

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


def identify(scope: Scope, keys: KeyStore) -> tuple[KeyRecord | None, str]:
    """The request's valid key (or None) and its client name, worked out once per request.

    :raises IntegrityError: the keys file is damaged
    """
    state = scope.setdefault("state", {})
    if "flexolmo_caller" not in state:
        auth = dict(scope.get("headers") or []).get(b"authorization")
        rec = keys.verify(bearer(auth.decode("latin-1") if auth else None))
        host = (scope.get("client") or ("unknown", 0))[0]
        state["flexolmo_caller"] = (rec, f"key:{rec.key_id}" if rec else f"addr:{host}")
    return state["flexolmo_caller"]


def client_of(scope: Scope, keys: KeyStore) -> str:
    """The request's client name; its address while the keys file cannot be read (owner routes say why)."""
    try:
        return identify(scope, keys)[1]
    except FlexolmoError:
        return f"addr:{(scope.get('client') or ('unknown', 0))[0]}"


class ClientLimits:
    """Each client's request rate (token bucket) and model passes running, in this process."""

    def __init__(self, rps: float, burst: int, passes: int):
        self.rps, self.burst, self.passes = rps, max(1, burst), passes
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when counted)
        self._running: dict[str, int] = {}
        self._mu = threading.Lock()

    def admit(self, client: str) -> None:
        """Count one request of `client`.

        :raises TooManyRequests: over `rps` sustained / `burst` at once
        """
        if self.rps <= 0:
            return
        now = time.monotonic()
        with self._mu:
            tokens, at = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rps)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                raise TooManyRequests(f"too many requests from this client: the limit is {self.rps:g} a second "
                                      f"(bursts of {self.burst}); retry after the Retry-After seconds",
                                      (1 - tokens) / self.rps)
            self._buckets[client] = (tokens - 1, now)
            if len(self._buckets) > MAX_CLIENTS:
                for c, (t, a) in list(self._buckets.items()):
                    if t + (now - a) * self.rps >= self.burst:
                        del self._buckets[c]

    @contextlib.contextmanager
    def model_pass(self, client: str) -> Iterator[None]:
        """Hold one of `client`'s model passes while the body runs.

        :raises TooManyRequests: the client already has `passes` running or queued
        """
        if self.passes <= 0:
            yield
            return
        with self._mu:
            n = self._running.get(client, 0)
            if n >= self.passes:
                raise TooManyRequests(f"this client already has {n} trace, generation or search request(s) "
                                      f"running or queued, its limit; wait for them, then retry", PASS_RETRY_S)
            self._running[client] = n + 1
        try:
            yield
        finally:
            with self._mu:
                n = self._running.pop(client) - 1
                if n:
                    self._running[client] = n


class ClientGate:
    """ASGI middleware: names the client, applies its request rate on /api, logs every refusal.

    `service` is the app's `api.deps.Service` (its `keys` and `limits`)."""

    def __init__(self, app: ASGIApp, service: Any):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = client_of(scope, self.service.keys)
        if scope["path"].startswith("/api/"):
            try:
                self.service.limits.admit(client)
            except TooManyRequests as e:
                refused(scope, client, 429, str(e))
                return await JSONResponse({"detail": str(e)}, status_code=429,
                                          headers={"Retry-After": str(e.retry_after)})(scope, receive, send)
        status, body = 0, bytearray()

        async def watched(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            elif msg["type"] == "http.response.body" and status in REFUSED:
                body.extend(msg.get("body", b"")[: 16_384 - len(body)])
                if not msg.get("more_body"):
                    refused(scope, client, status, _reason(bytes(body)))
            await send(msg)

        await self.app(scope, receive, watched)


def refused(scope: Scope, client: str, status: int, reason: str) -> None:
    """Log one refused request: method, path, client, status, reason (never the body)."""
    log.warning("refused %s %s %s client=%s: %s", status, scope.get("method", "?"), scope.get("path", "?")[:200],
                client, reason[:300])


def _reason(body: bytes) -> str:
    """The reason of an error answer: its `detail` text, or for input validation where and what kind."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return "(no detail)"
    if isinstance(detail, list):  # api/limits.py validation_error: loc and type, not the message
        return "invalid input: " + "; ".join(
            f"{'.'.join(str(p)[:40] for p in e.get('loc', []))} ({e.get('type', '')})" for e in detail[:5]
            if isinstance(e, dict))
    return str(detail)
