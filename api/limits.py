"""Limits at the door: a body-size cap, and 422s that say what was wrong without echoing it.

FastAPI's default 422 repeats the offending input (a 50 MB body came back as a 50 MB
reply). Here each error keeps its location, message and type only.
"""

from __future__ import annotations

import codecs

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, by Content-Length or while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> HTTPException:
        return HTTPException(413, detail=f"the request body is over {self.max_bytes:,} bytes, this service's limit; "
                                         "send a shorter text")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            e = self._too_large()
            return await JSONResponse({"detail": e.detail}, status_code=413, headers={"Connection": "close"})(
                scope, receive, send)
        seen = 0
        ctype = dict(scope.get("headers") or []).get(b"content-type", b"")
        utf8 = codecs.getincrementaldecoder("utf-8")() if b"json" in ctype else None

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                body = msg.get("body", b"")
                seen += len(body)
                if seen > self.max_bytes:
                    raise self._too_large()  # FastAPI re-raises HTTPExceptions from body reading
                if utf8 is not None:
                    try:
                        utf8.decode(body, final=not msg.get("more_body", False))
                    except UnicodeDecodeError as e:
                        raise HTTPException(400, detail=f"the request body is not UTF-8 text (byte {seen - len(body) + e.start}"
                                                        "): send JSON encoded as UTF-8") from None
            return msg

        await self.app(scope, limited, send)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with where and what, never the input itself."""
    errors = [{"loc": list(e.get("loc", ())), "msg": _msg(e), "type": e.get("type", "")} for e in exc.errors()[:20]]
    return JSONResponse(status_code=422, content={"detail": errors})


def _msg(e: dict) -> str:
    if e.get("type") == "string_unicode":  # e.g. a lone surrogate "\\ud800" in the JSON
        return "not valid Unicode text (a lone surrogate such as \\ud800?); send UTF-8 text"
    if e.get("type") == "json_invalid":
        where = e.get("loc", ("body", None))[-1]
        return f"the body is not valid JSON (at character {where}); send one JSON object, e.g. {{\"text\": \"...\"}}"
    return str(e.get("msg", ""))[:300]
