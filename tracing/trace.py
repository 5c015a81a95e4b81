"""The trace pipeline: response -> spans -> documents -> relevance -> experts -> provenance.

    tracer = Tracer.open(ws)                      # indexes, tokenizer, merged model: once
    t = tracer.trace("pasted response", prompt="...")
    t = tracer.generate_and_trace("prompt", GenerationOptions(max_new_tokens=60))
    t = tracer.trace(text, options=TraceOptions(max_docs=2))   # per call: the fields set win
    for t in tracer.trace_parts(text): ...        # spans first (no model pass yet), then experts

A trace runs in two stages: the first (spans, documents, relevance) needs only the indexes;
the second (expert linkage) runs the model passes over the first's spans. `trace` is the
two in sequence; `trace_parts` yields the trace after each, so the spans can be shown at once.

OLMoTrace's production settings (docs/architecture.md, Tracing; `TraceOptions` in tracing/options.py):
only the response is traced; maximal spans cut at delimiters, min_len 1, max_cnt 1,000,000,
word boundaries enforced; keep the K = ceil(0.05 L) spans with the lowest unigram log-prob
sum; up to 10 documents per span (seeded sample), 250 tokens of context a side and a
40-token snippet; BM25 relevance with each source's document frequencies (tracing/relevance.py, buckets
calibrated for this federation). Two adaptations: every token that *contains* a newline is
a delimiter, as is '.' (the byte-level BPE merges newlines with indentation), and spans
made only of whitespace and punctuation are not kept. Beyond OLMoTrace, each span is linked
to the experts that routed its tokens and to the drop in its log-probability without each
expert (tracing/experts.py); the counterfactual, when computed, names the top expert.

The index does the search (`Federation.find_spans`, `Federation.documents`) and enforces
source policy on its side: sources that are inactive or expired are neither searched nor
routed (a source whose index is damaged is not searched); `counts` sources contribute counts only,
`snippets` sources no long context; taken-down documents come back `blocked` with no text.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import time
import uuid
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from flexolmo.base import sources as src_lib
from flexolmo.base import tokenizer as tok_lib
from flexolmo.base.errors import InputError
from flexolmo.base.workspace import Workspace
from flexolmo.model.loading import ModelSpec, open_model
from flexolmo.model.specs import GenerationOptions
from index.engine import Federation
from index.results import SpanDocument, SpanMatch
from index.snippets import marked

from . import relevance
from .alignment import Alignment
from .results import DocHit, Span, SpanGroup, Trace
from .options import TraceOptions


def has_words(text: str) -> bool:
    """Does the text hold a letter, digit or symbol, i.e. more than whitespace and punctuation?"""
    return any(not (c.isspace() or unicodedata.category(c).startswith("P")) for c in text)


@dataclass
class Pending:
    """A trace after its first stage (spans, documents, relevance): the `trace` has its spans
    with their experts pending, and this holds what the second stage (expert linkage) needs."""

    trace: Trace
    ids: list[int]  # the response in the index's ids
    prompt_ids: list[int]  # the prompt in the model's ids (routing context)
    routing: tuple[np.ndarray, np.ndarray] | None  # captured while generating; None: one forward pass
    align: Alignment | None
    counterfactual: bool
    t0: float  # time.perf_counter() when the trace began (timings' "total" counts from it)


@dataclass
class Tracer:
    """Everything a trace needs, opened once: indexes (memory-mapped), tokenizer, model."""

    ws: Workspace
    fed: Federation  # the indexes' search: spans, and documents cut to each source's policy
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    bow: np.ndarray
    delims: list[int]
    policies: dict[str, src_lib.Source]
    model: object | None = None  # a flexolmo.model.moe.LoadedModel (FlexOlmo, or a dense LM: no experts)
    model_name: str | None = None
    model_tokenizer: object | None = None  # the model's own tokenizer; None: it shares the index's
    options: TraceOptions = field(default_factory=TraceOptions)  # the defaults of every call (a service's settings)
    fingerprint: tuple = ()  # the catalog state this tracer was opened under (see `stale`)

    @classmethod
    def open(cls, ws: Workspace, *, model: ModelSpec | LoadedModel | None = ModelSpec(),
             options: TraceOptions | None = None, today: dt.date | None = None) -> "Tracer":
        """Open the available sources' indexes and the model (by default the merged model, if built).

        :param model: a `ModelSpec` (a model folder: the project's, a stock FlexOlmo checkpoint or
            any causal LM, with its experts' names, device and dtype; `ModelSpec()` is the
            workspace's merged model), a `LoadedModel`, or None for no model (spans and documents
            only). Default: `ModelSpec()`.
        :param options: the defaults of every call; its `exclude`/`include` switch experts off
            when the model loads (their documents are still searched: switching an expert off is
            a model decision, not a policy)
        """
        opts = options or TraceOptions()
        fed = Federation.open(ws, today=today, strict=False)  # a damaged index is skipped, not fatal
        tok = tok_lib.load_tokenizer(ws)
        own = None
        if isinstance(model, ModelSpec):
            model, own = open_model(ws, model, exclude=opts.exclude, include=opts.include, today=today,
                                    index_tokenizer=tok)
        elif model is not None and not _is_loaded_model(model):
            raise InputError(f"Tracer.open(model=...) takes a ModelSpec, a LoadedModel (flexolmo.model.merge.load_merged) "
                             f"or None, not {type(model).__name__}")
        name = str(model.folder) if model is not None and model.folder else None
        bow, delims = np.asarray(tok_lib.read_bow_ids(ws)), tok_lib.read_delimiter_ids(ws)
        fed.warm(delims, bow)  # the first trace then costs what the others do
        return cls(ws=ws, fed=fed, tokenizer=tok, bow=bow, delims=delims,
                   policies={s.name: s for s in src_lib.list_sources(ws)}, model=model,
                   model_name=name, model_tokenizer=own, options=opts, fingerprint=catalog_fingerprint(ws))

    def checkpoint(self) -> None:
        """Called before every decoder layer of every model pass (generation, routing,
        counterfactuals); a service sets it to raise at a trace's deadline (api/worker.py)."""

    def model_card(self) -> dict | None:
        """What the trace says about its model: where it is, its kind, tokenizer, device and dtype,
        and whether expert linkage applies (None: no model)."""
        m = self.model
        if m is None:
            return None
        p = next(m.module.parameters())
        return {"path": self.model_name, "kind": "flexolmo" if m.is_moe else "dense", "experts": list(m.experts),
                "tokenizer": "own" if self.model_tokenizer is not None else "shared with the index",
                "device": str(p.device), "dtype": str(p.dtype).removeprefix("torch."),
                "expert_linkage": None if m.is_moe else
                "not applicable: a dense model has no experts (spans and documents only)"}

    def stale(self) -> bool:
        """Has a policy, a takedown, an index or the date changed since this tracer opened?

        A long-running service checks this before each trace and reopens: a source switched
        off from the command line, or one whose licence expires at midnight, stops at once.
        """
        return catalog_fingerprint(self.ws) != self.fingerprint

    # -- entry points ----------------------------------------------------------------------

    def generate_and_trace(self, prompt: str, generation: GenerationOptions | None = None, *,
                           options: TraceOptions | None = None, store: bool = True) -> Trace:
        """Generate a response with routing capture (greedy, or sampled with a seed), then trace it.

        :param generation: length, sampling and seed (default: `GenerationOptions()`)
        :param options: this call's trace options: the fields it sets override the tracer's"""
        from flexolmo.model.generate import generate
        from tracing.guard import VerbatimGuard

        o = self.options.merged(options)
        generation = generation or GenerationOptions()
        if self.model is None:
            raise InputError("no merged model to generate with; run `flexolmo merge` first, or trace --text")
        guard = VerbatimGuard.open(self.ws)  # owners' --max-verbatim limits (tracing/guard.py)
        if guard is not None:
            guard.require_index_tokenizer(self.model_tokenizer)
        mtok = self.model_tokenizer or self.tokenizer
        with self._experts_off_for(o):
            gen = generate(self.model, mtok, prompt, generation, guard=guard, check=self.checkpoint)
            ids = list(gen.token_ids)
            if ids and ids[-1] == mtok.eos_token_id:  # the end-of-text token is not part of the text
                ids.pop()
            if not ids:
                raise InputError("the model generated nothing for this prompt; try another prompt")
            kept = gen.routing[: len(ids)]
            routing = (np.asarray([r.experts for r in kept]), np.asarray([r.weights for r in kept])) if kept else None
            if self.model_tokenizer is None:
                trace = self._run(ids, o, prompt=prompt, prompt_ids=gen.prompt_ids, routing=routing, generated=True)
            else:
                response = mtok.decode(ids)
                align = Alignment.of_generated(self.tokenizer, mtok, response, ids, gen.prompt_ids)
                trace = self._run(align.ids, o, prompt=prompt, prompt_ids=gen.prompt_ids, routing=routing,
                                  generated=True, response=response, align=align)
        trace.settings["generation"] = generation.as_dict()
        if guard is not None:  # where the guard vetoed tokens, and the limits it applied
            trace.settings["verbatim_guard"] = {"limits": {g.name: g.limit for g in guard.sources}, "acted": gen.guard}
        return self._stored(trace, store)

    def trace(self, response: str, prompt: str | None = None, *, options: TraceOptions | None = None,
              store: bool = True) -> Trace:
        """Trace a response that the model did not generate here (routing by one forward pass).

        :param options: this call's options: the fields it sets override the tracer's"""
        ids, prompt_ids, align = self._tokenized(response, prompt)
        return self.trace_ids(ids, prompt=prompt, prompt_ids=prompt_ids, options=options, store=store,
                              response=response, align=align)

    def trace_parts(self, response: str, prompt: str | None = None, *, options: TraceOptions | None = None,
                    store: bool = True, checkpoint: Callable[[], None] | None = None) -> Iterator[Trace]:
        """`trace`, in two parts as they are ready: yields the Trace once its spans, documents and
        relevance are found (every span's `experts` empty, no model pass run yet), then the same
        Trace (same trace_id, completed in place) once its expert linkage is done; it is stored
        once, after the second part. Closing the generator after the first part skips the model work.

            for t in tracer.trace_parts(text): show(t)

        :param options: this call's options: the fields it sets override the tracer's
        :param checkpoint: called before the second stage and before every decoder layer of its
            model passes; it raises to stop the work (a service's deadline, a client gone)"""
        ids, prompt_ids, align = self._tokenized(response, prompt)
        o = self.options.merged(options)
        with self._experts_off_for(o):
            pending = self._first(list(ids), o, prompt=prompt, prompt_ids=list(prompt_ids), routing=None,
                                  generated=False, response=response, align=align)
            yield pending.trace
            check = self.checkpoint if checkpoint is None else _both(self.checkpoint, checkpoint)
            check()
            trace = self._link(pending, check)
        yield self._stored(trace, store)

    def _tokenized(self, response: str, prompt: str | None) -> tuple[list[int], list[int], Alignment | None]:
        """The response in the index's ids, the prompt in the model's, and their alignment when
        the model has its own tokenizer (None: it shares the index's)."""
        if not response or not response.strip():
            raise InputError("the response to trace is empty; pass --text TEXT or pipe text on stdin")
        if self.model_tokenizer is None:
            ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
            return ids, prompt_ids, None
        # spans on the index's ids, routing and counterfactuals on the model's
        align = Alignment.of_text(self.tokenizer, self.model_tokenizer, response, prompt)
        return align.ids, align.prompt_model_ids, align

    def trace_ids(self, ids: list[int], *, prompt: str | None = None, prompt_ids: list[int] = (),
                  routing: tuple[np.ndarray, np.ndarray] | None = None, generated: bool = False,
                  options: TraceOptions | None = None, store: bool = True, response: str | None = None,
                  align: Alignment | None = None) -> Trace:
        """Trace a response given as index ids.

        :param prompt_ids: the prompt in the model's ids (routing context)
        :param routing: per response token (model ids), captured while generating; None: one pass
        :param options: this call's options: the fields it sets override the tracer's
        :param align: the response in the model's own tokenization, when it differs from the
            index's (`tracing/alignment.py`); None: the model shares the index tokenizer
        """
        o = self.options.merged(options)
        with self._experts_off_for(o):
            trace = self._run(list(ids), o, prompt=prompt, prompt_ids=list(prompt_ids), routing=routing,
                              generated=generated, response=response, align=align)
        return self._stored(trace, store)

    def _stored(self, trace: Trace, store: bool) -> Trace:
        if store:
            from .provenance.store import save_trace

            save_trace(self.ws, trace)
        return trace

    @contextlib.contextmanager
    def _experts_off_for(self, o: TraceOptions) -> Iterator[None]:
        """For one call: the experts `o.exclude`/`o.include` switch off on top of those already off
        (by policy or when the tracer opened), back on afterwards; the trace lists them in `experts_off`."""
        want = set(o.exclude)
        if self.model is None or not self.model.is_moe:
            if want or o.include is not None:
                raise InputError("exclude/include switch experts off, but " + (
                    "there is no merged model; run `flexolmo merge` first" if self.model is None else
                    "this is a dense model without experts"))
            yield
            return
        from flexolmo.model.moe import experts_off, resolve_experts

        names = list(self.model.experts)
        if o.include is not None:
            resolve_experts(self.model, o.include)  # unknown names are refused
            want |= {n for n in names[1:] if n not in o.include}
        on = self.model.active
        extra = [i for i in resolve_experts(self.model, sorted(want)) if on[i]]
        if not extra:
            yield
            return
        before = dict(self.model.off)
        try:
            with experts_off(self.model, extra):
                self.model.off.update({names[i]: "excluded for this trace" for i in extra})
                yield
        finally:
            self.model.off.clear()
            self.model.off.update(before)

    # -- the pipeline ----------------------------------------------------------------------

    def _run(self, ids: list[int], st: TraceOptions, *, prompt: str | None, prompt_ids: list[int],
             routing: tuple[np.ndarray, np.ndarray] | None, generated: bool, response: str | None = None,
             align: Alignment | None = None) -> Trace:
        """spans -> documents -> relevance -> experts, under the options `st` (already merged):
        the two stages in sequence."""
        return self._link(self._first(ids, st, prompt=prompt, prompt_ids=prompt_ids, routing=routing,
                                      generated=generated, response=response, align=align))

    def _first(self, ids: list[int], st: TraceOptions, *, prompt: str | None, prompt_ids: list[int],
               routing: tuple[np.ndarray, np.ndarray] | None, generated: bool, response: str | None = None,
               align: Alignment | None = None) -> Pending:
        """The first stage: spans -> documents -> relevance, no model pass (experts pending)."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        response = response if response is not None else self.tokenizer.decode(ids)
        raw = self.fed.find_spans(ids, self.delims, self.bow, min_len=st.min_len, max_cnt=st.max_cnt,
                                  enforce_bow=st.enforce_bow)
        raw = [s for s in raw if has_words(self.tokenizer.decode(list(s.ids)))]  # not only whitespace/punctuation
        k = math.ceil(st.span_density * len(ids))
        kept = sorted(sorted(raw, key=lambda s: s.unigram_logprob_sum)[:k], key=lambda s: (s.l, s.r))
        timings["spans"] = _ms(t0)

        t1 = time.perf_counter()
        windows: list[tuple[DocHit, str]] = []  # every hit with its window text (for relevance only)
        docs = self.fed.documents_many(kept, st.max_docs, st.seed, context_tokens=st.context_tokens,
                                       snippet_tokens=st.snippet_tokens)  # one round trip per owner node
        spans = [self._span(i, s, ids, d, windows, align, st.snippet_tokens) for i, (s, d) in enumerate(zip(kept, docs))]
        groups = _groups(spans, ids, self.tokenizer, response if align is not None else None)
        timings["documents"] = _ms(t1)

        t2 = time.perf_counter()
        fallback = relevance.rate(windows, prompt, response, self.fed.indexes, context_tokens=st.context_tokens,
                                  snippet_tokens=st.snippet_tokens)
        timings["relevance"] = _ms(t2)

        off = sorted(self.model.off) if self.model is not None else []
        timings["first_part"] = _ms(t0)
        trace = Trace(
            trace_id=uuid.uuid4().hex[:16],
            created_at=dt.datetime.now().replace(microsecond=0).isoformat(),
            prompt=prompt, response=response, n_tokens=len(ids), generated=generated, model=self.model_name,
            sources_searched=self.fed.names, sources_skipped=dict(self.fed.skipped), experts_off=off,
            spans=spans, groups=groups, timings_ms=timings,
            settings={**st.as_dict(), "delimiter_ids": self.delims, "k": k, "relevance": relevance.FORMULA,
                      **({"relevance_fallback": fallback} if fallback else {}),
                      "model": self.model_card()},
        )
        return Pending(trace=trace, ids=ids, prompt_ids=prompt_ids, routing=routing, align=align,
                       counterfactual=st.counterfactual, t0=t0)

    def _link(self, p: Pending, check: Callable[[], None] | None = None) -> Trace:
        """The second stage: expert linkage (routing share, counterfactuals) over the first stage's
        spans, filled into `p.trace` in place; the model passes run here and only here, calling
        `check` (default: the tracer's `checkpoint`) before every decoder layer."""
        check = check or self.checkpoint
        trace, spans, timings = p.trace, p.trace.spans, p.trace.timings_ms
        if self.model is not None and self.model.is_moe and spans:
            t3 = time.perf_counter()
            mtok = self.model_tokenizer or self.tokenizer
            bos = mtok.bos_token_id if mtok.bos_token_id is not None else mtok.eos_token_id
            if p.align is None:
                sub = _link_experts(self.model, spans, p.ids, p.prompt_ids, p.routing, counterfactual=p.counterfactual,
                                   bos_id=int(bos), check=check)
            else:
                ranges = [p.align.model_range(s.char_start, s.char_end) for s in spans]
                sub = _link_experts(self.model, spans, p.align.model_ids, p.prompt_ids, p.routing,
                                   counterfactual=p.counterfactual, bos_id=int(bos), ranges=ranges, check=check)
            timings["experts"] = _ms(t3)
            timings.update({f"experts.{k}": v for k, v in sub.items()})
        timings["total"] = _ms(p.t0)
        return trace

    def _span(self, index: int, raw: SpanMatch, ids: list[int], docs: list[SpanDocument],
              windows: list[tuple[DocHit, str]], align: Alignment | None, snippet_tokens: int) -> Span:
        if align is None:  # one tokenizer: character positions by decoding, as the response was made
            dec = self.tokenizer.decode
            char_start = len(dec(ids[: raw.l]))
            text = dec(ids[raw.l: raw.r])
        else:  # the index's own character offsets in the response
            char_start, char_end = align.chars(raw.l, raw.r)
            text = align.response[char_start:char_end]
        return Span(index=index, start=raw.l, end=raw.r, char_start=char_start, char_end=char_start + len(text),
                    text=text, count=raw.count, count_by_source=dict(raw.count_by_source),
                    unigram_logprob_sum=raw.unigram_logprob_sum, group=-1,
                    documents=self._documents(docs, windows, snippet_tokens))

    def _documents(self, docs: list[SpanDocument], windows: list[tuple[DocHit, str]],
                   snippet_tokens: int) -> list[DocHit]:
        """The span's documents (up to max_docs distinct ones, sampled with a fixed seed from its
        occurrences in sources that show documents, each cut to its source's policy) as hits;
        hits with the same text under other doc_ids point at the first (`repeat_of`)."""
        out, first = [], {}
        for d in docs:
            hit, text = self._hit(d, snippet_tokens)
            key = (tuple(d.token_ids), d.needle_offset, d.token_offset)
            if not d.blocked and key in first:
                hit.repeat_of = first[key]
                out[first[key]].repeats += 1
            elif not d.blocked:
                first[key] = len(out)
            out.append(hit)
            if text is not None:
                windows.append((hit, text))
        return out

    def _hit(self, d: SpanDocument, snippet_tokens: int) -> tuple[DocHit, str | None]:
        """A document as the trace shows it, and the text BM25 rates it on (None when blocked)."""
        hit = DocHit(source=d.source, doc_id=d.doc_id, title=d.title, shard=d.shard, doc_ix=d.doc_ix,
                     token_offset=d.token_offset, blocked=d.blocked, snippet=None, snippet_span=None, context=None,
                     context_span=None)
        if d.blocked:  # nothing of a taken-down document leaves the index but its id
            return hit, None
        toks, a, n = d.token_ids, d.needle_offset, d.needle_len
        side = max(0, (snippet_tokens - n) // 2)
        hit.snippet, hit.snippet_span = marked(self.tokenizer, toks[max(0, a - side): a], toks[a: a + n],
                                               toks[a + n: a + n + side])
        text, span = marked(self.tokenizer, toks[:a], toks[a: a + n], toks[a + n:])
        if d.visibility == "full":
            hit.context, hit.context_span = text, span
        return hit, text


def catalog_fingerprint(ws: Workspace) -> tuple:
    """Everything a tracer's behaviour depends on that can change while it is open."""
    from index.catalog import list_indexes, list_takedowns

    return (dt.date.today(),
            tuple((s.name, s.active, s.visibility, s.expires, s.updated_at) for s in src_lib.list_sources(ws)),
            len(list_takedowns(ws)),
            tuple(sorted((r.source, r.build_id) for r in list_indexes(ws))))


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    """One checkpoint that asks two (the tracer's own, then a caller's)."""
    def check() -> None:
        first()
        second()
    return check


def _groups(spans: list[Span], ids: list[int], tok, response: str | None = None) -> list[SpanGroup]:
    """Merge overlapping spans into top-level groups (spans are sorted by start); a group's text
    is decoded from its ids, or cut from `response` by the spans' characters when given."""
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
        if response is None:
            g.text = tok.decode(ids[g.start: g.end])
        else:
            g.text = response[g.char_start: max(spans[i].char_end for i in g.spans)]
        g.char_end = g.char_start + len(g.text)
    return groups


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


def _is_loaded_model(model) -> bool:
    from flexolmo.model.moe import LoadedModel

    return isinstance(model, LoadedModel)


def _link_experts(*args, **kwargs):
    from .experts import link_experts  # the model layer (torch): imported only where a trace has a model

    return link_experts(*args, **kwargs)
