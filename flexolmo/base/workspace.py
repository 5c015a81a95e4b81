"""The workspace: one folder that holds everything a federation produces.

    <workspace>/                    --workspace, else $FLEXOLMO_HOME, else ./flexolmo-work
      catalog.duckdb                sources, policy changes, index builds, takedowns
      sources/<name>/documents.parquet
      sources/<name>/tokens-<split>-<hash>/   ids tokenized once per tokenizer (flexolmo/base/tokens.py)
      tokenizer/tokenizer.json      shared byte-level BPE (+ bow_ids.txt, card.json)
      models/public/                public model (HF checkpoint + card.json)
      models/merged/                merged FlexOlmo checkpoint
      experts/<name>/               expert packages (weights + card), one per source
      indexes/<name>/               infini-gram index of a source's train split
      traces/manifest.json, parts/  stored traces: append-only Parquet parts (tracing/provenance/parts.py)
      cache/                        downloaded packages for the sample federation

Every writer builds into a temporary sibling and renames it into place (`atomic_dir`),
so an interrupted command never leaves a half-written folder where a reader looks.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ENV_VAR = "FLEXOLMO_HOME"
DEFAULT_DIR = "flexolmo-work"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> "Workspace":
        """--workspace if given, else $FLEXOLMO_HOME, else ./flexolmo-work."""
        chosen = path or os.environ.get(ENV_VAR) or DEFAULT_DIR
        return cls(Path(chosen).expanduser().resolve())

    def ensure(self) -> "Workspace":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def sources_dir(self) -> Path:
        return self.root / "sources"

    def source_dir(self, name: str) -> Path:
        return self.sources_dir / name

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def experts_dir(self) -> Path:
        return self.root / "experts"

    @property
    def indexes_dir(self) -> Path:
        return self.root / "indexes"

    @property
    def traces_path(self) -> Path:
        return self.root / "traces" / "provenance.duckdb"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; on success it replaces `final`.

    On an exception (or a kill) the temporary folder is removed or left as an ignorable
    `.tmp-*` sibling, and `final` keeps its previous content.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(src: Path, final: Path) -> None:
    """Move folder `src` to `final`, replacing what was there.

    Where the kernel offers it (Linux renameat2 RENAME_EXCHANGE) the two folders swap in
    one atomic step, so a reader always finds either the old or the new folder at `final`;
    elsewhere two renames, with a brief moment between them where `final` is missing.
    """
    if not final.exists():
        os.rename(src, final)
        return
    if _exchange(src, final):
        shutil.rmtree(src, ignore_errors=True)  # `src` now holds the previous content
        return
    old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
    os.rename(final, old)
    os.rename(src, final)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 with RENAME_EXCHANGE); False if unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE) == 0


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def current_user() -> str:
    """Who runs this command, for the catalog's who-and-when records."""
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"

