"""The demo's story, as library functions: `flexolmo demo` prints them, the tests check them.

    pasted = pasted_response(tracer, ["creative", "news", "educational"])   # held passages + prose
    t = tracer.trace(pasted.text, prompt=pasted.prompt)                     # long spans, right sources
    attributed(t, pasted)                                                    # each long span's origin
    best = memorised(tracer, ["news", "creative"])                           # a training opening, greedy
    real = real_answer(Tracer.open(ws, model=ModelSpec.parse(path)), "public", "wiki/United States")  # a real model
    change = opt_out(tracer_before, t_before, t_after, "news")              # what switching news off did

A pasted response is assembled, honestly labelled as pasted, from passages the demo takes out
of the indexed (train) documents of several sources, each passage found in its own source and
in no other (checked by counting it in every index), joined by plain prose: a response such as
an assistant quoting its sources could have written. It shows what tracing finds when a model
really reproduces training text, which the demo's 8.4M-parameter model rarely does on its own.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

from flexolmo.base import sources as src_lib
from flexolmo.base.errors import InputError
from flexolmo.model.generate import GenerationOptions

from .results import Span, Trace
from .trace import Tracer

LONG = 8  # tokens: a span this long is the story's evidence (shorter ones occur by chance)
PROSE = ("Here is what I found, quoting my sources.", "As one passage has it:", "Another source puts it this way:",
         "And a third says:", "That is the whole answer.")
SENTENCE = re.compile(r"[^.!?]+[.!?]")  # a sentence may run over lines (verse, wrapped prose)
WORD = re.compile(r"\S+")
MARKUP = re.compile(r"[*#`|<>_=\[\]{}]|\n\s*\n")  # speaker names, headings, code, tables, paragraph breaks


@dataclass(frozen=True)
class Piece:
    """A passage of the pasted response: where it is in the response and where it came from."""

    source: str
    doc_id: str
    title: str | None
    char_start: int
    char_end: int


@dataclass(frozen=True)
class Pasted:
    text: str
    prompt: str
    pieces: list[Piece]


def pasted_response(tracer: Tracer, sources: Sequence[str], *, words: tuple[int, int] = (14, 26),
                    seed: int = 0, tries: int = 400) -> Pasted:
    """A response assembled from one passage per source, joined by the prose of `PROSE`.

    Each passage is the last `words` words of one sentence of a train document, verbatim
    (a verse quote keeps its line breaks), without markup, that occurs in its own source's
    index and in no other. Deterministic for a given `seed`.
    :raises InputError: a source without such a passage in `tries` candidates
    """
    rng = random.Random(seed)
    text, pieces, leads = PROSE[0], [], PROSE[1:-1]
    for k, name in enumerate(sources):
        doc, passage = _unique_passage(tracer, name, words, rng, tries)
        text += " " + leads[min(k, len(leads) - 1)]
        start = len(text) + 1
        text += " " + passage
        pieces.append(Piece(name, doc["doc_id"], doc.get("title"), start, start + len(passage)))
    text += " " + PROSE[-1]
    return Pasted(text=text, prompt="What do your sources say?", pieces=pieces)


def _unique_passage(tracer: Tracer, name: str, words: tuple[int, int], rng: random.Random,
                    tries: int) -> tuple[dict, str]:
    docs = src_lib.load_documents(tracer.ws, name, split="train", columns=["doc_id", "title", "text"]).to_pylist()
    if not docs:
        raise InputError(f"source {name!r} has no train documents to take a passage from")
    for _ in range(tries):
        doc = rng.choice(docs)
        sentences = [m.group() for m in SENTENCE.finditer(doc["text"]) if len(m.group().split()) >= words[0]]
        if not sentences:
            continue
        sentence = rng.choice(sentences)
        spans = [m.span() for m in WORD.finditer(sentence)]
        n = rng.randint(words[0], min(words[1], len(spans)))
        i = len(spans) - n  # the sentence's last n words: the quote ends where the sentence does
        passage = sentence[spans[i][0]:spans[-1][1]]  # verbatim: the source's own line breaks kept
        if MARKUP.search(passage) or passage.count("\n") > 2:
            continue
        counts = tracer.fed.count(tracer.tokenizer(" " + passage, add_special_tokens=False)["input_ids"])
        if counts.get(name, 0) >= 1 and not any(c for s, c in counts.items() if s != name):
            return doc, passage
    raise InputError(f"no passage of {words[0]}-{words[1]} words found in {name!r} only (after {tries} tries)")


@dataclass(frozen=True)
class Attribution:
    """A long span of the pasted response against the piece it lies in."""

    span: Span
    piece: Piece | None  # None: the span lies in the joining prose
    found_in_origin: bool  # the piece's source holds the span
    origin_document: bool  # the piece's own document is among the span's documents
    top_expert: str | None  # by counterfactual when computed, else routing


def attributed(t: Trace, pasted: Pasted, min_tokens: int = LONG) -> list[Attribution]:
    """Every span of at least `min_tokens` tokens, with the piece it overlaps and whether the
    trace found it in that piece's source and document."""
    out = []
    for s in t.spans:
        if s.end - s.start < min_tokens:
            continue
        piece = next((p for p in pasted.pieces if s.char_start < p.char_end and s.char_end > p.char_start), None)
        found = piece is not None and s.count_by_source.get(piece.source, 0) > 0
        origin = piece is not None and any(d.doc_id == piece.doc_id for d in s.documents)
        top = s.experts[s.top_expert].source if s.top_expert is not None and s.experts else None
        out.append(Attribution(s, piece, found, origin, top))
    return out


