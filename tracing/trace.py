"""The trace pipeline: response -> spans -> documents -> relevance -> experts -> provenance.

    tracer = Tracer.open(ws)                      # indexes, tokenizer, merged model: once
    t = tracer.trace("pasted response", prompt="...")
    t = tracer.generate_and_trace("prompt", max_new_tokens=60)

OLMoTrace's production settings (DESIGN.md, Tracing): only the response is traced; maximal
spans with delimiters newline and '.', min_len 1, max_cnt 1,000,000, word boundaries
enforced; keep the K = ceil(0.05 L) spans with the lowest unigram log-prob sum; up to 10
documents per span (seeded sample), 250 tokens of context a side and a 40-token snippet;
BM25 relevance over the retrieved windows. Beyond OLMoTrace, each span is linked to the
experts that routed its tokens and to the drop in its log-probability without each expert.

The index does the search (`Federation.find_spans`, `Federation.documents`) and enforces
source policy on its side: sources that are inactive or expired are neither searched nor
routed (a source whose index is damaged is not searched); `counts` sources contribute counts only,
`snippets` sources no long context; taken-down documents come back `blocked` with no text.
"""

from __future__ import annotations

import datetime as dt
import math
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from flexolmo import sources as src_lib
from flexolmo import tokenizer as tok_lib
from flexolmo.errors import InputError
from flexolmo.workspace import Workspace
from index.engine import Federation
from index.models import SpanDocument, SpanMatch

from . import relevance
from .models import DocHit, ExpertLink, Span, SpanGroup, Trace


@dataclass(frozen=True)
class TraceSettings:
    """OLMoTrace's published production settings; change them only to experiment."""

    min_len: int = 1
    max_cnt: int = 1_000_000
    enforce_bow: bool = True
    span_density: float = 0.05  # keep K = ceil(0.05 * response tokens) spans
    max_docs: int = 10  # documents per span, sampled with `seed` when more
    context_tokens: int = 250  # context a side of the match in the long view
    snippet_tokens: int = 40
    seed: int = 0
    counterfactual: bool = True


def delimiter_ids(tok) -> list[int]:
    """Ids of tokens that are only newlines, and of '.' (OLMoTrace's delimiters)."""
    out = []
    for token, i in tok.get_vocab().items():
        text = tok.decode([i])
        if text == "." or (text and set(text) == {"\n"}):
            out.append(i)
    return sorted(out)


