"""Build and record one infini-gram index per source (train split only).

    flexolmo index build --all            # or --source NAME, --shards N, --force, --mem-gib, --cpus
    flexolmo index build --all --ray      # the shards' suffix arrays as Ray tasks (index/ray_build.py)

A build is atomic: everything is written into `indexes/.tmp-<name>-*`, checked by
`index/verify.py` (the engine loads it; document and token counts match; sampled n-gram
counts equal a brute-force count; the suffix array is sorted at sampled ranks), renamed
into place, and only then recorded in the catalog. A failed or killed build leaves the
previous folder and catalog row untouched; the next build of the source (which holds the
source's lock, `format.source_lock`) removes the folders a killed one left. An index that
is current (its manifest's rule, index/manifest.py: same tokenizer, source content, shard
count and width) is not rebuilt unless forced.

It streams: the source is tokenized batch by batch into the token cache (flexolmo/base/tokens.py),
the shards are written from it a bounded run at a time (index/write.py), and each shard's
suffix sort works within `IndexConfig.mem_gib` (index/suffix_array.py). Memory is therefore bounded by the
budget, not by the source: a source whose token file would not fit is split into shards
(by default as many as the budget needs; `--shards N` or `max_shard_tokens` to choose).
Ids are u16 or u32 as the tokenizer's vocabulary needs (index/width.py). A source held by
its owner's node (`sources add --remote`) has no index here: `build_all` reports it and
goes on.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from typing import Protocol

from flexolmo.base import sources as src_lib
from flexolmo.base import tokenizer as tok_lib
from flexolmo.base.errors import ConflictError, FlexolmoError, InputError, IntegrityError
from flexolmo.base.tokens import source_tokens
from flexolmo.base.workspace import Workspace, atomic_dir

from . import catalog, doc_freq, format as fmt, width as widths
from .format import diff_dir, index_dir  # noqa: F401 -- callers of the builder find the paths here too
from .manifest import IndexManifest, inputs_for
from .results import BuildResult, IndexRecord
from .suffix_array import METHODS, build_suffix_array, check_method, max_shard_bytes, shards_for
from .takedown import rebuild_diff
from .verify import verify_folder
from .write import write_shards

MAX_SHARDS = 256  # shard files past 10 are zero-padded so the loader's name sort pairs them (format.shard_file)


class Progress(Protocol):
    """Receives build progress; `cli/index_cmds.py` prints it with rich."""

    def __call__(self, source: str, step: str, done: float, total: float | None, unit: str) -> None: ...


def _no_progress(source: str, step: str, done: float, total: float | None, unit: str) -> None:
    pass


@dataclass(frozen=True)
class IndexConfig:
    shards: int | None = None  # None: as many as the memory budget (and max_shard_tokens) needs
    cpus: int = max(1, min(os.cpu_count() or 1, 8))  # suffix-sort threads (rust_indexing: processes) at a time
    mem_gib: float = 8.0  # the suffix sort's budget: a shard's sort fits in it (index/suffix_array.py)
    max_shard_tokens: int | None = None  # positions (ids + separators) per shard at most; None: the budget's
    verify_ngrams: int = 64  # sampled n-gram counts checked against a brute-force count
    verify_sa_ranks: int = 256  # sampled adjacent suffix-array ranks checked for order
    suffix_array: str = METHODS[0]  # "divsufsort", or "rust" (rust_indexing: the same tables, slow on repeats)
    ray: bool = False  # the shards' suffix arrays as Ray tasks (index/ray_build.py)
    ray_address: str | None = None  # with ray: a running cluster's address; None: a local Ray of `cpus` CPUs

    def check(self) -> "IndexConfig":
        if self.shards is not None and not 1 <= self.shards <= MAX_SHARDS:
            raise InputError(f"--shards {self.shards} is out of range: use 1..{MAX_SHARDS}")
        if not 0.25 <= self.mem_gib <= 4096 or not 1 <= self.cpus <= 256:
            raise InputError(f"--mem-gib {self.mem_gib:g} / --cpus {self.cpus}: use 0.25..4096 GiB and 1..256 cpus")
        if self.max_shard_tokens is not None and self.max_shard_tokens < 1000:
            raise InputError(f"--max-shard-tokens {self.max_shard_tokens} is too small: use at least 1000")
        check_method(self.suffix_array)
        if self.ray_address is not None and not self.ray:
            raise InputError("--ray-address names the Ray cluster of --ray; add --ray")
        return self

    def shards_for(self, n_positions: int, width: widths.Width) -> int:
        """The shard count for a source of `n_positions` (ids + separators)."""
        if self.shards is not None:
            return self.shards
        n = shards_for(n_positions * width.bytes, self.mem_gib, self.max_shard_tokens, width, self.suffix_array)
        if n > MAX_SHARDS:
            raise InputError(f"{n_positions:,} tokens need {n} shards under --mem-gib {self.mem_gib:g}, more than "
                             f"{MAX_SHARDS}; give more memory (--mem-gib) or larger shards (--max-shard-tokens)")
        return n


# ---------------------------------------------------------------------------------------
# build


def build_source(
    ws: Workspace,
    name: str,
    *,
    shards: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    config: IndexConfig | None = None,
) -> BuildResult:
    """Build (or keep, when current) the index of source `name`'s train split.

    :param shards: number of shards (1..MAX_SHARDS); None: `config.shards`, else as many as
        the memory budget needs. Documents are split in order, balanced by size.
    :param force: rebuild even if the index is current.
    :param progress: called per step with counts, for display.
    """
    progress = progress or _no_progress
    config = (config or IndexConfig())
    if shards is not None:
        config = replace(config, shards=shards)
    config.check()
    t_start = time.perf_counter()
    source = src_lib.get_source(ws, name)
    if source.is_remote:
        raise ConflictError(f"source {name!r} is held by its owner's node ({_url(source)}); its index is built "
                            "there, with `flexolmo index build` in the owner's workspace")
    with fmt.source_lock(ws, name):  # no one else writes this source's folders now
        _remove_leftovers(ws, name)
        return _build_locked(ws, source, force, progress, config, t_start)


def _url(source: src_lib.Source) -> str:
    return source.origin[len(src_lib.REMOTE_ORIGIN):]


def _build_locked(ws: Workspace, source: src_lib.Source, force: bool, progress: Progress,
                  config: IndexConfig, t_start: float) -> BuildResult:
    name = source.name
    tok_hash = tok_lib.tokenizer_hash(ws)
    tok_info = tok_lib.tokenizer_info(ws)
    tok_lib.ensure_token_bytes(ws)  # the byte table traces decode windows with (index/snippets.py)
    width = widths.for_vocab(tok_info.vocab_size)
    final = index_dir(ws, name)

    if not force:
        kept = _unchanged(ws, name, source.content_hash, tok_hash, config, width)
        if kept is not None:
            progress(name, "unchanged, kept", 1, 1, "index")
            return BuildResult(source=name, path=final, skipped=True, n_docs=kept.n_docs, n_tokens=kept.n_tokens,
                               n_shards=kept.n_shards, bytes=kept.bytes, seconds=time.perf_counter() - t_start,
                               tokenize_seconds=0.0, suffix_array_seconds=0.0, verify_seconds=0.0,
                               reason="same content hash and tokenizer hash; use --force to rebuild")

    if source.n_docs_train == 0:
        raise InputError(f"source {name!r} has no train documents to index "
                         f"({source.n_docs_valid} validation documents are never indexed)")
    build_id = uuid.uuid4().hex[:12]

    with atomic_dir(final) as tmp:
        t0 = time.perf_counter()
        # the source's ids, tokenized once per tokenizer (streamed into a memory-mapped cache)
        toks = source_tokens(ws, name, "train", progress=lambda done, total: progress(name, "tokenize", done, total, "chars"))
        shards = config.shards_for(int(toks.offsets[-1]) + toks.n_docs, width)
        n_docs, n_tokens, shard_stats = write_shards(ws, tmp, name, toks, shards, width, tok_info.vocab_size)
        tokenize_seconds = time.perf_counter() - t0
        cap = max_shard_bytes(config.mem_gib, config.suffix_array)
        big = [s["shard"] for s in shard_stats if s["ds_tokens"] * width.bytes > cap]
        if big:
            raise InputError(f"shard(s) {big} of {name!r} hold more than --mem-gib {config.mem_gib:g} allows "
                             f"({cap:,} bytes of tokens); use more shards, or leave --shards out")

        sa_seconds = 0.0
        if config.ray:  # imported here: a plain build never loads Ray
            from .ray_build import suffix_arrays_on_ray

            sa_seconds = suffix_arrays_on_ray(tmp, shard_stats, width, config,
                                              lambda step, done, total: progress(name, step, done, total, "shards"))
        for st in [] if config.ray else shard_stats:
            k, step = st["shard"], f"suffix array {st['shard'] + 1}/{shards}"
            progress(name, step, 0, st["ds_tokens"], "tokens")
            sa_seconds += build_suffix_array(fmt.shard_file(tmp, "tokenized", k, shards),
                                             fmt.shard_file(tmp, "table", k, shards), tmp / f".work-{k}", width,
                                             cpus=config.cpus, mem_gib=config.mem_gib, method=config.suffix_array)
            shutil.rmtree(tmp / f".work-{k}", ignore_errors=True)
            progress(name, step, st["ds_tokens"], st["ds_tokens"], "tokens")
        shutil.copyfile(ws.tokenizer_dir / fmt.BOW_FILE, tmp / fmt.BOW_FILE)
        doc_freq.write_for_build(tmp, tok_info.path, width, shards)  # relevance's statistics, checksummed below

        progress(name, "checksums", 0, None, "files")
        manifest = IndexManifest(
            inputs=inputs_for(tok_hash, source.content_hash, shards=shards, width=width),
            token_dtype=width.name, vocab_size=tok_info.vocab_size, build_id=build_id, source=name,
            n_docs=n_docs, n_tokens=n_tokens, n_shards=shards, shards=shard_stats, eos_id=tok_info.eos_id,
            built_at=catalog.now().isoformat(), files=fmt.file_table(tmp))
        manifest.save(tmp)

        t1 = time.perf_counter()
        progress(name, "verify", 0, config.verify_ngrams, "n-grams")
        problems = verify_folder(tmp, manifest, n_ngrams=config.verify_ngrams,
                                 n_ranks=config.verify_sa_ranks, checksums=False)
        if problems:
            raise IntegrityError(f"the new index of {name!r} failed verification, the previous index is kept: "
                                 + "; ".join(problems[:5]))
        verify_seconds = time.perf_counter() - t1
        progress(name, "verify", config.verify_ngrams, config.verify_ngrams, "n-grams")
    # renamed into place; now record it (a kill here leaves the folder ahead of the catalog
    # row: `verify` and `_unchanged` re-record from the folder's manifest)
    seconds = time.perf_counter() - t_start
    total_bytes = sum(f.bytes for f in manifest.files.values()) + (final / fmt.MANIFEST).stat().st_size
    catalog.record(ws, catalog.record_from_manifest(final, manifest, total_bytes, seconds, tokenize_seconds, sa_seconds))
    # The takedown index copies document tokens from the main index: refresh it.
    rebuild_diff(ws, name)
    progress(name, "done", n_tokens, n_tokens, "tokens")
    return BuildResult(source=name, path=final, skipped=False, n_docs=n_docs, n_tokens=n_tokens, n_shards=shards,
                       bytes=total_bytes, seconds=seconds, tokenize_seconds=tokenize_seconds,
                       suffix_array_seconds=sa_seconds, verify_seconds=verify_seconds)


def build_all(
    ws: Workspace, *, shards: int | None = None, force: bool = False, progress: Progress | None = None,
    names: list[str] | None = None, config: IndexConfig | None = None,
) -> list[BuildResult]:
    """Build the index of every registered source (or of `names`), one after another. A remote
    source (held by its owner's node) is not built here: its result says so (`remote`)."""
    listed = src_lib.list_sources(ws)
    if not names and not listed:
        raise InputError("no sources registered yet; add one with `flexolmo sources add` or `flexolmo data samples`")
    remote = {s.name: _url(s) for s in listed if s.is_remote}
    out = []
    for n in names or [s.name for s in listed]:
        if n in remote and not names:
            out.append(BuildResult(source=n, path=None, skipped=True, n_docs=0, n_tokens=0, n_shards=0, bytes=0,
                                   seconds=0.0, tokenize_seconds=0.0, suffix_array_seconds=0.0, verify_seconds=0.0,
                                   reason=f"remote: held by its owner's node at {remote[n]}; built there",
                                   remote=remote[n]))
            continue
        out.append(build_source(ws, n, shards=shards, force=force, progress=progress, config=config))
    return out


def _unchanged(ws: Workspace, name: str, content_hash: str, tok_hash: str, config: IndexConfig,
               width: widths.Width) -> IndexRecord | None:
    """The catalog row of an index that is current (the manifest's rule) and intact, else None."""
    folder = index_dir(ws, name)
    if not folder.exists():
        return None
    try:
        m = fmt.read_manifest(folder)
        # same tokenizer and content: the same ids, so the shard count asked for follows from the manifest's
        shards = config.shards_for(m.n_tokens + m.n_docs, width)
    except FlexolmoError:
        return None
    if m.stale_reason(inputs_for(tok_hash, content_hash, shards=shards, width=width)) or fmt.check_files(folder, m):
        return None
    rec = catalog.get_index(ws, name)
    if rec is None or rec.build_id != m.build_id:
        rec = catalog.rerecord(ws, folder, m)
    return rec


def _remove_leftovers(ws: Workspace, name: str) -> None:
    """Remove the temporary folders of killed builds and takedowns of this source.

    Called with the source's lock held, so no live process is writing any of them.
    """
    for p in fmt.leftover_dirs(ws, name):
        shutil.rmtree(p, ignore_errors=True)


def catalog_table(ws: Workspace) -> list[dict]:
    """One dict per registered source: its policy and its index stats (None when unbuilt or
    remote). `stale_reason` is the index manifest's answer (tokenizer and source as now);
    `remote` the owner node's URL of a source held there."""
    recs = {r.source: r for r in catalog.list_indexes(ws)}
    takedowns = catalog.list_takedowns(ws)
    out = []
    current_tok = None
    try:
        current_tok = tok_lib.tokenizer_hash(ws)
    except FlexolmoError:
        pass
    for s in src_lib.list_sources(ws):
        r = None if s.is_remote else recs.get(s.name)
        m, why = _manifest_and_staleness(ws, s, current_tok) if r else (None, None)
        out.append({
            "source": s.name, "owner": s.owner, "domain": s.domain, "licence": s.licence,
            "visibility": s.visibility, "available": s.available(), "expires": s.expires,
            "indexed": r is not None, "remote": _url(s) if s.is_remote else None,
            "n_docs": r.n_docs if r else None, "n_tokens": r.n_tokens if r else None,
            "bytes": r.bytes if r else None, "bytes_per_token": r.bytes_per_token if r else None,
            "build_seconds": r.build_seconds if r else None, "tokens_per_second": r.tokens_per_second if r else None,
            "token_dtype": m.token_dtype if m else None, "n_shards": r.n_shards if r else None,
            "stale": why is not None, "stale_reason": why,
            "takedowns": sum(1 for t in takedowns if t.source == s.name),
            "path": r.path if r else None,
        })
    return out


def _manifest_and_staleness(ws: Workspace, s: src_lib.Source, tok_hash: str | None) -> tuple[IndexManifest | None, str | None]:
    """The source's index manifest, and why the index is not current (the manifest's rule) or None."""
    try:
        m = fmt.read_manifest(index_dir(ws, s.name))
    except FlexolmoError as e:
        return None, str(e)
    return m, m.stale_reason(m.inputs_with(tokenizer=tok_hash, source=s.content_hash))
