"""Tokenizer folders as Hugging Face writes them, built here (never downloaded), for the import
and u32-index tests:

    byte_level_folder(path, texts)    a byte-level BPE of N_IDS (> 65,535) ids: a small BPE trained on
                                      `texts`, its tokens moved to ids spread over [0, N_IDS) (one at
                                      0xFFFF, the u16 separator, one at 0x1FFFF), the rest unreachable
                                      fillers; no pad token
    metaspace_folder(path, texts)     a SentencePiece-style BPE (Metaspace '▁', byte fallback <0x0A>)
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

N_IDS = 131_200  # ids 0..131,199: u32 indexes
EOS = "<|endoftext|>"


def _save(tok: Tokenizer, path: Path, **special) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(str(path))
    return path


def byte_level_folder(path: Path, texts: list[str], n_ids: int = N_IDS) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=[EOS], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    by_old = sorted(vocab, key=vocab.get)
    # a permutation of [0, n_ids) (7919 is prime to n_ids); the two most frequent word tokens get the ids whose
    # bytes look like separators to a u16 reader
    new = {t: (i * 7919 + 255) % n_ids for i, t in enumerate(by_old)}
    enc = tok.encode(" ".join(texts[:50])).ids
    common = sorted(set(enc), key=lambda i: -enc.count(i))[:2]
    for want, old in zip((0xFFFF, 0x1FFFF), common):
        t = by_old[old]
        holder = next((k for k, v in new.items() if v == want), None)
        if holder is not None:
            new[holder] = new[t]
        new[t] = want
    used = set(new.values())
    fillers = {f"<unused{i}>": i for i in range(n_ids) if i not in used}
    spec["model"]["vocab"] = {**new, **fillers}
    for a in spec["added_tokens"]:
        a["id"] = new[a["content"]]
    return _save(Tokenizer.from_str(json.dumps(spec)), path, eos_token=EOS)


def metaspace_folder(path: Path, texts: list[str]) -> Path:
    """Trained without newlines, so a newline is spelled by byte fallback (<0x0A>), as in Llama-2's."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    tok.train_from_iterator([t.replace("\n", " ") for t in texts],
                            trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte tokens live in the model's vocabulary (not added tokens), as SentencePiece's do
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return _save(Tokenizer.from_str(json.dumps(spec)), path, eos_token="</s>", pad_token="<pad>", bos_token="<s>",
                 unk_token="<unk>")
