"""The shared tokenizer: a byte-level BPE trained on the public source only, or one brought
in from a plain Hugging Face folder (`flexolmo tokenizer import DIR`, flexolmo/base/hf_import.py).

The tokenizer is public, like the public model: every owner tokenizes with it, and every
index stores its ids: as u16 when the vocabulary holds at most 65,535 ids (0xFFFF stays free:
infini-gram's document separator), as u32 beyond (`ids_dtype`; real tokenizers such as OLMo 2's
dolma2 have 100,352 ids).

Files in `<workspace>/tokenizer/`:
    tokenizer.json      loadable by `tokenizers.Tokenizer` and `transformers.PreTrainedTokenizerFast`
    bow_ids.txt         one id per line: the ids that begin a word (their text starts with
                        whitespace: byte-level `Ġ`, sentencepiece `▁`); tracing uses it for
                        infini-gram's `enforce_bow`
    delimiter_ids.txt   one id per line: the ids a span is cut after (a newline inside, or '.')
    card.json           `flexolmo.base.artifacts.tokenizer.TokenizerCard`: inputs (source content, size),
                        vocabulary size, special ids, file hashes, where it was imported from
    token_bytes.bin     the raw bytes of every id (flexolmo/base/pieces.py), for decoding windows
                        without rebuilding the table in every process: written when the tokenizer
                        is trained or imported and by `index build` when missing; it opens with
                        the sha256 of the tokenizer.json it was made from and is ignored (the
                        table rebuilt in memory) when that is not tokenizer.json's (`stored_token_bytes`)

Whitespace runs (`whitespace_runs=True`, `--whitespace-runs`): a BPE learned from public text
with almost no indentation (the encyclopedia-only public source before run G) has no token for
two spaces, and an owner's code or math is tokenized one space at a time (single-space tokens
were 34% of the code source's tokens and 23% of math's). The option adds merges for runs of 2,
4, 8 and 16 spaces and 2 and 4 tabs, ahead of every learned merge, within the same vocabulary
size, skipping runs the BPE learned itself. They do not depend on any data (GPT-NeoX and OLMo's
tokenizers carry such tokens too). The ByteLevel split leaves a run's last space on the next
word, so words keep their word-start form. Measured with the encyclopedia public source (run F,
docs/eval-diagnosis.md; bits per byte on the same bytes): code's own model gained 2.0%, the
merged model 1.4%, math's own model lost 7.9%. Not the default: the sample federation's public
source now holds man pages and Perl code (run G), and the BPE learns runs of spaces from them.

    python -m cli.main tokenizer train --vocab-size 8192
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import numpy as np

from flexolmo.base import pieces
from flexolmo.base.artifacts import tokenizer as artifact
from flexolmo.base.errors import ConflictError, InputError, IntegrityError, NotFoundError
from flexolmo.base.sources import get_source, iter_texts
from flexolmo.base.workspace import Workspace, atomic_dir, file_sha256

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
U16_VOCAB = 65535  # u16 ids 0..65534; 0xFFFF is infini-gram's document separator
MAX_VOCAB = 2**32 - 1  # u32 ids 0..2^32-2; 0xFFFFFFFF is the separator of u32 indexes
DEFAULT_VOCAB = 8192  # small embeddings keep the CPU model profiles fast
SPACE, TAB = "Ġ", "ĉ"  # the byte-level alphabet's space and tab
WHITESPACE_RUNS = {SPACE: (2, 4, 8, 16), TAB: (2, 4)}  # run lengths that get a token of their own


def ids_dtype(vocab_size: int) -> np.dtype:
    """The id type of a vocabulary: uint16 up to 65,535 ids, uint32 beyond (token caches, indexes)."""
    if not 0 < vocab_size <= MAX_VOCAB:
        raise InputError(f"a vocabulary of {vocab_size:,} ids does not fit an index (1..{MAX_VOCAB:,})")
    return np.dtype(np.uint16) if vocab_size <= U16_VOCAB else np.dtype(np.uint32)


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    vocab_size: int
    eos_id: int
    pad_id: int
    sha256: str
    n_bow: int
    source: str
    seconds: float


def train_tokenizer(
    ws: Workspace,
    vocab_size: int = DEFAULT_VOCAB,
    source: str = "public",
    texts: list[str] | None = None,
    force: bool = False,
    whitespace_runs: bool = False,
) -> TokenizerInfo:
    """Train the shared byte-level BPE on one source's train split and save it atomically.

    Every index and model depends on the tokenizer, so an existing one that is current (its
    card's inputs: the same source content and size) is kept unless `force`.

    :param texts: train on these texts instead (tests); `source` is then only recorded.
    :param whitespace_runs: add tokens for runs of spaces and tabs (module docstring), within `vocab_size`
    """
    n_runs = sum(len(v) for v in WHITESPACE_RUNS.values()) if whitespace_runs else 0
    if not 256 + len(SPECIAL_TOKENS) + n_runs < vocab_size <= MAX_VOCAB:
        raise InputError(f"--vocab-size {vocab_size} is out of range: use {257 + len(SPECIAL_TOKENS) + n_runs}..{MAX_VOCAB} "
                         "(u32 index ids; up to 65535 the indexes store u16 ids)")
    old = artifact.TokenizerCard.find(artifact.folder(ws)) if (artifact.folder(ws) / artifact.TOKENIZER_FILE).exists() else None
    if old is not None and old.imported_from and not force:
        raise ConflictError(f"this workspace's tokenizer was imported from {old.imported_from}; training would "
                            "replace it (and its indexes and models would need rebuilding): pass --force")
    settings = {"vocab_size": vocab_size, **({"whitespace_runs": WHITESPACE_RUNS} if whitespace_runs else {})}
    if texts is None:
        src = get_source(ws, source)
        inputs = artifact.inputs_for(src.content_hash, settings)
        card = artifact.TokenizerCard.find(artifact.folder(ws)) if not force else None
        if card is not None and card.is_current(inputs):
            return tokenizer_info(ws)
        texts = list(iter_texts(ws, source, split="train"))
    else:
        inputs = artifact.texts_inputs(texts, settings)
    if not texts:
        raise InputError(f"source {source!r} has no training text to learn a tokenizer from")
    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_runs,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if whitespace_runs:
        tok = with_whitespace_runs(tok)
    bow, delims = bow_ids(tok), pieces.delimiter_ids(tok)
    card = dict(
        inputs=inputs, vocab_size=tok.get_vocab_size(), eos_token=EOS_TOKEN, eos_id=tok.token_to_id(EOS_TOKEN),
        pad_token=PAD_TOKEN, pad_id=tok.token_to_id(PAD_TOKEN), trained_on=source, n_texts=len(texts),
        n_bow_ids=len(bow), seconds=round(time.time() - t0, 2),
        whitespace_runs={"space": list(WHITESPACE_RUNS[SPACE]), "tab": list(WHITESPACE_RUNS[TAB])} if whitespace_runs else {},
    )
    artifact.write(ws, tok, bow, card, check_text=texts[0][:2000], delims=delims)
    ensure_token_bytes(ws)
    return tokenizer_info(ws)


def with_whitespace_runs(tok: Tokenizer) -> Tokenizer:
    """`tok` with merges for the runs in `WHITESPACE_RUNS` ahead of its own (each run of n from two
    runs of n/2), their tokens appended to the vocabulary; every existing id keeps its number.
    A run the BPE learned itself (a public source with indentation) keeps its learned merge."""
    import json

    spec = json.loads(tok.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    new = []
    for ch, lengths in WHITESPACE_RUNS.items():
        for n in lengths:  # increasing: the half of every run is in the vocabulary by then
            if ch * n not in vocab:
                new.append([ch * (n // 2)] * 2)
                vocab[ch * n] = len(vocab)
    spec["model"]["merges"] = new + merges
    return Tokenizer.from_str(json.dumps(spec))


def bow_ids(tok: Tokenizer) -> list[int]:
    """Ids whose text begins with whitespace (a new word), plus the special tokens."""
    return pieces.word_start_ids(tok)


def _require(ws: Workspace) -> Path:
    path = artifact.folder(ws) / artifact.TOKENIZER_FILE
    if not path.exists():
        raise NotFoundError(f"no tokenizer in {ws.tokenizer_dir}; run `flexolmo tokenizer train` first")
    return path


def tokenizer_info(ws: Workspace) -> TokenizerInfo:
    path = _require(ws)
    card = artifact.read(ws)
    return TokenizerInfo(path=path, vocab_size=card.vocab_size, eos_id=card.eos_id, pad_id=card.pad_id,
                         sha256=card.sha256, n_bow=card.n_bow_ids, source=card.trained_on, seconds=card.seconds)


def tokenizer_hash(ws: Workspace) -> str:
    """sha256 of tokenizer.json as it is on disk now (indexes record it to detect staleness)."""
    return file_sha256(_require(ws))


def load_raw_tokenizer(ws: Workspace) -> Tokenizer:
    """The fast `tokenizers.Tokenizer` (batch encoding in Rust, across cores)."""
    return Tokenizer.from_file(str(_require(ws)))


def load_tokenizer(ws_or_dir: Workspace | Path):
    """The shared tokenizer as a `transformers.PreTrainedTokenizerFast` (eos and pad as its card names them)."""
    from transformers import PreTrainedTokenizerFast

    folder = artifact.folder(ws_or_dir) if isinstance(ws_or_dir, Workspace) else Path(ws_or_dir)
    path = folder / artifact.TOKENIZER_FILE
    if not path.exists():
        raise NotFoundError(f"no tokenizer in {folder}; run `flexolmo tokenizer train` first")
    card = artifact.TokenizerCard.find(folder)
    eos, pad = (card.eos_token, card.pad_token) if card is not None else (EOS_TOKEN, PAD_TOKEN)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=eos, pad_token=pad)
    digest = card.sha256 if card is not None else None
    tok.flexolmo_token_bytes = lambda: stored_token_bytes(folder, digest)  # read by index/snippets.py when first needed
    return tok


TOKEN_BYTES_FILE = "token_bytes.bin"
TOKEN_BYTES_MAGIC = b"flexolmo-token-bytes-1\n"


def write_token_bytes(folder: Path, tok, digest: str) -> Path:
    """Write `folder/token_bytes.bin` for `tok` (whose tokenizer.json has sha256 `digest`), atomically:
    magic, the digest (64 hex digits and a newline), the id count (u64), offsets (u64, count + 1), bytes."""
    table = pieces.token_bytes(tok)
    offsets = np.zeros(len(table) + 1, dtype="<u8")
    offsets[1:] = np.cumsum([len(b) for b in table])
    out = folder / TOKEN_BYTES_FILE
    tmp = folder / f".{TOKEN_BYTES_FILE}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"  # concurrent builds each write their own
    with open(tmp, "wb") as f:
        f.write(TOKEN_BYTES_MAGIC + digest.encode() + b"\n")
        f.write(np.array([len(table)], dtype="<u8").tobytes() + offsets.tobytes() + b"".join(table))
    tmp.replace(out)
    return out


class StoredTokenBytes(Sequence):
    """id -> bytes over token_bytes.bin's offsets and bytes, sliced when asked (no per-id objects
    made at load: a trace reads a few thousand ids of a 100k vocabulary)."""

    def __init__(self, offsets: np.ndarray, blob: bytes) -> None:
        self._off, self._blob = offsets, blob

    def __len__(self) -> int:
        return len(self._off) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._blob[self._off[i]: self._off[i + 1]]


def stored_token_bytes(folder: Path, digest: str | None = None) -> StoredTokenBytes | None:
    """The byte table of `folder`'s tokenizer from token_bytes.bin; None when the file is missing,
    damaged or made from another tokenizer.json (the caller then builds it: `pieces.token_bytes`).

    :param digest: tokenizer.json's sha256 as its card records it (the loader has read the card);
        None: hashed here.
    """
    path = Path(folder) / TOKEN_BYTES_FILE
    try:
        data = path.read_bytes()
        digest = digest or file_sha256(Path(folder) / artifact.TOKENIZER_FILE)
    except OSError:
        return None
    head = len(TOKEN_BYTES_MAGIC) + 65
    if len(data) < head + 8 or data[: head] != TOKEN_BYTES_MAGIC + digest.encode() + b"\n":
        return None
    n = int(np.frombuffer(data, dtype="<u8", count=1, offset=head)[0])
    start = head + 8 + 8 * (n + 1)
    if start > len(data):
        return None
    offsets = np.frombuffer(data, dtype="<u8", count=n + 1, offset=head + 8).astype(np.int64)
    if int(offsets[-1]) != len(data) - start or np.any(np.diff(offsets) < 0):
        return None
    return StoredTokenBytes(offsets.tolist(), data[start:])


def ensure_token_bytes(ws: Workspace) -> None:
    """Write the workspace tokenizer's token_bytes.bin unless a current one is there."""
    folder = artifact.folder(ws)
    if stored_token_bytes(folder) is None:
        write_token_bytes(folder, Tokenizer.from_file(str(_require(ws))), tokenizer_hash(ws))


