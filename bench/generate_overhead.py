"""Time of generation with routing capture vs plain generation, in the same process.

    .venv/bin/python bench/generate_overhead.py                     # demo-shaped random model
    .venv/bin/python bench/generate_overhead.py -w flexolmo-work    # the workspace's merged model

Both paths call `flexolmo.generate.generate` (greedy, fixed length, no early stop); the
only difference is `capture=True`: forward hooks on every gate plus turning the captured
tensors into per-token records. Runs alternate (plain, capture, plain, ...) so that other
load on the machine hits both alike; the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexolmo.config import get_profile  # noqa: E402
from flexolmo.generate import generate  # noqa: E402
from flexolmo.model import build_model  # noqa: E402


class _IdTokenizer:
    """Stands in for the shared tokenizer with a random model: text is a list of ids."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(x) for x in text.split()]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def _model(workspace: str | None):
    if workspace:
        from flexolmo.merge import load_merged
        from flexolmo.tokenizer import load_tokenizer
        from flexolmo.workspace import Workspace

        ws = Workspace.resolve(workspace)
        model = load_merged(ws, respect_catalog=False)
        return model, load_tokenizer(ws), "The history of the river and the city", f"merged model in {ws.root}"
    p = get_profile("demo")
    cfg = p.model.hf_config(vocab_size=8192, eos_id=0, pad_id=1, num_experts=8, top_k=p.model.top_k)
    model = build_model(cfg, seed=0).eval()
    prompt = " ".join(str(i) for i in torch.randint(2, 8192, (16,), generator=torch.Generator().manual_seed(0)).tolist())
    return model, _IdTokenizer(), prompt, "demo profile, 8 experts, random weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", help="use <workspace>/models/merged (default: a random demo-shaped model)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from flexolmo.hflog import quiet_transformers

    quiet_transformers()
    model, tok, prompt, what = _model(args.workspace)
    kw = dict(max_new_tokens=args.new_tokens, stop_at_eos=False)
    for capture in (False, True):  # warm-up
        generate(model, tok, prompt, capture=capture, **kw)
    times = {False: [], True: []}
    for _ in range(args.reps):
        for capture in (False, True):
            t0 = time.perf_counter()
            r = generate(model, tok, prompt, capture=capture, **kw)
            times[capture].append(time.perf_counter() - t0)
            assert len(r.token_ids) == args.new_tokens and len(r.routing) == (args.new_tokens if capture else 0)
    plain, cap = statistics.median(times[False]), statistics.median(times[True])
    print(f"model: {what}; {model.config.num_hidden_layers} layers, top-{model.config.num_experts_per_tok} of "
          f"{model.config.num_experts} experts; {args.new_tokens} new tokens, {args.reps} reps, {torch.get_num_threads()} threads")
    print(f"plain generate     median {plain * 1000:8.1f} ms  ({args.new_tokens / plain:,.0f} tokens/s)")
    print(f"with routing       median {cap * 1000:8.1f} ms  ({args.new_tokens / cap:,.0f} tokens/s)")
    print(f"ratio capture/plain: {cap / plain:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
