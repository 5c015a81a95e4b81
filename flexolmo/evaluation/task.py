"""A cheap task measure: next-line exact match on code.

From the code source's validation documents, `n_lines` lines (seeded; at least 8 visible
characters, not a document's first line) are each given with up to `context_tokens` tokens
of the text before them, up to but not including the newline that ends the previous line:
this byte-level BPE merges a newline with the next line's indentation into one token, so a
context ending in a bare newline would be one the model never saw. The model decodes
greedily (at most `max_new_tokens` tokens) until the text after that first newline holds a
second one, and the line counts when the decoded line equals the true one (leading and
trailing whitespace ignored). A code model should complete `return x` or
`self.assertEqual(` lines; a model that never saw code rarely does.
"""

from __future__ import annotations

import inspect
import random
from typing import Callable

import torch

from flexolmo.base.errors import InputError
from flexolmo.model.device import model_device
from flexolmo.model.moe import as_module
from flexolmo.base.sources import load_documents
from flexolmo.base.tokenizer import load_tokenizer
from flexolmo.base.workspace import Workspace

WHAT = ("next-line exact match on code: greedy completion of a held-out line of the code source's validation "
        "documents from the text before it; exact match of the stripped line")


def task_lines(ws: Workspace, source: str, n_lines: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text before the line, the line) pairs from `source`'s validation documents."""
    texts = load_documents(ws, source, split="validation", columns=["text"]).column("text").to_pylist()
    cands = []
    for t in texts:
        lines = t.split("\n")
        pos = 0
        for i, line in enumerate(lines):
            if i > 0 and len(line.strip()) >= 8:
                cands.append((t[:pos - 1], line))  # the text before the line, without its newline
            pos += len(line) + 1
    if not cands:
        raise InputError(f"source {source!r} has no validation lines for the task")
    random.Random(seed).shuffle(cands)
    return cands[:n_lines]


@torch.no_grad()
def complete_line(model, tok, prefix_ids: list[int], max_new_tokens: int) -> str:
    """Greedy decoding with the KV cache of the line after the prefix's end: the text between
    the first newline generated and the next one."""
    module = as_module(model)
    module.eval()
    device = model_device(module)
    # transformers 5.x renames past_key_values to cache (the old name goes in 5.40)
    kw = "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"
    out = module(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True)
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
        if tok.decode(new).count("\n") >= 2:
            break
        past = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        out = module(input_ids=torch.tensor([[nxt]], device=device), use_cache=True, **{kw: past})
    text = tok.decode(new)
    return text.split("\n")[1] if "\n" in text else ""


def next_line_task(ws: Workspace, models: dict, *, source: str = "code", n_lines: int = 100, context_tokens: int = 128,
                   max_new_tokens: int = 48, log: Callable[[str], None] = print) -> dict:
    """Exact-match rate of every model; {"name", "what", "lines", "rows": {row: {"exact_match": rate}}}."""
    tok = load_tokenizer(ws)
    pairs = task_lines(ws, source, n_lines)
    prefixes = []
    for before, _ in pairs:
        ids = tok(before, add_special_tokens=False)["input_ids"][-context_tokens:]
        prefixes.append(ids or [tok.eos_token_id])
    rows = {}
    for name, model in models.items():
        hits = sum(complete_line(model, tok, ids, max_new_tokens).strip() == line.strip()
                   for ids, (_, line) in zip(prefixes, pairs))
        rows[name] = {"exact_match": round(hits / len(pairs), 4)}
        log(f"{'task ' + name:>16}: {hits}/{len(pairs)} next lines exact")
    return {"name": "next-line exact match (code)", "what": WHAT, "lines": len(pairs), "rows": rows}
