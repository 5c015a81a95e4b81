"""`flexolmo tokenizer ...`: the shared byte-level BPE."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from flexolmo import tokenizer as lib
from flexolmo.artifacts import tokenizer as artifact
from flexolmo.errors import ConflictError, InputError, IntegrityError
from flexolmo.workspace import Workspace, atomic_dir, file_sha256

from .common import console, ws

app = typer.Typer(help="The shared tokenizer (trained on the public source only).", no_args_is_help=True)


@app.command("train")
def train(
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, at most 65535 (u16 index ids).")] = lib.DEFAULT_VOCAB,
    source: Annotated[str, typer.Option(help="The public source to learn from.")] = "public",
    force: Annotated[bool, typer.Option(help="Retrain even if the public source has not changed.")] = False,
) -> None:
    """Train the shared tokenizer on the public source's train split."""
    info = lib.train_tokenizer(ws(), vocab_size=vocab_size, source=source, force=force)
    console.print(f"tokenizer: {info.vocab_size:,} ids, {info.n_bow:,} begin a word, trained on {info.source} "
                  f"in {info.seconds:.1f}s -> {info.path}")


@app.command("show")
def show() -> None:
    """Show the tokenizer card."""
    info = lib.tokenizer_info(ws())
    console.print(info)


@app.command("import")
def import_(
    folder: Annotated[str, typer.Argument(help="A tokenizer folder: tokenizer.json, bow_ids.txt and card.json.")],
    force: Annotated[bool, typer.Option(help="Replace a different tokenizer (its indexes must then be rebuilt).")] = False,
) -> None:
    """Bring in the shared tokenizer (e.g. on an owner's machine), checked against its card."""
    info = import_tokenizer(ws(), Path(folder), force=force)
    console.print(f"tokenizer {info.sha256[:12]}: {info.vocab_size:,} ids, {info.n_bow:,} begin a word -> {info.path}")


def import_tokenizer(w: Workspace, folder: Path, force: bool = False) -> lib.TokenizerInfo:
    """Copy a tokenizer folder into the workspace atomically, after checking it is whole: the card
    reads, tokenizer.json loads and has the card's hash, bow_ids.txt holds ids of its vocabulary."""
    from tokenizers import Tokenizer

    if not (folder / artifact.TOKENIZER_FILE).is_file() or not (folder / artifact.BOW_FILE).is_file():
        raise InputError(f"{folder} is not a tokenizer folder: it needs {artifact.TOKENIZER_FILE}, "
                         f"{artifact.BOW_FILE} and card.json (copy the folder `tokenizer/` of the shared workspace)")
    card = artifact.TokenizerCard.read(folder)  # NotFoundError/OutdatedError say what is wrong
    digest = file_sha256(folder / artifact.TOKENIZER_FILE)
    if digest != card.sha256:
        raise IntegrityError(f"{folder / artifact.TOKENIZER_FILE} has sha256 {digest}, its card says {card.sha256}: "
                             "the folder was altered or mixed up; copy it again")
    if card.files.get(artifact.BOW_FILE) not in (None, file_sha256(folder / artifact.BOW_FILE)):
        raise IntegrityError(f"{folder / artifact.BOW_FILE} does not match its card; copy the folder again")
    try:
        tok = Tokenizer.from_file(str(folder / artifact.TOKENIZER_FILE))
        bow = [int(x) for x in (folder / artifact.BOW_FILE).read_text().split()]
    except Exception as e:  # tokenizers raises its own exception type
        raise InputError(f"{folder} does not load as a tokenizer ({str(e)[:200]})") from None
    if tok.get_vocab_size() != card.vocab_size or tok.get_vocab_size() > lib.MAX_VOCAB \
            or any(not 0 <= i < card.vocab_size for i in bow):
        raise InputError(f"{folder}: vocabulary size or word-start ids disagree with the card (or exceed u16 ids)")
    current = artifact.TokenizerCard.find(artifact.folder(w)) if (artifact.folder(w) / artifact.TOKENIZER_FILE).exists() else None
    if current is not None and lib.tokenizer_hash(w) != digest and not force:
        raise ConflictError(f"this workspace already has another tokenizer ({lib.tokenizer_hash(w)[:12]}, the "
                            f"import is {digest[:12]}); its indexes and models would need rebuilding: pass --force")
    with atomic_dir(artifact.folder(w)) as tmp:
        for name in (artifact.TOKENIZER_FILE, artifact.BOW_FILE):
            shutil.copyfile(folder / name, tmp / name)
        card.save(tmp)
        if file_sha256(tmp / artifact.TOKENIZER_FILE) != digest:
            raise IntegrityError("the copied tokenizer.json differs from the original; nothing was imported")
    return lib.tokenizer_info(w)
