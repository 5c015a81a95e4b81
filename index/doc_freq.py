"""Document frequencies of words in a source: the collection statistics relevance is scored on.

    doc_freq.write_table(folder, tok, width, n_shards)   # at build time, into the index folder
    t = doc_freq.open_table(folder)                       # None: an index built without one
    t.df(["licence", "the"])                              # array([20, 980])
    t.n_docs, t.avg_words(cap)                            # BM25's N and avgdl (for windows of `cap` words)

A trace rates each retrieved window by BM25 against the prompt and response
(`tracing/relevance.py`). The IDF of a word must come from the source, not from the
windows retrieved for one response: when every retrieved window holds the same passage
(a licence, a disclaimer, a code header recurring in many documents), the windows' own
IDF of every shared word falls to about zero and the copied passage's origin rates low.

Why a table of words rather than the index's own counts: infini-gram counts occurrences
of token sequences, not the documents that hold them, and relevance works on words (`\\w+`
of the lowercased text, `words` below, the unit `tracing/relevance.py` scores on), which
the index's tokens split differently from one tokenizer to another. So the build decodes
every document of the index's own token files (the same bytes the trace's windows are
decoded from, `index/snippets.py`) and counts, per word, the documents holding it.

Two files in the index folder, written by the build before its checksums (so the manifest
records and checks them like every other file) and verified by `index verify`:

    docfreq.npy    sorted rows (key u64, df u32): key = the first 8 bytes of blake2b(word),
                   a stable 64-bit hash (collisions among 10M words: p ~ 3e-6); 12 bytes a word
    docfreq.json   {"format", "words", "n_docs", "n_words", "n_tokens", "n_keys",
                    "doc_words_quantiles": 101 quantiles of words per document}

Memory while building grows with the source's distinct words (one Python dict entry
each), not with its size. Taken-down documents stay counted (a count says nothing of a
document's text). An index built before these files has no table: `open_table` returns
None and relevance rates that source's windows as before (the retrieved windows' IDF) and
says so in the trace; `flexolmo index build --source NAME --force` adds the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from flexolmo.base import pieces
from flexolmo.base.errors import FlexolmoError, IntegrityError

from . import format as fmt
from .width import Width

TABLE_FILE, STATS_FILE = "docfreq.npy", "docfreq.json"
FORMAT = 1
WORD_RULE = r"\w+ of the lowercased text"
ROW = np.dtype([("key", "<u8"), ("df", "<u4")])
QUANTILES = 101
DOCS_PER_BATCH = 1024
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The words relevance scores on: `\\w+` of the lowercased text (Unicode letters and digits)."""
    return _WORD.findall(text.lower())


def keys(ws: Iterable[str]) -> np.ndarray:
    """The table's u64 key of each word."""
    return np.array([int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
                     for w in ws], dtype=np.uint64)


# ---------------------------------------------------------------------------------------
# building


def _byte_table(tok) -> tuple[list[bytes], np.ndarray]:
    """(the bytes of every token id, their lengths)."""
    table = pieces.token_bytes(tok)
    return table, np.fromiter((len(b) for b in table), dtype=np.int64, count=len(table))


def _doc_texts(ids: np.ndarray, bounds: np.ndarray, table: tuple[list[bytes], np.ndarray]) -> list[str]:
    """Texts of the documents whose ids are ids[bounds[i]:bounds[i+1]]."""
    pieces_, lens = table
    data = b"".join(map(pieces_.__getitem__, ids.tolist()))
    cut = np.concatenate([[0], np.cumsum(lens[ids])])[bounds].tolist()
    return [data[a:b].decode("utf-8", errors="replace") for a, b in zip(cut[:-1], cut[1:])]


