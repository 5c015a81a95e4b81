"""`flexolmo tokenizer ...`: the shared tokenizer (trained here, or imported from a Hugging Face folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flexolmo.base import tokenizer as lib

from .common import console, ws

app = typer.Typer(help="The shared tokenizer (trained on the public source only).", no_args_is_help=True)


@app.command("train")
def train(
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size (up to 65535 the indexes store u16 ids, u32 beyond).")] = lib.DEFAULT_VOCAB,
    source: Annotated[str, typer.Option(help="The public source to learn from.")] = "public",
    force: Annotated[bool, typer.Option(help="Retrain even if the public source has not changed.")] = False,
    whitespace_runs: Annotated[bool, typer.Option(
        help="Add tokens for runs of 2-16 spaces and 2-4 tabs (code and math: -21% and -8% tokens). "
             "Changes the vocabulary: the public model and every index must then be rebuilt. "
             "Helps only if the public text has indentation (docs/eval-diagnosis.md, run F).")] = False,
) -> None:
    """Train the shared tokenizer on the public source's train split."""
    info = lib.train_tokenizer(ws(), vocab_size=vocab_size, source=source, force=force, whitespace_runs=whitespace_runs)
    console.print(f"tokenizer: {info.vocab_size:,} ids, {info.n_bow:,} begin a word, trained on {info.source} "
                  f"in {info.seconds:.1f}s -> {info.path}")


@app.command("show")
def show() -> None:
    """Show the tokenizer card."""
    info = lib.tokenizer_info(ws())
    console.print(info)


@app.command("import")
def import_(
    folder: Annotated[str, typer.Argument(help="A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json), "
                                               "or a workspace's tokenizer/ folder (with card.json).")],
    force: Annotated[bool, typer.Option(help="Replace a different tokenizer (its indexes must then be rebuilt).")] = False,
) -> None:
    """Bring in a tokenizer: the shared one (e.g. on an owner's machine, checked against its card)
    or any Hugging Face tokenizer folder (eos, pad, word starts and delimiters derived from it)."""
    from flexolmo.base.artifacts import tokenizer as artifact

    w = ws()
    info = lib.import_tokenizer(w, Path(folder), force=force)
    card = artifact.read(w)
    console.print(f"tokenizer {info.sha256[:12]}: {info.vocab_size:,} ids ({lib.ids_dtype(info.vocab_size)} in indexes), "
                  f"{info.n_bow:,} begin a word, {card.n_delimiter_ids:,} delimiters, eos {card.eos_token!r} "
                  f"-> {info.path}")
    if card.pad_note:
        console.print(f"note: {card.pad_note}")
