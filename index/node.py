"""An owner node: one source of the owner's own workspace, answering the protocol of
`index/protocol.py` over HTTP, under keys the owner issued.

    flexolmo -w owner-ws keys create --owner "Lab A"              # give the key to a tracer
    flexolmo -w owner-ws index serve --source lab --port 8701     # 127.0.0.1 unless --host

The node answers from its own files with the project's compiled search (`SourceIndex`),
and the owner's policy is applied here, before anything is sent: `counts` sources send
no documents, `snippets` sources a snippet only, taken-down documents come back blocked
with no text and no title. A tracer may ask for anything; a stricter cap it sends
(`max_visibility`) is honoured too. The node re-reads its source's catalog row,
takedowns and index whenever the workspace changes (a stat of the catalog and manifests
per request), so an owner who switches the source off, changes its visibility or takes a
document down from the command line is followed by the very next answer.
"""

from __future__ import annotations

import copy
import datetime as dt
import sys
import threading
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from flexolmo.base import sources as src_lib
from flexolmo.base import tokenizer as tok_lib
from flexolmo.base.errors import ConflictError, FlexolmoError, NotFoundError
from flexolmo.base.workspace import Workspace

from . import catalog, doc_freq, format as fmt
from . import protocol as P
from .keys import KeyRecord, KeyStore, bearer
from .source import SourceIndex


def _stat(p: Path) -> tuple:
    try:
        st = p.stat()
    except FileNotFoundError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Node:
    """The served source: its catalog row and its index, reopened when the owner changes them."""

    def __init__(self, ws: Workspace, source: str, keys: KeyStore):
        self.ws, self.name, self.keys = ws, src_lib.check_name(source), keys
        self._mu = threading.Lock()
        self._stamp: tuple | None = None
        self._ix_key: tuple | None = None
        self.ix: SourceIndex | None = None
        self.src, self.ix = self.current()  # refuses to start on a missing, stale or damaged index
        self.tokenizer_hash = tok_lib.tokenizer_hash(ws)

    def _workspace_stamp(self) -> tuple:
        c = self.ws.catalog_path
        return (dt.date.today(), _stat(c), _stat(c.with_name(c.name + ".wal")),
                _stat(fmt.index_dir(self.ws, self.name) / fmt.MANIFEST),
                _stat(fmt.diff_dir(self.ws, self.name) / fmt.MANIFEST))

    def current(self) -> tuple[src_lib.Source, SourceIndex]:
        """The source's row and index as they are now (re-read only when the workspace changed)."""
        with self._mu:
            stamp = self._workspace_stamp()
            if stamp == self._stamp and self.ix is not None:
                return self.src, self.ix
            src = src_lib.get_source(self.ws, self.name)
            taken = tuple(sorted(t.doc_id for t in catalog.list_takedowns(self.ws, self.name)))
            ix_key = (stamp[3], stamp[4], taken)
            if self.ix is None or ix_key != self._ix_key:
                ix = SourceIndex(self.ws, self.name, visibility=src.visibility)
                ix.settle()  # every checksum, before the first answer from this index
                self.ix, self._ix_key = ix, ix_key
            self.ix.visibility = src.visibility
            self.src, self._stamp = src, stamp
            return src, self.ix

    def identity(self) -> dict:
        src, ix = self.current()
        ids, counts = ix.width.to_sparse(ix.unigram_counts)
        m = ix.manifest
        return P.Identity(source=src.name, owner=src.owner, domain=src.domain, licence=src.licence,
                          visibility=src.visibility, available=src.available(), tokenizer_hash=self.tokenizer_hash,
                          n_tokens=ix.n_tokens, n_docs=ix.n_docs, n_shards=m.n_shards, build_id=m.build_id,
                          content_hash=m.content_hash, takedowns=len(self._ix_key[2]),
                          unigrams=P.Unigrams(ids=ids.tolist(), counts=counts.tolist())).model_dump()

    def serving(self) -> tuple[src_lib.Source, SourceIndex]:
        """The index, if the owner lets the source answer today (409 otherwise)."""
        src, ix = self.current()
        if not src.available():
            why = "switched off by its owner" if not src.active else f"its licence expired on {src.expires}"
            raise ConflictError(f"source {src.name!r} is not available: {why}")
        return src, ix

    def matches(self, req: P.MatchesRequest) -> dict:
        src, ix = self.serving()
        m = ix.matches(req.ids, req.delim_ids, req.bow_ids, req.enforce_bow)
        return P.MatchesAnswer(source=src.name, build_id=ix.build_id, visibility=src.visibility,
                               lengths=m.lengths, counts=m.counts).model_dump()

    def documents(self, req: P.DocumentsRequest) -> dict:
        src, ix = self.serving()
        vis = P.stricter(src.visibility, req.max_visibility)
        view = copy.copy(ix)  # the same open files, cut to the stricter visibility for this answer
        view.visibility = vis
        out = [[d.__dict__ for d in view.documents(s.span_ids, s.picks, s.n, req.context_tokens, req.snippet_tokens)]
               for s in req.spans]
        return {"protocol": P.PROTOCOL, "source": src.name, "build_id": ix.build_id, "visibility": vis,
                "documents": out}

    def doc_freq(self, req: P.DocFreqRequest) -> dict:
        src, ix = self.serving()
        table = doc_freq.open_table(ix.folder)
        if table is None:
            raise NotFoundError(f"the index of {src.name!r} has no document-frequency table; its owner rebuilds it "
                                f"with `flexolmo index build --source {src.name} --force`")
        words = [w[: P.MAX_WORD_CHARS] for w in req.words]
        st = table.stats
        return P.DocFreqAnswer(source=src.name, build_id=ix.build_id, n_docs=table.n_docs, n_words=st["n_words"],
                               n_tokens=st["n_tokens"], doc_words_quantiles=st["doc_words_quantiles"],
                               df=table.df(words).tolist()).model_dump()