def count_words(folder: Path, tok, width: Width, n_shards: int) -> tuple[Counter, np.ndarray, int]:
    """(df per word, words per document, tokens) over every document of an index folder's shards."""
    table = _byte_table(tok)
    df: Counter = Counter()
    per_doc: list[int] = []
    n_tokens = 0
    for k in range(n_shards):
        tokenized = fmt.shard_file(folder, "tokenized", k, n_shards)
        od = np.fromfile(fmt.shard_file(folder, "offset", k, n_shards), dtype="<u8").astype(np.int64) // width.bytes
        end = tokenized.stat().st_size // width.bytes
        for a in range(0, len(od), DOCS_PER_BATCH):
            first = od[a: a + DOCS_PER_BATCH]
            last = od[a + DOCS_PER_BATCH] if a + DOCS_PER_BATCH < len(od) else end
            ids = fmt.read_tokens(tokenized, width, int(first[0]), int(last - first[0]))
            # each document: its separator, then its ids; drop the separators
            rel = np.concatenate([first - first[0], [len(ids)]])
            keep = np.ones(len(ids), dtype=bool)
            keep[rel[:-1]] = False
            bounds = rel - np.arange(len(rel))  # document i: [rel[i] - i, rel[i+1] - (i+1)) without separators
            ids = ids[keep]
            n_tokens += len(ids)
            for text in _doc_texts(ids, bounds, table):
                ws = words(text)
                per_doc.append(len(ws))
                df.update(set(ws))
    return df, np.asarray(per_doc, dtype=np.int64), n_tokens


def write_table(folder: Path, tok, width: Width, n_shards: int) -> dict:
    """Count the documents holding each word over an index folder's shards and write the
    table's two files into it (each written to a temporary name, then renamed). Returns the stats."""
    folder = Path(folder)
    df, per_doc, n_tokens = count_words(folder, tok, width, n_shards)
    rows = np.zeros(len(df), dtype=ROW)
    rows["key"] = keys(df.keys())
    rows["df"] = np.fromiter(df.values(), dtype=np.uint32, count=len(df))
    rows.sort(order="key")
    if len(rows) > 1 and np.any(rows["key"][1:] == rows["key"][:-1]):  # a 64-bit collision: merge (max df)
        uniq = np.unique(rows["key"])
        rows = np.array([(k, int(rows["df"][rows["key"] == k].max())) for k in uniq], dtype=ROW)
    q = np.quantile(per_doc, np.linspace(0, 1, QUANTILES)) if len(per_doc) else np.zeros(QUANTILES)
    stats = {"format": FORMAT, "words": WORD_RULE, "n_docs": int(len(per_doc)), "n_words": int(per_doc.sum()),
             "n_tokens": int(n_tokens), "n_keys": int(len(rows)),
             "doc_words_quantiles": [round(float(x), 2) for x in q]}
    _write(folder / TABLE_FILE, lambda f: np.save(f, rows, allow_pickle=False))
    _write(folder / STATS_FILE, lambda f: f.write(json.dumps(stats, indent=1).encode()))
    return stats