@dataclass(frozen=True)
class Memorised:
    """The training opening whose greedy continuation repeats its document the longest."""

    source: str
    doc_id: str
    prompt: str
    verbatim_tokens: int  # tokens of the continuation equal to the document's own continuation
    tried: int
    trace: Trace | None  # the continuation traced (None when nothing was repeated)


def memorised(tracer: Tracer, sources: Sequence[str], *, docs_per_source: int = 5, prompt_words: int = 12,
              new_tokens: int = 32) -> Memorised:
    """Prompt the model with the opening words of training documents, decode greedily, and keep
    the opening whose continuation matches its document's own continuation the longest; that
    continuation is traced (its spans should lead back to that document)."""
    if tracer.model is None:
        raise InputError("memorisation needs a model; run `flexolmo merge` first")
    from flexolmo.model.generate import generate

    tok = tracer.model_tokenizer or tracer.tokenizer
    new_tokens = max(1, min(new_tokens, tracer.model.config.max_position_embeddings - 2 * prompt_words - 8))
    best, tried = None, 0
    for name in sources:
        docs = src_lib.load_documents(tracer.ws, name, split="train", columns=["doc_id", "text"]).to_pylist()
        for doc in docs[:docs_per_source]:
            words = doc["text"].split(" ")
            if len(words) <= prompt_words:
                continue
            prompt = " ".join(words[:prompt_words])
            truth = tok(" " + " ".join(words[prompt_words:]), add_special_tokens=False)["input_ids"][:new_tokens]
            gen = generate(tracer.model, tok, prompt, GenerationOptions(max_new_tokens=new_tokens), capture=False)
            n = _common_prefix(gen.token_ids, truth)
            tried += 1
            if best is None or n > best[0]:
                best = (n, name, doc["doc_id"], prompt)
    if best is None:
        raise InputError(f"no training document of {', '.join(sources)} is longer than {prompt_words} words")
    n, name, doc_id, prompt = best
    trace = tracer.generate_and_trace(prompt, GenerationOptions(max_new_tokens=new_tokens), store=False) if n else None
    return Memorised(name, doc_id, prompt, n, tried, trace)


@dataclass(frozen=True)
class RealAnswer:
    """A real pretrained model's greedy answer to the opening of a document it plausibly saw, traced."""

    source: str
    doc_id: str
    title: str | None
    prompt: str
    trace: Trace

    def notable(self, n: int = 6) -> list[Span]:
        """The answer's `n` longest spans, longest first (the earliest of equal ones first)."""
        return sorted(self.trace.spans, key=lambda s: (s.start - s.end, s.start))[:n]


def real_answer(tracer: Tracer, source: str, doc_id: str, *, prompt_words: int = 12,
                new_tokens: int = 40) -> RealAnswer:
    """Prompt `tracer`'s model with the first `prompt_words` words of train document `doc_id`
    of `source`, decode greedily and trace the answer (the prompt itself is not traced).

    :raises InputError: no model, or no such train document (or one too short to prompt with)
    """
    if tracer.model is None:
        raise InputError("a real model's answer needs a model: open the tracer with --model PATH")
    docs = src_lib.load_documents(tracer.ws, source, split="train", columns=["doc_id", "title", "text"]).to_pylist()
    doc = next((d for d in docs if d["doc_id"] == doc_id), None)
    if doc is None:
        raise InputError(f"{source!r} has no train document {doc_id!r} to take a prompt from")
    words = doc["text"].split(" ")
    if len(words) <= prompt_words:
        raise InputError(f"{source}:{doc_id} is not longer than {prompt_words} words")
    prompt = " ".join(words[:prompt_words])
    t = tracer.generate_and_trace(prompt, GenerationOptions(max_new_tokens=new_tokens), store=False)
    return RealAnswer(source, doc_id, doc.get("title"), prompt, t)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class OptOut:
    """What switching one owner's source off changed in the trace of the same response."""

    source: str
    spans_before: int
    spans_after: int
    documents_before: int  # documents of `source` shown, over all spans
    documents_after: int
    tops_before: dict[str, int] = field(default_factory=dict)  # top expert -> spans
    tops_after: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)  # long spans no longer found


def opt_out(before: Trace, after: Trace, source: str) -> OptOut:
    """Compare the traces of one response before and after `source` was switched off."""
    def docs(t: Trace) -> int:
        return sum(1 for s in t.spans for d in s.documents if d.source == source)

    def tops(t: Trace) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in t.spans:
            if s.top_expert is not None and s.experts:
                name = s.experts[s.top_expert].source
                out[name] = out.get(name, 0) + 1
        return out

    kept = {(s.char_start, s.char_end) for s in after.spans}
    lost = [s.text.strip() for s in before.spans if s.end - s.start >= LONG and (s.char_start, s.char_end) not in kept]
    return OptOut(source, len(before.spans), len(after.spans), docs(before), docs(after), tops(before), tops(after), lost)
