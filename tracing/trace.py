"""The trace pipeline: response -> spans -> documents -> relevance -> experts -> provenance.

    tracer = Tracer.open(ws)                      # indexes, tokenizer, merged model: once
    t = tracer.trace("pasted response", prompt="...")
    t = tracer.generate_and_trace("prompt", GenerationOptions(max_new_tokens=60))
    t = tracer.trace(text, options=TraceOptions(max_docs=2))   # per call: the fields set win
    for t in tracer.trace_parts(text): ...        # spans first (no model pass yet), then experts

A trace runs in stages, each a public call, so that a service can run them on different
threads (api/worker.py: the index stage never waits behind model passes):

    g = tracer.generate_part(prompt, generation)   # model: the response, its routing captured
    p = tracer.first_part(text) or tracer.first_part_of(g)  # index: spans, documents, relevance
    t = tracer.last_part(p)                        # model: expert linkage (routing share, counterfactuals)

The first part touches no model state (the experts a call switches off are named from its
options), the model parts no index; `trace`, `trace_parts` and `generate_and_trace` are the
stages in sequence on one thread.

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

from . import relevance
from .alignment import Alignment
from .options import TraceOptions
from .results import Trace
from .spans import assemble, group, has_words

Check = Callable[[], None]
EXCLUDED = "excluded for this trace"  # why an expert a call switched off is off


@dataclass
class Generated:
    """A response the model generated (`Tracer.generate_part`), ready for the first stage."""

    prompt: str
    options: TraceOptions  # the call's options, merged over the tracer's
    ids: list[int]  # the response in the index's ids
    prompt_ids: list[int]  # the prompt in the model's ids
    routing: tuple[np.ndarray, np.ndarray] | None  # per response token (model ids), captured while generating
    response: str | None  # the text, when the model has its own tokenizer (else decoded from `ids`)
    align: Alignment | None
    settings: dict  # what the trace records of the generation (options, verbatim guard)


@dataclass
class Pending:
    """A trace after its first stage (spans, documents, relevance): the `trace` has its spans
    with their experts pending, and this holds what the second stage (expert linkage) needs."""

    trace: Trace
    ids: list[int]  # the response in the index's ids
    prompt_ids: list[int]  # the prompt in the model's ids (routing context)
    routing: tuple[np.ndarray, np.ndarray] | None  # captured while generating; None: one forward pass
    align: Alignment | None
    options: TraceOptions  # the call's options, merged over the tracer's (the experts it switches off)
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
    stamp: tuple = ()  # the date and the catalog files' stamp when `fingerprint` was last found unchanged

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
                   model_name=name, model_tokenizer=own, options=opts, stamp=_stamp(ws),
                   fingerprint=catalog_fingerprint(ws))

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
        now = _stamp(self.ws)  # microseconds; the catalog itself is read only when its files changed
        if now[1] is not None and now == self.stamp:
            return False
        if catalog_fingerprint(self.ws) != self.fingerprint:
            return True
        self.stamp = now  # written to, but nothing this tracer depends on changed
        return False

    # -- entry points: the stages in sequence ------------------------------------------------

    def generate_and_trace(self, prompt: str, generation: GenerationOptions | None = None, *,
                           options: TraceOptions | None = None, store: bool = True) -> Trace:
        """Generate a response with routing capture (greedy, or sampled with a seed), then trace it.

        :param generation: length, sampling and seed (default: `GenerationOptions()`)
        :param options: this call's trace options: the fields it sets override the tracer's"""
        g = self.generate_part(prompt, generation, options=options)
        return self._stored(self.last_part(self.first_part_of(g)), store)

    def trace(self, response: str, prompt: str | None = None, *, options: TraceOptions | None = None,
              store: bool = True) -> Trace:
        """Trace a response that the model did not generate here (routing by one forward pass).

        :param options: this call's options: the fields it sets override the tracer's"""
        return self._stored(self.last_part(self.first_part(response, prompt, options=options)), store)

    def trace_parts(self, response: str, prompt: str | None = None, *, options: TraceOptions | None = None,
                    store: bool = True, checkpoint: Check | None = None) -> Iterator[Trace]:
        """`trace`, in two parts as they are ready: yields the Trace once its spans, documents and
        relevance are found (every span's `experts` empty, no model pass run yet), then the same
        Trace (same trace_id, completed in place) once its expert linkage is done; it is stored
        once, after the second part. Closing the generator after the first part skips the model work.

            for t in tracer.trace_parts(text): show(t)

        :param options: this call's options: the fields it sets override the tracer's
        :param checkpoint: called before the second stage and before every decoder layer of its
            model passes; it raises to stop the work (a service's deadline, a client gone)"""
        pending = self.first_part(response, prompt, options=options, check=checkpoint)
        yield pending.trace
        yield self._stored(self.last_part(pending, check=checkpoint), store)

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
        pending = self._first(list(ids), o, prompt=prompt, prompt_ids=list(prompt_ids), routing=routing,
                              generated=generated, response=response, align=align)
        return self._stored(self.last_part(pending), store)

    # -- the stages --------------------------------------------------------------------------

    def generate_part(self, prompt: str, generation: GenerationOptions | None = None, *,
                      options: TraceOptions | None = None, check: Check | None = None) -> Generated:
        """The model stage of a generation: the response, with the routing of every step captured
        (owners' verbatim limits applied, tracing/guard.py), under the call's experts off."""
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
            gen = generate(self.model, mtok, prompt, generation, guard=guard, check=self._check(check))
        ids = list(gen.token_ids)
        if ids and ids[-1] == mtok.eos_token_id:  # the end-of-text token is not part of the text
            ids.pop()
        if not ids:
            raise InputError("the model generated nothing for this prompt; try another prompt")
        kept = gen.routing[: len(ids)]
        routing = (np.asarray([r.experts for r in kept]), np.asarray([r.weights for r in kept])) if kept else None
        settings = {"generation": generation.as_dict()}
        if guard is not None:  # where the guard vetoed tokens, and the limits it applied
            settings["verbatim_guard"] = {"limits": {g.name: g.limit for g in guard.sources}, "acted": gen.guard}
        if self.model_tokenizer is None:
            return Generated(prompt=prompt, options=o, ids=ids, prompt_ids=list(gen.prompt_ids), routing=routing,
                             response=None, align=None, settings=settings)
        response = mtok.decode(ids)
        align = Alignment.of_generated(self.tokenizer, mtok, response, ids, gen.prompt_ids)
        return Generated(prompt=prompt, options=o, ids=align.ids, prompt_ids=list(gen.prompt_ids), routing=routing,
                         response=response, align=align, settings=settings)

    def first_part(self, response: str, prompt: str | None = None, *, options: TraceOptions | None = None,
                   check: Check | None = None) -> Pending:
        """The index stage of a pasted response: spans, documents and relevance (no model pass;
        `check` is called before each span)."""
        ids, prompt_ids, align = self._tokenized(response, prompt)
        return self._first(list(ids), self.options.merged(options), prompt=prompt, prompt_ids=list(prompt_ids),
                           routing=None, generated=False, response=response, align=align, check=check)

    def first_part_of(self, g: Generated, check: Check | None = None) -> Pending:
        """The index stage of a generated response (`generate_part`)."""
        p = self._first(g.ids, g.options, prompt=g.prompt, prompt_ids=g.prompt_ids, routing=g.routing, generated=True,
                        response=g.response, align=g.align, check=check)
        p.trace.settings.update(g.settings)
        return p

    def last_part(self, p: Pending, check: Check | None = None) -> Trace:
        """The model stage: expert linkage (routing share, counterfactuals) over the first stage's
        spans, filled into `p.trace` in place, under the call's experts off; the model passes run
        here and only here, calling `check` (and the tracer's `checkpoint`) before every decoder
        layer. The trace is returned, not stored."""
        check = self._check(check)
        trace, spans, timings = p.trace, p.trace.spans, p.trace.timings_ms
        if self.model is not None and self.model.is_moe and spans and p.options.link_experts:
            check()
            t3 = time.perf_counter()
            mtok = self.model_tokenizer or self.tokenizer
            bos = mtok.bos_token_id if mtok.bos_token_id is not None else mtok.eos_token_id
            with self._experts_off_for(p.options):
                if p.align is None:
                    sub = _link_experts(self.model, spans, p.ids, p.prompt_ids, p.routing,
                                        counterfactual=p.options.counterfactual, bos_id=int(bos), check=check)
                else:
                    ranges = [p.align.model_range(s.char_start, s.char_end) for s in spans]
                    sub = _link_experts(self.model, spans, p.align.model_ids, p.prompt_ids, p.routing,
                                        counterfactual=p.options.counterfactual, bos_id=int(bos), ranges=ranges,
                                        check=check)
            timings["experts"] = _ms(t3)
            timings.update({f"experts.{k}": v for k, v in sub.items()})
        timings["total"] = _ms(p.t0)
        return trace

    def needs_model(self, options: TraceOptions | None = None) -> bool:
        """Does a trace under these options run model passes (the last part does work)?"""
        return self.model is not None and self.model.is_moe and self.options.merged(options).link_experts

    def _check(self, check: Check | None) -> Check:
        """The tracer's checkpoint, then the caller's."""
        return self.checkpoint if check is None else _both(self.checkpoint, check)

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

    def _stored(self, trace: Trace, store: bool) -> Trace:
        if store:
            from .provenance.store import save_trace

            save_trace(self.ws, trace)
        return trace

    def _experts_off_names(self, o: TraceOptions) -> list[str]:
        """The experts a call under `o` runs without: those off when the tracer opened (policy,
        its options) and those `o` switches off; read without changing the model, so that the
        index stage can name them while a model stage runs."""
        if self.model is None:
            return []
        names = list(self.model.experts)
        extra = self._extra_off(o)
        return sorted({n for n, why in self.model.off.items() if why != EXCLUDED} | {names[i] for i in extra})

    def _extra_off(self, o: TraceOptions) -> list[int]:
        """The experts (indices) `o.exclude`/`o.include` switch off on top of those already off;
        unknown names are refused."""
        want = set(o.exclude)
        if self.model is None or not self.model.is_moe:
            if want or o.include is not None:
                raise InputError("exclude/include switch experts off, but " + (
                    "there is no merged model; run `flexolmo merge` first" if self.model is None else
                    "this is a dense model without experts"))
            return []
        from flexolmo.model.moe import resolve_experts

        names = list(self.model.experts)
        if o.include is not None:
            resolve_experts(self.model, o.include)  # unknown names are refused
            want |= {n for n in names[1:] if n not in o.include}
        on = self.model.active
        return [i for i in resolve_experts(self.model, sorted(want)) if on[i]]

    @contextlib.contextmanager
    def _experts_off_for(self, o: TraceOptions) -> Iterator[None]:
        """For one model stage: the experts `o.exclude`/`o.include` switch off on top of those
        already off (by policy or when the tracer opened), back on afterwards."""
        extra = self._extra_off(o)
        if not extra:
            yield
            return
        from flexolmo.model.moe import experts_off

        names = list(self.model.experts)
        before = dict(self.model.off)
        try:
            with experts_off(self.model, extra):
                self.model.off.update({names[i]: EXCLUDED for i in extra})
                yield
        finally:
            self.model.off.clear()
            self.model.off.update(before)

    def _first(self, ids: list[int], st: TraceOptions, *, prompt: str | None, prompt_ids: list[int],
               routing: tuple[np.ndarray, np.ndarray] | None, generated: bool, response: str | None = None,
               align: Alignment | None = None, check: Check | None = None) -> Pending:
        """The first stage: spans -> documents -> relevance, no model pass (experts pending)."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        off = self._experts_off_names(st)  # refuses unknown expert names before any work
        response = response if response is not None else self.tokenizer.decode(ids)
        raw = self.fed.find_spans(ids, self.delims, self.bow, min_len=st.min_len, max_cnt=st.max_cnt,
                                  enforce_bow=st.enforce_bow)
        raw = [s for s in raw if has_words(self.tokenizer.decode(list(s.ids)))]  # not only whitespace/punctuation
        k = math.ceil(st.span_density * len(ids))
        kept = sorted(sorted(raw, key=lambda s: s.unigram_logprob_sum)[:k], key=lambda s: (s.l, s.r))
        timings["spans"] = _ms(t0)

        t1 = time.perf_counter()
        docs = self.fed.documents_many(kept, st.max_docs, st.seed, context_tokens=st.context_tokens,
                                       snippet_tokens=st.snippet_tokens)  # one round trip per owner node
        spans, windows = assemble(self.tokenizer, kept, docs, ids, align, st.snippet_tokens, check=check)
        groups = group(spans, ids, self.tokenizer, response if align is not None else None)
        timings["documents"] = _ms(t1)

        t2 = time.perf_counter()
        fallback = relevance.rate(windows, prompt, response, self.fed.indexes, context_tokens=st.context_tokens,
                                  snippet_tokens=st.snippet_tokens)
        timings["relevance"] = _ms(t2)
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
        return Pending(trace=trace, ids=ids, prompt_ids=prompt_ids, routing=routing, align=align, options=st, t0=t0)


def _stamp(ws: Workspace) -> tuple:
    from flexolmo.base.catalog import stamp

    return dt.date.today(), stamp(ws)


def catalog_fingerprint(ws: Workspace) -> tuple:
    """Everything a tracer's behaviour depends on that can change while it is open."""
    from index.catalog import list_indexes, list_takedowns

    return (dt.date.today(),
            tuple((s.name, s.active, s.visibility, s.expires, s.updated_at) for s in src_lib.list_sources(ws)),
            len(list_takedowns(ws)),
            tuple(sorted((r.source, r.build_id) for r in list_indexes(ws))))


def _both(first: Check, second: Check) -> Check:
    """One checkpoint that asks two (the tracer's own, then a caller's)."""
    def check() -> None:
        first()
        second()
    return check


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


def _is_loaded_model(model) -> bool:
    from flexolmo.model.moe import LoadedModel

    return isinstance(model, LoadedModel)


def _link_experts(*args, **kwargs):
    from .experts import link_experts  # the model layer (torch): imported only where a trace has a model

    return link_experts(*args, **kwargs)
