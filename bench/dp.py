"""DP-SGD throughput: the per-sample loop (before), torch.func vmap (now) and plain training,
in one run, on a random 2-expert model (no workspace needed).

    nice -n 19 env OMP_NUM_THREADS=1 python bench/dp.py [--hidden 64 --layers 2 --batch 16 --seq 64 --steps 4]

Prints tokens/s of each and the two ratios the issue sets targets for: vmap vs the loop
(>= 5x) and plain vs vmap (<= 4x). The model is the owner's [public | own] model with the
public row frozen; the loss is cross-entropy + router z-loss, as in owner training.
"""

from __future__ import annotations

import argparse
import time

import torch

from flexolmo.model.callbacks import train_rows
from flexolmo.model.config import ModelConfig, get_profile, override
from flexolmo.model.losses import WithRouterZLoss
from flexolmo.model.moe import build_model
from flexolmo.model.privacy import DPConfig, DPStep, clip_sample, per_sample_grads
from flexolmo.model.trainer import Trainer


def loop_backward(model, loss_fn, params, x, y, dp: DPConfig, g: torch.Generator) -> None:
    """The DP step before this change: one backward per window, clip, sum, noise."""
    summed = [torch.zeros_like(p) for p in params]
    for grads, _ in per_sample_grads(model, loss_fn, params, x, y, [0]):
        for s, c in zip(summed, clip_sample(grads, dp.max_grad_norm)[0]):
            s.add_(c)
    for p, s in zip(params, summed):
        noise = torch.randn(s.shape, generator=g) * dp.noise_multiplier * dp.max_grad_norm
        noise[0] = 0
        p.grad = (s + noise) / x.size(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    shape = ModelConfig(hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_layers=a.layers, num_heads=4,
                        num_kv_heads=4, max_seq_len=max(64, a.seq))
    model = build_model(shape.hf_config(vocab_size=a.vocab, eos_id=0, pad_id=1, num_experts=2, top_k=2), seed=0)
    params, frozen = train_rows(model, frozen=[0])
    cfg = override(get_profile("tiny").expert, batch_size=a.batch, seq_len=a.seq)
    loss_fn = WithRouterZLoss(model, cfg.router_z_loss)
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(2, a.vocab, (a.batch, a.seq), generator=g),
                torch.randint(2, a.vocab, (a.batch, a.seq), generator=g)) for _ in range(a.steps + 1)]
    step = DPStep(dp, params, frozen_rows=[0], z_coef=cfg.router_z_loss)
    tr = Trainer(model, params, cfg, torch.zeros(10, dtype=torch.long), callbacks=[step, frozen], loss_fn=loss_fn)

    def plain(x, y):
        loss_fn(model, x, y).backward()

    runs = {"plain": plain, "dp_vmap": lambda x, y: step.backward(tr, x, y),
            "dp_loop": lambda x, y: loop_backward(model, loss_fn, params, x, y, dp, g)}
    tok_s = {}
    for name, fn in runs.items():
        fn(*batches[0])  # warm-up
        tr.opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for x, y in batches[1:]:
            fn(x, y)
            tr.opt.step()
            tr.opt.zero_grad(set_to_none=True)
        tok_s[name] = a.steps * a.batch * a.seq / (time.perf_counter() - t0)
    print(f"model: hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, 2 experts; batch {a.batch} x {a.seq} tokens, "
          f"{a.steps} steps, torch threads {torch.get_num_threads()}")
    for name, v in tok_s.items():
        print(f"{name:8s} {v:10,.0f} tokens/s")
    print(f"dp_vmap / dp_loop = {tok_s['dp_vmap'] / tok_s['dp_loop']:.1f}x faster (target >= 5x)")
    print(f"plain / dp_vmap   = {tok_s['plain'] / tok_s['dp_vmap']:.2f}x slower (target <= 4x)")


if __name__ == "__main__":
    main()
