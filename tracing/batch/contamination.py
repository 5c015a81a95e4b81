"""Contamination: which benchmark items appear verbatim in a source's training data.

    m = ItemMatcher.open(ws)
    m.longest("What is the capital of ... ? Paris", min_match=8)
    # {'n_tokens': 14, 'longest': 9, 'longest_source': 'public', 'flagged': True, 'sources': [...]}

ConTAM (Singh et al., 2024) found the *longest* contaminated n-gram of an item, with n = 8 and
a single occurrence, the most predictive of score inflation. Here that is the index's own
longest-match search (`matches`, index/search.py: the longest match and its count at every
position, per source, local or an owner node's) over the item's ids, with word boundaries
enforced and no delimiter cut (a benchmark item's sentence end is no reason to stop a match).
No model is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flexolmo.base import tokenizer as tok_lib
from flexolmo.base.errors import FlexolmoError
from flexolmo.base.workspace import Workspace
from index.engine import Federation
from index.source import check_ids


@dataclass
class ItemMatcher:
    """The federation's indexes and the tokenizer, opened once."""

    fed: Federation
    tokenizer: object
    bow: np.ndarray

    @classmethod
    def open(cls, ws: Workspace) -> "ItemMatcher":
        fed = Federation.open(ws, strict=False)  # a damaged index is skipped, as a trace skips it
        return cls(fed=fed, tokenizer=tok_lib.load_tokenizer(ws), bow=np.asarray(tok_lib.read_bow_ids(ws)))

    def longest(self, text: str, min_match: int) -> dict:
        """The item's longest verbatim match in each source, in tokens, and whether it is flagged."""
        ids = check_ids(self.tokenizer(text, add_special_tokens=False)["input_ids"], "the item's ids", self.fed.max_id)
        best = (0, None, 0)  # (length, source, start)
        per = []
        for name, ix in self.fed.indexes.items():
            try:
                m = ix.matches(ids, [], self.bow, True)
            except FlexolmoError:  # an owner node down: this source is not counted for this item
                per.append({"source": name, "longest": 0, "count": 0, "available": False})
                continue
            lengths = np.asarray(m.lengths, dtype=np.int64)
            at = int(lengths.argmax()) if lengths.size else 0
            n = int(lengths[at]) if lengths.size else 0
            per.append({"source": name, "longest": n, "count": int(m.counts[at]) if n else 0, "available": True})
            if n > best[0]:
                best = (n, name, at)
        n, src, at = best
        return {"n_tokens": len(ids), "longest": n, "longest_source": src,
                "longest_text": self.tokenizer.decode(ids[at: at + n]) if n else None,
                "flagged": n >= min_match, "sources": per}
