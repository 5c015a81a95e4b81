"""Training throughput and model FLOP utilisation (MFU) of the demo shape, in one process.

    .venv/bin/python bench/train_throughput.py [--steps 6] [--quick]

The peak is measured here first (fp32 matmul, 1024^3, all threads), and every variant is a
ratio against it and against the baseline (the Trainer's settings: batch 16 x 256 tokens,
2 threads, eager mode, AdamW foreach, transformers' experts implementation the Trainer picks on the
CPU: flexolmo/model/trainer.py TRAINING_EXPERTS). Variants: threads, experts by transformers' default
(grouped_mm), batch/sequence shape, fused AdamW,
bfloat16 autocast (the Trainer's `--dtype bfloat16`: float32 weights), torch.compile. Model FLOPs per token: 6 x (non-embedding parameters + lm_head) + 12 x
layers x hidden x sequence (attention), the usual estimate; for the owner's 2-expert model
the backward pass still runs through both experts (activations), weights of one only.
Run it alone on the cores: anything else running is measured too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexolmo.model.config import get_profile  # noqa: E402
from flexolmo.model.device import autocast, resolve_dtype  # noqa: E402
from flexolmo.base.hflog import quiet_transformers  # noqa: E402
from flexolmo.model.moe import build_model, experts_implementation  # noqa: E402
from flexolmo.model.trainer import TRAINING_EXPERTS  # noqa: E402

VOCAB = 8192


def peak_gflops(seconds: float = 2.0) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9


def model_flops_per_token(model, seq_len: int) -> float:
    c = model.config
    emb = c.vocab_size * c.hidden_size
    non_emb = sum(p.numel() for p in model.parameters()) - emb  # lm_head counts: it is a matmul
    return 6 * non_emb + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def run(experts: int, batch: int, seq: int, threads: int, fused: bool, compiled: bool, steps: int,
        dtype: str = "float32", impl: str | None = TRAINING_EXPERTS.get("cpu")) -> tuple[float, float]:
    torch.set_num_threads(threads)
    p = get_profile("demo")
    hf = p.model.hf_config(vocab_size=VOCAB, eos_id=0, pad_id=1, num_experts=experts, top_k=2)
    model = build_model(hf, seed=0).train()
    params = list(model.parameters())
    if experts == 2:  # the owner recipe: only the fused expert tensors and the router train
        for n, q in model.named_parameters():
            q.requires_grad_("mlp." in n)
        params = [q for q in params if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=fused or None, foreach=None if fused else True)
    net = torch.compile(model) if compiled else model
    x = torch.randint(0, VOCAB, (batch, seq + 1))

    def step():
        with autocast(torch.device("cpu"), resolve_dtype(dtype)), experts_implementation(model, impl):
            logits = net(input_ids=x[:, :-1], use_cache=False).logits.float()
        F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3 if compiled else 2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    tps = steps * batch * seq / (time.perf_counter() - t0)
    return tps, tps * model_flops_per_token(model, seq) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="baseline, threads, experts implementation, fused AdamW and bfloat16 only")
    a = ap.parse_args()
    quiet_transformers()
    peak = peak_gflops()
    print(f"matmul peak here: {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    variants = [("baseline 16x256, 2 threads", dict(batch=16, seq=256, threads=2, fused=False, compiled=False)),
                ("1 thread", dict(batch=16, seq=256, threads=1, fused=False, compiled=False)),
                ("grouped_mm experts", dict(batch=16, seq=256, threads=2, fused=False, compiled=False, impl="grouped_mm")),
                ("fused AdamW", dict(batch=16, seq=256, threads=2, fused=True, compiled=False)),
                ("bfloat16 autocast", dict(batch=16, seq=256, threads=2, fused=False, compiled=False, dtype="bfloat16"))]
    if not a.quick:
        variants += [("32x128", dict(batch=32, seq=128, threads=2, fused=False, compiled=False)),
                     ("8x256", dict(batch=8, seq=256, threads=2, fused=False, compiled=False)),
                     ("torch.compile", dict(batch=16, seq=256, threads=2, fused=True, compiled=True))]
    for experts, what in ((1, "public model (1 expert, every weight trains)"), (2, "owner model (2 experts, FFN slice + router train)")):
        print(f"\n{what}")
        print(f"{'variant':<28} {'tokens/s':>10} {'GFLOP/s':>9} {'MFU':>6} {'vs baseline':>12}")
        base = None
        for name, kw in variants:
            try:
                tps, gf = run(experts, steps=a.steps, **kw)
            except Exception as e:  # torch.compile may be unavailable (no C compiler): say so, go on
                print(f"{name:<28} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            base = base or tps
            print(f"{name:<28} {tps:>10,.0f} {gf:>9.1f} {gf / peak:>6.0%} {tps / base:>11.2f}x")


if __name__ == "__main__":
    main()
