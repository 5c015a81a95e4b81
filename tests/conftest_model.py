"""Shared fixtures for the model tests: a tiny federation built in a temporary folder.

Imported by tests/test_model*.py (`from conftest_model import ...`); tests/conftest.py is
owned elsewhere and left alone.
"""

from __future__ import annotations

import random
from pathlib import Path

from flexolmo.base.sources import add_records
from flexolmo.base.tokenizer import train_tokenizer
from flexolmo.base.workspace import Workspace

WORDS = {
    "public": "the a of and to in is was for on with as by history city river people world year king war science".split(),
    "news": "president congress nation economy policy tax vote law union state budget report senate".split(),
    "code": "def return import class self if else for while print list dict value none true false".split(),
    "math": "theorem proof lemma set function integer prime sum equal implies axiom group ring".split(),
}


def _docs(source: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = WORDS[source]
    out = []
    for i in range(n):
        sent = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        out.append({"doc_id": f"{source}-{i}", "text": sent.capitalize() + "."})
    return out


def build_federation(root: Path, sources=("public", "news", "code"), n_docs: int = 60, vocab_size: int = 400) -> Workspace:
    ws = Workspace(Path(root)).ensure()
    for k, name in enumerate(sources):
        add_records(ws, name, _docs(name, n_docs, seed=k), owner=f"{name}-owner", domain=name, licence="CC0", origin="test")
    texts = [d["text"] for name in sources for d in _docs(name, n_docs, seed=sources.index(name))]
    train_tokenizer(ws, vocab_size=vocab_size, texts=texts)
    return ws


def build_served_federation(root: Path, sources=("public", "news", "code"), n_docs: int = 30) -> Workspace:
    """A tiny federation ready to serve: public model, one expert per owner, merged, every
    source indexed (the API, service and browser tests share it)."""
    from flexolmo.model.merge import merge
    from flexolmo.model.train import train_expert, train_public
    from index.build import build_source

    ws = build_federation(root, sources=sources, n_docs=n_docs)
    owners = [s for s in sources if s != "public"]
    train_public(ws, "tiny", progress=False)
    for s in owners:
        train_expert(ws, s, "tiny", progress=False)
    merge(ws, owners)
    for s in sources:
        build_source(ws, s)
    return ws
