"""What `flexolmo eval` computes for a profile, on paper: parameters, and FLOPs per stage.

    items = eval_flops(get_profile("gpu"), vocab_size=8192, owners=7)
    seconds(items, tflops=120)          # at 120 TFLOP/s sustained (30% of a 400 TFLOP/s bf16 peak)

A model of N parameters costs 2N FLOPs per token forward and 6N to train (forward 2N +
backward 4N; Kaplan et al. 2020), plus causal attention, 2·L·T·H forward and 6·L·T·H to train
(L layers, T the window, H the width). The owner's model [public | own] runs both experts on
every token (top-2 of 2), so its N is the whole 2-expert model; its frozen weights need no
weight gradients, so 6N is an upper bound for it (about 5.6N here). What the evaluation runs
(flexolmo/evaluation/run.py, every row):

    experts        7 owners' experts, and again for each of the 3 ablations: 28 training runs
    calibration    each run's bias calibration and recalibrations (forward passes over
                   `calibration_windows` windows of public and own text; flexolmo/model/bias.py)
    dense          the public model trained further, 7 x the expert steps
    router tuning  `tune_steps` x 16 x 128 tokens through the merged model, every expert active
    measurement    22 model passes over every domain's validation tokens, and the routing passes

Left out, because they are bound by kernel launches and disk rather than FLOPs: the domain
embeddings (one document per forward pass), merging and loading models, and the next-line task
(greedy decoding, one token per pass). They are what the time left over in the budget is for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexolmo.evaluation.run import ABLATIONS
from flexolmo.model.config import Profile
from flexolmo.model.moe import build_model, num_parameters

TUNE_BATCH, TUNE_SEQ = 16, 128  # flexolmo/model/router_tuning.py's defaults, as the evaluation runs it


@dataclass(frozen=True)
class Stage:
    what: str
    flops: float


def n_params(profile: Profile, vocab_size: int, num_experts: int) -> int:
    """Parameters of the profile's model with `num_experts` experts (built on the meta device:
    shapes only, no memory)."""
    with torch.device("meta"):
        model = build_model(profile.model.hf_config(vocab_size=vocab_size, eos_id=0, pad_id=1, num_experts=num_experts))
    return num_parameters(model)


def _calibration_passes(profile: Profile, calibrated: bool) -> int:
    """Forward passes over one set of calibration windows in one owner's run (flexolmo/model/train.py)."""
    cfg, L = profile.expert, profile.model.num_layers
    if not calibrated:  # a fixed bias: the margin scale, and the routing check at the start and the end
        return 1 + 2 + 2
    tracker = 2 * ((cfg.steps - 1) // cfg.router_bias_every) if cfg.router_bias_every else 0
    return 1 + 2 * L + 2 + tracker + 2 * L + 2  # scale, calibrate, check, recalibrations, final calibration, check


def eval_flops(profile: Profile, vocab_size: int = 8192, owners: int = 7, tokens_per_domain: int = 16_384,
               tune_steps: int = 200) -> list[Stage]:
    """The FLOPs of `flexolmo eval --profile <profile>` (every row) over a federation of one
    public source and `owners` owners, stage by stage (see the module docstring)."""
    m, cfg = profile.model, profile.expert
    n1, n2 = n_params(profile, vocab_size, 1), n_params(profile, vocab_size, 2)
    ffn = n2 - n1  # one expert's FFN, router row and bias
    n_all = n1 + owners * ffn  # the merged model, every expert active (router tuning)
    n_top = n1 + (min(m.top_k, 1 + owners) - 1) * ffn  # the merged model's active parameters per token
    attn = lambda t: 2 * m.num_layers * t * m.hidden_size  # noqa: E731  forward attention FLOPs per token, window t
    runs = owners * (1 + len(ABLATIONS))
    calibrated = owners * (1 + sum(1 for c in ABLATIONS.values() if c.get("router_bias_init") is None))
    expert_tokens = cfg.steps * cfg.tokens_per_step()
    calib_tokens = cfg.calibration_windows * cfg.seq_len
    passes = calibrated * _calibration_passes(profile, True) + (runs - calibrated) * _calibration_passes(profile, False)
    val = (1 + owners) * tokens_per_domain  # validation tokens of every domain
    eval_window = min(256, m.max_seq_len)
    measured = [n1, *[n2] * owners, n2, n1] + [n_top] * (1 + 1 + len(ABLATIONS) + owners)  # run.py's rows
    routing = [n_top] * (2 + len(ABLATIONS))  # the merged rows' routing passes
    return [
        Stage(f"experts: {runs} runs x {expert_tokens:,} tokens x 6 x {n2:,}",
              runs * expert_tokens * (6 * n2 + 3 * attn(cfg.seq_len))),
        Stage(f"calibration: {passes} passes x {calib_tokens:,} tokens x 2 x {n2:,}",
              passes * calib_tokens * (2 * n2 + attn(cfg.seq_len))),
        Stage(f"dense: {owners * expert_tokens:,} tokens x 6 x {n1:,}",
              owners * expert_tokens * (6 * n1 + 3 * attn(cfg.seq_len))),
        Stage(f"router tuning: {tune_steps * TUNE_BATCH * TUNE_SEQ:,} tokens x 6 x {n_all:,}",
              tune_steps * TUNE_BATCH * TUNE_SEQ * (6 * n_all + 3 * attn(TUNE_SEQ))),
        Stage(f"measurement: {len(measured) + len(routing)} passes x {val:,} tokens x 2N",
              val * sum(2 * n + attn(eval_window) for n in measured + routing)),
    ]


def seconds(stages: list[Stage], tflops: float) -> float:
    """Time for `stages` at a sustained `tflops` TFLOP/s."""
    return sum(s.flops for s in stages) / (tflops * 1e12)
