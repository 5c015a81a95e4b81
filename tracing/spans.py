"""From the index's matches to the trace's spans: character positions, documents as hits, groups.

    spans, windows = assemble(tokenizer, kept, docs, ids, align, snippet_tokens)
    groups = group(spans, ids, tokenizer, response)

`assemble` turns each kept `SpanMatch` (index/results.py) and its sampled documents into a
`Span` with its `DocHit`s, and returns every hit's window text for relevance (tracing/relevance.py);
`group` merges overlapping spans into the top-level groups the page highlights.
"""

from __future__ import annotations

import unicodedata
from typing import Callable

from index.results import SpanDocument, SpanMatch
from index.snippets import marked

from .alignment import Alignment
from .results import DocHit, Span, SpanGroup


def has_words(text: str) -> bool:
    """Does the text hold a letter, digit or symbol, i.e. more than whitespace and punctuation?"""
    return any(not (c.isspace() or unicodedata.category(c).startswith("P")) for c in text)


def assemble(tok, kept: list[SpanMatch], docs: list[list[SpanDocument]], ids: list[int], align: Alignment | None,
             snippet_tokens: int, check: Callable[[], None] | None = None) -> tuple[list[Span], list[tuple[DocHit, str]]]:
    """The trace's spans (one per kept match, with its documents as hits) and every shown hit with
    the text BM25 rates it on. `check` is called before each span (a service's deadline)."""
    windows: list[tuple[DocHit, str]] = []
    spans = []
    for i, (raw, d) in enumerate(zip(kept, docs)):
        if check is not None:
            check()
        spans.append(_span(tok, i, raw, ids, d, windows, align, snippet_tokens))
    return spans, windows


def _span(tok, index: int, raw: SpanMatch, ids: list[int], docs: list[SpanDocument],
          windows: list[tuple[DocHit, str]], align: Alignment | None, snippet_tokens: int) -> Span:
    if align is None:  # one tokenizer: character positions by decoding, as the response was made
        char_start = len(tok.decode(ids[: raw.l]))
        text = tok.decode(ids[raw.l: raw.r])
    else:  # the index's own character offsets in the response
        char_start, char_end = align.chars(raw.l, raw.r)
        text = align.response[char_start:char_end]
    return Span(index=index, start=raw.l, end=raw.r, char_start=char_start, char_end=char_start + len(text),
                text=text, count=raw.count, count_by_source=dict(raw.count_by_source),
                unigram_logprob_sum=raw.unigram_logprob_sum, group=-1,
                documents=_documents(tok, docs, windows, snippet_tokens))


def _documents(tok, docs: list[SpanDocument], windows: list[tuple[DocHit, str]], snippet_tokens: int) -> list[DocHit]:
    """The span's documents (up to max_docs distinct ones, sampled with a fixed seed from its
    occurrences in sources that show documents, each cut to its source's policy) as hits;
    hits with the same text under other doc_ids point at the first (`repeat_of`)."""
    out, first = [], {}
    for d in docs:
        hit, text = _hit(tok, d, snippet_tokens)
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


def _hit(tok, d: SpanDocument, snippet_tokens: int) -> tuple[DocHit, str | None]:
    """A document as the trace shows it, and the text BM25 rates it on (None when blocked)."""
    hit = DocHit(source=d.source, doc_id=d.doc_id, title=d.title, shard=d.shard, doc_ix=d.doc_ix,
                 token_offset=d.token_offset, blocked=d.blocked, snippet=None, snippet_span=None, context=None,
                 context_span=None)
    if d.blocked:  # nothing of a taken-down document leaves the index but its id
        return hit, None
    toks, a, n = d.token_ids, d.needle_offset, d.needle_len
    side = max(0, (snippet_tokens - n) // 2)
    hit.snippet, hit.snippet_span = marked(tok, toks[max(0, a - side): a], toks[a: a + n], toks[a + n: a + n + side])
    text, span = marked(tok, toks[:a], toks[a: a + n], toks[a + n:])
    if d.visibility == "full":
        hit.context, hit.context_span = text, span
    return hit, text


def group(spans: list[Span], ids: list[int], tok, response: str | None = None) -> list[SpanGroup]:
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
