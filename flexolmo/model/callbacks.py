"""The Trainer's callbacks (flexolmo/model/trainer.py): frozen rows, progress, checkpoint/resume,
early stop. DP-SGD's `DPStep` lives with the privacy code (flexolmo/model/privacy.py).

    params, frozen = train_rows(model, frozen=[0])                 # an owner's expert
    params, frozen = train_rows(model, frozen=[0, 3], routers_only=True)   # router tuning
"""

from __future__ import annotations

import sys

import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flexolmo.model import distributed
from flexolmo.model.layout import fused_params, router_params
from flexolmo.model.moe import as_module, load_model, save_model
from flexolmo.model.trainer import Callback, Trainer
from flexolmo.base.workspace import Workspace, atomic_dir


class FrozenRows(Callback):
    """Rows (expert indices) of fused tensors that must not change: their gradient is masked,
    and after each step they are restored bit for bit (belt and braces: AdamW's weight decay
    and a noise step would move them otherwise); every router bias is clamped to <= 0."""

    order = -20

    def __init__(self, params: list[torch.nn.Parameter], rows: list[int]):
        self.params, self.rows = params, torch.tensor(sorted(set(rows)), dtype=torch.long, device=params[0].device)
        self.saved = [p.detach()[self.rows].clone() for p in params]
        self.masks = []
        for i, p in enumerate(params):
            mask = torch.ones_like(p)
            mask[self.rows] = 0
            self.masks.append(mask)
            p.register_hook(lambda g, i=i: g * self.masks[i])

    def pre_train(self, tr: Trainer) -> None:
        # the Trainer moves the model to its device: the masks and the saved rows follow it
        device = self.params[0].device
        self.rows = self.rows.to(device)
        self.saved, self.masks = [s.to(device) for s in self.saved], [m.to(device) for m in self.masks]

    @torch.no_grad()
    def post_step(self, tr: Trainer) -> None:
        for p, s in zip(self.params, self.saved):
            p[self.rows] = s
            if p.ndim == 1:  # the router bias (E,)
                p.clamp_(max=0.0)


def train_rows(model, frozen: list[int], routers_only: bool = False) -> tuple[list[torch.nn.Parameter], FrozenRows]:
    """Make the fused tensors (or only the routers) trainable, everything else frozen
    (`requires_grad=False`); rows `frozen` stay fixed. Returns (params, the callback)."""
    module = as_module(model)
    params = router_params(module) if routers_only else fused_params(module)
    train = {id(p) for p in params}
    for p in module.parameters():
        p.requires_grad_(id(p) in train)
    return params, FrozenRows(params, frozen)


class Progress(Callback):
    """The loss and tokens/s (rank 0 only): a tqdm bar on a terminal; written to a file or a
    pipe (a captured log), one line at each quarter of the run instead of a redrawn bar."""

    order = 0
    LOG_LINES = 4

    def __init__(self, name: str, enabled: bool = True):
        self.name, self.enabled, self.bar, self.log = name, enabled, None, False

    def pre_train(self, tr: Trainer) -> None:
        on = self.enabled and tr.d.is_main
        self.log = on and not sys.stderr.isatty()
        self.bar = tqdm(total=tr.cfg.steps, initial=tr.step, desc=self.name, dynamic_ncols=True,
                        disable=not on or self.log)

    def post_step(self, tr: Trainer) -> None:
        self.bar.set_postfix(loss=f"{tr.last_loss:.3f}", tok_s=f"{tr.tokens_per_s:,.0f}")
        self.bar.update(1)
        every = max(1, tr.cfg.steps // self.LOG_LINES)
        if self.log and (tr.step % every == 0 or tr.step == tr.cfg.steps):
            print(f"{self.name}: step {tr.step}/{tr.cfg.steps}, loss {tr.last_loss:.3f}, "
                  f"{tr.tokens_per_s:,.0f} tokens/s", file=sys.stderr, flush=True)

    def post_train(self, tr: Trainer) -> None:
        self.bar.close()


class EarlyStop(Callback):
    """Stop after step `after` (an interruption, in tests); the FitResult says why it stopped."""

    order = -10

    def __init__(self, after: int | None):
        self.after = after

    def post_step(self, tr: Trainer) -> None:
        if self.after is not None and tr.step == self.after and tr.step < tr.cfg.steps:
            tr.stop_reason = f"stopped after step {tr.step} (stop_after)"


class Checkpoint(Callback):
    """Resume state in `runs/<name>/`: the model (an HF folder) and `state.pt`, a plain dict
    (optimizer, step, config, RNG, losses). Saved every `checkpoint_every` steps and when the
    run stops early; restored by a run with the same `run_config` and world size."""

    order = 10

    def __init__(self, ws: Workspace, name: str, run_config: dict):
        self.dir: Path = ws.root / "runs" / name
        self.run_config = run_config

    def pre_train(self, tr: Trainer) -> None:
        if not (self.dir / "state.pt").exists():
            return
        # onto the CPU: a run saved on a GPU resumes anywhere (load_state_dict moves the
        # optimizer's state to its parameters' device)
        state = torch.load(self.dir / "state.pt", weights_only=False, map_location="cpu")
        if state["config"] != self.run_config or state["world_size"] != tr.d.world_size:
            return  # another run's state: start afresh (it is replaced at the first checkpoint)
        tr.model.load_state_dict(load_model(self.dir / "model").module.state_dict())
        tr.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        tr.step, tr.losses, tr.tokens, tr.seconds = state["step"], state["losses"], state["tokens"], state["seconds"]
        tr.resumed_from = tr.step

    def post_step(self, tr: Trainer) -> None:
        every = tr.cfg.checkpoint_every
        if (every and tr.step % every == 0 and tr.step < tr.cfg.steps) or tr.stop_reason is not None:
            self.save(tr)

    def save(self, tr: Trainer) -> None:
        if tr.d.is_main:
            with atomic_dir(self.dir) as tmp:
                save_model(tr.model, tmp / "model")
                state = {"optimizer": tr.opt.state_dict(), "step": tr.step, "config": self.run_config,
                         "rng": {"torch": torch.get_rng_state()}, "losses": tr.losses, "tokens": tr.tokens,
                         "seconds": tr.seconds, "world_size": tr.d.world_size}
                torch.save(state, tmp / "state.pt")
        distributed.barrier(tr.d)

    def clear(self) -> None:
        """Remove the resume state (once the run's artifact is written)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def standard_callbacks(ws: Workspace, name: str, run_config: dict, progress: bool,
                       stop_after: int | None) -> tuple[list[Callback], Checkpoint]:
    """Progress, checkpoint/resume and early stop, as every recipe uses them."""
    ckpt = Checkpoint(ws, name, run_config)
    return [Progress(name, progress), ckpt, EarlyStop(stop_after)], ckpt
