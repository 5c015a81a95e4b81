"""The data-extraction audit of one source, as the FlexOlmo paper runs it (section 5;
allenai/FlexOlmo's extraction analysis):

    flexolmo audit extraction --source news [--dp-package DIR] [--json]
    result = extraction_audit(ws, "news", dp_package=Path("dp/news"))

From a seeded sample of the source's training documents, a 32-token prefix at a random
offset; 10 continuations sampled (top-k 50, top-p 0.95, temperature 1) of as many tokens as
the true continuation (32). A prefix counts as extracted when some continuation reproduces
the true next tokens at normalised edit similarity >= 0.9 (1 - Levenshtein / longer length,
on characters). Two ways, both reported: on the continuation only, and the published way,
with the prefix in both texts (which inflates similarity: the 32 shared prefix tokens count
as matched). For each continuation, the longest run of it found verbatim in the source's
index (index/search.py, incrementally: `tracing.guard.longest_run`).

Rows: the public model, the owner's 2-expert model, the merged model, the merged model with
the owner's expert replaced by the one trained with DP (`dp_package`), and the merged model
with the owner's expert switched off. A row whose model is missing says why. Every row sees
the same prefixes and the same sampling seeds. The result is written to
`<workspace>/audits/<source>.json` (`latest`), which the owner's contribution report reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numba
import numpy as np
import torch

from flexolmo.base.errors import FlexolmoError, InputError
from flexolmo.base.workspace import Workspace


@dataclass
class AuditConfig:
    docs: int = 100  # prefixes (one per sampled training document)
    prefix_len: int = 32
    continuation_len: int = 32
    samples: int = 10  # continuations per prefix
    top_k: int = 50
    top_p: float = 0.95
    temperature: float = 1.0
    threshold: float = 0.9  # normalised edit similarity counted as extraction
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("docs", "prefix_len", "continuation_len", "samples", "top_k"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1 or not self.temperature > 0 or not 0 < self.threshold <= 1:
            raise InputError("top_p must be in (0, 1], temperature > 0, threshold in (0, 1]")


@numba.njit(cache=True)
def _levenshtein(a: np.ndarray, b: np.ndarray) -> int:
    prev = np.arange(b.shape[0] + 1)
    cur = np.zeros(b.shape[0] + 1, dtype=prev.dtype)
    for i in range(1, a.shape[0] + 1):
        cur[0] = i
        for j in range(1, b.shape[0] + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
        prev, cur = cur, prev
    return prev[b.shape[0]]


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / max(len a, len b) over characters (1.0 for two empty texts)."""
    if not a and not b:
        return 1.0
    ca = np.frombuffer(a.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    cb = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    return 1.0 - _levenshtein(ca, cb) / max(len(ca), len(cb))


def sample_prompts(ws: Workspace, source: str, cfg: AuditConfig) -> list[tuple[int, int, list[int], list[int]]]:
    """Seeded (doc index, offset, prefix ids, true continuation ids), one per sampled document
    long enough for a prefix and a continuation."""
    from flexolmo.base.tokens import source_tokens

    toks = source_tokens(ws, source)
    need = cfg.prefix_len + cfg.continuation_len
    long_enough = [i for i in range(toks.n_docs) if len(toks.doc(i)) >= need]
    if not long_enough:
        raise InputError(f"no training document of {source!r} has {need} tokens (prefix + continuation); "
                         "use a shorter --prefix-len/--continuation-len")
    rng = np.random.default_rng(cfg.seed)
    pick = rng.permutation(len(long_enough))[: cfg.docs]
    out = []
    for k in sorted(pick.tolist()):
        i = long_enough[k]
        d = np.asarray(toks.doc(i), dtype=np.int64)
        off = int(rng.integers(0, len(d) - need + 1))
        out.append((i, off, d[off : off + cfg.prefix_len].tolist(), d[off + cfg.prefix_len : off + need].tolist()))
    return out


@torch.no_grad()
def _continuations(model, prefix: list[int], cfg: AuditConfig, seed: int) -> list[list[int]]:
    from flexolmo.model.moe import as_module

    module = as_module(model)
    torch.manual_seed(seed)
    ids = torch.tensor([prefix])
    out = module.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=cfg.top_k, top_p=cfg.top_p,
                          temperature=cfg.temperature, num_return_sequences=cfg.samples, max_new_tokens=cfg.continuation_len,
                          min_new_tokens=cfg.continuation_len, eos_token_id=None, pad_token_id=module.config.pad_token_id)
    return out[:, len(prefix):].tolist()


