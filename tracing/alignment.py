"""A response in two tokenizations, lined up by characters: the index's (spans are searched on
its ids, documents decode with it) and the model's (routing share and counterfactuals are
computed on its ids).

OLMoTrace does the same: it indexes OLMo 2's data with the Llama-2 tokenizer and re-tokenizes
the response text with it. Here a span [l, r) of index ids covers the characters
[offsets[l].start, offsets[r - 1].end) of the response; its model tokens are those whose own
character range overlaps that. When the model shares the index tokenizer there is no
`Alignment` at all: nothing is re-tokenized and a span's model tokens are its own tokens.

    align = Alignment.of_text(index_tok, model_tok, response, prompt)
    align = Alignment.of_generated(index_tok, model_tok, response, generated_ids, prompt_ids)
    align.chars(l, r)            # (char_start, char_end) of index ids [l, r)
    align.model_range(cs, ce)    # model tokens [a, b) over those characters
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Offsets = list[tuple[int, int]]


def encode(tok, text: str) -> tuple[list[int], Offsets]:
    """ids and the character range of each, no special tokens (a fast tokenizer's offset mapping)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def decoded_offsets(tok, ids: list[int], text: str) -> Offsets:
    """Character ranges of given ids in `text` = tok.decode(ids): from the tokenizer's own offsets
    when re-encoding the text gives the same ids, else by decoding growing prefixes."""
    again, offsets = encode(tok, text)
    if again == list(ids):
        return offsets
    out, prev = [], 0
    for j in range(len(ids)):
        end = min(len(tok.decode(ids[: j + 1])), len(text))
        out.append((prev, end))
        prev = end
    return out


@dataclass(frozen=True)
class Alignment:
    response: str
    ids: list[int]  # the index tokenizer's ids of the response
    offsets: Offsets  # character range of each
    model_ids: list[int]  # the model tokenizer's ids of the response
    model_offsets: Offsets
    prompt_model_ids: list[int]

    @classmethod
    def of_text(cls, index_tok, model_tok, response: str, prompt: str | None) -> "Alignment":
        """A pasted response (and its prompt), tokenized by both tokenizers."""
        ids, offsets = encode(index_tok, response)
        model_ids, model_offsets = encode(model_tok, response)
        prompt_ids = encode(model_tok, prompt)[0] if prompt else []
        return cls(response, ids, offsets, model_ids, model_offsets, prompt_ids)

    @classmethod
    def of_generated(cls, index_tok, model_tok, response: str, model_ids: list[int],
                     prompt_model_ids: list[int]) -> "Alignment":
        """A response the model generated (its ids as generated, `response` their decoding)."""
        ids, offsets = encode(index_tok, response)
        return cls(response, ids, offsets, list(model_ids), decoded_offsets(model_tok, model_ids, response),
                   list(prompt_model_ids))

    def chars(self, l: int, r: int) -> tuple[int, int]:
        """Characters [start, end) of the index ids [l, r)."""
        return self.offsets[l][0], self.offsets[r - 1][1]

    def model_range(self, char_start: int, char_end: int) -> tuple[int, int]:
        """Model tokens [a, b) whose characters overlap [char_start, char_end) (a == b: none)."""
        if not self.model_offsets:
            return 0, 0
        mo = np.asarray(self.model_offsets, dtype=np.int64).reshape(-1, 2)
        hit = np.flatnonzero((mo[:, 0] < char_end) & (mo[:, 1] > char_start))
        return (int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, 0)
