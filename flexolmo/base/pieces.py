"""The raw text of every token id, for the two tokenizer families the project reads.

    style(tok)            "byte_level" (GPT-2's byte alphabet: Ġ = space, Ċ = newline)
                          or "metaspace" (SentencePiece: ▁ = space, <0x0A> byte fallback)
    token_bytes(tok)      list: id -> the bytes the token stands for inside a text
    token_texts(tok)      list: id -> those bytes as text (a partial UTF-8 character: U+FFFD)
    word_start_ids(tok)   ids whose text begins with whitespace, plus the special tokens
    delimiter_ids(tok)    ids whose text holds a newline, and the id of '.'

`tok` is a `tokenizers.Tokenizer` or a transformers fast tokenizer (its `backend_tokenizer`).
A token's text here is what it adds *inside* a text: decoding one token alone would strip
a SentencePiece token's leading space (the Metaspace decoder drops it at the start), which
is exactly the space that says the token begins a word.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from flexolmo.base.errors import InputError

BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
METASPACE = "▁"


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable stand-in of each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def backend(tok):
    """The `tokenizers.Tokenizer` behind `tok` (itself, or a transformers tokenizer's backend)."""
    return getattr(tok, "backend_tokenizer", tok)


def _types(node) -> set[str]:
    """Every component `type` named in a tokenizer.json section (Sequences included)."""
    out: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            out.add(node["type"])
        for v in node.values():
            out |= _types(v)
    elif isinstance(node, list):
        for v in node:
            out |= _types(v)
    return out


def style(tok) -> str:
    """'byte_level' or 'metaspace'; InputError for a tokenizer of neither family."""
    spec = json.loads(backend(tok).to_str())
    kinds = _types(spec.get("pre_tokenizer")) | _types(spec.get("decoder"))
    if "ByteLevel" in kinds:
        return "byte_level"
    if "Metaspace" in kinds or any(METASPACE in piece for piece in backend(tok).get_vocab()):
        return "metaspace"
    raise InputError("the tokenizer is neither a byte-level BPE (GPT-2 byte alphabet, ByteLevel) nor "
                     "SentencePiece-style (Metaspace '▁'): word starts cannot be derived from its tokens")


def _special_ids(tok) -> set[int]:
    return {i for i, t in backend(tok).get_added_tokens_decoder().items() if t.special}


def token_bytes(tok) -> list[bytes]:
    """The bytes each token id stands for inside a text (special tokens: their own text)."""
    raw = backend(tok)
    vocab = raw.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values()) + 1)
    special = _special_ids(tok)
    kind = style(tok)
    dec = byte_decoder()
    for piece, i in vocab.items():
        if i in special:
            table[i] = piece.encode("utf-8")
        elif kind == "byte_level":
            try:
                table[i] = bytes(dec[c] for c in piece)
            except KeyError:  # an added token outside the byte alphabet: its own text
                table[i] = piece.encode("utf-8")
        else:
            m = BYTE_FALLBACK.match(piece)
            table[i] = bytes([int(m.group(1), 16)]) if m else piece.replace(METASPACE, " ").encode("utf-8")
    return table


def token_texts(tok) -> list[str]:
    return [b.decode("utf-8", errors="replace") for b in token_bytes(tok)]


def word_start_ids(tok, texts: list[str] | None = None) -> list[int]:
    """Ids that begin a word: their text starts with whitespace (Ġ, Ċ, ĉ, ▁, <0x0A>, ...),
    plus the special tokens (infini-gram's `bow` file for `enforce_bow`).

    :param texts: `token_texts(tok)`, when the caller has them already
    """
    special = _special_ids(tok)
    return sorted(i for i, t in enumerate(texts or token_texts(tok)) if t[:1].isspace() or i in special)


def delimiter_ids(tok, texts: list[str] | None = None) -> list[int]:
    """Ids of every token whose text holds a newline, and of '.' (OLMoTrace cuts spans at
    newline and '.' tokens; a byte-level BPE merges a newline with indentation, "\\n    ")."""
    special = _special_ids(tok)
    return sorted(i for i, t in enumerate(texts or token_texts(tok)) if i not in special and ("\n" in t or t == "."))