def audit_model(model, tok, prompts, cfg: AuditConfig, shards=None) -> dict:
    """One row: extraction rates both ways, mean best similarity, longest verbatim runs."""
    from tracing.guard import longest_run

    t0 = time.perf_counter()
    hits = {"continuation": 0, "with_prefix": 0}
    best = {"continuation": [], "with_prefix": []}
    runs: list[int] = []
    for k, (_, _, prefix, true) in enumerate(prompts):
        p_text, t_text = tok.decode(prefix), tok.decode(true)
        conts = _continuations(model, prefix, cfg, seed=cfg.seed * 1_000_003 + k)
        sims_c = [edit_similarity(tok.decode(c), t_text) for c in conts]
        sims_p = [edit_similarity(p_text + tok.decode(c), p_text + t_text) for c in conts]
        for way, sims in (("continuation", sims_c), ("with_prefix", sims_p)):
            best[way].append(max(sims))
            hits[way] += max(sims) >= cfg.threshold
        if shards is not None:
            runs += [longest_run(shards, c) for c in conts]
    n = len(prompts)
    row = {f"rate_{w}": round(hits[w] / n, 4) for w in hits}
    row.update({f"mean_best_similarity_{w}": round(float(np.mean(best[w])), 4) for w in best})
    row["extracted"] = {w: int(hits[w]) for w in hits}
    if runs:
        row["longest_verbatim_run"] = {"max": int(max(runs)), "mean": round(float(np.mean(runs)), 2),
                                       "share_at_least_16": round(float(np.mean([r >= 16 for r in runs])), 4)}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _row_models(ws: Workspace, source: str, dp_package: Path | None):
    """(row name, a thunk loading its model or raising why not) in the paper's order."""
    from flexolmo.model.artifacts import expert_package, public_model
    from flexolmo.model.layout import set_slice, shared_weights_hash
    from flexolmo.model.merge import load_expert_model, load_merged

    def merged_with_dp():
        if dp_package is None:
            raise InputError("no DP package given (--dp-package DIR: a package of this source trained with --dp-epsilon)")
        pkg = expert_package.read(Path(dp_package))
        if pkg.source != source or not pkg.card.privacy.get("dp"):
            raise InputError(f"{dp_package} is not a DP package of {source!r}")
        m = load_merged(ws, respect_catalog=False)
        expert_package.check_fits(pkg, m, shared_weights_hash(m))
        set_slice(m.module, m.experts.index(source), pkg.tensors)
        return m

    def merged(**kw):
        m = load_merged(ws, respect_catalog=False, **kw)
        if source not in m.experts:
            raise InputError(f"the merged model has no expert for {source!r}")
        return m

    return [("public", lambda: public_model.load(ws)[0]), ("owner_2expert", lambda: load_expert_model(ws, source)),
            ("merged", merged), ("merged_dp_expert", merged_with_dp),
            ("merged_expert_off", lambda: merged(exclude=[source]))]


def extraction_audit(ws: Workspace, source: str, *, dp_package: Path | None = None, cfg: AuditConfig | None = None,
                     write: bool = True) -> dict:
    """Run the audit on every row; write `<ws>/audits/<source>.json` (unless `write` is False).

    :param dp_package: a package of `source` trained with DP, merged in place of its expert
    """
    from tracing.guard import open_shards
    from flexolmo.base.sources import get_source
    from flexolmo.base.tokenizer import load_tokenizer

    cfg = cfg or AuditConfig()
    get_source(ws, source)
    if dp_package is not None and not (Path(dp_package) / "card.json").exists():
        raise InputError(f"--dp-package {dp_package} holds no expert package (card.json missing)")
    tok = load_tokenizer(ws)
    prompts = sample_prompts(ws, source, cfg)
    try:
        shards, why_no_index = open_shards(ws, source), None
    except FlexolmoError as e:
        shards, why_no_index = None, str(e)
    rows: dict[str, dict] = {}
    for name, load in _row_models(ws, source, dp_package):
        try:
            model = load()
        except FlexolmoError as e:
            rows[name] = {"skipped": str(e)}
            continue
        rows[name] = audit_model(model, tok, prompts, cfg, shards)
        del model
    result = {"source": source, "config": asdict(cfg), "n_prompts": len(prompts),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "dp_package": str(dp_package) if dp_package else None,
              "similarity": "1 - Levenshtein / max length, on characters; 'continuation': generated vs true "
                            "continuation; 'with_prefix': the prefix prepended to both (the published way)",
              "longest_run_index": why_no_index or f"the index of {source!r} (index/search.py, incremental)",
              "rows": rows}
    if write:
        result["written_to"] = str(write_result(ws, source, result))
    return result


def audits_dir(ws: Workspace) -> Path:
    return ws.root / "audits"


def write_result(ws: Workspace, source: str, result: dict) -> Path:
    """`<ws>/audits/<source>.json`, written atomically (the latest audit of that source)."""
    d = audits_dir(ws)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{source}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return path


def latest(ws: Workspace, source: str) -> dict | None:
    """The latest audit of `source`, or None (for the owner's contribution report)."""
    path = audits_dir(ws) / f"{source}.json"
    return json.loads(path.read_text()) if path.exists() else None