@dataclass
class Tracer:
    """Everything a trace needs, opened once: indexes (memory-mapped), tokenizer, model."""

    ws: Workspace
    fed: Federation  # the indexes' search: spans, and documents cut to each source's policy
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    bow: np.ndarray
    delims: list[int]
    policies: dict[str, src_lib.Source]
    model: object | None = None
    model_name: str | None = None
    settings: TraceSettings = field(default_factory=TraceSettings)
    fingerprint: tuple = ()  # the catalog state this tracer was opened under (see `stale`)

    @classmethod
    def open(cls, ws: Workspace, *, model: object | None | str = "auto", exclude: tuple[str, ...] = (),
             include: tuple[str, ...] | None = None, today: dt.date | None = None,
             settings: TraceSettings | None = None) -> "Tracer":
        """Open the available sources' indexes and (with model='auto') the merged model if built.

        :param exclude: sources whose expert is switched off for these traces (their documents
            are still searched: switching an expert off is a model decision, not a policy)
        """
        fed = Federation.open(ws, today=today, strict=False)  # a damaged index is skipped, not fatal
        tok = tok_lib.load_tokenizer(ws)
        name = None
        if model == "auto":
            model = None
            if (ws.models_dir / "merged" / "config.json").exists():
                from flexolmo.merge import load_merged

                model = load_merged(ws, exclude=exclude, include=include, today=today)
                name = str(ws.models_dir / "merged")
        return cls(ws=ws, fed=fed, tokenizer=tok, bow=np.asarray(tok_lib.read_bow_ids(ws)),
                   delims=delimiter_ids(tok), policies={s.name: s for s in src_lib.list_sources(ws)}, model=model, model_name=name,
                   settings=settings or TraceSettings(), fingerprint=catalog_fingerprint(ws))

    def stale(self) -> bool:
        """Has a policy, a takedown, an index or the date changed since this tracer opened?

        A long-running service checks this before each trace and reopens: a source switched
        off from the command line, or one whose licence expires at midnight, stops at once.
        """
        return catalog_fingerprint(self.ws) != self.fingerprint

    # -- entry points ----------------------------------------------------------------------

    def generate_and_trace(self, prompt: str, max_new_tokens: int = 60, do_sample: bool = False, seed: int = 0,
                           temperature: float = 0.8, top_p: float = 0.95, store: bool = True) -> Trace:
        """Generate a response with routing capture (greedy, or sampled with a seed), then trace it."""
        from flexolmo.generate import generate

        if self.model is None:
            raise InputError("no merged model to generate with; run `flexolmo merge` first, or trace --text")
        gen = generate(self.model, self.tokenizer, prompt, max_new_tokens=max_new_tokens, do_sample=do_sample,
                       seed=seed, temperature=temperature, top_p=top_p)
        ids = list(gen.token_ids)
        if ids and ids[-1] == self.tokenizer.eos_token_id:  # the end-of-text token is not part of the text
            ids.pop()
        if not ids:
            raise InputError("the model generated nothing for this prompt; try another prompt")
        kept = gen.routing[: len(ids)]
        routing = (np.asarray([r.experts for r in kept]), np.asarray([r.weights for r in kept]))
        return self.trace_ids(ids, prompt=prompt, prompt_ids=gen.prompt_ids, routing=routing,
                              generated=True, store=store)

    def trace(self, response: str, prompt: str | None = None, store: bool = True) -> Trace:
        """Trace a response that the model did not generate here (routing by one forward pass)."""
        if not response or not response.strip():
            raise InputError("the response to trace is empty; pass --text TEXT or pipe text on stdin")
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        return self.trace_ids(ids, prompt=prompt, prompt_ids=prompt_ids, routing=None, generated=False,
                              store=store, response=response)

    # -- the pipeline ----------------------------------------------------------------------

    def trace_ids(self, ids: list[int], *, prompt: str | None, prompt_ids: list[int],
                  routing: tuple[np.ndarray, np.ndarray] | None, generated: bool, store: bool,
                  response: str | None = None) -> Trace:
        st = self.settings
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        response = response if response is not None else self.tokenizer.decode(ids)
        raw = self.fed.find_spans(ids, self.delims, self.bow, min_len=st.min_len, max_cnt=st.max_cnt,
                                  enforce_bow=st.enforce_bow)
        k = math.ceil(st.span_density * len(ids))
        kept = sorted(sorted(raw, key=lambda s: s.unigram_logprob_sum)[:k], key=lambda s: (s.l, s.r))
        timings["spans"] = _ms(t0)

        t1 = time.perf_counter()
        windows: list[tuple[DocHit, str]] = []  # every hit with its window text (for relevance only)
        spans = [self._span(i, s, ids, windows) for i, s in enumerate(kept)]
        groups = _groups(spans, ids, self.tokenizer)
        timings["documents"] = _ms(t1)

        t2 = time.perf_counter()
        _rate(windows, (prompt or "") + " " + response, len(response))
        timings["relevance"] = _ms(t2)

        off = sorted(getattr(self.model, "flexolmo_off", {}) or {}) if self.model is not None else []
        if self.model is not None and spans:
            t3 = time.perf_counter()
            self._link_experts(spans, ids, prompt_ids, routing)
            timings["experts"] = _ms(t3)
        timings["total"] = _ms(t0)
        trace = Trace(
            trace_id=uuid.uuid4().hex[:16],
            created_at=dt.datetime.now().replace(microsecond=0).isoformat(),
            prompt=prompt, response=response, n_tokens=len(ids), generated=generated, model=self.model_name,
            sources_searched=self.fed.names, sources_skipped=dict(self.fed.skipped), experts_off=off,
            spans=spans, groups=groups, timings_ms=timings,
            settings={**st.__dict__, "delimiter_ids": self.delims, "k": k},
        )
        if store:
            from .store import save_trace

            save_trace(self.ws, trace)
        return trace

    def _span(self, index: int, raw: SpanMatch, ids: list[int], windows: list[tuple[DocHit, str]]) -> Span:
        dec = self.tokenizer.decode
        char_start = len(dec(ids[: raw.l]))
        text = dec(ids[raw.l: raw.r])
        return Span(index=index, start=raw.l, end=raw.r, char_start=char_start, char_end=char_start + len(text),
                    text=text, count=raw.count, count_by_source=dict(raw.count_by_source),
                    unigram_logprob_sum=raw.unigram_logprob_sum, group=-1,
                    documents=self._documents(raw, windows))

    def _documents(self, raw: SpanMatch, windows: list[tuple[DocHit, str]]) -> list[DocHit]:
        """Up to max_docs distinct documents containing the span, sampled with a fixed seed from
        its occurrences in sources that show documents; each source cuts the text to its policy."""
        st = self.settings
        out = []
        for d in self.fed.documents(raw, st.max_docs, st.seed, context_tokens=st.context_tokens,
                                    snippet_tokens=st.snippet_tokens):
            hit, text = self._hit(d)
            out.append(hit)
            if text is not None:
                windows.append((hit, text))
        return out

    def _hit(self, d: SpanDocument) -> tuple[DocHit, str | None]:
        """A document as the trace shows it, and the text BM25 rates it on (None when blocked)."""
        hit = DocHit(source=d.source, doc_id=d.doc_id, title=d.title, shard=d.shard, doc_ix=d.doc_ix,
                     token_offset=d.token_offset, blocked=d.blocked, snippet=None, snippet_span=None, context=None,
                     context_span=None)
        if d.blocked:  # nothing of a taken-down document leaves the index but its id
            return hit, None
        toks, a, n = d.token_ids, d.needle_offset, d.needle_len
        side = max(0, (self.settings.snippet_tokens - n) // 2)
        hit.snippet, hit.snippet_span = _marked(self.tokenizer, toks[max(0, a - side): a], toks[a: a + n],
                                                toks[a + n: a + n + side])
        text, span = _marked(self.tokenizer, toks[:a], toks[a: a + n], toks[a + n:])
        if d.visibility == "full":
            hit.context, hit.context_span = text, span
        return hit, text

    def _link_experts(self, spans: list[Span], ids: list[int], prompt_ids: list[int],
                      routing: tuple[np.ndarray, np.ndarray] | None) -> None:
        from flexolmo.generate import route, token_logprobs
        from flexolmo.model import active_experts, expert_names

        model = self.model
        names, on = expert_names(model), active_experts(model)
        E = len(names)
        # the full sequence; an end-of-text token in front gives the first token a producing step
        ctx = list(prompt_ids) if prompt_ids else [int(self.tokenizer.eos_token_id)]
        seq, P, n = ctx + list(ids), len(ctx), len(ids)
        windows = _windows(P, n, model.config.max_position_embeddings)
        if routing is None:  # pasted text: one forward pass per window; the step at t-1 produced token t
            parts = [route(model, seq[a:b]) for a, b, _, _ in windows]
            experts = np.concatenate([r.experts[s - a - 1: e - a - 1].numpy() for r, (a, _, s, e) in zip(parts, windows)])
            weights = np.concatenate([r.weights[s - a - 1: e - a - 1].numpy() for r, (a, _, s, e) in zip(parts, windows)])
        else:
            experts, weights = routing

        def logprobs(exclude: list[int]) -> np.ndarray:  # log p of each response token, (n,)
            return np.concatenate([token_logprobs(model, seq[a:b], exclude=exclude)[s - a - 1: e - a - 1].numpy()
                                   for a, b, s, e in windows])

        # counterfactual: one forward pass of the whole response per expert that is on. An
        # expert already off changes nothing when switched off (0); the last expert on cannot
        # be switched off (None).
        drops: dict[int, np.ndarray | None] = {}
        if self.settings.counterfactual:
            base = logprobs([])
            for e in range(E):
                drops[e] = (base - logprobs([e])) if on[e] and sum(on) > 1 else (np.zeros(n) if not on[e] else None)
        for span in spans:
            sel_e = experts[span.start: span.end].reshape(-1)
            sel_w = weights[span.start: span.end].reshape(-1).astype(np.float64)
            share = np.bincount(sel_e, weights=sel_w, minlength=E)
            share = share / share.sum() if share.sum() > 0 else share
            rows = slice(span.start, span.end)
            span.experts = [ExpertLink(expert=e, source=names[e], routing_share=round(float(share[e]), 5),
                                       counterfactual=None if drops.get(e) is None else round(float(drops[e][rows].sum()), 5),
                                       active=on[e]) for e in range(E)]
            span.top_expert = int(np.argmax(share))
            span.agreement = names[span.top_expert] in span.sources


def catalog_fingerprint(ws: Workspace) -> tuple:
    """Everything a tracer's behaviour depends on that can change while it is open."""
    from index.catalog import list_indexes, list_takedowns

    return (dt.date.today(),
            tuple((s.name, s.active, s.visibility, s.expires, s.updated_at) for s in src_lib.list_sources(ws)),
            len(list_takedowns(ws)),
            tuple(sorted((r.source, r.build_id) for r in list_indexes(ws))))


def _windows(P: int, n: int, limit: int) -> list[tuple[int, int, int, int]]:
    """Model windows over prompt (P tokens) + response (n tokens) for a model of `limit` positions.

    Each (a, b, s, e): run the model on seq[a:b] and keep its predictions for tokens s..e-1
    (in sequence coordinates). One window when it all fits; otherwise consecutive chunks of
    the response, each with as much preceding text as context as fits (at least half).
    """
    if P + n <= limit:
        return [(0, P + n, P, P + n)]
    step = max(1, limit // 2)
    out = []
    for s in range(P, P + n, step):
        e = min(P + n, s + step)
        out.append((max(0, e - limit), e, s, e))
    return out


def _rate(windows: list[tuple[DocHit, str]], query: str, response_chars: int) -> None:
    """BM25 of every retrieved window against prompt + response, normalised and bucketed."""
    scores = relevance.bm25_scores([text for _, text in windows], query)
    for (hit, _), score in zip(windows, scores):
        hit.relevance = round(float(score), 4)
        hit.relevance_norm = round(relevance.normalise(score, response_chars), 4)
        hit.bucket = relevance.bucket(hit.relevance_norm)


def _marked(tok, left: list[int], mid: list[int], right: list[int]) -> tuple[str, tuple[int, int]]:
    """Decode left + mid + right as one text (a character split across the pieces stays whole)
    and the character range of `mid` in it."""
    text = tok.decode(left + mid + right)
    a = len(tok.decode(left))
    b = len(tok.decode(left + mid))
    return text, (a, b)


def _groups(spans: list[Span], ids: list[int], tok) -> list[SpanGroup]:
    """Merge overlapping spans into top-level groups (spans are sorted by start)."""
    groups: list[SpanGroup] = []
    for s in spans:
        if groups and s.start < groups[-1].end:
            g = groups[-1]
            g.end = max(g.end, s.end)
            g.spans.append(s.index)
        else:
            groups.append(SpanGroup(index=len(groups), start=s.start, end=s.end, char_start=s.char_start,
                                    char_end=s.char_end, text="", spans=[s.index]))
        s.group = groups[-1].index
    for g in groups:
        g.text = tok.decode(ids[g.start: g.end])
        g.char_end = g.char_start + len(g.text)
    return groups


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)
