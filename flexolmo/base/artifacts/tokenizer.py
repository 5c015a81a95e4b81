"""The tokenizer artifact: `<workspace>/tokenizer/` (tokenizer.json, bow_ids.txt,
delimiter_ids.txt, card.json).

Inputs: `source` (the public source's content hash) and `settings` (the vocabulary size
asked for); a tokenizer trained on given texts (tests) records `texts` instead of `source`,
and one imported from a plain Hugging Face folder records `tokenizer_json` (its sha256).
flexolmo/base/tokenizer.py trains and imports it; this module owns its files and its card.
A tokenizer written before delimiter_ids.txt existed has none: readers derive the ids from
tokenizer.json (`flexolmo.base.tokenizer.read_delimiter_ids`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer

from flexolmo.base.errors import IntegrityError
from flexolmo.base.workspace import Workspace, atomic_dir, file_sha256
from flexolmo.base.artifacts.card import Card, Inputs, sha256_json

TOKENIZER_FILE = "tokenizer.json"
BOW_FILE = "bow_ids.txt"
DELIM_FILE = "delimiter_ids.txt"


class TokenizerCard(Card):
    KIND = "tokenizer"
    REBUILD = "flexolmo tokenizer train --force"

    kind: Literal["tokenizer"] = "tokenizer"
    algorithm: str = "byte-level BPE (HF tokenizers)"
    vocab_size: int
    eos_token: str
    eos_id: int
    pad_token: str
    pad_id: int
    trained_on: str
    n_texts: int
    n_bow_ids: int
    bow_rule: str = "decoded token starts with whitespace"
    files: dict[str, str]  # file name -> sha256
    seconds: float
    whitespace_runs: dict[str, list[int]] = {}  # run lengths of spaces / tabs with a token of their own (none: {})
    style: str = "byte_level"  # byte_level (Ġ) | metaspace (SentencePiece ▁): flexolmo/base/pieces.py
    n_delimiter_ids: int | None = None  # None: written before delimiter_ids.txt existed
    delimiter_rule: str = "token text holds a newline, or is '.'"
    imported_from: str | None = None  # a plain Hugging Face folder this tokenizer was imported from
    pad_note: str | None = None  # e.g. the folder named no pad token, so pad = eos

    @property
    def sha256(self) -> str:
        """The tokenizer's identity: sha256 of tokenizer.json (other artifacts' `tokenizer` input)."""
        return self.files[TOKENIZER_FILE]

def folder(ws: Workspace) -> Path:
    return ws.tokenizer_dir


def inputs_for(source_content_hash: str, settings: dict) -> Inputs:
    """`settings`: {"vocab_size": n}, plus "whitespace_runs" when asked for (a tokenizer without
    them keeps the hash it had before the option existed)."""
    return {"source": source_content_hash, "settings": sha256_json(settings)}


def texts_inputs(texts: list[str], settings: dict) -> Inputs:
    return {"texts": sha256_json(texts), "settings": sha256_json(settings)}


def read(ws: Workspace) -> TokenizerCard:
    return TokenizerCard.read(folder(ws))


def write(ws: Workspace, tok: Tokenizer, bow: list[int], card: dict, check_text: str,
          delims: list[int] | None = None) -> TokenizerCard:
    """Write the tokenizer atomically: temp folder, verify (loads, round-trips `check_text`), rename.

    :param card: the card's fields except `files`
    :param delims: the delimiter ids (delimiter_ids.txt)
    """
    with atomic_dir(folder(ws)) as tmp:
        tok.save(str(tmp / TOKENIZER_FILE))
        (tmp / BOW_FILE).write_text("".join(f"{i}\n" for i in bow))
        names = [TOKENIZER_FILE, BOW_FILE]
        if delims is not None:
            (tmp / DELIM_FILE).write_text("".join(f"{i}\n" for i in delims))
            names.append(DELIM_FILE)
            card = {**card, "n_delimiter_ids": len(delims)}
        full = TokenizerCard(**card, files={f: file_sha256(tmp / f) for f in names})
        full.save(tmp)
        check = Tokenizer.from_file(str(tmp / TOKENIZER_FILE))
        if check_text and check.decode(check.encode(check_text).ids) != check_text:
            raise IntegrityError("the tokenizer does not round-trip its own check text; this is a bug")
    return full