def _write(path: Path, fill) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        fill(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_for_build(folder: Path, tokenizer_file: Path, width: Width, n_shards: int) -> dict:
    """The build's hook (index/build.py): the table of the shards just written into `folder`."""
    from tokenizers import Tokenizer

    return write_table(folder, Tokenizer.from_file(str(tokenizer_file)), width, n_shards)


# ---------------------------------------------------------------------------------------
# reading


@dataclass
class Stats:
    """What BM25 needs of a source: N, document frequencies of some words, document lengths."""

    n_docs: int
    n_words: int
    n_tokens: int
    doc_words_quantiles: list[float]
    dfs: dict[str, int]  # the words asked for (absent: 0)

    def avg_words(self, cap_words: float | None = None) -> float:
        """The mean words per document, each counted up to `cap_words` (a window of a document
        holds at most that many): BM25's avgdl for windows of that size."""
        q = np.asarray(self.doc_words_quantiles, dtype=np.float64)
        if cap_words is not None:
            q = np.minimum(q, cap_words)
        return max(1.0, float(q.mean()))

    @property
    def words_per_token(self) -> float:
        return self.n_words / self.n_tokens if self.n_tokens else 1.0


class Table:
    """An index folder's document-frequency table, memory-mapped."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        try:
            self.stats = json.loads((folder / STATS_FILE).read_text())
            self.rows = np.load(folder / TABLE_FILE, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IntegrityError(f"the document-frequency table of {folder} cannot be read ({e}); rebuild the index "
                                 f"with `flexolmo index build --source {folder.name} --force`") from None
        if self.stats.get("format") != FORMAT or self.rows.dtype != ROW:
            raise IntegrityError(f"the document-frequency table of {folder} has another format; rebuild the index "
                                 f"with `flexolmo index build --source {folder.name} --force`")
        self.n_docs = int(self.stats["n_docs"])

    def df(self, ws: Sequence[str]) -> np.ndarray:
        """Documents holding each word (0 for a word the source does not hold)."""
        if not len(ws):
            return np.zeros(0, dtype=np.int64)
        k = keys(ws)
        if not len(self.rows):
            return np.zeros(len(k), dtype=np.int64)
        at = np.minimum(np.searchsorted(self.rows["key"], k), len(self.rows) - 1)
        hit = np.asarray(self.rows["key"][at]) == k
        return np.where(hit, np.asarray(self.rows["df"][at], dtype=np.int64), 0)

    def lookup(self, ws: Sequence[str]) -> Stats:
        uniq = sorted(set(ws))
        return Stats(n_docs=self.n_docs, n_words=int(self.stats["n_words"]), n_tokens=int(self.stats["n_tokens"]),
                     doc_words_quantiles=list(self.stats["doc_words_quantiles"]),
                     dfs=dict(zip(uniq, self.df(uniq).tolist())))

    def problems(self, n_docs: int) -> list[str]:
        """What is wrong with the table for an index of `n_docs` documents (empty: sound)."""
        out = []
        keys_ = np.asarray(self.rows["key"])
        dfs = np.asarray(self.rows["df"])
        if self.n_docs != n_docs:
            out.append(f"{STATS_FILE} counts {self.n_docs} documents, the index {n_docs}")
        if len(keys_) != int(self.stats.get("n_keys", -1)):
            out.append(f"{TABLE_FILE} holds {len(keys_)} words, {STATS_FILE} says {self.stats.get('n_keys')}")
        if len(keys_) > 1 and np.any(keys_[1:] <= keys_[:-1]):
            out.append(f"{TABLE_FILE} is not sorted by key")
        if len(dfs) and (dfs.min() < 1 or dfs.max() > n_docs):
            out.append(f"{TABLE_FILE} holds document frequencies outside 1..{n_docs}")
        if len(self.stats.get("doc_words_quantiles", [])) != QUANTILES:
            out.append(f"{STATS_FILE} lacks its {QUANTILES} document-length quantiles")
        return out


_open: dict[tuple, Table | None] = {}


def open_table(folder: Path) -> Table | None:
    """The folder's table (cached per folder and file stamp), or None when the index has none."""
    folder = Path(folder)
    p = folder / TABLE_FILE
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    key = (str(folder), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _open:
        _open[key] = Table(folder)
    return _open[key]


def check_folder(folder: Path, n_docs: int, listed: Iterable[str]) -> list[str]:
    """`index verify`'s checks of the table: readable, consistent, recorded in the manifest.
    An index built without a table has no problem here (relevance falls back and says so)."""
    folder = Path(folder)
    present = [n for n in (TABLE_FILE, STATS_FILE) if (folder / n).exists()]
    if not present:
        return []
    listed = set(listed)
    out = [f"{n} is not recorded in the manifest" for n in present if n not in listed]
    if len(present) < 2:
        return out + [f"the document-frequency table is incomplete (only {present[0]})"]
    try:
        return out + Table(folder).problems(n_docs)
    except IntegrityError as e:
        return out + [str(e)]


# ---------------------------------------------------------------------------------------
# the statistics of served sources, local or remote


def is_remote(ix) -> bool:
    """A `RemoteSource` (asked over HTTP) rather than a local `SourceIndex`."""
    return callable(getattr(ix, "doc_freq", None))


def source_stats(ix, ws: Sequence[str]) -> tuple[Stats | None, str | None]:
    """(statistics of `ws` in the source `ix`, None) or (None, why not): a local `SourceIndex`
    reads its folder's table; a `RemoteSource` asks its node (`/v1/doc_freq`)."""
    if is_remote(ix):
        try:
            return ix.doc_freq(ws), None
        except FlexolmoError as e:  # RemoteUnavailable: down, slow, or a node without the table
            return None, f"its node gave no document frequencies ({e})"
    try:
        t = open_table(ix.folder)
    except IntegrityError as e:
        return None, str(e)
    if t is None:
        return None, (f"its index was built without a document-frequency table; rebuild it with "
                      f"`flexolmo index build --source {ix.name} --force`")
    return t.lookup(ws), None
