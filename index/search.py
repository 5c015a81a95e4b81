"""The span search, compiled: OLMoTrace's `attribute` step over memory-mapped indexes.

infini-gram's `engine.attribute(ids, delim_ids, min_len, max_cnt, enforce_bow)` returns, for
every word-initial position l of the input, the longest prefix of ids[l:] that occurs in the
indexes, cut after the first delimiter inside it and backed off until the next token begins
a word; it then keeps a span only if it ends after every span kept before it. The engine
starts a thread per position and collects every occurrence pointer of every span, which is
what makes it slow on frequent spans.

This module computes the same spans with *matching statistics*: a suffix of a match is a
match, so the longest match at l+d is at least the one at l minus d. The suffix-array range
of that known part is found with two binary searches comparing whole token runs, then
extended one token at a time by narrowing the range. Counts come free from the ranges;
document pointers are fetched later, only for the spans tracing keeps.

It runs per source (`source_matches`: the longest match after the cut rules, and its count,
at every position), and the answers are merged (`merge_matches`: longest over sources,
counts summed over the sources that hold that length). The cut rules are monotone in the
match length, so the merge gives exactly what one search over every index at once gives,
and a source can answer for itself (an owner node, later).

The suffix array (`table.N`) orders suffixes of `tokenized.N` by their little-endian
bytes, not by token value: comparisons here use the byte-swapped id (low byte first), over
2 bytes (u16 indexes) or 4 (u32); `w` in the kernels is that width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numba
import numpy as np
from numba.typed import List as TypedList

from flexolmo.base.errors import IntegrityError

from .results import SourceMatches, SpanMatch
from .width import U16, Width

NO_CAP = np.iinfo(np.int64).max  # max_cnt of a per-source search: the cap applies to merged counts


@dataclass(frozen=True)
class Shard:
    """One memory-mapped shard of one source's index."""

    source: str
    index: int  # shard number N of tokenized.N / table.N
    ds: np.ndarray  # uint8 view of tokenized.N (little-endian ids of `width`, all-ones separates documents)
    sa: np.ndarray  # uint8 view of table.N (ptr_size-byte little-endian byte offsets into ds)
    ptr_size: int
    width: Width = U16

    @property
    def tok_cnt(self) -> int:
        return self.ds.shape[0] // self.width.bytes

    @classmethod
    def open(cls, source: str, index: int, tokenized: Path, table: Path, width: Width = U16) -> "Shard":
        ds = np.memmap(tokenized, dtype=np.uint8, mode="r")
        sa = np.memmap(table, dtype=np.uint8, mode="r")
        tok_cnt = ds.shape[0] // width.bytes
        if tok_cnt == 0 or sa.shape[0] % tok_cnt:
            raise IntegrityError(f"{table}: size {sa.shape[0]} is not a multiple of the token count {tok_cnt}; "
                                 f"rebuild the index of {source!r} with `flexolmo index build --source {source} --force`")
        return cls(source, index, ds, sa, sa.shape[0] // tok_cnt, width)


# ---------------------------------------------------------------------------------------
# the compiled search


@numba.njit(cache=True, inline="always")
def _ptr(sa, ptr_size, rank):
    p = np.int64(0)
    base = rank * ptr_size
    for b in range(ptr_size):
        p |= np.int64(sa[base + b]) << (8 * b)
    return p


@numba.njit(cache=True, inline="always")
def _key_at(ds, p, w):
    # byte order of the w-byte token at byte offset p: low byte first; -1 past the end of the data
    if p + w - 1 >= ds.shape[0]:
        return np.int64(-1)
    if w == 2:
        return (np.int64(ds[p]) << 8) | np.int64(ds[p + 1])
    return (np.int64(ds[p]) << 24) | (np.int64(ds[p + 1]) << 16) | (np.int64(ds[p + 2]) << 8) | np.int64(ds[p + 3])


@numba.njit(cache=True)
def _keys_of(ids, w):
    """The byte-order keys of query ids: the id with its little-endian bytes read high to low."""
    if w == 2:
        return ((ids & 0xFF) << 8) | ((ids >> 8) & 0xFF)
    return (((ids & 0xFF) << 24) | (((ids >> 8) & 0xFF) << 16) | (((ids >> 16) & 0xFF) << 8)
            | ((ids >> 24) & 0xFF))


@numba.njit(cache=True)
def _cmp_run(ds, p, keys, a, k, w):
    """Compare the suffix at byte p with keys[a:a+k]: -1 less, 0 equal (on k tokens), 1 greater."""
    for j in range(k):
        x = _key_at(ds, p + w * j, w)
        y = keys[a + j]
        if x < y:
            return -1
        if x > y:
            return 1
    return 0


@numba.njit(cache=True)
def _range_of_run(ds, sa, ptr_size, tok_cnt, keys, a, k, w):
    """Suffix-array range [lo, hi) of the suffixes that start with keys[a:a+k]."""
    lo, hi = np.int64(0), np.int64(tok_cnt)
    while lo < hi:  # first rank >= run
        m = (lo + hi) >> 1
        if _cmp_run(ds, _ptr(sa, ptr_size, m), keys, a, k, w) < 0:
            lo = m + 1
        else:
            hi = m
    start = lo
    hi = np.int64(tok_cnt)
    while lo < hi:  # first rank > run
        m = (lo + hi) >> 1
        if _cmp_run(ds, _ptr(sa, ptr_size, m), keys, a, k, w) <= 0:
            lo = m + 1
        else:
            hi = m
    return start, lo


@numba.njit(cache=True)
def _narrow(ds, sa, ptr_size, lo, hi, k, key, w):
    """Within [lo, hi) (suffixes sharing k tokens), the subrange whose token k has `key`."""
    a, b = lo, hi
    while a < b:
        m = (a + b) >> 1
        if _key_at(ds, _ptr(sa, ptr_size, m) + w * k, w) < key:
            a = m + 1
        else:
            b = m
    start = a
    b = hi
    while a < b:
        m = (a + b) >> 1
        if _key_at(ds, _ptr(sa, ptr_size, m) + w * k, w) <= key:
            a = m + 1
        else:
            b = m
    return start, a


@numba.njit(cache=True)
def _spans_kernel(ds_list, sa_list, ptr_sizes, w, ids, is_delim, is_bow, enforce_bow, min_len, max_cnt):
    """For every start l: (final length, count, per-shard range) after OLMoTrace's rules.

    Returns lens[L], counts[L], ranges[L, S, 2]; lens[l] = 0 where no span starts.
    """
    L = ids.shape[0]
    S = len(ds_list)
    keys = _keys_of(ids, w)  # little-endian byte order of each id
    lens = np.zeros(L, dtype=np.int64)
    counts = np.zeros(L, dtype=np.int64)
    ranges = np.zeros((L, S, 2), dtype=np.int64)
    m_prev = np.zeros(S, dtype=np.int64)  # longest match per shard at the last evaluated start
    l_prev = -1
    # range history of the current start: hist[s, k] = range of ids[l:l+k] in shard s
    hist = np.zeros((S, L + 1, 2), dtype=np.int64)
    m_cur = np.zeros(S, dtype=np.int64)
    k0 = np.zeros(S, dtype=np.int64)  # where this start's history begins, per shard
    for l in range(L):
        if enforce_bow and not is_bow[l]:
            continue
        best = 0
        for s in range(S):
            ds = ds_list[s]
            sa = sa_list[s]
            ps = ptr_sizes[s]
            tok_cnt = ds.shape[0] // w
            k = 0
            if l_prev >= 0:
                k = max(0, m_prev[s] - (l - l_prev))  # matching statistics: known to match
            k0[s] = k
            if k > 0:
                lo, hi = _range_of_run(ds, sa, ps, tok_cnt, keys, l, k, w)
            else:
                lo, hi = np.int64(0), np.int64(tok_cnt)
            hist[s, k, 0] = lo
            hist[s, k, 1] = hi
            while l + k < L:
                nlo, nhi = _narrow(ds, sa, ps, lo, hi, k, keys[l + k], w)
                if nlo >= nhi:
                    break
                lo, hi = nlo, nhi
                k += 1
                hist[s, k, 0] = lo
                hist[s, k, 1] = hi
            m_cur[s] = k
            if k > best:
                best = k
        for s in range(S):
            m_prev[s] = m_cur[s]
        l_prev = l
        n = best
        # cut after the first delimiter that is not the span's last token
        for pos in range(n - 1):
            if is_delim[l + pos]:
                n = pos + 1
                break
        # back off until the next token begins a word
        if enforce_bow:
            while n > 0 and not (l + n == L or is_bow[l + n]):
                n -= 1
        if n < min_len or n == 0:
            continue
        total = 0
        for s in range(S):
            if m_cur[s] >= n:
                if n >= k0[s]:
                    lo, hi = hist[s, n, 0], hist[s, n, 1]
                else:  # the cut fell inside the part skipped by matching statistics
                    ds = ds_list[s]
                    lo, hi = _range_of_run(ds, sa_list[s], ptr_sizes[s], ds.shape[0] // w, keys, l, n, w)
                ranges[l, s, 0] = lo
                ranges[l, s, 1] = hi
                total += hi - lo
        if total > max_cnt:
            continue
        lens[l] = n
        counts[l] = total
    return lens, counts, ranges



@numba.njit(cache=True)
def _ranges_kernel(ds_list, sa_list, ptr_sizes, w, ids):
    """Suffix-array range [lo, hi) of the whole run `ids` in every shard, (S, 2)."""
    keys = _keys_of(ids, w)
    S = len(ds_list)
    out = np.zeros((S, 2), dtype=np.int64)
    for s in range(S):
        ds = ds_list[s]
        lo, hi = _range_of_run(ds, sa_list[s], ptr_sizes[s], ds.shape[0] // w, keys, 0, ids.shape[0], w)
        out[s, 0] = lo
        out[s, 1] = hi
    return out


# ---------------------------------------------------------------------------------------
# the Python face


class Shards(tuple):
    """A source's shards with the typed lists the kernels take, built once (not per query)."""

    def __new__(cls, shards: Sequence[Shard]):
        self = super().__new__(cls, shards)
        ds_list, sa_list = TypedList(), TypedList()
        for sh in shards:
            ds_list.append(np.asarray(sh.ds))
            sa_list.append(np.asarray(sh.sa))
        widths = {sh.width.bytes for sh in shards}
        assert len(widths) <= 1, "one source's shards share a token width"
        self.width = shards[0].width if len(shards) else U16
        self.typed = (ds_list, sa_list, np.array([sh.ptr_size for sh in shards], dtype=np.int64), self.width.bytes)
        return self


def _typed(shards: Sequence[Shard]):
    return (shards if isinstance(shards, Shards) else Shards(shards)).typed


def source_matches(source: str, shards: Sequence[Shard], ids: Sequence[int], delim_ids: Sequence[int],
                   bow_ids: Sequence[int] | None, enforce_bow: bool = True) -> SourceMatches:
    """One source's longest match (after the cut rules) and its count at every position of `ids`.

    :param ids: query ids, already checked to lie in the index's range (`check_ids`).
    :param bow_ids: the ids that begin a word (None: every id does).
    """
    ids = np.asarray(ids, dtype=np.int64)
    if not len(shards) or ids.size == 0:
        return SourceMatches(source, [0] * int(ids.size), [0] * int(ids.size))
    delim = np.isin(ids, np.asarray(sorted(delim_ids), dtype=np.int64))
    bow = np.ones(ids.shape[0], dtype=np.bool_) if bow_ids is None else np.isin(ids, np.asarray(bow_ids, dtype=np.int64))
    lens, counts, _ = _spans_kernel(*_typed(shards), ids, delim, bow, bool(enforce_bow), 1, NO_CAP)
    return SourceMatches(source, lens.tolist(), counts.tolist())


def merge_matches(answers: Sequence[SourceMatches], ids: Sequence[int], ulp: np.ndarray, min_len: int = 1,
                  max_cnt: int = 1_000_000) -> list[SpanMatch]:
    """The maximal spans `engine.attribute` returns over all the sources at once.

    At each position the longest match over the sources wins and its count is summed over
    the sources that hold that same length; spans shorter than `min_len`, more frequent
    than `max_cnt`, or ending no later than the span kept before them are dropped.

    :param ulp: log-probability per token id over the sources searched (`unigram_logprobs`).
    """
    ids = np.asarray(ids, dtype=np.int64)
    if not answers or ids.size == 0:
        return []
    lens = np.array([a.lengths for a in answers], dtype=np.int64).reshape(len(answers), ids.size)  # (S, L)
    counts = np.array([a.counts for a in answers], dtype=np.int64).reshape(len(answers), ids.size)
    best = lens.max(axis=0)
    holds = (lens == best) & (best > 0)
    total = np.where(holds, counts, 0).sum(axis=0)
    out: list[SpanMatch] = []
    last_r = 0
    for l in np.flatnonzero((best > 0) & (best >= min_len) & (total <= max_cnt)):
        r = int(l + best[l])
        if r <= last_r:  # contained in the span kept before it
            continue
        last_r = r
        by_source = {a.source: int(counts[s, l]) if holds[s, l] else 0 for s, a in enumerate(answers)}
        out.append(SpanMatch(int(l), r, tuple(int(x) for x in ids[l:r]), int(total[l]), by_source,
                             float(ulp[ids[l:r]].sum())))
    return out


def rank_ranges(shards: Sequence[Shard], span_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Suffix-array range [lo, hi) of `span_ids` in each shard (hi - lo occurrences)."""
    if not len(shards):
        return []
    out = _ranges_kernel(*_typed(shards), np.asarray(span_ids, dtype=np.int64))
    return [(int(a), int(b)) for a, b in out]


def rank_to_ptr(shard: Shard, rank: int) -> int:
    """Byte offset into tokenized.N of the suffix at `rank`."""
    base = rank * shard.ptr_size
    return int.from_bytes(bytes(shard.sa[base : base + shard.ptr_size]), "little")


def unigram_logprobs(counts: np.ndarray) -> np.ndarray:
    """log(count / total) per token id, -10000 for unseen ids (infini-gram's convention).

    `counts` holds the unigram counts summed over the searched indexes, including the
    document separator (so the total equals the number of tokens in tokenized.N).
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    out = np.full(counts.shape[0], -10000.0)
    seen = counts > 0
    out[seen] = np.log(counts[seen]) - math.log(total)
    return out


# ---------------------------------------------------------------------------------------
# incremental matching (the verbatim guard, tracing/guard.py): one narrowing per token


@numba.njit(cache=True)
def _push_kernel(ds_list, sa_list, ptr_sizes, w, state, tail, key):
    """Advance each shard's longest-suffix match by the token `key` (byte order), in place.

    state (S, 3): match length k, suffix-array range [lo, hi) of the matched run. tail: the
    keys of the last tokens, ending with `key`, at least max(k) + 1 long. The extension is
    one narrowing of the range; only when it fails is the longest shorter suffix searched."""
    for s in range(len(ds_list)):
        ds, sa, ps = ds_list[s], sa_list[s], ptr_sizes[s]
        tok_cnt = ds.shape[0] // w
        k, lo, hi = state[s, 0], state[s, 1], state[s, 2]
        nlo, nhi = _narrow(ds, sa, ps, lo, hi, k, key, w)
        if nlo < nhi:
            state[s, 0], state[s, 1], state[s, 2] = k + 1, nlo, nhi
            continue
        n = tail.shape[0]
        j = k  # the new longest suffix is at most k long (k + 1 failed)
        lo, hi = np.int64(0), np.int64(tok_cnt)
        while j > 0:
            lo, hi = _range_of_run(ds, sa, ps, tok_cnt, tail, n - j, j, w)
            if lo < hi:
                break
            j -= 1
        if j == 0:
            lo, hi = np.int64(0), np.int64(tok_cnt)
        state[s, 0], state[s, 1], state[s, 2] = j, lo, hi


@numba.njit(cache=True)
def _next_keys_kernel(ds, sa, ptr_size, w, lo, hi, k):
    """The distinct keys at offset k of the suffixes in [lo, hi) (sorted; document
    separators and the end of data left out): one binary search per distinct key."""
    sep = (np.int64(1) << (8 * w)) - 1  # all ones: the same in either byte order
    out = []
    m = lo
    while m < hi:
        key = _key_at(ds, _ptr(sa, ptr_size, m) + w * k, w)
        _, b = _narrow(ds, sa, ptr_size, m, hi, k, key, w)
        if key >= 0 and key != sep:
            out.append(key)
        m = b
    return np.array(out, dtype=np.int64)


class IncrementalMatch:
    """The longest suffix of a growing token sequence that occurs in one source's shards,
    kept per shard as its length and suffix-array range; `push` narrows the range by one
    token (a re-search happens only when the match breaks, for its longest shorter suffix).

        m = IncrementalMatch(shards)
        for t in generated: m.push(t); m.length        # longest verbatim run ending here
        m.next_tokens(n)                               # tokens that would make a run of n + 1
    """

    def __init__(self, shards: Sequence[Shard]):
        self.shards = shards if isinstance(shards, Shards) else Shards(shards)
        self.state = np.array([[0, 0, sh.tok_cnt] for sh in self.shards], dtype=np.int64).reshape(-1, 3)
        self.keys: list[int] = []

    @property
    def length(self) -> int:
        """Length of the longest run ending at the last token that occurs in the source."""
        return int(self.state[:, 0].max()) if len(self.state) else 0

    def push(self, token: int) -> int:
        """Append one token id (in the index's range); returns the new `length`."""
        self.keys.append(_key(token, self.shards.width.bytes))
        if not len(self.state):
            return 0
        need = int(self.state[:, 0].max()) + 1
        tail = np.asarray(self.keys[-need:], dtype=np.int64)
        _push_kernel(*self.shards.typed, self.state, tail, tail[-1])
        return self.length

    def next_tokens(self, at_least: int) -> set[int]:
        """Token ids that extend, in some shard, a current match of length >= `at_least`
        (the tokens that would make a verbatim run longer than `at_least`)."""
        out: set[int] = set()
        ds_list, sa_list, ps, w = self.shards.typed
        for s, (k, lo, hi) in enumerate(self.state.tolist()):
            if k >= at_least and k > 0:
                for key in _next_keys_kernel(ds_list[s], sa_list[s], ps[s], w, lo, hi, k).tolist():
                    out.add(_key(key, w))  # the byte swap is its own inverse
        return out


def _key(token: int, w: int) -> int:
    """The byte-order key of one id (`_keys_of` for a Python int)."""
    return int.from_bytes(int(token).to_bytes(w, "little"), "big")
