"""Time of generation with routing capture, and with the verbatim guard, vs plain generation,
in the same process.

    .venv/bin/python bench/generate_overhead.py                     # demo-shaped random model
    .venv/bin/python bench/generate_overhead.py -w flexolmo-work    # the workspace's merged model
    .venv/bin/python bench/generate_overhead.py --guard-only --new-tokens 32 --reps 5

Every path calls `flexolmo.model.generate.generate` (greedy, fixed length, no early stop). Capture:
forward hooks on every gate plus per-token records. Guard: a `VerbatimGuard` (tracing/guard.py)
over a source built from the model's own unguarded output (so the guard has to act: the
worst case), with --max-verbatim 8, indexed by the project's real index build in a temporary
workspace (with -w: every source of that workspace at --max-verbatim 8 instead). Runs
alternate so that other load on the machine hits every path alike; ratios are of medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexolmo.model.config import get_profile  # noqa: E402
from flexolmo.model.generate import generate  # noqa: E402
from flexolmo.model.moe import build_model  # noqa: E402


class _IdTokenizer:
    """Stands in for the shared tokenizer with a random model: text is a list of ids."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(x) for x in text.split()]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def _model(workspace: str | None, vocab_size: int = 8192):
    if workspace:
        from flexolmo.model.merge import load_merged
        from flexolmo.base.tokenizer import load_tokenizer
        from flexolmo.base.workspace import Workspace

        ws = Workspace.resolve(workspace)
        model = load_merged(ws, respect_catalog=False)
        return model, load_tokenizer(ws), "The history of the river and the city", f"merged model in {ws.root}"
    p = get_profile("demo")
    cfg = p.model.hf_config(vocab_size=vocab_size, eos_id=0, pad_id=1, num_experts=8, top_k=p.model.top_k)
    model = build_model(cfg, seed=0).eval()
    prompt = " ".join(str(i) for i in torch.randint(2, 8192, (16,), generator=torch.Generator().manual_seed(0)).tolist())
    return model, _IdTokenizer(), prompt, "demo profile, 8 experts, random weights"


def _temp_workspace():
    """A temporary workspace with a real tokenizer (trained on this package's source text)."""
    import tempfile

    from flexolmo.base.tokenizer import load_tokenizer, train_tokenizer
    from flexolmo.base.workspace import Workspace

    ws = Workspace(Path(tempfile.mkdtemp(prefix="guard-bench-"))).ensure()
    texts = [f.read_text() for f in sorted((Path(__file__).resolve().parents[1] / "flexolmo").rglob("*.py"))]
    train_tokenizer(ws, vocab_size=2048, texts=texts)
    return ws, load_tokenizer(ws), texts


def _guard(workspace: str | None, model, tok, prompt: str, kw: dict, ws=None, texts=()):
    """A guard that must act: every source of the workspace at --max-verbatim 8, or (a random
    model) a source made of the model's own unguarded output plus some other text."""
    from flexolmo.base import sources
    from tracing.guard import VerbatimGuard, longest_run
    from index.build import build_source

    if workspace:
        from flexolmo.base.workspace import Workspace

        ws = Workspace.resolve(workspace)
        names = [s.name for s in sources.list_sources(ws)]
        olds = {n: sources.get_source(ws, n).max_verbatim for n in names}
        for n in names:
            sources.set_policy(ws, n, max_verbatim=8, by="bench")
        try:
            return VerbatimGuard.open(ws), "every source at max_verbatim 8"
        finally:
            for n, v in olds.items():
                sources.set_policy(ws, n, max_verbatim=v, by="bench")
    out = generate(model, tok, prompt, capture=False, **kw).token_ids
    docs = [{"doc_id": f"t-{i}", "text": tok.decode(out)} for i in range(8)]
    docs += [{"doc_id": f"o-{i}", "text": t} for i, t in enumerate(texts)]
    sources.add_records(ws, "tempt", docs, owner="bench", domain="bench", licence="CC0", origin="bench")
    build_source(ws, "tempt")
    sources.set_policy(ws, "tempt", max_verbatim=8, by="bench")
    guard = VerbatimGuard.open(ws)
    run = longest_run(guard.sources[0].shards, out)
    return guard, f"a source holding the model's own unguarded output (its longest run there: {run}) at max_verbatim 8"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", help="use <workspace>/models/merged (default: a random demo-shaped model)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--guard-only", action="store_true", help="skip the routing-capture comparison")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from flexolmo.base.hflog import quiet_transformers

    quiet_transformers()
    kw = dict(max_new_tokens=args.new_tokens, stop_at_eos=False)
    if args.workspace:
        model, tok, prompt, what = _model(args.workspace)
        guard, guard_what = _guard(args.workspace, model, tok, prompt, kw)
    else:
        ws, tok, texts = _temp_workspace()
        model, _, _, what = _model(None, vocab_size=len(tok))
        prompt = "The history of the river"
        guard, guard_what = _guard(None, model, tok, prompt, kw, ws, texts)
    paths = {"plain": dict(capture=False), "guard": dict(capture=False, guard=guard)}
    if not args.guard_only:
        paths["capture"] = dict(capture=True)
    for p in paths.values():  # warm-up (numba kernels compile on first use)
        generate(model, tok, prompt, **p, **kw)
    times = {k: [] for k in paths}
    acted = 0
    for _ in range(args.reps):
        for name, p in paths.items():
            t0 = time.perf_counter()
            r = generate(model, tok, prompt, **p, **kw)
            times[name].append(time.perf_counter() - t0)
            assert len(r.token_ids) == args.new_tokens
            acted = max(acted, len(r.guard))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: {what}; {model.config.num_hidden_layers} layers, top-{model.config.num_experts_per_tok} of "
          f"{model.config.num_experts} experts; {args.new_tokens} new tokens, {args.reps} reps, {torch.get_num_threads()} threads")
    print(f"guard: {guard_what}; it acted at {acted} of {args.new_tokens} tokens")
    for name, label in (("plain", "plain generate"), ("capture", "with routing"), ("guard", "with verbatim guard")):
        if name in med:
            print(f"{label:20s} median {med[name] * 1000:8.1f} ms  ({args.new_tokens / med[name]:,.0f} tokens/s)")
    if "capture" in med:
        print(f"ratio capture/plain: {med['capture'] / med['plain']:.3f}  (target <= 1.05)")
    print(f"ratio guard/plain:   {med['guard'] / med['plain']:.3f}  (target <= 1.25)")


if __name__ == "__main__":
    main()
