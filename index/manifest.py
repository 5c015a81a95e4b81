"""The index's card: `indexes/<name>/manifest.json`, a typed `flexolmo.base.artifacts.card.Card`.

    m = IndexManifest.read(folder)                   # an old manifest (no `inputs`) is upgraded
    m.stale_reason(inputs_for(tok_hash, content_hash, shards=2, width=w))   # None: current
    m.serve_problem(tokenizer_hash(ws))              # None: may answer for this workspace

One rule for "is this index current", asked by the build (keep an unchanged index), verify,
takedown (its diff index copies the main index's tokens), the catalog row, the owner node
and the verbatim guard. Inputs:

    tokenizer   sha256 of the index tokenizer's tokenizer.json
    source      the source's content hash (a takedown diff index: its main index's)
    settings    sha256 of {"shards": n, "token_dtype": "u16" | "u32"}

Answers from an index are wrong only when the tokenizer changed (its ids mean other text),
so that alone stops an index from serving (`serve_problem`); a changed source or shard
count makes it stale: listed as such, rebuilt by the next `index build`.

A manifest written before cards (infini-gram keys, `tokenizer_hash` and `content_hash` at
the top level, no `inputs`) is upgraded on read with every input recovered, so the sample
federation's indexes stay current; one that cannot be read says to rebuild with
`flexolmo index build --source NAME --force`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from flexolmo.base.artifacts.card import Card, Inputs, sha256_json

from . import width as widths

MANIFEST = "manifest.json"
KINDS = ("tokenized", "table", "offset", "metadata", "metaoff", "unigram")


def shard_file(folder: Path, kind: str, k: int, n_shards: int = 1) -> Path:
    """The file of one kind (`tokenized`, `table`, ...) of shard k of `n_shards`: the only place
    its name is made (index/format.py re-exports it). Up to 10 shards `tokenized.0`..`tokenized.9`
    (infini-gram's own names); beyond, zero-padded (`tokenized.00`..), since the loader pairs a
    shard's files by sorting names and `tokenized.10` would sort before `tokenized.2`."""
    if kind not in KINDS:
        raise ValueError(f"unknown index file kind {kind!r}; one of {', '.join(KINDS)}")
    digits = len(str(n_shards - 1)) if n_shards > 10 else 1
    return Path(folder) / f"{kind}.{k:0{digits}d}"


class ShardStat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shard: int
    n_docs: int
    n_tokens: int  # document tokens, separators excluded
    ds_tokens: int  # positions in tokenized.N: tokens + one separator per document
    ptr_size: int  # bytes per suffix-array entry in table.N


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bytes: int
    sha256: str
    blocks: list[str] = []  # a large file: sha256 of sampled blocks, checked at open (index/format.py)


class IndexManifest(Card):
    KIND = "index"
    REBUILD = "flexolmo index build --source {name} --force"
    FILE: ClassVar[str] = MANIFEST

    kind: Literal["index", "takedown_index"] = "index"
    engine: str = "infini-gram"
    version: int = 4  # infini-gram's index format version
    token_dtype: Literal["u16", "u32"] = "u16"
    vocab_size: int | None = None  # the index tokenizer's (None: written before u32 indexes, always u16)
    build_id: str
    source: str
    split: str = "train"
    n_docs: int
    n_tokens: int
    n_shards: int
    shards: list[ShardStat]
    eos_id: int
    built_at: str
    files: dict[str, FileEntry]
    main_build_id: str | None = None  # a takedown index: the build of the main index it copies from
    doc_ids: list[str] = []  # a takedown index: the documents it holds

    @property
    def tokenizer_hash(self) -> str:
        return self.inputs.get("tokenizer", "")

    @property
    def content_hash(self) -> str:
        return self.inputs.get("source", "")

    @property
    def width(self) -> widths.Width:
        return widths.named(self.token_dtype)

    @property
    def max_id(self) -> int:
        return self.width.max_id(self.vocab_size)

    @property
    def engine_kwargs(self) -> dict:
        """What infini-gram's `InfiniGramEngine` needs to read this index (besides its folder)."""
        wide = self.token_dtype != "u16" and self.vocab_size  # u16: the engine's default vocabulary
        return {"eos_token_id": int(self.eos_id), "version": self.version, "token_dtype": self.token_dtype,
                **({"vocab_size": self.vocab_size} if wide else {})}

    def shard_file(self, folder: Path, kind: str, k: int) -> Path:
        """The file of one kind of shard k (names padded when there are more than 10 shards)."""
        return shard_file(folder, kind, k, self.n_shards)

    # -- is it current? ---------------------------------------------------------------------

    def inputs_with(self, *, tokenizer: str | None = None, source: str | None = None) -> Inputs:
        """This index's inputs with the tokenizer and/or the source's content as they are now."""
        return {**self.inputs, **({"tokenizer": tokenizer} if tokenizer else {}), **({"source": source} if source else {})}

    def serve_problem(self, tokenizer_hash: str) -> str | None:
        """None when the index may answer for a workspace with this tokenizer; else why not."""
        why = self.stale_reason(self.inputs_with(tokenizer=tokenizer_hash))
        return None if why is None else (f"it was built with another tokenizer than the workspace's ({why}); "
                                         f"rebuild it with `flexolmo index build --source {self.source}`")

    @classmethod
    def _rebuild(cls, folder: Path) -> str:
        name = Path(folder).name.removesuffix("-removed")  # a takedown index is rebuilt with its source
        return cls.REBUILD.format(name=name)


def inputs_for(tokenizer_hash: str, content_hash: str, *, shards: int, width: widths.Width) -> Inputs:
    """The inputs of an index of a source with this content, tokenizer, shard count and width."""
    return {"tokenizer": tokenizer_hash, "source": content_hash,
            "settings": sha256_json({"shards": int(shards), "token_dtype": width.name})}


def read(folder: Path) -> IndexManifest:
    """The manifest of an index folder (NotFoundError / OutdatedError say how to rebuild)."""
    return IndexManifest.read(folder)
