"""Small corpora for the search and relevance tests: prose with a Zipf-like vocabulary, and
code whose lines are indented (so the byte-level BPE learns tokens like "\\n    ")."""

from __future__ import annotations

import random
from pathlib import Path

from flexolmo.base import sources, tokenizer
from flexolmo.base.workspace import Workspace
from index import build

COMMON = "the of and to in is was for on with as by at from".split()


def prose_docs(name: str, n: int, seed: int, vocab: int = 600) -> list[dict]:
    """Sentences of common words and of `name`'s own rarer words (Zipf-like ranks)."""
    rng = random.Random(seed)
    own = [f"{name}{i}" for i in range(vocab)]
    weights = [1 / (r + 1) for r in range(vocab)]
    out = []
    for i in range(n):
        sents = []
        for _ in range(rng.randint(4, 12)):
            words = [rng.choice(COMMON) if rng.random() < 0.35 else rng.choices(own, weights)[0]
                     for _ in range(rng.randint(6, 16))]
            sents.append(" ".join(words).capitalize() + ".")
        out.append({"doc_id": f"{name}-{i}", "title": f"{name} {i}", "text": " ".join(sents)})
    return out


def code_docs(n: int, seed: int) -> list[dict]:
    """Python-like functions: indented lines, blank lines, punctuation-heavy statements."""
    rng = random.Random(seed)
    names = [f"var{i}" for i in range(80)]
    out = []
    for i in range(n):
        lines = []
        for f in range(rng.randint(2, 5)):
            a, b = rng.sample(names, 2)
            lines.append(f"def fn{i}_{f}({a}, {b}):")
            for _ in range(rng.randint(2, 6)):
                x, y = rng.sample(names, 2)
                lines.append(rng.choice([f"    {x} = {y} + 1", f"    if {x}:", f"        return {y}",
                                         f"    {x}.append({y})", f"    print({x}, {y})", "    pass"]))
            lines.append("")
        out.append({"doc_id": f"code-{i}", "title": f"code {i}", "text": "\n".join(lines)})
    return out


def build_workspace(root: Path, n_docs: int = 80) -> Workspace:
    """Sources 'public' and 'news' (prose) and 'code', a tokenizer trained on them, indexes built."""
    ws = Workspace(Path(root))
    corpora = {"public": prose_docs("pub", n_docs, 1), "news": prose_docs("news", n_docs, 2), "code": code_docs(n_docs, 3)}
    for name, docs in corpora.items():
        sources.add_records(ws, name, docs, owner="o", domain=name, licence="CC0", origin="test")
    tokenizer.train_tokenizer(ws, vocab_size=600, texts=[d["text"] for docs in corpora.values() for d in docs])
    for name in corpora:
        build.build_source(ws, name)
    return ws


WORDS = "the a of to and in is was it for on that with as by at from an be this which or are had".split() + [
    f"w{i}" for i in range(150)]


def word_text(rng: random.Random, sentences: int) -> str:
    """Sentences of random words, ending in '.', '.\n', ',' or nothing (the span search's tests)."""
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([". ", ".\n", ", ", " "])
                   for _ in range(sentences))


def word_records(name: str, rng: random.Random, n_docs: int, max_sentences: int) -> list[dict]:
    return [{"doc_id": f"{name}{i}", "title": f"{name} title {i}", "text": word_text(rng, rng.randint(5, max_sentences))}
            for i in range(n_docs)]
