"""`flexolmo demo`: the whole pipeline on the sample federation, step by step."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from flexolmo import tokenizer as tok_lib

from .common import console, ws
from .data import build_and_report


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size.")] = tok_lib.DEFAULT_VOCAB,
) -> None:
    """Build the sample federation and its shared tokenizer, then print a summary."""
    t0 = time.time()
    console.rule("1. sample sources")
    results = build_and_report()
    missing = [r for r in results if not r.ok]
    if missing:
        console.print(f"[yellow]{len(missing)} sample source(s) missing; run `make data-deps` and retry[/]")
    console.rule("2. shared tokenizer (public source only)")
    info = tok_lib.train_tokenizer(ws(), vocab_size=vocab_size)
    console.print(f"{info.vocab_size:,} ids ({info.n_bow:,} begin a word), trained in {info.seconds:.1f}s")
    console.rule(f"done in {time.time() - t0:.0f}s; workspace {ws().root}")