# -- the HTTP face -----------------------------------------------------------------------


class _BodyLimit:
    """413 for bodies over the protocol's limit, by Content-Length or while reading."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        detail = {"detail": f"the request body is over {self.max_bytes:,} bytes, the node's limit"}
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse(detail, status_code=413, headers={"Connection": "close"})(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, detail=detail["detail"])
            return msg

        await self.app(scope, limited, send)


def _node(request: Request) -> Node:
    return request.app.state.node


def _caller(request: Request) -> KeyRecord:
    """The key of this request: 401 without a valid one, 403 when it is not this owner's index key."""
    node = _node(request)
    rec = node.keys.verify(bearer(request.headers.get("authorization")))
    if rec is None:
        raise HTTPException(401, detail="a valid key is required (Authorization: Bearer <key>); ask the source's "
                                        "owner for one (`flexolmo keys create --owner ... --scope index`)",
                            headers={"WWW-Authenticate": "Bearer"})
    src, _ = node.current()
    if rec.owner != src.owner:
        raise HTTPException(403, detail=f"this key was issued by another owner, not by {src.owner!r}, "
                                        f"who owns {src.name!r}")
    if rec.scope != "index":
        raise HTTPException(403, detail=f"this key has scope {rec.scope!r}; a node answers keys of scope 'index'")
    return rec


Caller = Annotated[KeyRecord, Depends(_caller)]
NodeDep = Annotated[Node, Depends(_node)]


def create_app(node: Node) -> FastAPI:
    """The node's FastAPI app (routes under /v1; every route requires a key)."""
    app = FastAPI(title=f"flexolmo owner node: {node.name}", version=P.PROTOCOL, docs_url=None, redoc_url=None)
    app.state.node = node

    @app.exception_handler(FlexolmoError)
    async def _flexolmo_error(request: Request, e: FlexolmoError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=e.http_status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(x.get("loc", ())), "msg": str(x.get("msg", ""))[:300]} for x in e.errors()[:10]]
        return JSONResponse({"detail": errors}, status_code=422)  # never echoes the input

    @app.get("/v1/identity", response_model=P.Identity)
    def identity(_: Caller, node: NodeDep):
        """Who this node is: source, owner, tokenizer hash, counts, unigram counts, index build."""
        return JSONResponse(node.identity())

    @app.post("/v1/matches", response_model=P.MatchesAnswer)
    def matches(req: P.MatchesRequest, _: Caller, node: NodeDep):
        """The longest match (OLMoTrace's cut rules) and its count at every position of `ids`."""
        return JSONResponse(node.matches(req))

    @app.post("/v1/documents", response_model=P.DocumentsAnswer)
    def documents(req: P.DocumentsRequest, _: Caller, node: NodeDep):
        """Sampled documents of each span, cut to the owner's policy; takedowns blocked, no text."""
        return JSONResponse(node.documents(req))

    @app.post("/v1/doc_freq", response_model=P.DocFreqAnswer)
    def doc_freq_(req: P.DocFreqRequest, _: Caller, node: NodeDep):
        """Documents holding each word, and the source's document count and lengths (relevance's statistics)."""
        return JSONResponse(node.doc_freq(req))

    app.add_middleware(_BodyLimit, max_bytes=P.MAX_BODY_BYTES)
    return app


def serve(ws: Workspace, source: str, host: str = "127.0.0.1", port: int = 0, keys: str | None = None,
          log_level: str = "warning") -> None:
    """Run the node until interrupted. Prints `listening on http://HOST:PORT` once bound
    (port 0: a free port), so a parent process can find it."""
    import uvicorn

    store = KeyStore.for_workspace(ws, keys)
    node = Node(ws, source, store)
    if not store.list(node.src.owner):
        print(f"warning: no keys of owner {node.src.owner!r} in {store.path}; every request will get 401 until "
              f"you run `flexolmo keys create --owner {node.src.owner!r}`", file=sys.stderr, flush=True)
    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # uvicorn binds (asyncio then sets TCP_NODELAY on every connection)
                bound = self.servers[0].sockets[0].getsockname()[1]
                print(f"listening on http://{host}:{bound} (source {source!r}, keys {store.path})", flush=True)

    config = uvicorn.Config(create_app(node), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_keep_alive=30)
    _Server(config).run()
