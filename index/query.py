"""Searching the training data itself: phrase counts, boolean (CNF) queries, documents, next tokens.

    flexolmo search "the river"                          # count in every source, a few documents
    flexolmo search "natural language OR speech AND model" --source news --json
    flexolmo search "the president" --next               # next-token distribution per source

    from index.query import Query, search, next_tokens
    res = search(fed, tok, "the river", n_docs=5)        # fed: an index.engine.Federation -> SearchResult
    ntd = next_tokens(fed, tok, "the president")         # -> NextTokens

A query is infini-gram's CNF: an AND of clauses, each an OR of phrases, written
`a OR b AND c` (OR binds tighter) or given as [["a", "b"], ["c"]]. As in infini-gram, AND
means the phrases occur within `max_diff_tokens` tokens of each other (not anywhere in a
document). A phrase is matched as written and, when it starts with a letter or digit, also
after a space (the byte-level BPE spells a word differently at the start of a text and in
running text): both spellings count. Each source answers under its own policy: a `counts`
source gives counts only, taken-down documents come back blocked with no text (counts
include them: a count is not text), inactive or expired sources are not searched, and an
owner node's source (protocol v1 answers traces only) is listed as not searched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Sequence

from flexolmo.base.errors import InputError

from .options import SNIPPET_LIMIT, WINDOW
from .snippets import decode, marked

if TYPE_CHECKING:
    from .engine import Federation

MAX_QUERY_CHARS = 2000
MAX_CLAUSES = 4  # ANDs: each clause is one engine pass over its phrases' occurrences
MAX_TERMS = 4  # ORs per clause
MAX_PHRASE_TOKENS = 64
MAX_CLAUSE_FREQ = 50_000  # infini-gram's default: a clause more frequent is sampled (count approx)
MAX_DIFF_TOKENS = 100  # infini-gram's default: AND-ed phrases lie within this many tokens
MAX_DOCS = 50
DOCS_PER_SOURCE = 5  # documents a search shows per source unless asked (the CLI's --docs, the API's n_docs)
MAX_SUPPORT = 1000  # next tokens: occurrences examined per source (infini-gram's default)


@dataclass(frozen=True)
class Query:
    """An AND of clauses, each an OR of phrases (infini-gram's CNF), checked against the limits."""

    clauses: tuple[tuple[str, ...], ...]

    @classmethod
    def parse(cls, text: str) -> "Query":
        """'a OR b AND c' -> ((a, b), (c,)); a phrase may be quoted ("a AND b" is one phrase)."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("the search query is empty; give a phrase, e.g. \"the river\"")
        if len(text) > MAX_QUERY_CHARS:
            raise InputError(f"the search query is {len(text):,} characters; at most {MAX_QUERY_CHARS:,}")
        return cls.from_cnf([[_unquote(t) for t in c.split(" OR ")] for c in _split_outside_quotes(text, " AND ")])

    @classmethod
    def from_cnf(cls, cnf: Sequence[Sequence[str]]) -> "Query":
        clauses = tuple(tuple(p for p in clause) for clause in cnf)
        if not clauses or any(not c for c in clauses):
            raise InputError("the search query has an empty clause; write `a OR b AND c`, or [[\"a\", \"b\"], [\"c\"]]")
        if len(clauses) > MAX_CLAUSES:
            raise InputError(f"the search query has {len(clauses)} AND-ed clauses; at most {MAX_CLAUSES}")
        for c in clauses:
            if len(c) > MAX_TERMS:
                raise InputError(f"a clause of the search query has {len(c)} OR-ed phrases; at most {MAX_TERMS}")
            for p in c:
                if not isinstance(p, str) or not p.strip():
                    raise InputError("the search query has an empty phrase (e.g. `a OR  OR b`); remove it")
                try:
                    p.encode("utf-8")
                except UnicodeEncodeError:
                    raise InputError("the search query is not valid Unicode text (a lone surrogate?)") from None
        return cls(clauses)

    @property
    def text(self) -> str:
        return " AND ".join(" OR ".join(c) for c in self.clauses)

    def ids(self, tok) -> list[list[list[int]]]:
        """The CNF as the engine takes it: each phrase as written and, for a word, after a space."""
        out = []
        for clause in self.clauses:
            terms: list[list[int]] = []
            for phrase in clause:
                spelled = [_encode(tok, p) for p in _spellings(phrase)]
                if len(spelled) == 2 and spelled[1][-len(spelled[0]):] == spelled[0]:
                    spelled = spelled[:1]  # the space is a token of its own: as written covers both
                for ids in spelled:
                    if len(ids) > MAX_PHRASE_TOKENS:
                        raise InputError(f"the phrase {phrase[:40]!r}... is {len(ids)} tokens; at most {MAX_PHRASE_TOKENS}")
                    if ids and ids not in terms:
                        terms.append(ids)
            out.append(terms)
        return out


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, cur, quoted, i = [], "", False, 0
    while i < len(text):
        if text[i] == '"':
            quoted = not quoted
        if not quoted and text.startswith(sep, i):
            parts.append(cur)
            cur, i = "", i + len(sep)
            continue
        cur += text[i]
        i += 1
    return parts + [cur]


def _unquote(p: str) -> str:
    p = p.strip()
    return p[1:-1] if len(p) >= 2 and p[0] == p[-1] == '"' else p


def _spellings(phrase: str) -> list[str]:
    return [phrase, " " + phrase] if phrase[:1].isalnum() else [phrase]


def _encode(tok, text: str) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False)
    return list(getattr(ids, "ids", ids))


# -- result shapes ------------------------------------------------------------------------


@dataclass
class Hit:
    """One document where the query holds, cut to its source's policy."""

    source: str
    doc_id: str
    title: str | None
    token_offset: int  # where the phrase found there starts in the document, in tokens
    blocked: bool  # taken down: no text
    snippet: str | None
    snippet_span: tuple[int, int] | None  # character range of the phrase in `snippet`
    repeats: int = 1  # documents with this same text (this one included)
    same_text: list[str] = field(default_factory=list)  # the other doc_ids with the same text


@dataclass
class SourceHits:
    source: str
    visibility: str
    count: int | None  # None: not searched (see `note`)
    approx: bool  # a clause was more frequent than max_clause_freq: the count is estimated
    documents: list[Hit]
    note: str | None = None  # e.g. "counts only (the owner's policy)"


@dataclass
class SearchResult:
    query: str
    clauses: list[list[str]]
    total: int  # over the sources searched
    sources: list[SourceHits]
    skipped: dict[str, str]  # sources not searched, and why

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NextToken:
    token_id: int
    text: str
    count: int  # over the sources that show text
    prob: float
    by_source: dict[str, int]


@dataclass
class NextTokens:
    phrase: str
    prompt_count: dict[str, int | None]  # occurrences of the phrase per source (None: not searched)
    approx: dict[str, bool]
    tokens: list[NextToken]  # most frequent first
    notes: dict[str, str]
    skipped: dict[str, str]

    def to_dict(self) -> dict:
        return asdict(self)


# -- the searches -------------------------------------------------------------------------


def _sources(fed: "Federation", source: str | None) -> tuple[list[str], dict[str, str]]:
    if source is not None:
        fed.source(source)  # NotFoundError naming what is served
        names = [source]
    else:
        names = list(fed.indexes)
    notes = {n: "not searched: an owner node answers traces only (protocol v1)" for n in names if n in fed.remote}
    return names, notes


def search(fed: "Federation", tok, query: str | Query, *, source: str | None = None, n_docs: int = DOCS_PER_SOURCE,
           seed: int = 0, snippet_tokens: int = WINDOW.snippet_tokens, max_clause_freq: int = MAX_CLAUSE_FREQ,
           max_diff_tokens: int = MAX_DIFF_TOKENS) -> SearchResult:
    """Count `query` in every served source (or `source`) and return up to `n_docs` documents per source.

    :param n_docs: documents per source (0: counts only), sampled with `seed`
    :param snippet_tokens: tokens of the snippet around the phrase found
    """
    q = query if isinstance(query, Query) else Query.parse(query)
    if not 0 <= n_docs <= MAX_DOCS:
        raise InputError(f"n_docs must be between 0 and {MAX_DOCS}, got {n_docs}")
    if not 1 <= snippet_tokens <= SNIPPET_LIMIT:
        raise InputError(f"snippet_tokens must be between 1 and {SNIPPET_LIMIT}, got {snippet_tokens}")
    if not (1 <= max_clause_freq <= 10 * MAX_CLAUSE_FREQ and 1 <= max_diff_tokens <= 1000):
        raise InputError(f"max_clause_freq must be in [1, {10 * MAX_CLAUSE_FREQ}] and max_diff_tokens in [1, 1000]")
    cnf = q.ids(tok)
    names, notes = _sources(fed, source)
    out = []
    for n in names:
        ix = fed.indexes[n]
        if n in notes:
            out.append(SourceHits(n, ix.visibility, None, False, [], notes[n]))
            continue
        count, approx = ix.count_cnf(cnf, max_clause_freq, max_diff_tokens)
        docs = ix.cnf_documents(cnf, n_docs, seed, snippet_tokens, max_clause_freq, max_diff_tokens) if count else []
        note = "counts only (the owner's policy)" if ix.visibility == "counts" else None
        out.append(SourceHits(n, ix.visibility, count, approx, group_repeats([_hit(tok, d) for d in docs],
                                                                             [tuple(d.token_ids) for d in docs]), note))
    return SearchResult(query=q.text, clauses=[list(c) for c in q.clauses],
                        total=sum(s.count or 0 for s in out), sources=out, skipped=dict(fed.skipped))


def _hit(tok, d) -> Hit:
    if d.blocked:
        return Hit(d.source, d.doc_id, None, d.token_offset, True, None, None)
    t, a, k = d.token_ids, d.needle_offset, d.needle_len
    snippet, span = marked(tok, t[:a], t[a: a + k], t[a + k:])
    return Hit(d.source, d.doc_id, d.title, d.token_offset, False, snippet, span)


def group_repeats(hits: list, keys: list) -> list:
    """Keep the first of the hits whose text is the same (same key), counting the others on it
    ("repeated N times"); blocked hits (no text) are never grouped."""
    first: dict = {}
    out = []
    for h, k in zip(hits, keys):
        if h.blocked or not k:
            out.append(h)
        elif k in first:
            first[k].repeats += 1
            first[k].same_text.append(h.doc_id)
        else:
            first[k] = h
            out.append(h)
    return out


def next_tokens(fed: "Federation", tok, phrase: str, *, source: str | None = None, top: int = 20,
                max_support: int = MAX_SUPPORT) -> NextTokens:
    """infini-gram's `ntd` per source: which tokens follow `phrase`, and in which sources.

    The phrase is matched in one spelling: as written or after a space, whichever occurs more
    often (`phrase` of the result says which); its last token decides what may follow. `counts`
    sources give the phrase's count only.
    """
    if not isinstance(phrase, str) or not phrase.strip():
        raise InputError("give a phrase to continue, e.g. \"the president\"")
    if len(phrase) > MAX_QUERY_CHARS or not 1 <= top <= 200 or not 1 <= max_support <= 10 * MAX_SUPPORT:
        raise InputError(f"the phrase must be at most {MAX_QUERY_CHARS} characters, top in [1, 200] and "
                         f"max_support in [1, {10 * MAX_SUPPORT}]")
    names, notes = _sources(fed, source)
    # one spelling: as written, or after a space (a word in running text), whichever is more frequent
    spellings = [_encode(tok, p) for p in _spellings(phrase)]
    if any(len(ids) > MAX_PHRASE_TOKENS for ids in spellings):
        raise InputError(f"the phrase is {max(len(i) for i in spellings)} tokens; at most {MAX_PHRASE_TOKENS}")
    searched = [fed.indexes[n] for n in names if n not in notes]
    ids = max(spellings, key=lambda i: sum(ix.count(i) for ix in searched))
    phrase = _spellings(phrase)[spellings.index(ids)]
    prompt_count: dict[str, int | None] = {}
    approx: dict[str, bool] = {}
    merged: dict[int, dict[str, int]] = {}
    for n in names:
        ix = fed.indexes[n]
        if n in notes:
            prompt_count[n], approx[n] = None, False
            continue
        total, apx, counts = ix.next_token_counts(ids, max_support)
        prompt_count[n], approx[n] = total, apx
        if ix.visibility == "counts":
            notes[n] = "counts only (the owner's policy): no continuations"
            continue
        for t, c in counts.items():
            merged.setdefault(t, {})[n] = c
    grand = sum(sum(v.values()) for v in merged.values())
    ranked = sorted(merged.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:top]
    tokens = [NextToken(t, decode(tok, [t]) or tok.decode([t]), sum(by.values()), round(sum(by.values()) / grand, 6),
                        dict(sorted(by.items(), key=lambda kv: -kv[1]))) for t, by in ranked]
    return NextTokens(phrase, prompt_count, approx, tokens, notes, dict(fed.skipped))
