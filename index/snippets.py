"""Token windows as text, cut only between characters.

A window of a document is cut at token boundaries, but the byte-level BPE can split one
multi-byte UTF-8 character over two tokens: decoding such a window puts U+FFFD where the
cut fell. Here a window is decoded from its bytes, the partial character at either end is
dropped, and the marked part (the match) is moved onto character boundaries, so no
character is ever split:

    text, (a, b) = marked(tok, left_ids, match_ids, right_ids)   # text[a:b] is the match
"""

from __future__ import annotations

import weakref
from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
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


_TABLES: "weakref.WeakKeyDictionary[object, list[bytes]]" = weakref.WeakKeyDictionary()


def token_bytes(tok) -> list[bytes]:
    """The raw bytes of every token id of a byte-level BPE tokenizer (transformers' or tokenizers'),
    built once per tokenizer object (asking a tokenizer for its vocabulary costs milliseconds: a
    trace decodes hundreds of windows)."""
    table = _TABLES.get(tok)
    if table is None:
        dec = _byte_decoder()
        vocab = tok.get_vocab()
        table = [b""] * (max(vocab.values()) + 1)
        for piece, i in vocab.items():
            try:
                table[i] = bytes(dec[c] for c in piece)
            except KeyError:  # a special token such as <|endoftext|>: its own text
                table[i] = piece.encode("utf-8")
        _TABLES[tok] = table
    return table


def _is_cont(b: int) -> bool:
    return 0x80 <= b <= 0xBF


def _seq_len(b: int) -> int:
    return 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1


def _start(data: bytes, i: int, limit: int) -> int:
    """The first character boundary at or after i (at most 3 bytes on, never past limit)."""
    j = i
    while j < min(limit, i + 3) and _is_cont(data[j]):
        j += 1
    return j


def _end(data: bytes) -> int:
    """len(data) minus an incomplete character at its end."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if not _is_cont(b):
            return len(data) - back if _seq_len(b) > back else len(data)
    return len(data)


def marked(tok, left: Sequence[int], mid: Sequence[int], right: Sequence[int]) -> tuple[str, tuple[int, int]]:
    """Decode left + mid + right as one text cut between characters, and the character range
    of `mid` in it (moved onto character boundaries when a token split a character)."""
    table = token_bytes(tok)
    lb, mb, rb = (b"".join(table[i] for i in ids) for ids in (left, mid, right))
    data = lb + mb + rb
    end = _end(data)
    s = _start(data, 0, end)
    a = max(s, min(_start(data, len(lb), end), end))
    b = max(a, min(_start(data, len(lb) + len(mb), end), end))
    dec = lambda x: x.decode("utf-8", errors="replace")  # noqa: E731  invalid bytes *inside* the source text stay visible
    head, body, tail = dec(data[s:a]), dec(data[a:b]), dec(data[b:end])
    return head + body + tail, (len(head), len(head) + len(body))


def decode(tok, ids: Sequence[int]) -> str:
    """Ids as text with a character split at either end dropped."""
    return marked(tok, [], ids, [])[0]
