"""Token windows as text, cut only between characters.

A window of a document is cut at token boundaries, but a byte-level BPE can split one
multi-byte UTF-8 character over two tokens: decoding such a window puts U+FFFD where the
cut fell. Here a window is decoded from its bytes, the partial character at either end is
dropped, and the marked part (the match) is moved onto character boundaries, so no
character is ever split:

    text, (a, b) = marked(tok, left_ids, match_ids, right_ids)   # text[a:b] is the match
"""

from __future__ import annotations

import weakref
from typing import Sequence

from flexolmo.base import pieces

_TABLES: "weakref.WeakKeyDictionary[object, list[bytes]]" = weakref.WeakKeyDictionary()


def token_bytes(tok) -> list[bytes]:
    """The raw bytes of every token id (byte-level BPE or SentencePiece-style: flexolmo/base/pieces.py),
    once per tokenizer object: read from the workspace's token_bytes.bin when the tokenizer came
    from `flexolmo.base.tokenizer.load_tokenizer` (milliseconds), else built from the vocabulary
    (about a second for 100k ids)."""
    table = _TABLES.get(tok)
    if table is None:
        stored = getattr(tok, "flexolmo_token_bytes", None)
        table = _TABLES[tok] = (stored() if stored is not None else None) or pieces.token_bytes(tok)
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
