"""Imported once by the local pool's fork server (run.py), never by a worker or the driver: what
every forked worker would otherwise import and compile on its own before its first row.

The tracer's modules (index, relevance, the tokenizer class) and numba's typed lists of the
compiled search (compiled per process, about half a second) are in the fork server's memory,
and each worker forked from it starts with them.
"""

import numpy as np
from numba.typed import List
from transformers import PreTrainedTokenizerFast  # noqa: F401 (load_tokenizer's class)

from ..trace import Tracer  # noqa: F401
from .contamination import ItemMatcher  # noqa: F401

_warm = List()
_warm.append(np.zeros(1, dtype=np.uint8))  # the type the search's shard lists hold (index/search.py Shards)
