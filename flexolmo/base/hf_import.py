"""A plain Hugging Face tokenizer folder brought in as the workspace's (index) tokenizer.

    flexolmo tokenizer import path/to/hf-folder      # tokenizer.json + tokenizer_config.json

The folder is what `save_pretrained` writes (or what a model repository ships): tokenizer.json,
and tokenizer_config.json and/or special_tokens_map.json naming the special tokens. From it
this module reads the eos and pad tokens (no pad: pad = eos, and the card says so), derives
the word-start ids and the delimiter ids from the tokens themselves (flexolmo/base/pieces.py:
byte-level BPE `Ġ`/`Ċ`/..., SentencePiece `▁` and `<0x0A>`), and hands back the card fields;
`flexolmo.base.tokenizer.import_tokenizer` writes the folder. A folder it cannot use is
refused with what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from flexolmo.base import pieces
from flexolmo.base.errors import InputError

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Imported:
    tok: Tokenizer
    bow: list[int]
    delims: list[int]
    card: dict  # TokenizerCard fields except inputs and files


def _config(folder: Path) -> dict:
    """The special-token settings of the folder: tokenizer_config.json over special_tokens_map.json."""
    out: dict = {}
    for name in reversed(CONFIG_FILES):
        p = folder / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"{p} does not parse as JSON ({getattr(e, 'msg', e)}); fix or remove it") from None
            if isinstance(data, dict):
                out.update({k: v for k, v in data.items() if v is not None})
    return out


def _token(value) -> str | None:
    """A special token as the config names it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_folder(folder: Path, max_vocab: int) -> Imported:
    """Load and check a plain HF tokenizer folder; InputError says why one cannot be used.

    :param max_vocab: the most ids an index can hold (u32 ids, one value kept for the separator)
    """
    path = folder / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type
        raise InputError(f"{folder} is not a tokenizer folder: tokenizer.json does not load ({str(e)[:200]})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    if not vocab:
        raise InputError(f"{folder}: tokenizer.json has an empty vocabulary")
    size = max(vocab.values()) + 1
    if size > max_vocab:
        raise InputError(f"{folder}: {size:,} ids; an index holds at most {max_vocab:,} (u32 ids)")
    cfg = _config(folder)
    if not any((folder / n).is_file() for n in CONFIG_FILES):
        raise InputError(f"{folder} has no {' or '.join(CONFIG_FILES)}, so its eos token is unknown; save the "
                         "tokenizer with `save_pretrained` (or add tokenizer_config.json with \"eos_token\")")
    eos = _token(cfg.get("eos_token"))
    if eos is None:
        raise InputError(f"{folder}: no eos token ({' and '.join(CONFIG_FILES)} name no \"eos_token\"); "
                         "add one: documents are separated by it")
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise InputError(f"{folder}: the eos token {eos!r} is not in tokenizer.json's vocabulary")
    pad = _token(cfg.get("pad_token"))
    note = None
    if pad is None or tok.token_to_id(pad) is None:
        note = ("the folder names no pad token: pad = eos" if pad is None
                else f"the pad token {pad!r} is not in the vocabulary: pad = eos")
        pad = eos
    style = pieces.style(tok)
    texts = pieces.token_texts(tok)
    bow, delims = pieces.word_start_ids(tok, texts), pieces.delimiter_ids(tok, texts)
    if len(bow) <= len(tok.get_added_tokens_decoder()):
        raise InputError(f"{folder}: no token begins a word (no {'Ġ' if style == 'byte_level' else '▁'} tokens); "
                         "spans could not be cut at word boundaries")
    card = dict(algorithm=f"imported Hugging Face tokenizer ({tok.model.__class__.__name__}, {style})",
                vocab_size=size, eos_token=eos, eos_id=eos_id, pad_token=pad, pad_id=tok.token_to_id(pad),
                trained_on=f"imported from {folder}", n_texts=0, n_bow_ids=len(bow), seconds=0.0,
                bow_rule="token text starts with whitespace (Ġ Ċ ▁ <0x0A> ...), or a special token",
                style=style, imported_from=str(folder), pad_note=note)
    return Imported(tok, bow, delims, card)
