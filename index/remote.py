"""A source whose index stays on its owner's machine, asked over the node protocol.

    add_remote(ws, "lab", "http://127.0.0.1:8701", key_file="lab.key", owner="Lab A",
               domain="biology", licence="CC BY 4.0")         # checks the node, then registers it
    rs = RemoteSource("lab", url, key, tokenizer_hash=...)    # what Federation.open builds for it
    rs.matches(ids, delim_ids, bow_ids)                       # SourceMatches, as SourceIndex.matches
    rs.documents_many([(span_ids, picks, n)])                 # [[SpanDocument]], one round trip

`RemoteSource` answers the same questions as `index/source.py`'s `SourceIndex` (identity:
name, visibility, counts, unigram counts, build; `matches`; `documents`), so the
Federation merges local and remote answers the same way. Each call has a deadline
(retries included: a lost connection or a 502/503/504 is retried a bounded number of
times while time is left), the answer is read with a size cap and checked against the
protocol before it is used; anything else raises `RemoteUnavailable` with the reason, and
the Federation marks the source `unavailable` for that trace. After a timeout the node is
not asked again for `cooldown_s` (a slow node costs one deadline, not one per trace);
otherwise every call tries again, so a node that comes back is used at once.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import numpy as np
from pydantic import BaseModel, ValidationError

from flexolmo.base import catalog as base_catalog
from flexolmo.base import sources as src_lib
from flexolmo.base import tokenizer as tok_lib
from flexolmo.base.errors import ConflictError, FlexolmoError, InputError, IntegrityError, NotFoundError
from flexolmo.base.workspace import Workspace

from . import catalog, width as widths
from . import protocol as P
from .keys import read_key_file, write_secret
from .options import WINDOW
from .results import SourceMatches, SpanDocument
from .source import check_ids

MAX_ANSWER_BYTES = 64_000_000  # an answer larger than this is garbage


@dataclass(frozen=True)
class RemoteSettings:
    """How the tracer talks to owner nodes."""

    deadline_s: float = 5.0  # per call, retries included
    retries: int = 1  # extra attempts after a lost connection or a 502/503/504, while time is left
    connect_s: float = 1.0  # loopback or LAN: a node that does not accept within 1 s is down
    cooldown_s: float = 2.0  # after a timeout, answer `unavailable` at once for this long


class RemoteUnavailable(FlexolmoError):
    """A node did not give a usable answer (down, slow, refused the key, or answered garbage)."""

    http_status = 503


def check_url(url: str) -> str:
    """A node's base URL, http(s)://host[:port] (a trailing slash is dropped)."""
    parts = urlsplit((url or "").strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or parts.path not in ("", "/"):
        raise InputError(f"--remote {url!r} is not a node URL; give http://HOST:PORT (e.g. http://127.0.0.1:8701)")
    return f"{parts.scheme}://{parts.netloc}"


class NodeClient:
    """HTTP to one node: keyed, with a deadline, bounded retries, size cap and answer checks.

    Plain `http.client` with kept-alive connections (it sets TCP_NODELAY, without which a
    request's body waits for the node's delayed ACK: 40 ms a call). Connections are pooled,
    so a call still running past the Federation's wait does not block the next one.
    """

    def __init__(self, url: str, key: str, settings: RemoteSettings | None = None):
        self.url, self.settings = check_url(url), settings or RemoteSettings()
        parts = urlsplit(self.url)
        self._conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port = parts.hostname, parts.port
        self._headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
        self._idle: list[http.client.HTTPConnection] = []
        self._mu = threading.Lock()
        self._down_until = 0.0
        self._down_why = ""
        self.bytes_sent = 0  # request and answer bodies (HTTP headers not counted), for the benchmark
        self.bytes_received = 0
        self.requests = 0

    def call(self, method: str, path: str, model: type[BaseModel], body: dict | None = None) -> BaseModel:
        st = self.settings
        now = time.monotonic()
        if now < self._down_until:
            raise RemoteUnavailable(f"{self._down_why} (not asked again for {self._down_until - now:.1f}s)")
        deadline = now + st.deadline_s
        payload = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        why = ""
        for attempt in range(1 + st.retries):
            if deadline - time.monotonic() <= 0:
                break
            try:
                status, raw = self._once(method, path, payload, deadline)
            except TimeoutError:
                self._down_until, self._down_why = time.monotonic() + st.cooldown_s, \
                    f"no answer from {self.url} within {st.deadline_s:g}s"
                raise RemoteUnavailable(self._down_why) from None
            except (OSError, http.client.HTTPException) as e:  # refused, reset, closed mid-answer
                why = f"cannot reach {self.url} ({type(e).__name__}: {str(e)[:120] or 'connection lost'})"
                self._drop_idle()  # kept-alive connections to a node that went away are all stale
                time.sleep(min(0.05 * (attempt + 1), max(0.0, deadline - time.monotonic())))
                continue
            if status in (502, 503, 504):
                why = f"{self.url} answered {status}"
                continue
            return self._parse(status, raw, path, model)
        raise RemoteUnavailable(why or f"no answer from {self.url} within {st.deadline_s:g}s")

    def _once(self, method: str, path: str, payload: bytes | None, deadline: float) -> tuple[int, bytes]:
        def left() -> float:
            t = deadline - time.monotonic()
            if t <= 0:
                raise TimeoutError("deadline passed")
            return t

        with self._mu:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._conn_cls(self._host, self._port, timeout=min(left(), self.settings.connect_s))
            conn.connect()
        try:
            sock = conn.sock  # getresponse() lets go of it when the node closes the connection after answering
            sock.settimeout(left())
            headers = dict(self._headers, **({"Content-Type": "application/json"} if payload is not None else {}))
            conn.request(method, path, body=payload, headers=headers)
            r = conn.getresponse()
            chunks, size = [], 0
            while not r.isclosed():  # closed once the whole answer is read
                sock.settimeout(left())
                chunk = r.read(1 << 16)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise RemoteUnavailable(f"{self.url} sent an answer over {MAX_ANSWER_BYTES:,} bytes")
                chunks.append(chunk)
        except BaseException:
            conn.close()
            raise
        if r.will_close:
            conn.close()
        else:
            with self._mu:
                self._idle.append(conn)
        self.requests += 1
        self.bytes_sent += len(payload or b"")
        self.bytes_received += size
        return r.status, b"".join(chunks)

    def _drop_idle(self) -> None:
        with self._mu:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    def _parse(self, status: int, raw: bytes, path: str, model: type[BaseModel]) -> BaseModel:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        detail = data.get("detail") if isinstance(data, dict) else None
        if status == 401:
            raise RemoteUnavailable(f"{self.url} refused the key (401): {detail or 'no valid key'}")
        if status == 403:
            raise RemoteUnavailable(f"{self.url} refused the key (403): {detail or 'another owner'}")
        if status != 200:
            if detail is None:
                raise RemoteUnavailable(f"{self.url} is not a flexolmo owner node ({path} answered {status})")
            raise RemoteUnavailable(f"{self.url} answered {status}: {str(detail)[:300]}")
        if not isinstance(data, dict) or data.get("protocol") != P.PROTOCOL:
            raise RemoteUnavailable(f"{self.url} is not a flexolmo owner node speaking {P.PROTOCOL} "
                                    f"({path} answered something else)")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise RemoteUnavailable(f"{self.url} answered garbage ({str(e.errors()[0].get('msg'))[:120]})") from None

    def close(self) -> None:
        self._drop_idle()


class RemoteSource:
    """One source served by its owner's node, with the face of a `SourceIndex`."""

    def __init__(self, name: str, url: str, key: str, *, tokenizer_hash: str, visibility: str = "full",
                 settings: RemoteSettings | None = None, vocab_size: int | None = None):
        self.name = name
        # the tracer's tokenizer is the node's (checked on every identity), so its width is the node's
        self.width = widths.for_vocab(vocab_size) if vocab_size else widths.U16
        self.vocab_size = vocab_size
        self.max_id = self.width.max_id(vocab_size)
        self.client = NodeClient(url, key, settings)
        self.url = self.client.url
        self.tokenizer_hash = tokenizer_hash  # the tracer's: a node with another is not used
        self.local_visibility = src_lib.check_visibility(visibility)  # the tracer's own cap
        self.node_visibility = "full"  # the owner's, as its last answer said
        self._identity: P.Identity | None = None
        self._unigram: np.ndarray | None = None
        self._mu = threading.Lock()

    @property
    def visibility(self) -> str:
        return P.stricter(self.local_visibility, self.node_visibility)

    # -- identity --------------------------------------------------------------------------

    def identity(self, refresh: bool = False) -> P.Identity:
        """The node's identity (cached; fetched again when its build changes or on `refresh`)."""
        with self._mu:
            if self._identity is None or refresh:
                ident = self.client.call("GET", "/v1/identity", P.Identity)
                self._check(ident)
                try:
                    u = self.width.from_sparse(ident.unigrams.ids, ident.unigrams.counts, self.vocab_size)
                except IntegrityError:
                    raise RemoteUnavailable(f"{self.url} answered garbage (unigram ids out of range)") from None
                self._identity, self._unigram, self.node_visibility = ident, u, ident.visibility
            return self._identity

    def _check(self, ident: P.Identity) -> None:
        if ident.source != self.name:
            raise RemoteUnavailable(f"{self.url} serves source {ident.source!r}, not {self.name!r}")
        if ident.tokenizer_hash != self.tokenizer_hash:
            raise RemoteUnavailable(f"{self.url} tokenizes with {ident.tokenizer_hash[:12]}, this tracer with "
                                    f"{self.tokenizer_hash[:12]}; the owner must import the shared tokenizer and rebuild")

    @property
    def build_id(self) -> str:
        return self.identity().build_id

    @property
    def n_tokens(self) -> int:
        return self.identity().n_tokens

    @property
    def n_docs(self) -> int:
        return self.identity().n_docs

    @property
    def unigram_counts(self) -> np.ndarray:
        self.identity()
        return self._unigram

    def settle(self) -> None:
        """Nothing to wait for: the node checks its own files."""

    # -- the two questions of a trace ------------------------------------------------------

    def matches(self, ids: Sequence[int], delim_ids: Sequence[int], bow_ids: Sequence[int] | None,
                enforce_bow: bool = True) -> SourceMatches:
        """As `SourceIndex.matches`, asked of the node (only the delimiter and word-start ids that
        occur in the query are sent: the answer is the same)."""
        ids = check_ids(ids, max_id=self.max_id)
        present = set(ids)
        body = {"ids": ids, "delim_ids": sorted(present.intersection(check_ids(delim_ids, "delim_ids", self.max_id))),
                "bow_ids": None if bow_ids is None else sorted(present.intersection(int(i) for i in bow_ids)),
                "enforce_bow": bool(enforce_bow)}
        ident = self.identity()
        a = self.client.call("POST", "/v1/matches", P.MatchesAnswer, body)
        L = len(ids)
        if a.source != self.name or len(a.lengths) != L or len(a.counts) != L or any(
                not 0 <= n <= L - l or c < 0 or (n == 0) != (c == 0) for l, (n, c) in enumerate(zip(a.lengths, a.counts))):
            raise RemoteUnavailable(f"{self.url} answered garbage (matches that do not fit the query)")
        self.node_visibility = a.visibility
        if a.build_id != ident.build_id:  # rebuilt since: its unigram counts changed too
            self.identity(refresh=True)
        return SourceMatches(self.name, list(a.lengths), list(a.counts))

    def documents(self, span_ids: Sequence[int], picks: Sequence[int], n: int = WINDOW.max_docs,
                  context_tokens: int = WINDOW.context_tokens,
                  snippet_tokens: int = WINDOW.snippet_tokens) -> list[SpanDocument]:
        return self.documents_many([(span_ids, picks, n)], context_tokens, snippet_tokens)[0]

    def documents_many(self, requests: Sequence[tuple[Sequence[int], Sequence[int], int]],
                       context_tokens: int = WINDOW.context_tokens,
                       snippet_tokens: int = WINDOW.snippet_tokens) -> list[list[SpanDocument]]:
        """Documents of several spans in one round trip: one list per (span_ids, picks, n)."""
        if self.visibility == "counts" or not requests:
            return [[] for _ in requests]
        body = {"spans": [{"span_ids": check_ids(s, "span_ids", self.max_id), "picks": [int(p) for p in ps], "n": int(n)}
                          for s, ps, n in requests],
                "context_tokens": int(context_tokens), "snippet_tokens": int(snippet_tokens),
                "max_visibility": self.local_visibility}
        a = self.client.call("POST", "/v1/documents", P.DocumentsAnswer, body)
        self.node_visibility = a.visibility
        if a.source != self.name or len(a.documents) != len(requests):
            raise RemoteUnavailable(f"{self.url} answered garbage (documents for other spans)")
        out = []
        for (span_ids, picks, n), docs in zip(requests, a.documents):
            for d in docs:
                text = bool(d.token_ids) or d.title is not None
                if (d.source != self.name or d.needle_len != len(span_ids) or not 0 <= d.draw < len(picks)
                        or P.VISIBILITY_ORDER.index(d.visibility) > P.VISIBILITY_ORDER.index(self.visibility)
                        or d.visibility == "counts" or (d.blocked and text) or len(docs) > n):
                    raise RemoteUnavailable(f"{self.url} answered garbage (a document outside its policy or request)")
            out.append([SpanDocument(**d.model_dump()) for d in docs])
        return out

    def doc_freq(self, words: Sequence[str]):
        """The node's document frequencies of `words` and its source's document statistics
        (`index.doc_freq.Stats`); RemoteUnavailable when it has none or does not answer."""
        from .doc_freq import Stats

        uniq = sorted(set(words))[: P.MAX_DF_WORDS]
        a = self.client.call("POST", "/v1/doc_freq", P.DocFreqAnswer, {"words": uniq})
        if a.source != self.name or len(a.df) != len(uniq) or any(not 0 <= d <= a.n_docs for d in a.df):
            raise RemoteUnavailable(f"{self.url} answered garbage (document frequencies that do not fit the request)")
        return Stats(n_docs=a.n_docs, n_words=a.n_words, n_tokens=a.n_tokens,
                     doc_words_quantiles=list(a.doc_words_quantiles), dfs=dict(zip(uniq, a.df)))

    def count(self, ids: Sequence[int]) -> int:
        raise ConflictError(f"source {self.name!r} is held by its owner's node, which answers only matches "
                            "and documents; counts come with each trace's spans")

    def document(self, doc_id: str):
        raise ConflictError(f"source {self.name!r} is held by its owner's node; its documents are seen only "
                            "through traces, cut to the owner's policy")

    doc_at = attribute = document_tokens = document

    def close(self) -> None:
        self.client.close()


# -- registering a remote source at the tracer ---------------------------------------------


def remotes_dir(ws: Workspace) -> Path:
    return ws.root / "remotes"


def add_remote(ws: Workspace, name: str, url: str, key_file: str | os.PathLike, *, owner: str, domain: str,
               licence: str, visibility: str = "full", by: str | None = None,
               settings: RemoteSettings | None = None) -> src_lib.Source:
    """Register a source held by its owner's node: checked first (reachable, speaks the protocol,
    same source name and owner, same tokenizer), then its key and rows are stored; nothing is
    stored when a check fails."""
    src_lib.check_name(name)
    src_lib.check_visibility(visibility)
    url = check_url(url)
    key = read_key_file(key_file)
    try:
        ours = tok_lib.tokenizer_hash(ws)
    except NotFoundError:
        raise ConflictError("this workspace has no tokenizer; bring in the shared one first with "
                            "`flexolmo tokenizer import DIR`") from None
    with base_catalog.connect(ws, read_only=True) as con:
        if con.execute("SELECT 1 FROM sources WHERE name = ?", [name]).fetchone():
            raise ConflictError(f"source {name!r} already exists; choose another name")
    client = NodeClient(url, key, settings)
    try:
        ident = client.call("GET", "/v1/identity", P.Identity)
    except RemoteUnavailable as e:
        raise InputError(f"cannot add {name!r}: {e}") from None
    finally:
        client.close()
    if ident.source != name:
        raise ConflictError(f"the node at {url} serves source {ident.source!r}, not {name!r}; "
                            f"add it as {ident.source!r} or ask its owner")
    if ident.owner != owner:
        raise ConflictError(f"the node at {url} belongs to owner {ident.owner!r}, not {owner!r}")
    if ident.tokenizer_hash != ours:
        raise ConflictError(f"the node at {url} tokenizes with {ident.tokenizer_hash}, this workspace with {ours}; "
                            "both must use the shared tokenizer (`flexolmo tokenizer import DIR`, then the owner "
                            "rebuilds the index)")
    path = remotes_dir(ws) / f"{name}.key"
    write_secret(path, key)
    try:
        with catalog.connect(ws) as con:
            con.execute("BEGIN")
            try:
                src_lib.insert_remote_row(con, name, owner=owner, domain=domain, licence=licence,
                                          origin=f"{src_lib.REMOTE_ORIGIN}{url}", content_hash=ident.content_hash,
                                          n_docs=ident.n_docs, visibility=visibility, by=by)
                catalog.insert_remote(con, {"source": name, "url": url, "key_path": str(path), "owner": owner,
                                            "tokenizer_hash": ident.tokenizer_hash, "build_id": ident.build_id,
                                            "n_tokens": ident.n_tokens,
                                            "added_at": dt.datetime.now().replace(microsecond=0)})
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return src_lib.get_source(ws, name)


def open_remotes(ws: Workspace, names: Sequence[str], visibility: dict[str, str],
                 settings: RemoteSettings | None = None) -> tuple[dict[str, RemoteSource], dict[str, str]]:
    """The RemoteSource of each of `names` registered as remote; (opened, skipped with why).
    Opening asks no node anything: each is asked on first use."""
    rows = catalog.list_remote_sources(ws)
    wanted = [n for n in names if n in rows]
    if not wanted:
        return {}, {}
    ours = tok_lib.tokenizer_hash(ws)
    vocab = tok_lib.tokenizer_info(ws).vocab_size
    opened, skipped = {}, {}
    for n in wanted:
        try:
            key = read_key_file(rows[n]["key_path"])
        except InputError as e:
            skipped[n] = f"unavailable: its key cannot be read ({e})"
            continue
        opened[n] = RemoteSource(n, rows[n]["url"], key, tokenizer_hash=ours, visibility=visibility.get(n, "full"),
                                 settings=settings, vocab_size=vocab)
    return opened, skipped