def read_bow_ids(ws: Workspace) -> list[int]:
    _require(ws)
    return [int(x) for x in (artifact.folder(ws) / artifact.BOW_FILE).read_text().split()]


def read_delimiter_ids(ws: Workspace) -> list[int]:
    """The ids a span is cut after: every token whose text holds a newline, and '.'.

    Read from delimiter_ids.txt; a tokenizer folder written before that file existed gets
    them derived from tokenizer.json by the same rule (flexolmo/base/pieces.py)."""
    path = _require(ws)
    f = artifact.folder(ws) / artifact.DELIM_FILE
    if f.exists():
        return [int(x) for x in f.read_text().split()]
    return pieces.delimiter_ids(Tokenizer.from_file(str(path)))


def import_tokenizer(w: Workspace, folder: Path, force: bool = False) -> TokenizerInfo:
    """Bring a tokenizer folder into the workspace atomically, after checking it can be used.

    Either the `tokenizer/` folder of another flexolmo workspace (its card reads, tokenizer.json
    has the card's hash, bow_ids.txt holds ids of its vocabulary), or a plain Hugging Face
    folder (tokenizer.json + tokenizer_config.json / special_tokens_map.json, no card.json):
    eos, pad, word starts and delimiters are then derived from it (flexolmo/base/hf_import.py).
    """
    folder = Path(folder)
    if not (folder / artifact.TOKENIZER_FILE).is_file():
        raise InputError(f"{folder} is not a tokenizer folder: it has no {artifact.TOKENIZER_FILE} (give a "
                         "Hugging Face tokenizer folder as `save_pretrained` writes it, or the `tokenizer/` "
                         "folder of the shared workspace)")
    if (folder / "card.json").is_file():
        _, bow, delims, card = _project_folder(folder)
    else:
        from flexolmo.base.hf_import import read_folder

        got = read_folder(folder, MAX_VOCAB)
        bow, delims = got.bow, got.delims
        card = {**got.card, "inputs": {"tokenizer_json": file_sha256(folder / artifact.TOKENIZER_FILE)}}
    digest = file_sha256(folder / artifact.TOKENIZER_FILE)
    current = artifact.TokenizerCard.find(artifact.folder(w)) if (artifact.folder(w) / artifact.TOKENIZER_FILE).exists() else None
    if current is not None and tokenizer_hash(w) != digest and not force:
        raise ConflictError(f"this workspace already has another tokenizer ({tokenizer_hash(w)[:12]}, the "
                            f"import is {digest[:12]}); its indexes and models would need rebuilding: pass --force")
    with atomic_dir(artifact.folder(w)) as tmp:
        # tokenizer.json is copied byte for byte: its sha256 is the tokenizer's identity
        shutil.copyfile(folder / artifact.TOKENIZER_FILE, tmp / artifact.TOKENIZER_FILE)
        (tmp / artifact.BOW_FILE).write_text("".join(f"{i}\n" for i in bow))
        (tmp / artifact.DELIM_FILE).write_text("".join(f"{i}\n" for i in delims))
        names = (artifact.TOKENIZER_FILE, artifact.BOW_FILE, artifact.DELIM_FILE)
        files = {**card.pop("files", {}), **{n: file_sha256(tmp / n) for n in names}}
        artifact.TokenizerCard(**{**card, "n_delimiter_ids": len(delims)}, files=files).save(tmp)
        if file_sha256(tmp / artifact.TOKENIZER_FILE) != digest:
            raise IntegrityError("the copied tokenizer.json differs from the original; nothing was imported")
    ensure_token_bytes(w)
    return tokenizer_info(w)


def _project_folder(folder: Path) -> tuple[Tokenizer, list[int], list[int], dict]:
    """A flexolmo workspace's tokenizer folder, checked against its card: (tok, bow, delims, card fields)."""
    if not (folder / artifact.BOW_FILE).is_file():
        raise InputError(f"{folder} is not a tokenizer folder: it has card.json but no {artifact.BOW_FILE} "
                         "(copy the whole folder `tokenizer/` of the shared workspace)")
    card = artifact.TokenizerCard.read(folder)  # NotFoundError/OutdatedError say what is wrong
    digest = file_sha256(folder / artifact.TOKENIZER_FILE)
    if digest != card.sha256:
        raise IntegrityError(f"{folder / artifact.TOKENIZER_FILE} has sha256 {digest}, its card says {card.sha256}: "
                             "the folder was altered or mixed up; copy it again")
    for name in (artifact.BOW_FILE, artifact.DELIM_FILE):
        if card.files.get(name) not in (None, file_sha256(folder / name) if (folder / name).exists() else None):
            raise IntegrityError(f"{folder / name} does not match its card; copy the folder again")
    try:
        tok = Tokenizer.from_file(str(folder / artifact.TOKENIZER_FILE))
        bow = [int(x) for x in (folder / artifact.BOW_FILE).read_text().split()]
    except Exception as e:  # tokenizers raises its own exception type
        raise InputError(f"{folder} is not a tokenizer folder: it does not load ({str(e)[:200]})") from None
    if tok.get_vocab_size() != card.vocab_size or tok.get_vocab_size() > MAX_VOCAB \
            or any(not 0 <= i < card.vocab_size for i in bow):
        raise InputError(f"{folder}: vocabulary size or word-start ids disagree with the card (or exceed u32 ids)")
    delim_file = folder / artifact.DELIM_FILE
    delims = [int(x) for x in delim_file.read_text().split()] if delim_file.exists() else pieces.delimiter_ids(tok)
    return tok, bow, delims, card.model_dump()
